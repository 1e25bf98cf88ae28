// Flat parameter buffers and the optimizers' updates (see optimizers.h).
#include "optim/optimizers.h"

#include <malloc.h>

#include <algorithm>
#include <cstring>

#include "core/backend.h"
#include "core/error.h"

namespace mdff {

ParameterBuffer::ParameterBuffer(const NamedTensors& parameters) : named_(parameters) {
  MDFF_CHECK(!parameters.empty(), "ParameterBuffer: no parameters");
  const Tensor& first = parameters.front().second;
  int64_t total = 0;
  for (const auto& [name, p] : parameters) {
    MDFF_CHECK(p.device() == first.device() && p.dtype() == first.dtype(), "ParameterBuffer: parameter ", name,
               " is a ", dtype_name(p.dtype()), " tensor on ", device_name(p.device()), ", unlike the others");
    total += p.numel();
  }
  values_ = Tensor::empty({total}, first.dtype(), first.device());
  int64_t offset = 0;
  for (auto& [name, p] : named_) {
    Tensor value = values_.view_range(offset, p.shape());
    value.copy_(p);
    p.rebind_storage(value);  // the model's handle now reads and writes the flat buffer
    offsets_.push_back(offset);
    offset += p.numel();
  }
  zero_grad();
  // The parameters' former storage was just freed: hand it back to the system rather than keep it
  // resident next to its copy (ResNet50's 114 MB and the allocator's slack; measured by bench_model).
  malloc_trim(0);
}

namespace {
// The index of the first NaN or infinity among `count` floating-point numbers whose bits are read as
// Bits (uint32_t for float, uint64_t for double), or -1. NaN and infinity are the values whose
// exponent bits are all ones, the largest the exponent bits can be: the first pass takes the maximum of
// everyone's exponent bits, a loop the compiler vectorises (it runs at the speed of a memory read); the
// second runs only when there is one to find.
template <class Bits>
int64_t find_non_finite(const void* data, int64_t count, Bits exponent) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  auto exponent_bits = [&](int64_t i) {
    Bits bits;
    std::memcpy(&bits, bytes + i * sizeof(Bits), sizeof(Bits));
    return bits & exponent;
  };
  Bits largest = 0;
  for (int64_t i = 0; i < count; ++i) largest = std::max(largest, exponent_bits(i));
  if (largest != exponent) return -1;
  int64_t i = 0;
  while (exponent_bits(i) != exponent) ++i;
  return i;
}

// The first NaN or infinity of `tensor` (any shape, row-major) as {"", index, value}, or nullopt.
std::optional<NonFinite> find_in(const Tensor& tensor) {
  const Tensor host = tensor.cpu();  // tensors are always contiguous
  MDFF_CHECK(host.dtype() == DType::F32 || host.dtype() == DType::F64, "looking for NaN: a ",
             dtype_name(host.dtype()), " tensor is not floating point");
  const bool single = host.dtype() == DType::F32;
  const int64_t at = single ? find_non_finite(host.raw(), host.numel(), uint32_t{0x7f800000})
                            : find_non_finite(host.raw(), host.numel(), uint64_t{0x7ff0000000000000});
  if (at < 0) return std::nullopt;
  const double value = single ? static_cast<const float*>(host.raw())[at] : static_cast<const double*>(host.raw())[at];
  return NonFinite{"", at, value};
}
}  // namespace

std::optional<NonFinite> first_non_finite(const NamedTensors& tensors) {
  for (const auto& [name, tensor] : tensors) {
    if (std::optional<NonFinite> bad = find_in(tensor)) {
      bad->name = name;
      return bad;
    }
  }
  return std::nullopt;
}

std::vector<GradientSlice> ParameterBuffer::gradients() const {
  std::vector<GradientSlice> slices;
  for (size_t k = 0; k < named_.size(); ++k) {
    const Tensor grad = named_[k].second.grad();
    if (!grad.defined()) continue;
    MDFF_CHECK(grad.dtype() == values_.dtype() && grad.device() == values_.device(), "the gradient of ",
               named_[k].first, " is a ", dtype_name(grad.dtype()), " tensor on ", device_name(grad.device()),
               ", unlike its parameter (", dtype_name(values_.dtype()), " on ", device_name(values_.device()), ")");
    slices.push_back({grad, offsets_[k]});
  }
  return slices;
}

std::vector<Tensor> ParameterBuffer::grads() const {
  std::vector<Tensor> tensors;
  for (const GradientSlice& slice : gradients()) tensors.push_back(slice.grad);
  return tensors;
}

void ParameterBuffer::zero_grad() {
  for (auto& [name, p] : named_) p.clear_grad();
}

std::optional<NonFinite> ParameterBuffer::first_non_finite_grad() const {
  NamedTensors grads;
  for (const auto& [name, p] : named_)
    if (p.grad().defined()) grads.emplace_back(name, p.grad());
  return first_non_finite(grads);
}

std::optional<NonFinite> ParameterBuffer::first_non_finite_value() const {
  std::optional<NonFinite> bad = find_in(values_);
  if (!bad) return bad;
  size_t k = 0;  // the parameter holding the element: the views cover the buffer in order
  while (bad->index >= named_[k].second.numel()) bad->index -= named_[k++].second.numel();
  bad->name = named_[k].first;
  return bad;
}

RMSProp::RMSProp(ParameterBuffer& parameters, const RMSPropOptions& options)
    : Optimizer(parameters), options_(options) {
  MDFF_CHECK(options.lr > 0 && options.alpha >= 0 && options.alpha < 1 && options.eps > 0 && options.weight_decay >= 0,
             "RMSProp: lr ", options.lr, ", alpha ", options.alpha, ", eps ", options.eps, ", weight decay ",
             options.weight_decay, " out of range (lr > 0, 0 <= alpha < 1, eps > 0, weight decay >= 0)");
  lr = options.lr;
  square_avg_ = Tensor::zeros({parameters.numel()}, parameters.values().dtype(), parameters.values().device());
}

void RMSProp::update() {
  backend_of(parameters_.values())
      .rmsprop_step(parameters_.values(), parameters_.gradients(), square_avg_, lr, options_.alpha, options_.eps,
                    options_.weight_decay);
}

Sgd::Sgd(ParameterBuffer& parameters, const SgdOptions& options) : Optimizer(parameters), options_(options) {
  MDFF_CHECK(options.lr > 0 && options.momentum >= 0 && options.weight_decay >= 0, "SGD: lr ", options.lr,
             ", momentum ", options.momentum, ", weight decay ", options.weight_decay,
             " out of range (lr > 0, momentum >= 0, weight decay >= 0)");
  lr = options.lr;
  momentum_buffer_ = Tensor::zeros({parameters.numel()}, parameters.values().dtype(), parameters.values().device());
}

void Sgd::update() {
  backend_of(parameters_.values())
      .sgd_step(parameters_.values(), parameters_.gradients(), momentum_buffer_, lr, options_.momentum,
                options_.weight_decay, steps_ == 0);
}

}  // namespace mdff
