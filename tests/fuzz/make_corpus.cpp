// Writes the fuzz targets' seed corpora (tests/fuzz/corpus/<target>/): small valid inputs made with the
// engine's own writers where it has them, deterministic, so that rerunning it reproduces the committed
// files. Usage: fuzz_make_corpus tests/fuzz/corpus
#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "apps/train_options.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"
#include "retrieval/code_db.h"
#include "retrieval/npy.h"
#include "tests/stb_image_write_static.h"

using namespace mdff;
namespace fs = std::filesystem;

namespace {
fs::path root;

std::string out(const std::string& target, const std::string& name) {
  fs::create_directories(root / target);
  return (root / target / name).string();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string idx_bytes(const std::vector<uint32_t>& dims) {
  std::string bytes{0, 0, 0x08, static_cast<char>(dims.size())};
  size_t count = 1;
  for (uint32_t d : dims) {
    for (int shift : {24, 16, 8, 0}) bytes += static_cast<char>(d >> shift);
    count *= d;
  }
  for (size_t i = 0; i < count; ++i) bytes += static_cast<char>(i * 37 % 251);
  return bytes;
}

void write_gz(const std::string& path, const std::string& bytes) {
  gzFile file = gzopen(path.c_str(), "wb9");  // zlib writes mtime 0: the same bytes every time
  gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(file);
}

void idx() {
  write_bytes(out("fuzz_idx", "images.idx"), idx_bytes({2, 3, 3}));
  write_bytes(out("fuzz_idx", "labels.idx"), idx_bytes({4}));
  write_gz(out("fuzz_idx", "images.idx.gz"), idx_bytes({2, 4, 4}));
}

void cifar10() {
  std::string records;
  for (int r = 0; r < 6; ++r) {
    records += static_cast<char>(r);
    for (int i = 0; i < 3 * 32 * 32; ++i) records += static_cast<char>((i * 7 + r) % 256);
  }
  write_bytes(out("fuzz_cifar10", "six_records"), records);
  write_bytes(out("fuzz_cifar10", "six_records_and_names"),
              records + "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n");
}

void image_list() {
  write_bytes(out("fuzz_image_list", "three_classes"), "3\na.png 1 0 1\nb.jpg 0 1 0\n\nsub/c.png 1 1 1\n");
  write_bytes(out("fuzz_image_list", "one_class"), "1\nsub/c.png 1\n");
}

void images() {
  std::vector<uint8_t> rgb(5 * 3 * 3), grey(4 * 4);
  for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>(i * 17);
  for (size_t i = 0; i < grey.size(); ++i) grey[i] = static_cast<uint8_t>(i * 16);
  stbi_write_png(out("fuzz_image", "rgb.png").c_str(), 5, 3, 3, rgb.data(), 5 * 3);
  stbi_write_png(out("fuzz_image", "grey.png").c_str(), 4, 4, 1, grey.data(), 4);
  stbi_write_bmp(out("fuzz_image", "rgb.bmp").c_str(), 5, 3, 3, rgb.data());
  stbi_write_tga(out("fuzz_image", "rgb.tga").c_str(), 5, 3, 3, rgb.data());
  stbi_write_jpg(out("fuzz_image", "rgb.jpg").c_str(), 5, 3, 3, rgb.data(), 90);
  const std::vector<float> hdr(2 * 2 * 3, 0.5f);
  stbi_write_hdr(out("fuzz_image", "grey.hdr").c_str(), 2, 2, 3, hdr.data());
  write_bytes(out("fuzz_image", "rgb.ppm"), "P6\n2 2\n255\n" + std::string(reinterpret_cast<const char*>(rgb.data()), 12));
  // A 1x1 GIF (no GIF writer in stb): header, screen, a 2-colour table, image descriptor, LZW data.
  static const char gif[] = "GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\x00\x00\x00\x00\xff"
                            ",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00;";
  write_bytes(out("fuzz_image", "dot.gif"), std::string(gif, sizeof gif - 1));
}

// BF16 bytes of a float tensor: the upper half of each float32.
std::vector<uint8_t> bf16_bytes(const Tensor& t) {
  const Tensor host = t.cpu();
  std::vector<uint8_t> bytes;
  for (int64_t i = 0; i < host.numel(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, host.data<float>() + i, 4);
    bytes.push_back(static_cast<uint8_t>(bits >> 16));
    bytes.push_back(static_cast<uint8_t>(bits >> 24));
  }
  return bytes;
}

void safetensors() {
  Rng rng(1);
  io::save_safetensors(out("fuzz_safetensors", "f32_f64_i32.safetensors"),
                       {{"weight", Tensor::randn({2, 3}, rng)},
                        {"running_var", Tensor::full({3}, 1.5, DType::F64)},
                        {"steps", Tensor::from_vector(std::vector<int32_t>{1, -2}, {2})},
                        {"empty", Tensor::zeros({0, 4})}},
                       {{"format", "pt"}, {"note", "seed"}});
  io::save_safetensors_entries(out("fuzz_safetensors", "bf16_f16_i64_u8_bool.safetensors"),
                               {{"bf16", "BF16", {2}, {0x80, 0x3f, 0x00, 0xc0}},
                                {"f16", "F16", {3}, {0x00, 0x3c, 0x00, 0x7c, 0x01, 0x00}},
                                {"i64", "I64", {1}, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
                                {"u8", "U8", {2, 2}, {0, 1, 2, 255}},
                                {"bool", "BOOL", {1}, {1}}});
}

// The state of a tiny-backbone MDFF-SH as train_mdff names it, in BF16. Only the tensors of at most 2,048
// values are kept (the 1024-wide head layers would make the seed megabytes): the loader rebuilds the
// model, copies the backbone and stops at the first missing head tensor, which the fuzzer may add.
void checkpoint() {
  train::Options o;
  o.model = "tiny";
  o.bits = "8";
  o.scales = "1";
  o.taps = "fc1";
  o.classes = 3;
  train::resolve_defaults(o);
  Rng rng(0);
  const MdffSh model(mdff_config("tiny", 8, 3, "fc1", {1.0}), rng);
  std::vector<io::SafetensorsEntry> entries;
  for (const auto& [name, tensor] : model_state(model)) {
    if (tensor.numel() <= 2048) entries.push_back({name, "BF16", tensor.shape(), bf16_bytes(tensor)});
  }
  const std::string config = train::options_json(o).dump();
  io::save_safetensors_entries(out("fuzz_checkpoint", "tiny_fc1_8bits.safetensors"), entries,
                               {{"bits", "8"}, {"config", config}});
  nlohmann::json crop = train::options_json(o);
  crop["resize"] = 40;
  crop["crop"] = 32;
  io::save_safetensors_entries(out("fuzz_checkpoint", "metadata_only.safetensors"), {},
                               {{"bits", "8"}, {"config", crop.dump()}});
}

// The tiny ResNet's parameters and buffers by torchvision's names, as a plain file (F32, with an ImageNet
// classifier and counters that are ignored) and as an mdff checkpoint ("backbone." names, F16 elsewhere).
void pretrained() {
  Rng rng(0);
  const ResNet backbone(ResNetConfig::tiny(), rng);
  NamedTensors state = model_state(backbone);
  state.push_back({"fc.weight", Tensor::zeros({2, 16})});
  state.push_back({"bn1.num_batches_tracked", Tensor::from_vector(std::vector<int32_t>{7}, {})});
  io::save_safetensors(out("fuzz_pretrained", "torchvision_names.safetensors"), state);
  std::vector<io::SafetensorsEntry> entries;
  for (const auto& [name, tensor] : model_state(backbone)) {
    entries.push_back({"module.backbone." + name, "BF16", tensor.shape(), bf16_bytes(tensor)});
  }
  entries.push_back({"module.hash.bias", "F16", {2}, {0x00, 0x3c, 0x00, 0xbc}});
  io::save_safetensors_entries(out("fuzz_pretrained", "mdff_checkpoint.safetensors"), entries);
}

void code_db() {
  retrieval::CodeDatabase db;
  db.codes.bits = 12;
  db.codes.words = 1;
  db.codes.count = 3;
  db.codes.data = {0x0ff, 0xabc, 0x001};
  db.paths = {"images/a.png", "b.jpg", ""};
  db.classes = 2;
  db.labels = {1, 0, 0, 1, 1, 1};
  db.checkpoint = "/runs/x/checkpoint_12bits.safetensors";
  db.checkpoint_crc32 = "0123abcd";
  retrieval::write_code_database(out("fuzz_code_db", "12bits_labels.safetensors"), db);
  db.codes.bits = 64;
  db.codes.data = {~uint64_t{0}, 0, uint64_t{1} << 63};
  db.classes = 0;
  db.labels.clear();
  retrieval::write_code_database(out("fuzz_code_db", "64bits.safetensors"), db);
}

void npy() {
  retrieval::write_npy(out("fuzz_npy", "int8.npy"), std::vector<int8_t>{1, -1, -1, 1, 1, 1}, {2, 3});
  retrieval::write_npy(out("fuzz_npy", "uint8.npy"), std::vector<uint8_t>{0, 1, 1}, {3});
  retrieval::write_npy(out("fuzz_npy", "float32.npy"), std::vector<float>{0.5f, -2.0f}, {1, 2, 1});
  // Format version 2.0 (4-byte header length), which the reader also takes.
  const std::string header = "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }\n";
  std::string v2 = std::string("\x93NUMPY\x02\x00", 8);
  for (int shift : {0, 8, 16, 24}) v2 += static_cast<char>(header.size() >> shift);
  write_bytes(out("fuzz_npy", "v2.npy"), v2 + header + std::string("\x01\x00", 2));
}

void config() {
  write_bytes(out("fuzz_config_toml", "options.toml"),
              "# a train_mdff config\nepochs = 3\nbits = \"12,24\"\nscales = \"1,0.5\"\nlr = 0.01\nmodel = \"tiny\"\n"
              "recipe = \"paper\"\nno-flip = true\nseed = 7\n");
  write_bytes(out("fuzz_config_toml", "crop.toml"), "dataset = \"list.txt\"\nclasses = 5\nresize = 40\ncrop = 32\n"
                                                    "queries = 10\n");
  train::Options o;
  o.epochs = 3;
  train::resolve_defaults(o);
  write_bytes(out("fuzz_config_json", "config.json"), train::options_json(o).dump(2) + "\n");
  o.dataset = "list.txt";
  o.bits = "12,24,32,48";
  o.resize = 256;
  o.crop = 224;
  write_bytes(out("fuzz_config_json", "list_crop.json"), train::options_json(o).dump() + "\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR (tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  root = argv[1];
  idx();
  cifar10();
  image_list();
  images();
  safetensors();
  checkpoint();
  pretrained();
  code_db();
  npy();
  config();
  std::printf("seed corpora written under %s\n", root.c_str());
  return 0;
}
