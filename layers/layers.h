// The layers of ResNet50 and the MDFF-SH head, as modules with PyTorch's parameter names and
// PyTorch's default initialisation (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), batch
// norm weight 1, bias 0, running mean 0, running variance 1). Each forward is one op of core/ops.h.
#pragma once
#include <memory>
#include <vector>

#include "core/rng.h"
#include "layers/module.h"

namespace mdff {

class Conv2d : public Layer {
 public:
  Conv2d(int in_channels, int out_channels, int kernel, int stride, int padding, bool bias, Rng& rng);
  Tensor forward(const Tensor& x) override;  // (N,Cin,H,W) -> (N,Cout,Ho,Wo)
  Tensor weight, bias;                       // (Cout,Cin,k,k), (Cout) or undefined
  int stride, padding;
};

class BatchNorm2d : public Layer {
 public:
  explicit BatchNorm2d(int channels, double momentum = 0.1, double eps = 1e-5);
  Tensor forward(const Tensor& x) override;  // (N,C,H,W): batch statistics in training, running in eval
  Tensor weight, bias, running_mean, running_var;  // (C) each
  double momentum, eps;
};

// conv, then bn, then + residual when defined, then ReLU when asked: how ResNet chains them. Evaluation
// without gradients (encoding) runs one fused kernel (ops::conv2d_bn_eval); training runs the conv and
// the fused ops::batch_norm2d_relu or ops::add_relu, which keep no pre-ReLU activation. The results are
// equal to the separate ops.
Tensor conv_bn(Conv2d& conv, BatchNorm2d& bn, const Tensor& x, bool relu, const Tensor& residual = Tensor());

class Linear : public Layer {
 public:
  Linear(int in_features, int out_features, bool bias, Rng& rng);
  Tensor forward(const Tensor& x) override;  // (N,in) -> (N,out)
  Tensor weight, bias;                       // (out,in), (out) or undefined
};

class ReLU : public Layer {
 public:
  Tensor forward(const Tensor& x) override;
};

class MaxPool2d : public Layer {
 public:
  MaxPool2d(int kernel, int stride, int padding) : kernel(kernel), stride(stride), padding(padding) {}
  Tensor forward(const Tensor& x) override;
  int kernel, stride, padding;
};

class GlobalAvgPool : public Layer {
 public:
  Tensor forward(const Tensor& x) override;  // (N,C,H,W) -> (N,C)
};

// Children named "0", "1", ... as torch.nn.Sequential names them.
class Sequential : public Layer {
 public:
  Sequential& add(std::shared_ptr<Layer> layer);
  Tensor forward(const Tensor& x) override;
  size_t size() const { return layers_.size(); }
  Layer& operator[](size_t i) { return *layers_[i]; }

 private:
  std::vector<std::shared_ptr<Layer>> layers_;
};

}  // namespace mdff
