// Optimizers over flat buffers. ParameterBuffer moves a model's parameters into one contiguous
// buffer (each parameter becomes a named view of it), so a checkpoint is one write and the optimizers'
// state is one buffer of the same layout. Gradients are not in a buffer: backward allocates each when it
// reaches its parameter and zero_grad drops them all (PyTorch's set_to_none), so a training step's peak
// (early in backward, when every activation is still saved) holds almost none of them; a flat gradient
// buffer would hold all of them there (109 MiB for ResNet50-MDFF-SH). An update is still one kernel over
// all parameters: the backend takes the gradients as slices of the flat layout. RMSProp and SGD follow
// PyTorch's torch.optim semantics exactly, including that a parameter without a gradient is not updated.
#pragma once
#include <memory>
#include <optional>
#include <string>

#include "core/backend.h"
#include "layers/module.h"

namespace mdff {

// A NaN or an infinity in a parameter or its gradient: the parameter's name, the element's index in it
// (row-major) and its value.
struct NonFinite {
  std::string name;
  int64_t index = 0;
  double value = 0;
};

// The first element, in order, of `tensors` (floating point) that is NaN or infinite; nullopt when all
// are finite. For the batch-norm statistics and other tensors outside a ParameterBuffer.
std::optional<NonFinite> first_non_finite(const NamedTensors& tensors);

class ParameterBuffer {
 public:
  // The parameters must share one device and dtype. Their values are copied into the flat buffer and
  // the tensors rebound to it, so the model keeps working on the same handles.
  explicit ParameterBuffer(const NamedTensors& parameters);
  const Tensor& values() const { return values_; }  // (P) all parameters, in the model's order
  // The gradients backward left on the parameters, each with its parameter's place in values(); the
  // parameters it did not reach have none and are not listed.
  std::vector<GradientSlice> gradients() const;
  std::vector<Tensor> grads() const;  // the same gradients alone
  // Drops every parameter's gradient (the next backward allocates them anew).
  void zero_grad();
  const NamedTensors& named() const { return named_; }
  int64_t numel() const { return values_.numel(); }
  // The first element (in the model's order) of the gradients, or of the values, that is NaN or
  // infinite; nullopt when every one is finite. The values are one pass over the flat buffer; names are
  // looked up only when one is found.
  std::optional<NonFinite> first_non_finite_grad() const;
  std::optional<NonFinite> first_non_finite_value() const;

 private:
  NamedTensors named_;
  std::vector<int64_t> offsets_;  // where each parameter starts in values_
  Tensor values_;
};

class Optimizer {
 public:
  explicit Optimizer(ParameterBuffer& parameters) : parameters_(parameters) {}
  virtual ~Optimizer() = default;
  // One update from the parameters' gradients.
  void step() {
    update();
    ++steps_;
  }
  virtual const char* name() const = 0;
  // What a checkpoint must keep to continue exactly: the state buffers by name (views, not copies:
  // copy_ into them to restore) and the number of steps taken.
  virtual NamedTensors state() = 0;
  int64_t steps() const { return steps_; }
  void set_steps(int64_t steps) { steps_ = steps; }
  double lr = 0;  // the learning rate of the next step (schedules change it)

 protected:
  virtual void update() = 0;
  ParameterBuffer& parameters_;
  int64_t steps_ = 0;
};

struct RMSPropOptions {
  double lr = 1e-5, alpha = 0.99, eps = 1e-8, weight_decay = 1e-5;
};

// v <- alpha v + (1-alpha) g^2;  p <- p - lr g / (sqrt(v) + eps), with g = grad + weight_decay p.
class RMSProp : public Optimizer {
 public:
  RMSProp(ParameterBuffer& parameters, const RMSPropOptions& options);
  const char* name() const override { return "rmsprop"; }
  NamedTensors state() override { return {{"square_avg", square_avg_}}; }
  const Tensor& square_avg() const { return square_avg_; }  // (P) the running mean of g^2

 private:
  void update() override;
  RMSPropOptions options_;
  Tensor square_avg_;
};

struct SgdOptions {
  double lr = 0.01, momentum = 0.9, weight_decay = 0;
};

// b <- g on the first step, then momentum b + g;  p <- p - lr b, with g = grad + weight_decay p.
class Sgd : public Optimizer {
 public:
  Sgd(ParameterBuffer& parameters, const SgdOptions& options);
  const char* name() const override { return "sgd"; }
  NamedTensors state() override { return {{"momentum_buffer", momentum_buffer_}}; }

 private:
  void update() override;
  SgdOptions options_;
  Tensor momentum_buffer_;  // (P)
};

}  // namespace mdff
