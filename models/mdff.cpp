// MDFF-SH construction, forward pass and summary (see mdff.h).
#include "models/mdff.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "core/autograd.h"
#include "core/error.h"
#include "core/ops.h"

namespace mdff {

Taps parse_taps(const std::string& text) {
  if (text == "all") return Taps::All;
  if (text == "fc1") return Taps::Fc1;
  if (text == "convs") return Taps::Convs;
  MDFF_FAIL("unknown taps '", text, "': use all, fc1 or convs");
}

const char* taps_name(Taps taps) {
  switch (taps) {
    case Taps::All: return "all";
    case Taps::Fc1: return "fc1";
    case Taps::Convs: return "convs";
  }
  return "?";
}

MdffSh::MdffSh(const MdffConfig& config, Rng& rng) : config_(config) {
  MDFF_CHECK(config.bits >= 1 && config.classes >= 1, "MDFF-SH needs bits >= 1 and classes >= 1, got ", config.bits,
             " and ", config.classes);
  MDFF_CHECK(!config.scales.empty(), "MDFF-SH needs at least one scale");
  for (double s : config.scales) MDFF_CHECK(s > 0 && s <= 4, "scale ", s, " must be in (0, 4]");
  backbone_ = register_module("backbone", std::make_shared<ResNet>(config.backbone, rng));
  const int c3 = config.backbone.out_channels(1), c4 = config.backbone.out_channels(2);
  const int c5 = config.backbone.out_channels(3), lateral = config.lateral_channels, bits = config.bits;
  int fusion_in = 0, hash_in = bits;  // h_f always; h3..h5 with the conv taps
  if (uses_fc1()) {
    fc1_ = register_module("fc1", std::make_shared<Linear>(c5, config.fc1_features, true, rng));
    fusion_in += config.fc1_features;
  }
  if (uses_convs()) {
    lateral3_ = register_module("lateral3", std::make_shared<Conv2d>(c3, lateral, 1, 1, 0, true, rng));
    lateral4_ = register_module("lateral4", std::make_shared<Conv2d>(c4, lateral, 1, 1, 0, true, rng));
    lateral5_ = register_module("lateral5", std::make_shared<Conv2d>(c5, lateral, 1, 1, 0, true, rng));
    hash3_ = register_module("hash3", std::make_shared<Linear>(lateral, bits, true, rng));
    hash4_ = register_module("hash4", std::make_shared<Linear>(lateral, bits, true, rng));
    hash5_ = register_module("hash5", std::make_shared<Linear>(lateral, bits, true, rng));
    fusion_in += 3 * lateral;
    hash_in += 3 * bits;
  }
  fusion_ = register_module("fusion", std::make_shared<Linear>(fusion_in, config.fusion_features, true, rng));
  hash_fusion_ = register_module("hash_fusion", std::make_shared<Linear>(config.fusion_features, bits, true, rng));
  hash_ = register_module("hash", std::make_shared<Linear>(hash_in, bits, true, rng));
  classifier_ = register_module("classifier", std::make_shared<Linear>(bits, config.classes, true, rng));
}

namespace {
int64_t count(std::initializer_list<const Module*> modules) {
  int64_t n = 0;
  for (const Module* m : modules)
    if (m) n += m->num_parameters();
  return n;
}
}  // namespace

MdffOutput MdffSh::forward(const Tensor& images, std::vector<TraceRow>* trace) {
  MDFF_CHECK(images.dim() == 4 && images.size(1) == 3, "MDFF-SH takes images of shape (N,3,H,W), got ",
             shape_str(images.shape()));
  auto note = [&](const char* stage, const Tensor& t, int64_t parameters) {
    if (trace) trace->push_back({stage, t.shape(), parameters});
  };
  // Per-scale pooled features, summed over the scales and divided by their number at the end.
  Tensor g3, g4, g5, fc1;
  auto accumulate = [](Tensor& sum, const Tensor& value) { sum = sum.defined() ? ops::add(sum, value) : value; };
  for (size_t s = 0; s < config_.scales.size(); ++s) {
    const double scale = config_.scales[s];
    Tensor x = images;
    if (scale != 1.0) {
      const auto h = std::max<int64_t>(1, std::lround(images.size(2) * scale));
      const auto w = std::max<int64_t>(1, std::lround(images.size(3) * scale));
      x = ops::resize_bilinear(images.detach(), h, w);  // the input needs no gradient
    }
    const bool first = s == 0;
    ResNetTaps taps = backbone_->forward_taps(x);
    if (first) {
      note("backbone C3 (stem..layer2)", taps.c3, backbone_->parameters_through(1));
      note("backbone C4 (layer3)", taps.c4, backbone_->parameters_through(2) - backbone_->parameters_through(1));
      note("backbone C5 (layer4)", taps.c5, backbone_->parameters_through(3) - backbone_->parameters_through(2));
    }
    if (uses_fc1()) {
      Tensor f = ops::relu(fc1_->forward(ops::global_avg_pool(taps.c5)));  // (N,1024)
      if (first) note("fc1", f, count({fc1_.get()}));
      accumulate(fc1, f);
    }
    if (uses_convs()) {
      Tensor p5 = lateral5_->forward(taps.c5);  // (N,256,H/32,W/32)
      Tensor l4 = lateral4_->forward(taps.c4);
      Tensor p4 = ops::add(l4, ops::upsample_nearest(p5, l4.size(2), l4.size(3)));  // (N,256,H/16,W/16)
      Tensor l3 = lateral3_->forward(taps.c3);
      Tensor p3 = ops::add(l3, ops::upsample_nearest(p4, l3.size(2), l3.size(3)));  // (N,256,H/8,W/8)
      if (first) {
        note("lateral + top-down P5", p5, count({lateral5_.get()}));
        note("lateral + top-down P4", p4, count({lateral4_.get()}));
        note("lateral + top-down P3", p3, count({lateral3_.get()}));
      }
      accumulate(g3, ops::global_avg_pool(p3));
      accumulate(g4, ops::global_avg_pool(p4));
      accumulate(g5, ops::global_avg_pool(p5));
    }
  }
  auto scale_mean = [&](const Tensor& sum) {
    return config_.scales.size() == 1 ? sum : ops::scale(sum, 1.0 / static_cast<double>(config_.scales.size()));
  };
  std::vector<Tensor> fusion_inputs, hashes;
  if (uses_convs()) {
    g3 = scale_mean(g3);  // (N,256) each
    g4 = scale_mean(g4);
    g5 = scale_mean(g5);
    fusion_inputs = {g3, g4, g5};
    hashes = {ops::tanh(hash3_->forward(g3)), ops::tanh(hash4_->forward(g4)), ops::tanh(hash5_->forward(g5))};
  }
  if (uses_fc1()) fusion_inputs.push_back(scale_mean(fc1));  // (N,1024)
  Tensor fused = ops::concat(fusion_inputs, 1);
  note("pooled features (scale mean)", fused, 0);
  Tensor f = ops::relu(fusion_->forward(fused));  // (N,1024)
  note("fusion layer", f, count({fusion_.get()}));
  hashes.push_back(ops::tanh(hash_fusion_->forward(f)));  // h_f (N,L)
  Tensor hash_input = ops::concat(hashes, 1);             // (N,4L) or (N,L)
  note(uses_convs() ? "hash layers h3 h4 h5 h_f" : "hash layer h_f", hash_input,
       count({hash3_.get(), hash4_.get(), hash5_.get(), hash_fusion_.get()}));
  MdffOutput out;
  out.u = ops::tanh(hash_->forward(hash_input));  // (N,L)
  note("final hash layer u", out.u, count({hash_.get()}));
  out.logits = classifier_->forward(out.u);  // (N,K)
  note("classifier", out.logits, count({classifier_.get()}));
  return out;
}

std::string MdffSh::summary(int image_size) {
  const bool was_training = is_training();
  eval();
  std::vector<TraceRow> rows;
  {
    NoGradGuard no_grad;
    forward(Tensor::zeros({2, 3, image_size, image_size}, DType::F32, parameters().front().device()), &rows);
  }
  train(was_training);
  std::string text;
  char line[160];
  std::snprintf(line, sizeof line, "MDFF-SH (taps %s, %zu scale%s, %d bits, %d classes) on %dx%d images\n",
                taps_name(config_.taps), config_.scales.size(), config_.scales.size() > 1 ? "s" : "", config_.bits,
                config_.classes, image_size, image_size);
  text += line;
  // The shapes are those of the first scale's pass, which need not be 1 (--scales 0.5): the heading says which.
  char heading[64];
  std::snprintf(heading, sizeof heading, "output shape (scale %g)", config_.scales.front());
  const int shape_width = std::max(22, static_cast<int>(std::strlen(heading)));
  const int width = 32 + 1 + shape_width + 1 + 14;
  std::snprintf(line, sizeof line, "%-32s %-*s %14s\n", "stage", shape_width, heading, "parameters");
  text += line;
  text += std::string(width, '-') + "\n";
  int64_t total = 0;
  for (const TraceRow& r : rows) {
    std::snprintf(line, sizeof line, "%-32s %-*s %14lld\n", r.stage.c_str(), shape_width, shape_str(r.shape).c_str(),
                  static_cast<long long>(r.parameters));
    text += line;
    total += r.parameters;
  }
  text += std::string(width, '-') + "\n";
  std::snprintf(line, sizeof line, "%-*s %14lld\n", width - 15, "total parameters",
                static_cast<long long>(num_parameters()));
  text += line;
  MDFF_CHECK(total == num_parameters(), "model summary: the stages account for ", total, " of ", num_parameters(),
             " parameters");
  return text;
}

}  // namespace mdff
