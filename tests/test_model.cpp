// ResNet50 and MDFF-SH: torchvision's parameter count and names, initialisation, the head's options
// (taps, scales), the model summary, modes, and a float64 gradient check of a whole tiny MDFF-SH.
#include "tests/gradcheck.h"

#include <cmath>
#include <map>

#include "core/autograd.h"
#include "core/error.h"
#include "losses/hash_losses.h"
#include "models/mdff.h"

using namespace mdff;

namespace {
MdffConfig tiny_config(Taps taps, std::vector<double> scales) {
  MdffConfig c;
  c.backbone = ResNetConfig::tiny();
  c.bits = 6;
  c.classes = 3;
  c.taps = taps;
  c.scales = std::move(scales);
  c.lateral_channels = 8;
  c.fc1_features = 12;
  c.fusion_features = 10;
  return c;
}
}  // namespace

TEST_CASE("ResNet50 has torchvision's parameter count and names") {
  Rng rng(0);
  ResNet backbone(ResNetConfig::resnet50(), rng);
  CHECK(backbone.num_parameters() == 23508032);
  ResNetConfig with_fc = ResNetConfig::resnet50();
  with_fc.num_classes = 1000;
  ResNet classifier(with_fc, rng);
  CHECK(classifier.num_parameters() == 25557032);

  const NamedTensors params = classifier.named_parameters(), buffers = classifier.named_buffers();
  CHECK(params.size() == 161);   // torchvision's resnet50().parameters()
  CHECK(buffers.size() == 106);  // running_mean and running_var of its 53 batch norms
  std::map<std::string, Shape> shapes;
  for (const auto& [name, t] : params) shapes[name] = t.shape();
  for (const auto& [name, t] : buffers) shapes[name] = t.shape();
  CHECK(params.front().first == "conv1.weight");
  CHECK(shapes["conv1.weight"] == Shape{64, 3, 7, 7});
  CHECK(shapes["bn1.running_mean"] == Shape{64});
  CHECK(shapes["layer1.0.downsample.0.weight"] == Shape{256, 64, 1, 1});
  CHECK(shapes["layer2.0.conv2.weight"] == Shape{128, 128, 3, 3});  // v1.5: the stride sits here
  CHECK(shapes["layer2.0.downsample.1.running_var"] == Shape{512});
  CHECK(shapes["layer3.5.bn3.bias"] == Shape{1024});
  CHECK(shapes["layer4.2.conv3.weight"] == Shape{2048, 512, 1, 1});
  CHECK(shapes["fc.weight"] == Shape{1000, 2048});
  CHECK(shapes.count("layer1.1.downsample.0.weight") == 0);  // identity shortcut
}

TEST_CASE("ResNet initialisation: Kaiming normal (fan-out) convolutions, batch norm 1 and 0") {
  Rng rng(1);
  ResNet net(ResNetConfig::resnet50(), rng);
  for (const auto& [name, t] : net.named_parameters()) {
    const std::vector<double> v = t.to_vector();
    if (name == "layer4.0.conv2.weight") {  // 512*3*3 fan-out: std = sqrt(2 / 4608)
      double sq = 0;
      for (double x : v) sq += x * x;
      CHECK(std::sqrt(sq / v.size()) == doctest::Approx(std::sqrt(2.0 / 4608)).epsilon(0.01));
    }
    if (name == "layer3.1.bn2.weight") CHECK(v == std::vector<double>(256, 1.0));
    if (name == "layer3.1.bn2.bias") CHECK(v == std::vector<double>(256, 0.0));
  }
}

TEST_CASE("MDFF-SH on the full ResNet50: shapes of u and logits, names of the head") {
  Rng rng(2);
  MdffConfig config;  // ResNet50, 48 bits, 10 classes, all taps, scales 1 and 0.5
  MdffSh model(config, rng);
  const MdffOutput out = model.forward(Tensor::randn({2, 3, 32, 32}, rng));
  CHECK(out.u.shape() == Shape{2, 48});
  CHECK(out.logits.shape() == Shape{2, 10});
  for (double v : out.u.to_vector()) CHECK((v > -1 && v < 1));
  std::map<std::string, Shape> shapes;
  for (const auto& [name, t] : model.named_parameters()) shapes[name] = t.shape();
  CHECK(shapes["backbone.layer4.2.conv3.weight"] == Shape{2048, 512, 1, 1});
  CHECK(shapes["fc1.weight"] == Shape{1024, 2048});
  CHECK(shapes["lateral3.weight"] == Shape{256, 512, 1, 1});
  CHECK(shapes["lateral5.bias"] == Shape{256});
  CHECK(shapes["fusion.weight"] == Shape{1024, 3 * 256 + 1024});
  CHECK(shapes["hash4.weight"] == Shape{48, 256});
  CHECK(shapes["hash_fusion.weight"] == Shape{48, 1024});
  CHECK(shapes["hash.weight"] == Shape{48, 4 * 48});
  CHECK(shapes["classifier.weight"] == Shape{10, 48});
}

