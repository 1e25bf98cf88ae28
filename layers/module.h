// Module: the base of every layer and model. It owns named parameters (leaves that require grad) and
// buffers (state without gradients, such as batch-norm running statistics) and child modules, and
// names them the way PyTorch's state_dict does ("layer1.0.conv1.weight"), so checkpoints and ImageNet
// weights load without a renaming map. train()/eval() switch the mode of the whole tree.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace mdff {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Every parameter / buffer of this module and its descendants, in registration order, with
  // dotted names. The Tensors are handles: changing their values changes the module's.
  NamedTensors named_parameters() const;
  NamedTensors named_buffers() const;
  std::vector<Tensor> parameters() const;
  int64_t num_parameters() const;  // elements, as torchinfo counts them

  void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }
  void zero_grad();  // zeroes every parameter's .grad in place

  // Moves every parameter and buffer to `device`, or converts the float ones to `dtype` (float64 for
  // gradient checks); the same handles now hold the moved values.
  void to(Device device);
  void to(DType dtype);

 protected:
  Tensor& register_parameter(const std::string& name, Tensor value);
  Tensor& register_buffer(const std::string& name, Tensor value);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    children_.emplace_back(name, module);
    return module;
  }

 private:
  void collect(const std::string& prefix, bool parameters, NamedTensors& out) const;
  NamedTensors parameters_, buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;
};

// A module with one input and one output: what Sequential chains.
class Layer : public Module {
 public:
  virtual Tensor forward(const Tensor& x) = 0;
};

}  // namespace mdff
