// The trainer's numerical guards: a NaN that the forward pass hides (ReLU maps it to 0, so the loss stays
// finite) still makes gradients NaN, and training stops at that step naming the first parameter, in the
// model's order, whose gradient is not finite; an update that overflows parameters from finite
// gradients stops it at the end of the epoch (before any checkpoint), naming the first one.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "core/backend.h"
#include "models/checkpoint.h"
#include "optim/trainer.h"

using namespace mdff;

namespace {
// 32 random 32x32 RGB images in 4 classes, in memory.
data::Dataset random_dataset() {
  data::Dataset d;
  d.name = "random";
  d.classes = 4;
  d.channels = 3;
  d.height = d.width = 32;
  Rng rng(3);
  for (int i = 0; i < 32 * 3 * 32 * 32; ++i) d.pixels.push_back(static_cast<uint8_t>(rng.below(256)));
  for (int i = 0; i < 32; ++i)
    for (int k = 0; k < 4; ++k) d.labels.push_back(k == i % 4);
  return d;
}

struct Setup {
  data::Dataset dataset = random_dataset();
  Rng rng{1};
  MdffSh model{mdff_config("tiny", 8, 4, "all", {1.0}), rng};
  std::unique_ptr<Trainer> trainer;
  explicit Setup(const std::string& optimizer = "sgd", double lr = 0.01, int64_t batch_size = 8, int readout_every = 0,
                 int epochs = 1) {
    TrainSettings settings;
    settings.readout_every = readout_every;
    settings.epochs = epochs;
    settings.batch_size = batch_size;
    settings.optimizer = optimizer;
    settings.lr = lr;
    std::vector<int64_t> rows(32);
    for (int64_t i = 0; i < 32; ++i) rows[i] = i;
    trainer = std::make_unique<Trainer>(model, dataset, rows, settings);
  }
  Tensor parameter(const std::string& name) {
    for (auto& [n, p] : model.named_parameters())
      if (n == name) return p;
    FAIL("no parameter ", name);
    return {};
  }
};

// `named` is the first parameter of `model`, in order, for which part(parameter) (its value or its
// gradient) holds a NaN or an infinity.
void check_first_non_finite(MdffSh& model, const std::string& named, const std::function<Tensor(const Tensor&)>& part) {
  bool reached = false;
  for (const auto& [key, p] : model.named_parameters()) {
    const std::string& name = key;  // CAPTURE captures in a lambda, which in C++17 cannot name a structured binding
    bool finite = true;
    for (double v : part(p).to_vector()) finite = finite && std::isfinite(v);
    CAPTURE(name);
    if (name == named) {
      CHECK_FALSE(finite);
      reached = true;
      break;
    }
    CHECK(finite);
  }
  CHECK(reached);
}

// The message of the TrainingDiverged that one epoch of `s` ends with ("" when it ends normally).
std::string divergence(Setup& s) {
  try {
    s.trainer->train_epoch();
  } catch (const TrainingDiverged& e) {
    return e.what();
  }
  return "";
}

// The parameter name that follows `prefix` at the start of `message`.
std::string named_after(const std::string& message, const std::string& prefix) {
  REQUIRE(message.rfind(prefix, 0) == 0);
  return message.substr(prefix.size(), message.find(' ', prefix.size()) - prefix.size());
}
}  // namespace

TEST_CASE("a NaN gradient under a finite loss stops training naming the first parameter whose gradient is NaN") {
  Setup s;
  // One weight of the fusion layer NaN: its output column is NaN before the ReLU, 0 after it, so the
  // loss is finite; backward multiplies that weight into the gradient of the fusion's inputs.
  s.parameter("fusion.weight").data<float>()[5] = std::nanf("");
  const std::string message = divergence(s);
  INFO(message);
  const std::string named = named_after(message, "the gradient of ");
  CHECK(message.find(" became nan (element ") != std::string::npos);
  CHECK(message.find("at epoch 1, step 1, with the loss still finite") != std::string::npos);
  check_first_non_finite(s.model, named, [](const Tensor& p) { return p.grad(); });
}

