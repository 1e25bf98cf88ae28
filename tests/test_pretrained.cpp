// Loading pretrained backbone weights (models/pretrained.h) from small hand-made safetensors files: an
// mdff checkpoint, torchvision-style names with the "module." prefix, the tensors that are ignored, dtype
// conversion, leaves that still learn, and one file per error, each named in the message. The comparison
// with torchvision's own ResNet50 is in test_pretrained_torchvision.cpp (it needs torch).
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"
#include "models/mdff.h"
#include "models/pretrained.h"
#include "tests/temp_folder.h"

using namespace mdff;

namespace {

std::string temp_path(const std::string& name) {
  static const test::TempFolder folder("mdff_test_pretrained");
  return folder.file(name);
}

MdffConfig tiny_config() {
  MdffConfig c;
  c.backbone = ResNetConfig::tiny();
  c.bits = 6;
  c.classes = 3;
  c.scales = {1.0};
  c.lateral_channels = 8;
  c.fc1_features = 12;
  c.fusion_features = 10;
  return c;
}

std::map<std::string, std::vector<double>> values_of(const Module& module) {
  std::map<std::string, std::vector<double>> values;
  for (const auto& [name, t] : model_state(module)) values[name] = t.to_vector();
  return values;
}

// A tiny MDFF-SH whose backbone's batch norms are not at their initialisation, so that loading them shows.
std::unique_ptr<MdffSh> tiny_model(uint64_t seed) {
  Rng rng(seed);
  auto model = std::make_unique<MdffSh>(tiny_config(), rng);
  for (auto& [name, t] : model->backbone().named_buffers())
    t.copy_(Tensor::uniform(t.shape(), rng, 0.5, 1.5, t.dtype()));
  return model;
}

// `model`'s backbone as torchvision names it, each name prefixed with `prefix`.
NamedTensors torchvision_state(MdffSh& model, const std::string& prefix = "") {
  NamedTensors state;
  for (const auto& [name, t] : model_state(model.backbone())) state.emplace_back(prefix + name, t);
  return state;
}

// `values` stored as BF16, a float32's upper half (exact when the lower half is zero).
io::SafetensorsEntry bf16_entry(const std::string& name, const std::vector<float>& values) {
  io::SafetensorsEntry entry{name, "BF16", {static_cast<int64_t>(values.size())}, {}};
  for (float value : values) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    entry.bytes.push_back(static_cast<uint8_t>(bits >> 16));
    entry.bytes.push_back(static_cast<uint8_t>(bits >> 24));
  }
  return entry;
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("no mdff::Error was thrown");
  return "";
}

}  // namespace

TEST_CASE("an mdff checkpoint loads into the backbone; its head and training state are ignored") {
  auto source = tiny_model(1), model = tiny_model(2);
  const std::string path = temp_path("checkpoint.safetensors");
  NamedTensors checkpoint = model_state(*source);
  checkpoint.emplace_back("optimizer.step", Tensor::zeros({1}));
  io::save_safetensors(path, checkpoint);
  const auto head_before = values_of(*model);

  const PretrainedReport report = load_pretrained_backbone(model->backbone(), path);
  CHECK(values_of(model->backbone()) == values_of(source->backbone()));
  const auto after = values_of(*model);
  size_t head_tensors = 0;
  for (const auto& [key, values] : after)
    if (key.rfind("backbone.", 0) != 0) {
      const std::string& name = key;  // CAPTURE captures in a lambda, which in C++17 cannot name a structured binding
      CAPTURE(name);
      CHECK(values == head_before.at(name));
      ++head_tensors;
    }
  CHECK(report.loaded == static_cast<int64_t>(model_state(model->backbone()).size()));
  CHECK(report.ignored.size() == head_tensors + 1);  // and optimizer.step
  CHECK(report.summary().find(path + ": loaded " + std::to_string(report.loaded) + " backbone tensors, ignored ") == 0);
}

TEST_CASE("torchvision names with DataParallel's prefix: counters and the classifier are ignored, F64 and BF16 converted") {
  auto source = tiny_model(3), model = tiny_model(4);
  const std::vector<float> bias{-2.0f, -1.5f, -1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 1.5f};  // exact in bfloat16
  for (auto& [name, t] : model_state(source->backbone()))
    if (name == "bn1.bias") t.copy_(Tensor::from_vector(bias, {8}));
  NamedTensors state = torchvision_state(*source, "module.");
  state.at(0).second = state.at(0).second.to(DType::F64);  // conv1.weight stored as F64
  state.emplace_back("module.bn1.num_batches_tracked", Tensor::from_vector(std::vector<int32_t>{7}, {}));
  state.emplace_back("module.fc.weight", Tensor::zeros({1000, 64}));
  state.emplace_back("module.fc.bias", Tensor::zeros({1000}));
  const std::string path = temp_path("torchvision.safetensors");
  io::save_safetensors(path, state);
  io::SafetensorsFile file = io::load_safetensors(path);  // then bn1.bias stored as BF16
  for (io::SafetensorsEntry& entry : file.entries)
    if (entry.name == "module.bn1.bias") entry = bf16_entry(entry.name, bias);
  io::save_safetensors_entries(path, file.entries);

  const PretrainedReport report = load_pretrained_backbone(model->backbone(), path);
  CHECK(values_of(model->backbone()) == values_of(source->backbone()));
  CHECK(report.ignored == std::vector<std::string>{"module.bn1.num_batches_tracked", "module.fc.weight", "module.fc.bias"});
  CHECK(report.summary() == path + ": loaded " + std::to_string(report.loaded) +
                                " backbone tensors, ignored 3 (module.fc.weight, module.fc.bias, 1 num_batches_tracked)");

  SUBCASE("into a float64 model") {
    model->to(DType::F64);
    load_pretrained_backbone(model->backbone(), path);
    CHECK(values_of(model->backbone()) == values_of(source->backbone()));
  }
  SUBCASE("the parameters stay leaves that learn") {
    for (const auto& [key, p] : model->named_parameters()) {
      const std::string& name = key;
      CAPTURE(name);
      CHECK(p.is_leaf());
      CHECK(p.requires_grad());
    }
    Rng rng(5);
    ops::sum(model->forward(Tensor::randn({2, 3, 32, 32}, rng)).u).backward();
    const Tensor conv1 = model->backbone().named_parameters().at(0).second;
    REQUIRE(conv1.grad().defined());
    CHECK(conv1.grad().shape() == conv1.shape());
  }
}

