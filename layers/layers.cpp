// Layer construction, default initialisation and forward passes (see layers.h).
#include "layers/layers.h"

#include <cmath>
#include <string>

#include "core/autograd.h"
#include "core/ops.h"

namespace mdff {

namespace {
// PyTorch's default for Conv2d and Linear: kaiming_uniform_(a=sqrt(5)) for the weight, which is
// U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
Tensor default_init(const Shape& shape, int64_t fan_in, Rng& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  return Tensor::uniform(shape, rng, -bound, bound);
}
}  // namespace

Conv2d::Conv2d(int in_channels, int out_channels, int kernel, int stride_, int padding_, bool with_bias, Rng& rng)
    : stride(stride_), padding(padding_) {
  const int64_t fan_in = int64_t{in_channels} * kernel * kernel;
  weight = register_parameter("weight", default_init({out_channels, in_channels, kernel, kernel}, fan_in, rng));
  if (with_bias) bias = register_parameter("bias", default_init({out_channels}, fan_in, rng));
}

Tensor Conv2d::forward(const Tensor& x) { return ops::conv2d(x, weight, bias, stride, padding); }

BatchNorm2d::BatchNorm2d(int channels, double momentum_, double eps_) : momentum(momentum_), eps(eps_) {
  weight = register_parameter("weight", Tensor::full({channels}, 1.0));
  bias = register_parameter("bias", Tensor::zeros({channels}));
  running_mean = register_buffer("running_mean", Tensor::zeros({channels}));
  running_var = register_buffer("running_var", Tensor::full({channels}, 1.0));
}

Tensor BatchNorm2d::forward(const Tensor& x) {
  return ops::batch_norm2d(x, weight, bias, running_mean, running_var, is_training(), momentum, eps);
}

Tensor conv_bn(Conv2d& conv, BatchNorm2d& bn, const Tensor& x, bool relu, const Tensor& residual) {
  if (!bn.is_training() && !grad_enabled() && !conv.bias.defined())
    return ops::conv2d_bn_eval(x, conv.weight, {bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps},
                               conv.stride, conv.padding, residual, relu);
  const Tensor h = conv.forward(x);
  if (!residual.defined())
    return relu ? ops::batch_norm2d_relu(h, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.is_training(),
                                         bn.momentum, bn.eps)
                : bn.forward(h);
  return relu ? ops::add_relu(bn.forward(h), residual) : ops::add(bn.forward(h), residual);
}

Linear::Linear(int in_features, int out_features, bool with_bias, Rng& rng) {
  weight = register_parameter("weight", default_init({out_features, in_features}, in_features, rng));
  if (with_bias) bias = register_parameter("bias", default_init({out_features}, in_features, rng));
}

Tensor Linear::forward(const Tensor& x) { return ops::linear(x, weight, bias); }

Tensor ReLU::forward(const Tensor& x) { return ops::relu(x); }
Tensor MaxPool2d::forward(const Tensor& x) { return ops::max_pool2d(x, kernel, stride, padding); }
Tensor GlobalAvgPool::forward(const Tensor& x) { return ops::global_avg_pool(x); }

Sequential& Sequential::add(std::shared_ptr<Layer> layer) {
  register_module(std::to_string(layers_.size()), layer);
  layers_.push_back(std::move(layer));
  return *this;
}

Tensor Sequential::forward(const Tensor& x) {
  Tensor h = x;
  for (auto& layer : layers_) h = layer->forward(h);
  return h;
}

}  // namespace mdff
