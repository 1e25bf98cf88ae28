// Loading pretrained backbone weights (see pretrained.h): the file's names matched to the backbone's,
// every problem collected into one message before anything is copied, and the report.
#include "models/pretrained.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "core/error.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"

namespace mdff {

namespace {

constexpr size_t kListed = 8;  // names a message lists before "and N more"
const std::string kModulePrefix = "module.", kBackbonePrefix = "backbone.", kCounter = "num_batches_tracked";

bool starts_with(const std::string& text, const std::string& prefix) { return text.rfind(prefix, 0) == 0; }

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string without(const std::string& prefix, const std::string& name) {
  return starts_with(name, prefix) ? name.substr(prefix.size()) : name;
}

// "a, b, c" with at most kListed items, then "and N more".
std::string listing(const std::vector<std::string>& items) {
  std::string text;
  for (size_t i = 0; i < items.size() && i < kListed; ++i) text += (i ? ", " : "") + items[i];
  if (items.size() > kListed) text += detail::concat(", and ", items.size() - kListed, " more");
  return text;
}

// "1 tensor" or "3 tensors".
std::string tensors(size_t n) { return detail::concat(n, n == 1 ? " tensor" : " tensors"); }

bool is_floating_entry(const io::SafetensorsEntry& entry) {
  return entry.dtype == "F32" || entry.dtype == "F16" || entry.dtype == "BF16" || entry.dtype == "F64";
}

// The flat index of the first NaN or infinite value of a CPU F32 or F64 tensor, or -1.
int64_t first_non_finite_index(const Tensor& t) {
  const auto scan = [&](const auto* values) {
    for (int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(values[i])) return i;
    return int64_t{-1};
  };
  return t.dtype() == DType::F64 ? scan(t.data<double>()) : scan(t.data<float>());
}

}  // namespace

std::string PretrainedReport::summary() const {
  std::vector<std::string> named;
  size_t counters = 0;
  for (const std::string& name : ignored) {
    if (ends_with(name, kCounter)) ++counters;
    else named.push_back(name);
  }
  if (counters) named.push_back(detail::concat(counters, " ", kCounter));
  std::string text = detail::concat(path, ": loaded ", loaded, " backbone tensors");
  if (!ignored.empty()) text += detail::concat(", ignored ", ignored.size(), " (", listing(named), ")");
  return text;
}

PretrainedReport load_pretrained_backbone(ResNet& backbone, const std::string& path) {
  const io::SafetensorsFile file = io::load_safetensors(path);

  NamedTensors targets = model_state(backbone);
  std::map<std::string, Shape> shape_of;
  for (const auto& [name, tensor] : targets) shape_of[name] = tensor.shape();

  const bool checkpoint = std::any_of(file.entries.begin(), file.entries.end(), [](const io::SafetensorsEntry& e) {
    return starts_with(without(kModulePrefix, e.name), kBackbonePrefix);
  });

  PretrainedReport report;
  report.path = path;
  std::map<std::string, const io::SafetensorsEntry*> source_of;  // backbone name -> the file's tensor
  std::vector<std::string> unknown, mismatched, not_floating;
  for (const io::SafetensorsEntry& entry : file.entries) {
    std::string name = without(kModulePrefix, entry.name);
    if (checkpoint && !starts_with(name, kBackbonePrefix)) {  // an mdff checkpoint's head or training state
      report.ignored.push_back(entry.name);
      continue;
    }
    name = without(kBackbonePrefix, name);
    const auto shape = shape_of.find(name);
    if (shape == shape_of.end()) {
      if (ends_with(name, kCounter) || name == "fc.weight" || name == "fc.bias") report.ignored.push_back(entry.name);
      else unknown.push_back(entry.name);
      continue;
    }
    const auto [previous, inserted] = source_of.emplace(name, &entry);
    if (!inserted)
      MDFF_FAIL(path, ": both '", previous->second->name, "' and '", entry.name, "' hold the backbone's ", name);
    if (!is_floating_entry(entry)) not_floating.push_back(detail::concat(entry.name, " (", entry.dtype, ")"));
    else if (entry.shape != shape->second)
      mismatched.push_back(detail::concat(entry.name, ": ", shape_str(entry.shape), " in the file, ",
                                          shape_str(shape->second), " in the model"));
  }
  std::vector<std::string> missing;
  for (const auto& [name, tensor] : targets)
    if (!source_of.count(name)) missing.push_back(name);

  std::vector<std::string> problems;
  if (!missing.empty()) problems.push_back(tensors(missing.size()) + " missing from the file (" + listing(missing) + ")");
  if (!mismatched.empty())
    problems.push_back(tensors(mismatched.size()) + " with another shape (" + listing(mismatched) + ")");
  if (!unknown.empty())
    problems.push_back(tensors(unknown.size()) + " that the backbone does not have (" + listing(unknown) + ")");
  if (!not_floating.empty())
    problems.push_back(tensors(not_floating.size()) + " not stored as F32, F16, BF16 or F64 (" + listing(not_floating) +
                       ")");
  if (!problems.empty()) {
    std::string text;
    for (const std::string& problem : problems) text += (text.empty() ? "" : "; ") + problem;
    MDFF_FAIL(path, " does not fit the ResNet backbone (", targets.size(), " tensors by torchvision's names): ", text);
  }

  // Every tensor converted and checked before any is copied, so that a refused file leaves the model as it was.
  std::vector<Tensor> values;
  for (auto& [name, target] : targets) {
    const io::SafetensorsEntry& entry = *source_of.at(name);
    values.push_back(io::to_tensor(entry, target.dtype()));  // on the CPU
    // A NaN or infinity here would surface epochs later as a "diverged" run blamed on the learning rate.
    const int64_t bad = first_non_finite_index(values.back());
    MDFF_CHECK(bad < 0, path, ": '", entry.name, "' holds a value that is not finite (element ", bad, "): the weights "
               "file is damaged; get it again (scripts/download_resnet50.sh)");
  }
  for (size_t i = 0; i < targets.size(); ++i) targets[i].second.copy_(values[i]);
  report.loaded = static_cast<int64_t>(targets.size());
  return report;
}

}  // namespace mdff