TEST_CASE("a file that does not fit the backbone is refused, naming each tensor, and nothing is loaded") {
  auto source = tiny_model(6), model = tiny_model(7);
  const auto before = values_of(*model);
  const auto refused = [&](const std::string& name, NamedTensors state) {
    const std::string path = temp_path(name);
    io::save_safetensors(path, state);
    const std::string message = error_of([&] { load_pretrained_backbone(model->backbone(), path); });
    CHECK(values_of(*model) == before);
    CHECK(message.find(path + " does not fit the ResNet backbone") != std::string::npos);
    return message;
  };
  const NamedTensors full = torchvision_state(*source);
  const auto without = [&](const std::string& dropped) {
    NamedTensors state;
    for (const auto& named : full)
      if (named.first != dropped) state.push_back(named);
    return state;
  };

  SUBCASE("a tensor missing") {
    CHECK(refused("missing.safetensors", without("layer1.0.bn2.running_var"))
              .find("1 tensor missing from the file (layer1.0.bn2.running_var)") != std::string::npos);
  }
  SUBCASE("many tensors missing: the count and the first few") {
    NamedTensors state{full.front()};
    const std::string message = refused("nearly_empty.safetensors", state);
    CHECK(message.find(std::to_string(full.size() - 1) + " tensors missing from the file (bn1.weight, ") !=
          std::string::npos);
    CHECK(message.find(", and " + std::to_string(full.size() - 9) + " more)") != std::string::npos);
  }
  SUBCASE("a value that is not finite: refused naming the tensor, nothing loaded") {
    NamedTensors state = full;
    std::vector<float> values;
    for (double v : state.back().second.to_vector()) values.push_back(static_cast<float>(v));
    values[values.size() / 2] = std::numeric_limits<float>::quiet_NaN();
    state.back().second = Tensor::from_vector(values, state.back().second.shape());
    const std::string path = temp_path("nan.safetensors");
    io::save_safetensors(path, state);
    const std::string message = error_of([&] { load_pretrained_backbone(model->backbone(), path); });
    CHECK(values_of(*model) == before);
    CHECK(message.find("'" + state.back().first + "' holds a value that is not finite (element " +
                       std::to_string(values.size() / 2) + ")") != std::string::npos);
  }
  SUBCASE("a wrong shape") {
    NamedTensors state = full;
    state.at(0).second = Tensor::zeros({8, 3, 3, 3});
    CHECK(refused("shape.safetensors", state)
              .find("1 tensor with another shape (conv1.weight: (8,3,3,3) in the file, (8,3,7,7) in the model)") !=
          std::string::npos);
  }
  SUBCASE("tensors the backbone does not have") {
    NamedTensors state = full;
    state.emplace_back("layer5.0.conv1.weight", Tensor::zeros({2}));
    state.emplace_back("head.weight", Tensor::zeros({2}));
    CHECK(refused("unknown.safetensors", state)
              .find("2 tensors that the backbone does not have (layer5.0.conv1.weight, head.weight)") !=
          std::string::npos);
  }
  SUBCASE("an integer tensor") {
    NamedTensors state = without("bn1.running_mean");
    state.emplace_back("bn1.running_mean", Tensor::from_vector(std::vector<int32_t>(8, 0), {8}));
    CHECK(refused("integer.safetensors", state)
              .find("1 tensor not stored as F32, F16, BF16 or F64 (bn1.running_mean (I32))") != std::string::npos);
  }
  SUBCASE("every problem at once") {
    NamedTensors state = without("layer1.0.bn2.running_var");
    state.at(0).second = Tensor::zeros({1});
    state.emplace_back("extra", Tensor::zeros({1}));
    const std::string message = refused("all.safetensors", state);
    CHECK(message.find("1 tensor missing from the file (layer1.0.bn2.running_var); 1 tensor with another shape "
                       "(conv1.weight: (1) in the file, (8,3,7,7) in the model); 1 tensor that the backbone does not "
                       "have (extra)") != std::string::npos);
  }
  SUBCASE("the same tensor twice") {
    NamedTensors state = full;
    state.emplace_back("module.conv1.weight", full.front().second);
    const std::string path = temp_path("twice.safetensors");
    io::save_safetensors(path, state);
    CHECK_THROWS_WITH_AS(load_pretrained_backbone(model->backbone(), path),
                         doctest::Contains("both 'conv1.weight' and 'module.conv1.weight' hold the backbone's conv1.weight"),
                         Error);
  }
  SUBCASE("not a safetensors file: io's error") {
    const std::string path = temp_path("weights.pth");
    std::ofstream(path) << "PK\3\4 a zip archive, as torch.save writes";
    CHECK_THROWS_WITH_AS(load_pretrained_backbone(model->backbone(), path), doctest::Contains((path + ": the header length").c_str()),
                         Error);
    CHECK(values_of(*model) == before);
  }
}