TEST_CASE("the taps and scales options build the ablations of Table 4") {
  Rng rng(3);
  for (Taps taps : {Taps::All, Taps::Fc1, Taps::Convs})
    for (const auto& scales : {std::vector<double>{1.0}, std::vector<double>{1.0, 0.5}}) {
      CAPTURE(taps_name(taps));
      CAPTURE(scales.size());
      MdffSh model(tiny_config(taps, scales), rng);
      std::map<std::string, Shape> shapes;
      for (const auto& [name, t] : model.named_parameters()) shapes[name] = t.shape();
      CHECK((shapes.count("fc1.weight") == 1) == (taps != Taps::Convs));
      CHECK((shapes.count("lateral4.weight") == 1) == (taps != Taps::Fc1));
      CHECK(shapes["hash.weight"] == Shape{6, taps == Taps::Fc1 ? 6 : 24});
      const MdffOutput out = model.forward(Tensor::randn({3, 3, 20, 20}, rng));
      CHECK(out.u.shape() == Shape{3, 6});
      CHECK(out.logits.shape() == Shape{3, 3});
    }
  CHECK_THROWS_WITH_AS(parse_taps("fc2"), doctest::Contains("use all, fc1 or convs"), Error);
  MdffConfig bad = tiny_config(Taps::All, {});
  CHECK_THROWS_WITH_AS(MdffSh(bad, rng), doctest::Contains("at least one scale"), Error);
  MdffSh model(tiny_config(Taps::All, {1.0}), rng);
  CHECK_THROWS_WITH_AS(model.forward(Tensor::zeros({2, 1, 16, 16})), doctest::Contains("(N,3,H,W)"), Error);
}

TEST_CASE("the dual-scale model averages the two scales' pooled features") {
  // With scales {1, 1}, the mean of two identical passes equals the single-scale output.
  Rng rng_a(4), rng_b(4);
  MdffSh one(tiny_config(Taps::All, {1.0}), rng_a), two(tiny_config(Taps::All, {1.0, 1.0}), rng_b);
  one.eval();
  two.eval();
  Rng data(5);
  const Tensor x = Tensor::randn({2, 3, 16, 16}, data);
  const std::vector<double> a = one.forward(x).u.to_vector(), b = two.forward(x).u.to_vector();
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-6));
}

TEST_CASE("model summary: every stage with its output shape, and all parameters accounted for") {
  Rng rng(6);
  MdffSh model(MdffConfig{}, rng);
  const std::string text = model.summary(32);
  MESSAGE(text);
  CHECK(text.find("backbone C5 (layer4)") != std::string::npos);
  CHECK(text.find("(2,2048,1,1)") != std::string::npos);
  CHECK(text.find("lateral + top-down P3") != std::string::npos);
  CHECK(text.find("(2,256,4,4)") != std::string::npos);
  CHECK(text.find("(2,48)") != std::string::npos);
  CHECK(text.find(std::to_string(model.num_parameters())) != std::string::npos);
  CHECK(model.is_training());  // the summary restores the mode
  CHECK(text.find("output shape (scale 1) ") != std::string::npos);
}

TEST_CASE("model summary: the heading names the first scale, whose shapes the table shows") {
  Rng rng(6);
  MdffSh model(tiny_config(Taps::All, {0.5, 1.0}), rng);
  const std::string text = model.summary(32);
  CHECK(text.find("output shape (scale 0.5)") != std::string::npos);
  CHECK(text.find("(scale 1)") == std::string::npos);
  // the columns stay aligned with the wider heading: every line of the table is as long as its rule
  const size_t rule = text.find("\n---") + 1;
  const size_t width = text.find('\n', rule) - rule;
  for (size_t start = text.find('\n') + 1; start < text.size(); start = text.find('\n', start) + 1)
    CHECK(text.find('\n', start) - start == width);
}

TEST_CASE("train and eval modes reach every batch norm") {
  Rng rng(7);
  MdffSh model(tiny_config(Taps::All, {1.0}), rng);
  const Tensor x = Tensor::randn({4, 3, 16, 16}, rng);
  const std::vector<double> before = model.named_buffers().front().second.to_vector();
  model.eval();
  model.forward(x);
  CHECK(model.named_buffers().front().second.to_vector() == before);  // evaluation: running stats untouched
  model.train();
  model.forward(x);
  CHECK(model.named_buffers().front().second.to_vector() != before);
}

TEST_CASE("evaluation without gradients (the fused convolution + batch norm) gives the same codes") {
  Rng rng(8);
  MdffSh model(tiny_config(Taps::All, {1.0, 0.5}), rng);
  const Tensor x = Tensor::randn({5, 3, 16, 16}, rng);
  model.train();
  model.forward(x);  // running statistics away from their initial 0 and 1
  model.eval();
  const std::vector<double> recorded = model.forward(x).u.to_vector();  // gradients recorded: separate ops
  NoGradGuard no_grad;
  CHECK(model.forward(x).u.to_vector() == recorded);
}

TEST_CASE("a whole tiny MDFF-SH forward and backward, gradient-checked in float64") {
  for (Taps taps : {Taps::All, Taps::Fc1, Taps::Convs}) {
    CAPTURE(taps_name(taps));
    Rng rng(8);
    MdffSh model(tiny_config(taps, {1.0, 0.5}), rng);
    model.to(DType::F64);
    const Tensor x = Tensor::randn({3, 3, 16, 16}, rng, 1.0, DType::F64);
    const Tensor labels = Tensor::from_vector(std::vector<double>{1, 0, 0, 0, 1, 1, 1, 0, 0}, {3, 3}, DType::F64);
    const Tensor codes = Tensor::uniform({5, 6}, rng, -1, 1, DType::F64);  // a fixed U of five other images
    const Tensor code_labels = Tensor::from_vector(
        std::vector<double>{1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1}, {5, 3}, DType::F64);
    std::vector<Tensor> params;
    for (const auto& [name, t] : model.named_parameters()) params.push_back(t);
    auto loss = [&](const std::vector<Tensor>&) {
      const MdffOutput out = model.forward(x);
      return ops::add(ops::add(pairwise_loss(out.u, labels, codes, code_labels),
                               ops::scale(quantization_loss(out.u), 0.1)),
                      ops::scale(classification_loss(out.logits, labels), 0.01));
    };
    test::check_op("conv2d", loss, params, test::kNetworkCheck);
  }
}
