// ResNet construction and forward passes (see resnet.h).
#include "models/resnet.h"

#include <cmath>
#include <string>

#include "core/error.h"
#include "core/ops.h"

namespace mdff {

namespace {
// torchvision: nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
std::shared_ptr<Conv2d> kaiming_conv(int in, int out, int kernel, int stride, int padding, Rng& rng) {
  auto conv = std::make_shared<Conv2d>(in, out, kernel, stride, padding, false, rng);
  const double std = std::sqrt(2.0 / (double(out) * kernel * kernel));
  conv->weight.copy_(Tensor::randn(conv->weight.shape(), rng, std));
  return conv;
}
}  // namespace

Bottleneck::Bottleneck(int in_channels, int width, int stride, bool zero_init_residual, Rng& rng) {
  const int out = width * kExpansion;
  conv1_ = register_module("conv1", kaiming_conv(in_channels, width, 1, 1, 0, rng));
  bn1_ = register_module("bn1", std::make_shared<BatchNorm2d>(width));
  conv2_ = register_module("conv2", kaiming_conv(width, width, 3, stride, 1, rng));
  bn2_ = register_module("bn2", std::make_shared<BatchNorm2d>(width));
  conv3_ = register_module("conv3", kaiming_conv(width, out, 1, 1, 0, rng));
  bn3_ = register_module("bn3", std::make_shared<BatchNorm2d>(out));
  if (zero_init_residual) bn3_->weight.fill_(0.0);
  if (stride != 1 || in_channels != out) {
    downsample_conv_ = kaiming_conv(in_channels, out, 1, stride, 0, rng);
    downsample_bn_ = std::make_shared<BatchNorm2d>(out);
    downsample_ = std::make_shared<Sequential>();
    downsample_->add(downsample_conv_).add(downsample_bn_);
    register_module("downsample", downsample_);
  }
}

Tensor Bottleneck::forward(const Tensor& x) {
  Tensor h = conv_bn(*conv1_, *bn1_, x, true);
  h = conv_bn(*conv2_, *bn2_, h, true);
  const Tensor shortcut = downsample_ ? conv_bn(*downsample_conv_, *downsample_bn_, x, false) : x;
  return conv_bn(*conv3_, *bn3_, h, true, shortcut);
}

ResNet::ResNet(const ResNetConfig& config, Rng& rng) : config_(config) {
  conv1_ = register_module("conv1", kaiming_conv(3, config.stem, 7, 2, 3, rng));
  bn1_ = register_module("bn1", std::make_shared<BatchNorm2d>(config.stem));
  int channels = config.stem;
  for (int stage = 0; stage < 4; ++stage) {
    layers_[stage] = std::make_shared<Sequential>();
    for (int b = 0; b < config.blocks[stage]; ++b) {
      const int stride = (stage > 0 && b == 0) ? 2 : 1;
      layers_[stage]->add(std::make_shared<Bottleneck>(channels, config.widths[stage], stride, config.zero_init_residual, rng));
      channels = config.out_channels(stage);
    }
    register_module("layer" + std::to_string(stage + 1), layers_[stage]);
  }
  if (config.num_classes > 0) fc_ = register_module("fc", std::make_shared<Linear>(channels, config.num_classes, true, rng));
}

ResNetTaps ResNet::forward_taps(const Tensor& images) {
  Tensor h = ops::max_pool2d(conv_bn(*conv1_, *bn1_, images, true), 3, 2, 1);
  h = layers_[0]->forward(h);
  ResNetTaps taps;
  taps.c3 = layers_[1]->forward(h);
  taps.c4 = layers_[2]->forward(taps.c3);
  taps.c5 = layers_[3]->forward(taps.c4);
  return taps;
}

int64_t ResNet::parameters_through(int stage) const {
  int64_t n = conv1_->num_parameters() + bn1_->num_parameters();
  for (int s = 0; s <= stage; ++s) n += layers_[s]->num_parameters();
  return n;
}

Tensor ResNet::forward(const Tensor& images) {
  MDFF_CHECK(fc_, "ResNet::forward needs the classifier: build it with num_classes > 0");
  return fc_->forward(ops::global_avg_pool(forward_taps(images).c5));
}

}  // namespace mdff
