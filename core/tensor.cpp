// Tensor creation, conversion, copies and views (see tensor.h). Device work goes through backend().
#include "core/tensor.h"

#include <cstring>

#include "core/autograd.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/rng.h"

namespace mdff {

Storage::Storage(size_t bytes_, Device device_) : bytes(bytes_), device(device_) {
  data = backend(device).allocate(bytes);
}

Storage::~Storage() {
  if (data) backend(device).deallocate(data, bytes);
}

namespace {
const TensorImpl& checked(const std::shared_ptr<TensorImpl>& impl) {
  MDFF_CHECK(impl, "use of an undefined tensor (default-constructed, or a gradient that was never computed)");
  return *impl;
}

// Writes `values` (doubles) into a fresh CPU tensor of `dtype`.
Tensor host_tensor_from(const std::vector<double>& values, const Shape& shape, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype, Device::CPU);
  const int64_t n = t.numel();
  switch (dtype) {
    case DType::F32: for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = static_cast<float>(values[i]); break;
    case DType::F64: std::memcpy(t.raw(), values.data(), n * sizeof(double)); break;
    case DType::I32: for (int64_t i = 0; i < n; ++i) t.data<int32_t>()[i] = static_cast<int32_t>(values[i]); break;
  }
  return t;
}
}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) MDFF_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape));
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<Storage>(static_cast<size_t>(mdff::numel(shape)) * dtype_size(dtype), device);
  impl->shape = shape;
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::from_vector(const std::vector<double>& values, const Shape& shape, DType dtype, Device device) {
  MDFF_CHECK(static_cast<int64_t>(values.size()) == mdff::numel(shape), "from_vector: ", values.size(),
             " values do not fill shape ", shape_str(shape));
  return host_tensor_from(values, shape, dtype).to(device);
}

Tensor Tensor::from_vector(const std::vector<float>& values, const Shape& shape, Device device) {
  return from_vector(std::vector<double>(values.begin(), values.end()), shape, DType::F32, device);
}

Tensor Tensor::from_vector(const std::vector<int32_t>& values, const Shape& shape, Device device) {
  return from_vector(std::vector<double>(values.begin(), values.end()), shape, DType::I32, device);
}

Tensor Tensor::randn(const Shape& shape, Rng& rng, double std, DType dtype, Device device) {
  std::vector<double> values(static_cast<size_t>(mdff::numel(shape)));
  for (double& v : values) v = std * rng.normal();
  return from_vector(values, shape, dtype, device);
}

Tensor Tensor::uniform(const Shape& shape, Rng& rng, double low, double high, DType dtype, Device device) {
  std::vector<double> values(static_cast<size_t>(mdff::numel(shape)));
  for (double& v : values) v = rng.uniform(low, high);
  return from_vector(values, shape, dtype, device);
}

const Shape& Tensor::shape() const { return checked(impl_).shape; }

int64_t Tensor::size(int64_t d) const {
  const int64_t n = dim();
  MDFF_CHECK(d >= -n && d < n, "dimension ", d, " out of range for a tensor of shape ", shape_str(shape()));
  return shape()[d < 0 ? d + n : d];
}

DType Tensor::dtype() const { return checked(impl_).dtype; }
Device Tensor::device() const { return checked(impl_).storage->device; }

void* Tensor::raw() const {
  const TensorImpl& impl = checked(impl_);
  return static_cast<char*>(impl.storage->data) + impl.offset_bytes;
}

template <class T>
T* Tensor::data() const {
  constexpr DType wanted = std::is_same_v<T, float> ? DType::F32 : std::is_same_v<T, double> ? DType::F64 : DType::I32;
  MDFF_CHECK(dtype() == wanted, "data<", dtype_name(wanted), ">() on a ", dtype_name(dtype()), " tensor");
  return static_cast<T*>(raw());
}
template float* Tensor::data<float>() const;
template double* Tensor::data<double>() const;
template int32_t* Tensor::data<int32_t>() const;

Tensor Tensor::to(Device target) const {
  if (device() == target) return *this;
  Tensor out = empty(shape(), dtype(), target);
  if (target == Device::CPU) backend(device()).copy_to_host(out.raw(), raw(), nbytes());
  else backend(target).copy_from_host(out.raw(), raw(), nbytes());
  return out;
}

Tensor Tensor::to(DType target) const {
  if (dtype() == target) return *this;
  MDFF_CHECK(is_floating(dtype()) && is_floating(target), "conversion from ", dtype_name(dtype()), " to ",
             dtype_name(target), " is not supported");
  Tensor out = empty(shape(), target, device());
  backend(device()).cast(*this, out);
  return out;
}

Tensor Tensor::clone() const {
  Tensor out = empty(shape(), dtype(), device());
  out.copy_(*this);
  return out;
}

void Tensor::copy_(const Tensor& src) {
  MDFF_CHECK(src.shape() == shape(), "copy_: source shape ", shape_str(src.shape()), " differs from ",
             shape_str(shape()));
  MDFF_CHECK(src.dtype() == dtype(), "copy_: source dtype ", dtype_name(src.dtype()), " differs from ",
             dtype_name(dtype()));
  if (src.device() == device()) backend(device()).copy_on_device(raw(), src.raw(), nbytes());
  else if (device() == Device::CPU) backend(src.device()).copy_to_host(raw(), src.raw(), nbytes());
  else backend(device()).copy_from_host(raw(), src.raw(), nbytes());
}

