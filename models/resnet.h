// ResNet with bottleneck blocks, exactly as torchvision builds ResNet50 (v1.5: the stride sits in the
// 3x3 conv; the shortcut is a 1x1 conv + BN when the shape changes), with torchvision's parameter
// names (conv1.weight, bn1.running_mean, layer2.0.downsample.0.weight, ...) and initialisation
// (Kaiming normal, fan-out, for every conv; batch norm weight 1, bias 0). The same code builds a tiny
// ResNet (fewer blocks, narrow widths) for fast tests.
#pragma once
#include <array>
#include <memory>

#include "layers/layers.h"

namespace mdff {

struct ResNetConfig {
  std::array<int, 4> blocks{3, 4, 6, 3};         // bottlenecks per stage (layer1..layer4)
  std::array<int, 4> widths{64, 128, 256, 512};  // inner width per stage; outputs are 4x this
  int stem = 64;                                 // channels of conv1
  int num_classes = 0;                           // > 0 adds torchvision's `fc` classifier
  // torchvision's zero_init_residual: each bottleneck's last BN starts with gamma = 0, so every residual
  // block starts as the identity (Goyal et al. 2017); helps a deep network trained from scratch.
  bool zero_init_residual = false;
  static ResNetConfig resnet50() { return {}; }
  static ResNetConfig tiny() { return {{1, 1, 1, 1}, {4, 8, 8, 16}, 8, 0, false}; }
  int out_channels(int stage) const { return 4 * widths[stage]; }
};

class Bottleneck : public Layer {
 public:
  static constexpr int kExpansion = 4;
  Bottleneck(int in_channels, int width, int stride, bool zero_init_residual, Rng& rng);
  Tensor forward(const Tensor& x) override;  // relu(bn3(conv3(...)) + shortcut(x))

 private:
  std::shared_ptr<Conv2d> conv1_, conv2_, conv3_;
  std::shared_ptr<BatchNorm2d> bn1_, bn2_, bn3_;
  std::shared_ptr<Sequential> downsample_;  // null when the shortcut is the identity; else these two:
  std::shared_ptr<Conv2d> downsample_conv_;
  std::shared_ptr<BatchNorm2d> downsample_bn_;
};

// The feature maps MDFF-SH taps (method.md §2).
struct ResNetTaps {
  Tensor c3, c4, c5;  // outputs of layer2, layer3, layer4: (N,512,H/8,W/8), (N,1024,H/16,..), (N,2048,H/32,..)
};

class ResNet : public Module {
 public:
  ResNet(const ResNetConfig& config, Rng& rng);
  ResNetTaps forward_taps(const Tensor& images);  // images (N,3,H,W)
  Tensor forward(const Tensor& images);           // torchvision's forward: logits (N,num_classes)
  const ResNetConfig& config() const { return config_; }
  // Parameters of the stem (conv1, bn1) and stages 0..3 up to and including `stage` (layer1..layer4).
  int64_t parameters_through(int stage) const;

 private:
  ResNetConfig config_;
  std::shared_ptr<Conv2d> conv1_;
  std::shared_ptr<BatchNorm2d> bn1_;
  std::array<std::shared_ptr<Sequential>, 4> layers_;
  std::shared_ptr<Linear> fc_;
};

}  // namespace mdff
