// mdff_summary: prints the MDFF-SH model as a table of stages with output shapes and parameter
// counts (like torchinfo), for any of the options the model has. The shapes are those of the first scale.
//
//   mdff_summary [--bits 48] [--classes 10] [--taps all|fc1|convs] [--scales 1,0.5] [--image-size 32] [--tiny]
#include <cstdio>

#include "apps/cli.h"
#include "core/error.h"
#include "models/mdff.h"

using namespace mdff;

int main(int argc, char** argv) {
  CLI::App app{"Prints the MDFF-SH model: each stage with its output shape and parameter count"};
  MdffConfig config;
  std::string taps = "all", scales = "1,0.5";
  int image_size = 32;
  bool tiny = false;
  app.add_option("--bits", config.bits, "code length L")->capture_default_str()->transform(cli::whole_number(1, 4096));
  app.add_option("--classes", config.classes, "number of classes K")->capture_default_str()->transform(cli::whole_number(1, 100000));
  app.add_option("--taps", taps, "which features feed the fusion layer: all, fc1 or convs (the paper's Table 4)")
      ->capture_default_str()->check(CLI::IsMember({"all", "fc1", "convs"}));
  app.add_option("--scales", scales, "the image sizes the backbone sees, relative to the input, each in (0, 4]; the "
                 "table shows the first one's shapes")->capture_default_str();
  app.add_option("--image-size", image_size, "input height = width")->capture_default_str()->transform(cli::whole_number(16, 1024));
  app.add_flag("--tiny", tiny, "the tiny ResNet of the tests instead of ResNet50");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  // Option values CLI11 cannot check alone: an error here is a usage error (exit 2), like CLI11's own; the
  // scales' range and message are train_mdff's.
  try {
    config.taps = parse_taps(taps);
    config.scales = cli::parse_list<double>(scales, "--scales");
    for (double s : config.scales) MDFF_CHECK(s > 0 && s <= 4, "--scales: ", s, " is outside (0, 4]");
    if (tiny) config.backbone = ResNetConfig::tiny();
  } catch (const Error& e) {
    std::fprintf(stderr, "mdff_summary: %s\nRun with --help for more information.\n", e.reason());
    return 2;
  }
  try {
    Rng rng(0);
    MdffSh model(config, rng);
    std::fputs(model.summary(image_size).c_str(), stdout);
  } catch (const Error& e) {  // the model could not be built or run: the program's failure, not the options'
    std::fprintf(stderr, "mdff_summary: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
