// Flat parameter buffers and the optimizers' updates (see optimizers.h).
#include "optim/optimizers.h"

#include <malloc.h>

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
  grads_ = Tensor::zeros({total}, first.dtype(), first.device());
  int64_t offset = 0;
  for (auto& [name, p] : named_) {
    Tensor value = values_.view_range(offset, p.shape());
    value.copy_(p);
    p.rebind_storage(value);  // the model's handle now reads and writes the flat buffer
    p.set_grad(grads_.view_range(offset, p.shape()));
    offset += p.numel();
  }
  // The parameters' former storage was just freed: hand it back to the system rather than keep it
  // resident next to its copy (ResNet50's 114 MB and the allocator's slack; measured by bench_model).
  malloc_trim(0);
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
      .rmsprop_step(parameters_.values(), parameters_.grads(), square_avg_, lr, options_.alpha, options_.eps,
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
      .sgd_step(parameters_.values(), parameters_.grads(), momentum_buffer_, lr, options_.momentum,
                options_.weight_decay, steps_ == 0);
}

}  // namespace mdff
