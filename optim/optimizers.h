// Optimizers over flat buffers. ParameterBuffer moves a model's parameters into one contiguous
// buffer (each parameter becomes a named view of it) and gives them gradient views into a second
// one, so an update is one kernel over all parameters, a checkpoint is one write, and finding a NaN
// or an infinity among all gradients is one pass. RMSProp and SGD follow PyTorch's torch.optim
// semantics exactly.
#pragma once
#include <memory>
#include <optional>
#include <string>

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
  const Tensor& grads() const { return grads_; }    // (P) their gradients; backward adds into it
  void zero_grad() { grads_.fill_(0.0); }
  const NamedTensors& named() const { return named_; }
  int64_t numel() const { return values_.numel(); }
  // The first element (in the model's order) of the gradients, or of the values, that is NaN or
  // infinite; nullopt when every one is finite. One pass over the flat buffer; names are looked up
  // only when one is found.
  std::optional<NonFinite> first_non_finite_grad() const { return locate(grads_); }
  std::optional<NonFinite> first_non_finite_value() const { return locate(values_); }

 private:
  std::optional<NonFinite> locate(const Tensor& flat) const;
  NamedTensors named_;
  Tensor values_, grads_;
};

class Optimizer {
 public:
  explicit Optimizer(ParameterBuffer& parameters) : parameters_(parameters) {}
  virtual ~Optimizer() = default;
  // One update from the gradients in the buffer.
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
