// Optimizers over flat buffers. ParameterBuffer moves a model's parameters into one contiguous
// buffer (each parameter becomes a named view of it) and gives them gradient views into a second
// one, so an update is one kernel over all parameters and a checkpoint is one write. RMSProp and SGD
// follow PyTorch's torch.optim semantics exactly.
#pragma once
#include <memory>
#include <string>

#include "layers/module.h"

namespace mdff {

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

 private:
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