TEST_CASE("read-outs every few steps give the same epoch and report progress at each read-out") {
  Setup every_step, every_third("sgd", 0.01, 8, 3);
  const EpochReport reference = every_step.trainer->train_epoch();
  std::vector<int64_t> reported;
  const EpochReport report = every_third.trainer->train_epoch(
      [&](int64_t done, int64_t total, double, double) { reported.push_back(done * 100 + total); });
  CHECK(reported == std::vector<int64_t>{304, 404});  // steps 3 and 4 of 4: a full window, then the rest
  CHECK(report.loss == reference.loss);
  CHECK(report.j1 == reference.j1);
  CHECK(report.j3 == reference.j3);
}

TEST_CASE("a NaN gradient found at a later read-out names its step") {
  Setup s("sgd", 0.01, 8, 3);
  s.parameter("fusion.weight").data<float>()[5] = std::nanf("");
  const std::string message = divergence(s);
  INFO(message);
  // Step 1's gradients were overwritten by steps 2 and 3 before the read-out: its step is named, its
  // parameter cannot be.
  CHECK(message.find(" gradient values became NaN or infinite at epoch 1, step 1, with the loss still finite") !=
        std::string::npos);
}

TEST_CASE("an update that overflows a parameter stops training at the end of the epoch, naming the first one") {
  // RMSProp's first step moves every weight with a gradient by about 10 lr: past float's largest value.
  // One batch of 32: the epoch ends after that step, where the parameters are checked.
  Setup s("rmsprop", 1e38, 32);
  const std::string message = divergence(s);
  INFO(message);
  const std::string named = named_after(message, "after epoch 1, step 1, parameter ");
  CHECK(message.find("although every gradient was finite: an update overflowed it, the learning rate (1e+38 at "
                     "that step) is far too high") != std::string::npos);
  check_first_non_finite(s.model, named, [](const Tensor& p) { return p; });
}

TEST_CASE("training holds no more memory after an epoch than after the one before (nothing kept per step)") {
  // RMSProp: its state is allocated at the first step, so epoch 1 may end higher than it began.
  Setup s("rmsprop", 1e-4, 8, 0, 3);
  Backend& cpu = backend(Device::CPU);
  s.trainer->train_epoch();
  const size_t after_first = cpu.memory_stats().bytes_in_use;
  cpu.reset_peak_memory();
  s.trainer->train_epoch();
  const MemoryStats second = cpu.memory_stats();
  CHECK(second.bytes_in_use == after_first);
  CHECK(second.peak_bytes_in_use > after_first);  // the steps' activations came and went
  s.trainer->train_epoch();
  CHECK(cpu.memory_stats().bytes_in_use == after_first);
}

TEST_CASE("the learning rate: a linear warm-up that scales the schedule and never passes 1") {
  TrainSettings s;
  s.lr = 0.1;
  s.schedule = "constant";
  s.warmup_epochs = 0.01;  // 0.04 of a step at 4 steps an epoch: (step + 1) / 0.04 was 25 on the first step
  CHECK(scheduled_learning_rate(s, 0, 4, 12) == doctest::Approx(0.1));
  s.warmup_epochs = 0.3;  // 1.2 steps: the second step's factor was 2 / 1.2
  CHECK(scheduled_learning_rate(s, 0, 4, 12) == doctest::Approx(0.1 / 1.2));
  CHECK(scheduled_learning_rate(s, 1, 4, 12) == doctest::Approx(0.1));
  s.warmup_epochs = 1;  // 4 steps: 1/4, 2/4, 3/4, 1
  for (int step = 0; step < 6; ++step) {
    CAPTURE(step);
    CHECK(scheduled_learning_rate(s, step, 4, 12) == doctest::Approx(0.1 * std::min(1.0, (step + 1) / 4.0)));
  }
  s.schedule = "cosine";  // the ramp times 0.5 (1 + cos(pi step / total))
  CHECK(scheduled_learning_rate(s, 3, 4, 12) == doctest::Approx(0.05 * (1 + std::cos(M_PI * 3 / 12))));
  CHECK(scheduled_learning_rate(s, 6, 4, 12) == doctest::Approx(0.05));
  s.warmup_epochs = 0;
  CHECK(scheduled_learning_rate(s, 0, 4, 12) == doctest::Approx(0.1));
  CHECK(scheduled_learning_rate(s, 11, 4, 12) < 0.01);
}
