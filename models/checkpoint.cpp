// Rebuilding an MdffSh from a train_mdff checkpoint (see checkpoint.h).
#include "models/checkpoint.h"

#include <nlohmann/json.hpp>

#include <map>

#include "core/error.h"
#include "core/rng.h"

namespace mdff {

namespace {
using json = nlohmann::json;

// The largest model a checkpoint may describe: train_mdff's own limits (--bits 4..1024, --classes up to
// 10000, image sizes up to 1024, --scales in (0, 4]), so that damaged metadata cannot make the model or its
// input gigabytes large.
constexpr int kMaxBits = 1024, kMaxClasses = 10000, kMaxImageSize = 1024;
constexpr double kMaxScale = 4;

// Tensors under these prefixes hold training state (optimizer moments, the trainer's position), not the model.
bool is_training_state(const std::string& name) {
  return name.rfind("optimizer.", 0) == 0 || name.rfind("trainer.", 0) == 0;
}

const std::string& metadata_value(const io::SafetensorsFile& file, const char* key, const std::string& path) {
  const auto it = file.metadata.find(key);
  MDFF_CHECK(it != file.metadata.end(), path, ": the checkpoint has no \"", key,
             "\" metadata; load_model_checkpoint reads the checkpoint_{L}bits.safetensors files train_mdff writes");
  return it->second;
}

// config[key], which must exist and be of the kind `is_kind` checks (`kind` names it in the error).
const json& config_value(const json& config, const char* key, bool (json::*is_kind)() const noexcept,
                         const char* kind, const std::string& path) {
  MDFF_CHECK(config.contains(key), path, ": the checkpoint's \"config\" metadata has no \"", key,
             "\" (it holds the run's config.json, which train_mdff writes with every option)");
  const json& value = config[key];
  MDFF_CHECK((value.*is_kind)(), path, ": \"", key, "\" in the checkpoint's \"config\" metadata is ", value.dump(),
             ", not ", kind);
  return value;
}

// config[key] as an int in lowest..highest.
int int_in(const json& config, const char* key, int lowest, int highest, const std::string& path) {
  const json& value = config_value(config, key, &json::is_number_integer, "a whole number", path);
  const int64_t number = value.get<int64_t>();  // one above INT64_MAX comes out negative, and is refused
  MDFF_CHECK(number >= lowest && number <= highest, path, ": \"", key, "\" in the checkpoint's \"config\" metadata is ",
             value.dump(), ", not in ", lowest, "..", highest);
  return static_cast<int>(number);
}

int bits_of(const io::SafetensorsFile& file, const std::string& path) {
  const std::string& text = metadata_value(file, "bits", path);
  size_t used = 0;
  int bits = 0;
  try {
    bits = std::stoi(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MDFF_CHECK(used > 0 && used == text.size() && bits >= 1 && bits <= kMaxBits, path,
             ": the checkpoint's \"bits\" metadata is '", text, "', not a code length in 1..", kMaxBits);
  return bits;
}
}  // namespace

MdffConfig mdff_config(const std::string& backbone, int bits, int classes, const std::string& taps,
                       const std::vector<double>& scales) {
  MdffConfig config;
  MDFF_CHECK(backbone == "resnet50" || backbone == "tiny", "unknown model '", backbone, "': use resnet50 or tiny");
  if (backbone == "tiny") config.backbone = ResNetConfig::tiny();
  config.bits = bits;
  config.classes = classes;
  config.taps = parse_taps(taps);
  config.scales = scales;
  return config;
}

NamedTensors model_state(const Module& model) {
  NamedTensors state = model.named_parameters();
  for (auto& named : model.named_buffers()) state.push_back(named);
  return state;
}

void load_model_state(Module& model, const io::SafetensorsFile& file, const std::string& source,
                      const std::string& model_name) {
  std::map<std::string, Tensor> expected;
  for (auto& [name, tensor] : model_state(model)) expected.emplace(name, tensor);
  for (const io::SafetensorsEntry& entry : file.entries) {
    if (is_training_state(entry.name)) continue;
    MDFF_CHECK(expected.count(entry.name), source, ": the checkpoint holds the tensor '", entry.name, "', which ",
               model_name, " does not have");
  }
  for (auto& [name, tensor] : expected) {
    const io::SafetensorsEntry* entry = file.find(name);
    MDFF_CHECK(entry, source, ": the checkpoint has no tensor '", name, "', which ", model_name, " needs");
    MDFF_CHECK(entry->shape == tensor.shape(), source, ": tensor '", name, "' has shape ", shape_str(entry->shape),
               " in the checkpoint, but ", model_name, " needs ", shape_str(tensor.shape()));
    tensor.copy_(io::to_tensor(*entry, tensor.dtype()));  // any stored dtype becomes the model's; copy_ crosses devices
  }
}

LoadedCheckpoint load_model_checkpoint(const std::string& path) {
  const io::SafetensorsFile file = io::load_safetensors(path);
  const int bits = bits_of(file, path);
  json config;
  try {
    config = json::parse(metadata_value(file, "config", path));
  } catch (const json::exception& e) {
    MDFF_FAIL(path, ": the checkpoint's \"config\" metadata is not valid JSON (", e.what(), ")");
  }
  MDFF_CHECK(config.is_object(), path, ": the checkpoint's \"config\" metadata is ", config.type_name(),
             ", not a JSON object");

  LoadedCheckpoint loaded;
  loaded.backbone = config_value(config, "model", &json::is_string, "a string", path).get<std::string>();
  loaded.classes = int_in(config, "classes", 1, kMaxClasses, path);
  loaded.batch.image_size = int_in(config, "image_size", 1, kMaxImageSize, path);
  // Crop mode (train_mdff --resize R --crop C); both 0, or absent in runs from before these options, for
  // the plain resize to image_size.
  loaded.batch.resize = config.contains("resize") ? int_in(config, "resize", 0, kMaxImageSize, path) : 0;
  loaded.batch.crop = config.contains("crop") ? int_in(config, "crop", 0, kMaxImageSize, path) : 0;
  loaded.batch.crop_mode = loaded.batch.crop > 0;
  MDFF_CHECK((loaded.batch.resize > 0) == loaded.batch.crop_mode && loaded.batch.crop <= loaded.batch.resize, path,
             ": the checkpoint's \"config\" metadata has \"resize\" ", loaded.batch.resize, " and \"crop\" ",
             loaded.batch.crop, "; crop mode needs 1 <= crop <= resize, and both are 0 without it");
  const std::string taps = config_value(config, "taps", &json::is_string, "a string", path).get<std::string>();
  std::vector<double> scales;
  for (const json& s : config_value(config, "scales", &json::is_array, "an array of numbers", path)) {
    MDFF_CHECK(s.is_number() && s.get<double>() > 0 && s.get<double>() <= kMaxScale, path,
               ": \"scales\" in the checkpoint's \"config\" metadata holds ", s.dump(), ", not a number in (0, ",
               kMaxScale, "]");
    scales.push_back(s.get<double>());
  }
  try {
    Rng rng(0);  // every value is replaced by the checkpoint's
    loaded.model = std::make_unique<MdffSh>(mdff_config(loaded.backbone, bits, loaded.classes, taps, scales), rng);
  } catch (const Error& e) {
    MDFF_FAIL(path, ": the checkpoint's metadata describes no valid model: ", e.what());
  }

  load_model_state(*loaded.model, file, path,
                   detail::concat("a ", loaded.backbone, " MDFF-SH (", bits, " bits, ", loaded.classes, " classes, taps ",
                                  taps, ")"));
  loaded.model->eval();
  return loaded;
}

}  // namespace mdff
