// MDFF-SH: the multiscale deep-feature-fusion hashing network (method.md §1-2).
//
//   images (N,3,H,W) -> ResNet -> taps C3, C4, C5 and fc1 = ReLU(Linear(GAP(C5)))
//   1x1 lateral convs to 256 channels, top-down fusion P5 = L5, P4 = L4 + up(P5), P3 = L3 + up(P4)
//   g3, g4, g5 = GAP(P3), GAP(P4), GAP(P5)          (each averaged over the scales, e.g. 1 and 0.5)
//   f = ReLU(Linear([g3,g4,g5,fc1] -> 1024))        the fusion layer
//   h_k = tanh(Linear(g_k -> L)), h_f = tanh(Linear(f -> L))
//   u = tanh(Linear([h3,h4,h5,h_f] -> L)), b = sign(u);  logits = Linear(u -> K)
//
// `taps` selects the ablations of the paper's Table 4: all (the above), fc1 (fc1 alone feeds the
// fusion layer; only h_f is hashed) or convs (g3, g4, g5 feed the fusion layer; no fc1).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "models/resnet.h"

namespace mdff {

enum class Taps { All, Fc1, Convs };
Taps parse_taps(const std::string& text);  // "all" | "fc1" | "convs"
const char* taps_name(Taps taps);

struct MdffConfig {
  ResNetConfig backbone = ResNetConfig::resnet50();
  int bits = 48;                      // code length L
  int classes = 10;                   // K
  Taps taps = Taps::All;
  std::vector<double> scales{1.0, 0.5};  // the image sizes the backbone sees, relative to the input
  int lateral_channels = 256;
  int fc1_features = 1024;
  int fusion_features = 1024;
};

struct MdffOutput {
  Tensor u;       // (N,L) continuous codes in (-1,1); the binary code is sign(u)
  Tensor logits;  // (N,K)
};

// One line of the model summary: a stage, its output shape (for the first scale) and its parameters.
struct TraceRow {
  std::string stage;
  Shape shape;
  int64_t parameters;
};

class MdffSh : public Module {
 public:
  MdffSh(const MdffConfig& config, Rng& rng);
  // trace, when given, receives one row per stage (the model summary).
  MdffOutput forward(const Tensor& images, std::vector<TraceRow>* trace = nullptr);
  const MdffConfig& config() const { return config_; }
  ResNet& backbone() { return *backbone_; }
  // A readable table of the stages with output shapes and parameter counts, like torchinfo,
  // traced on a batch of two images of the given size in evaluation mode.
  std::string summary(int image_size);

 private:
  bool uses_convs() const { return config_.taps != Taps::Fc1; }
  bool uses_fc1() const { return config_.taps != Taps::Convs; }
  MdffConfig config_;
  std::shared_ptr<ResNet> backbone_;
  std::shared_ptr<Linear> fc1_, fusion_, hash3_, hash4_, hash5_, hash_fusion_, hash_, classifier_;
  std::shared_ptr<Conv2d> lateral3_, lateral4_, lateral5_;
};

}  // namespace mdff