void Tensor::fill_(double value) { backend(device()).fill(*this, value); }

std::vector<double> Tensor::to_vector() const {
  const Tensor host = cpu();
  const int64_t n = numel();
  std::vector<double> values(static_cast<size_t>(n));
  switch (dtype()) {
    case DType::F32: for (int64_t i = 0; i < n; ++i) values[i] = host.data<float>()[i]; break;
    case DType::F64: for (int64_t i = 0; i < n; ++i) values[i] = host.data<double>()[i]; break;
    case DType::I32: for (int64_t i = 0; i < n; ++i) values[i] = host.data<int32_t>()[i]; break;
  }
  return values;
}

double Tensor::item() const {
  MDFF_CHECK(numel() == 1, "item() needs a one-element tensor, got shape ", shape_str(shape()));
  return to_vector()[0];
}

Tensor Tensor::reshape(const Shape& requested) const {
  Shape target = requested;
  int64_t known = 1, inferred = -1;
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i] == -1) {
      MDFF_CHECK(inferred < 0, "reshape: more than one -1 in ", shape_str(requested));
      inferred = static_cast<int64_t>(i);
    } else {
      known *= target[i];
    }
  }
  if (inferred >= 0 && known > 0) target[inferred] = numel() / known;
  MDFF_CHECK(mdff::numel(target) == numel(), "reshape: cannot view shape ", shape_str(shape()), " as ",
             shape_str(requested));
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = impl_->storage;
  impl->offset_bytes = impl_->offset_bytes;
  impl->shape = target;
  impl->dtype = impl_->dtype;
  const Shape original = shape();
  return record(Tensor(std::move(impl)), "reshape", {*this},
                [original](const Tensor& g) { return std::vector<Tensor>{g.reshape(original)}; });
}

Tensor Tensor::detach() const {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = checked(impl_).storage;
  impl->offset_bytes = impl_->offset_bytes;
  impl->shape = impl_->shape;
  impl->dtype = impl_->dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::view_range(int64_t offset, const Shape& shape) const {
  MDFF_CHECK(offset >= 0 && offset + mdff::numel(shape) <= numel(), "view_range: elements [", offset, ", ",
             offset + mdff::numel(shape), ") are outside a tensor of ", numel(), " elements");
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = impl_->storage;
  impl->offset_bytes = impl_->offset_bytes + static_cast<size_t>(offset) * dtype_size(dtype());
  impl->shape = shape;
  impl->dtype = dtype();
  return Tensor(std::move(impl));
}

void Tensor::rebind_storage(const Tensor& other) {
  MDFF_CHECK(other.shape() == shape(), "rebind_storage: a tensor of shape ", shape_str(other.shape()),
             " cannot stand for one of shape ", shape_str(shape()));
  MDFF_CHECK(is_leaf(), "rebind_storage: only leaf tensors (parameters, buffers) can be rebound");
  if (impl_->grad && (other.dtype() != dtype() || other.device() != device())) impl_->grad.reset();
  impl_->storage = other.impl()->storage;
  impl_->offset_bytes = other.impl()->offset_bytes;
  impl_->dtype = other.dtype();
}

bool Tensor::requires_grad() const {
  const TensorImpl& impl = checked(impl_);
  return impl.requires_grad || impl.grad_fn != nullptr;
}

Tensor& Tensor::set_requires_grad(bool value) {
  MDFF_CHECK(is_leaf(), "set_requires_grad: only leaf tensors (not results of ops) can be marked");
  MDFF_CHECK(!value || is_floating(dtype()), "set_requires_grad: ", dtype_name(dtype()),
             " tensors cannot have gradients");
  impl_->requires_grad = value;
  return *this;
}

Tensor Tensor::grad() const { return Tensor(checked(impl_).grad); }
void Tensor::zero_grad() {
  if (checked(impl_).grad) Tensor(impl_->grad).fill_(0.0);
}

void Tensor::clear_grad() {
  checked(impl_);
  impl_->grad.reset();
}

bool Tensor::is_leaf() const { return checked(impl_).grad_fn == nullptr; }
const std::shared_ptr<Node>& Tensor::grad_fn() const { return checked(impl_).grad_fn; }

void Tensor::backward(const Tensor& grad_output, bool retain_graph) const {
  run_backward(*this, grad_output, retain_graph);
}

void check_defined(const Tensor& t, const char* op, const char* what) {
  MDFF_CHECK(t.defined(), op, ": ", what, " is an undefined tensor");
}

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  MDFF_CHECK(a.device() == b.device(), op, ": tensors on different devices (", device_name(a.device()), " and ",
             device_name(b.device()), "); move one with .to(Device)");
}

void check_same_dtype(const Tensor& a, const Tensor& b, const char* op) {
  MDFF_CHECK(a.dtype() == b.dtype(), op, ": tensors of different dtypes (", dtype_name(a.dtype()), " and ",
             dtype_name(b.dtype()), "); convert one with .to(DType)");
}

}  // namespace mdff
