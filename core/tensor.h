// Tensor: a shape, a dtype and a device over reference-counted storage, always contiguous row-major
// (NCHW for images). A Tensor is a cheap handle (shared_ptr); copies share data. Views (reshape,
// detach) share storage and are free. Autograd state (requires_grad, grad, grad_fn) lives here too;
// the graph itself is in autograd.h.
#pragma once
#include <memory>
#include <vector>

#include "core/dtype.h"

namespace mdff {

class Rng;
struct Node;

// A block of memory on one device, freed through that device's backend when the last user lets go.
struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Device device = Device::CPU;
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
};

struct TensorImpl {
  std::shared_ptr<Storage> storage;
  size_t offset_bytes = 0;  // where this tensor starts inside storage (views of rows)
  Shape shape;
  DType dtype = DType::F32;
  bool requires_grad = false;               // set on leaves (parameters) by the user
  std::shared_ptr<TensorImpl> grad;         // accumulated gradient of a leaf
  std::shared_ptr<Node> grad_fn;            // the op that produced this tensor (non-leaves)
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- creation (contents as named; `empty` leaves memory uninitialised) ----
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor full(const Shape& shape, double value, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor from_vector(const std::vector<double>& values, const Shape& shape, DType dtype = DType::F32,
                            Device device = Device::CPU);
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape, Device device = Device::CPU);
  static Tensor from_vector(const std::vector<int32_t>& values, const Shape& shape, Device device = Device::CPU);
  // N(0, std^2) and U[low, high) from the engine's own generator (reproducible on every platform).
  static Tensor randn(const Shape& shape, Rng& rng, double std = 1.0, DType dtype = DType::F32,
                      Device device = Device::CPU);
  static Tensor uniform(const Shape& shape, Rng& rng, double low, double high, DType dtype = DType::F32,
                        Device device = Device::CPU);

  // ---- metadata ----
  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const;
  int64_t dim() const { return static_cast<int64_t>(shape().size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return mdff::numel(shape()); }
  DType dtype() const;
  Device device() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype()); }

  // Raw pointer to the first element on the tensor's device; data<T>() checks that T matches dtype.
  void* raw() const;
  template <class T> T* data() const;

  // ---- conversion and copies (new storage unless noted) ----
  Tensor to(Device device) const;  // same tensor if already there
  Tensor to(DType dtype) const;    // same tensor if already that dtype
  Tensor cpu() const { return to(Device::CPU); }
  Tensor clone() const;
  void copy_(const Tensor& src);   // assigns src's values (same shape; any devices, same dtype)
  void fill_(double value);
  std::vector<double> to_vector() const;  // host copy as doubles, in row-major order
  double item() const;                    // the value of a one-element tensor

  // ---- views (share storage) ----
  Tensor reshape(const Shape& shape) const;  // autograd-aware; one dimension may be -1
  Tensor detach() const;                     // same data, no autograd history
  // numel(shape) elements starting at element `offset` of this contiguous tensor, as a tensor of
  // `shape` (no autograd history): the named views of a flat parameter buffer.
  Tensor view_range(int64_t offset, const Shape& shape) const;
  // Makes this tensor (and every handle sharing it) hold `other`'s data from now on: its memory,
  // device and dtype; the shapes must match, and a gradient of another dtype or device is dropped.
  // How parameters move into one flat buffer (optim/optimizers.h) or to another device or dtype.
  void rebind_storage(const Tensor& other);

  // ---- autograd ----
  bool requires_grad() const;  // a leaf that wants .grad, or the result of an op recording a graph
  Tensor& set_requires_grad(bool value = true);
  Tensor grad() const;         // undefined until a backward pass reaches this leaf
  void zero_grad();            // sets .grad to zeros in place (it stays allocated), if there is one
  void clear_grad();           // drops .grad (undefined until the next backward pass reaches this leaf)
  bool is_leaf() const;
  const std::shared_ptr<Node>& grad_fn() const;
  // Backpropagates from this tensor. A one-element tensor needs no `grad_output` (it is 1).
  // The graph's saved tensors are released unless retain_graph is true.
  void backward(const Tensor& grad_output = Tensor(), bool retain_graph = false) const;

  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

 private:
  std::shared_ptr<TensorImpl> impl_;
};

void check_same_device(const Tensor& a, const Tensor& b, const char* op);
void check_same_dtype(const Tensor& a, const Tensor& b, const char* op);
void check_defined(const Tensor& t, const char* op, const char* what);

}  // namespace mdff
