// torchvision's own ResNet50, loaded with load_pretrained_backbone (models/pretrained.h), must give
// torchvision's outputs: tools/torchvision_resnet50.py builds torchvision.models.resnet50() with random
// weights and random batch-norm statistics, writes its state_dict as ImageNet weight files hold it
// (num_batches_tracked and fc.* included) and its eval-mode outputs of layer2, layer3 and layer4 (C3, C4,
// C5: C5 depends on every backbone tensor). The engine loads the file into MDFF-SH's backbone and compares.
//
// - float64 (the file's float32 values widened): tests the semantics, every name and every tensor, at
//   the rounding of float64; the two agree to about 1e-14.
// - float32: the engine as train_mdff runs it. PyTorch's own float32 C5 is 2e-5 from its float64 C5 here
//   (53 convolutions, sums over up to 4,608 terms, each rounded at 6e-8); the engine sums in another
//   order, so it lands about as far from float64, and from PyTorch's float32. The bound, 2e-4, allows 10x
//   that, while one batch norm's statistics left unloaded moves C5 by 1e-1 or more.
//
// Needs /usr/bin/python3 with Debian's python3-torch and python3-torchvision; without them the whole
// executable is skipped with the reason (exit 77), except in CI, which installs them.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <array>
#include <utility>
#include <vector>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/autograd.h"
#include "core/safetensors.h"
#include "tests/reference_tensors.h"
#include "models/mdff.h"
#include "models/pretrained.h"
#include "tests/temp_folder.h"
#include "tests/source_tree.h"

using namespace mdff;

namespace {

constexpr double kFloat64Tolerance = 1e-10;  // max |engine - torchvision| / max |torchvision|, float64
constexpr double kFloat32Tolerance = 2e-4;   // the same in float32 (see above)

using test::reference_tensor;
using test::relative_error;

}  // namespace

// Read by doctest_main.cpp: non-empty means "skip this executable, for this reason".
std::string mdff_test_skip_reason() {
  if (std::getenv("CI")) return "";  // CI installs torch and torchvision: a failure to import must fail the test
  FILE* pipe = ::popen("/usr/bin/python3 -c 'import torch, torchvision' 2>&1", "r");
  if (!pipe) return "cannot run /usr/bin/python3";
  std::string output;
  std::array<char, 256> chunk;
  while (std::fgets(chunk.data(), chunk.size(), pipe)) output = chunk.data();  // keep the last line
  if (::pclose(pipe) == 0) return "";
  if (!output.empty() && output.back() == '\n') output.pop_back();
  return "/usr/bin/python3 cannot import torch and torchvision (apt-get install python3-torch python3-torchvision): " +
         output;
}

TEST_CASE("torchvision's ResNet50 weights give torchvision's C3, C4 and C5 in MDFF-SH's backbone") {
  const test::TempFolder folder("mdff_test_pretrained_torchvision");
  const std::string weights = folder.file("resnet50.safetensors"), outputs = folder.file("outputs.safetensors");
  const std::string command = "/usr/bin/python3 " + test::source_file("tools/torchvision_resnet50.py") + " '" + weights +
                              "' '" + outputs + "'";
  REQUIRE_MESSAGE(std::system(command.c_str()) == 0, "the torchvision reference failed: ", command);
  const io::SafetensorsFile expected = io::load_safetensors(outputs);

  for (const DType dtype : {DType::F64, DType::F32}) {
    const std::string type = dtype_name(dtype);
    MdffConfig config;  // ResNet50
    Rng rng(0);
    MdffSh model(config, rng);
    model.to(dtype);
    const PretrainedReport report = load_pretrained_backbone(model.backbone(), weights);
    CHECK(report.loaded == 265);          // 161 - 2 parameters (no fc) and 106 batch-norm statistics
    CHECK(report.ignored.size() == 55);   // fc.weight, fc.bias and 53 num_batches_tracked
    MESSAGE(report.summary());

    model.eval();
    NoGradGuard no_grad;
    const ResNetTaps taps = model.backbone().forward_taps(reference_tensor(expected, "input", dtype));
    const double tolerance = dtype == DType::F64 ? kFloat64Tolerance : kFloat32Tolerance;
    const std::vector<std::pair<std::string, Tensor>> outputs_of{{"c3", taps.c3}, {"c4", taps.c4}, {"c5", taps.c5}};
    for (const auto& output : outputs_of) {
      // CHECK_MESSAGE captures in a lambda, which in C++17 cannot name a structured binding.
      const std::string& name = output.first;
      const Tensor& engine = output.second;
      const Tensor torchvision = reference_tensor(expected, name, DType::F64);
      const double error = relative_error(engine, torchvision);
      MESSAGE(type, " ", name, ": max relative error ", error, " (PyTorch's own float32: ",
              relative_error(reference_tensor(expected, name + "_f32", DType::F64), torchvision), ")");
      CHECK_MESSAGE(error < tolerance, type, " ", name);
    }
  }
}
