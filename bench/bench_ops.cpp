// Per-op speed on the CPU or the GPU at the shapes of one ResNet50-MDFF-SH training step (batch 32, 32x32
// input by default, the first scale; 48 bits): each kernel's median time with its GFLOP/s (compute-bound
// ops) or GB/s (memory-bound ops), next to the device's roofline measured in the same run: the GEMM peak
// and the memory bandwidth of a triad. The FLOPs and bytes of a call are those the profiler counts
// (core/profiler.h), so the benchmark and the profiler agree; "n" is how often the op runs per pass.
// An op whose operands fit in the caches can go beyond the memory bandwidth (more than 100% of it).
// The second scale (the 0.5x image) repeats the backbone's ops at half the size and is not listed.
// The ops are the model's: batch norm with its ReLU in one kernel where a ReLU follows it, the residual
// add with its ReLU, ReLU's gradient taken from the output. Each fused op is also timed as the two
// kernels it replaces, and the fusions section says what each fusion saves per pass.
//
//   bench_ops [--device cpu|cuda] [--precision tf32|fp32] [--input 32] [--batch 32] [--bits 48] [--repeat 5]
//             [--filter SUBSTRING] [--json FILE]
// Exit status 0; 1 when a kernel failed or the JSON could not be written; 2 for a bad option or value (--device
// cuda without a usable GPU among them).
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "apps/cli.h"
#include "bench/resnet50_convs.h"
#include "bench/timing.h"
#include "core/backend.h"
#include "core/blas.h"
#include "core/file_io.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "models/mdff.h"

using namespace mdff;
using json = nlohmann::json;

namespace {

// Rows of the U matrix that J1 compares each batch against (the training set of the paper's protocol).
constexpr int kTrainSize = 5000;

Device g_device = Device::CPU;  // --device: where every operand lives and every op runs
const bench::RandomOperands* g_random = nullptr;  // g_device's, made by main before any op is prepared
Backend& dev() { return backend(g_device); }  // looked up per call, so the profiler sees it when on

// Operands on the benchmark's device.
Tensor randn(const Shape& shape, Rng& rng, double std = 1.0) { return (*g_random)(shape, rng, std); }
Tensor empty(const Shape& shape, DType dtype = DType::F32) { return Tensor::empty(shape, dtype, g_device); }
Tensor full(const Shape& shape, double value) { return Tensor::full(shape, value, DType::F32, g_device); }

// An op with its operands allocated: its shapes (input -> output) and the call to time.
struct Prepared {
  std::string shapes;
  std::function<void()> call;
};

struct Op {
  std::string name;  // what it is, e.g. "conv fwd layer1.k 3x3"; --filter matches it
  int count;         // how often it runs in one forward (or backward) pass
  std::function<Prepared()> prepare;
  std::function<Prepared()> unfused = nullptr;  // for a fused op: the same work as the kernels it replaces
};

// (shape, occurrences) in order of first appearance, the occurrences of equal shapes summed.
using ShapeCounts = std::vector<std::pair<Shape, int>>;
void add_count(ShapeCounts& counts, const Shape& shape, int n) {
  for (auto& [s, c] : counts)
    if (s == shape) {
      c += n;
      return;
    }
  counts.emplace_back(shape, n);
}

std::string arrow(const Shape& from, const Shape& to) { return shape_str(from) + " -> " + shape_str(to); }

// Forward and backward of a convolution. Backward writes the weight gradient, the bias gradient when
// there is a bias, and the input gradient unless the input is the images (they need none).
void add_conv(std::vector<Op>& ops, const bench::ConvShape& s, int batch, bool bias, bool input_grad) {
  const Shape x{batch, s.cin, s.size, s.size}, w{s.cout, s.cin, s.kernel, s.kernel};
  const Shape y{batch, s.cout, s.out_size(), s.out_size()};
  const Conv2dParams p{s.stride, s.padding};
  ops.push_back({"conv fwd " + s.name, s.count, [=] {
                   Rng rng(1);
                   const Tensor xt = randn(x, rng), wt = randn(w, rng, 0.05), yt = empty(y);
                   const Tensor bt = bias ? randn({s.cout}, rng) : Tensor();
                   return Prepared{arrow(x, y), [=] { dev().conv2d_forward(xt, wt, bt, p, yt); }};
                 }});
  ops.push_back({"conv bwd " + s.name, s.count, [=] {
                   Rng rng(2);
                   const Tensor xt = randn(x, rng), wt = randn(w, rng, 0.05), gy = randn(y, rng);
                   const Tensor gx = input_grad ? empty(x) : Tensor(), gw = empty(w);
                   const Tensor gb = bias ? empty({s.cout}) : Tensor();
                   return Prepared{arrow(y, x), [=] { dev().conv2d_backward(xt, wt, gy, p, gx, gw, gb); }};
                 }});
}

// Operands of a training-mode batch norm of shape x: parameters, running statistics, and the batch
// statistics of one forward pass.
struct BatchNorm {
  Tensor x, gamma, beta, running_mean, running_var, y, mean, invstd;
  explicit BatchNorm(const Shape& shape) {
    Rng rng(3);
    const Shape channels{shape[1]};
    x = randn(shape, rng);
    gamma = full(channels, 1.0);
    beta = full(channels, 0.0);
    running_mean = full(channels, 0.0);
    running_var = full(channels, 1.0);
    y = empty(shape);
    mean = empty(channels);
    invstd = empty(channels);
    forward(false);
  }
  void forward(bool relu) const {
    dev().batch_norm_forward(x, gamma, beta, running_mean, running_var, true, 0.1, 1e-5, y, mean, invstd, relu);
  }
};

// relu: the batch norm writes the ReLU of its result (ops::batch_norm2d_relu), fused from a batch norm and
// a ReLU over its output. The backward is the same either way (ReLU's gradient is its own row).
void add_batch_norm_forward(std::vector<Op>& ops, const Shape& shape, int count, bool relu) {
  if (!relu) {
    ops.push_back({"bn fwd train", count, [=] {
                     const BatchNorm bn(shape);
                     return Prepared{shape_str(shape), [=] { bn.forward(false); }};
                   }});
    return;
  }
  ops.push_back({"bn+relu fwd train", count,
                 [=] {
                   const BatchNorm bn(shape);
                   return Prepared{shape_str(shape), [=] { bn.forward(true); }};
                 },
                 [=] {
                   const BatchNorm bn(shape);
                   const Tensor activated = empty(shape);
                   return Prepared{shape_str(shape), [=] {
                                     bn.forward(false);
                                     dev().unary(UnaryOp::Relu, bn.y, activated);
                                   }};
                 }});
}

void add_batch_norm_backward(std::vector<Op>& ops, const Shape& shape, int count) {
  ops.push_back({"bn bwd train", count, [=] {
                   const BatchNorm bn(shape);
                   Rng rng(4);
                   const Tensor gy = randn(shape, rng), gx = empty(shape);
                   const Tensor gg = empty({shape[1]}), gb = empty({shape[1]});
                   return Prepared{shape_str(shape), [=] {
                                     dev().batch_norm_backward(bn.x, bn.gamma, bn.mean, bn.invstd, gy, true, gx, gg,
                                                               gb);
                                   }};
                 }});
}

void add_relu_forward(std::vector<Op>& ops, const Shape& shape, int count) {
  ops.push_back({"relu fwd", count, [=] {
                   Rng rng(5);
                   const Tensor x = randn(shape, rng), y = empty(shape);
                   return Prepared{shape_str(shape), [=] { dev().unary(UnaryOp::Relu, x, y); }};
                 }});
}

// ReLU's gradient: from the output where the ReLU is fused (relu(h) > 0 exactly where h > 0), from the input
// for the head's standalone ReLUs; the same kernel either way.
void add_relu_backward(std::vector<Op>& ops, const Shape& shape, int count) {
  ops.push_back({"relu bwd", count, [=] {
                   Rng rng(6);
                   const Tensor y = randn(shape, rng), gy = randn(shape, rng);
                   const Tensor gx = empty(shape);
                   return Prepared{shape_str(shape), [=] { dev().unary_backward(UnaryOp::Relu, y, Tensor(), gy, gx); }};
                 }});
}

// The residual join of a bottleneck block: relu(a + b) in one pass (ops::add_relu), fused from an add and a
// ReLU over its result.
void add_residual_join(std::vector<Op>& ops, const Shape& shape, int count) {
  auto operand = [shape](uint64_t seed) {
    Rng rng(seed);
    return randn(shape, rng);
  };
  ops.push_back({"add+relu fwd", count,
                 [=] {
                   const Tensor a = operand(10), b = operand(11), y = empty(shape);
                   return Prepared{shape_str(shape), [=] { dev().binary(BinaryOp::AddRelu, a, b, y); }};
                 },
                 [=] {
                   const Tensor a = operand(10), b = operand(11);
                   const Tensor sum = empty(shape), y = empty(shape);
                   return Prepared{shape_str(shape), [=] {
                                     dev().binary(BinaryOp::Add, a, b, sum);
                                     dev().unary(UnaryOp::Relu, sum, y);
                                   }};
                 }});
}

// y (N,out) = x (N,in) W^T + b; backward: dx = dy W, dW = dy^T x, db = the column sums of dy.
void add_linear(std::vector<Op>& ops, const std::string& name, int batch, int in, int out, int count) {
  const Shape x{batch, in}, w{out, in}, y{batch, out};
  ops.push_back({"linear fwd " + name, count, [=] {
                   Rng rng(7);
                   const Tensor xt = randn(x, rng), wt = randn(w, rng, 0.05);
                   const Tensor b = randn({out}, rng), yt = empty(y);
                   return Prepared{arrow(x, y), [=] {
                                     dev().gemm(false, true, 1.0, xt, wt, 0.0, yt);
                                     dev().binary(BinaryOp::Add, yt, b, yt);
                                   }};
                 }});
  ops.push_back({"linear bwd " + name, count, [=] {
                   Rng rng(8);
                   const Tensor xt = randn(x, rng), wt = randn(w, rng, 0.05), gy = randn(y, rng);
                   const Tensor gx = empty(x), gw = empty(w), gb = empty({out});
                   return Prepared{arrow(y, x), [=] {
                                     dev().gemm(false, false, 1.0, gy, wt, 0.0, gx);
                                     dev().gemm(true, false, 1.0, gy, xt, 0.0, gw);
                                     dev().sum_to(gy, gb);
                                   }};
                 }});
}

// An optimizer step over every parameter of the model (optim/optimizers.h): parameters and state in flat
// buffers, a gradient tensor per parameter.
void add_optimizer_step(std::vector<Op>& ops, const MdffConfig& config, bool rmsprop) {
  ops.push_back({rmsprop ? "rmsprop step" : "sgd step", 1, [=] {
                   Rng rng(9);
                   const NamedTensors parameters = MdffSh(config, rng).named_parameters();
                   std::vector<GradientSlice> grads;
                   int64_t n = 0;
                   for (const auto& [name, p] : parameters) {
                     grads.push_back({randn(p.shape(), rng, 1e-3), n});
                     n += p.numel();
                   }
                   const Tensor param = randn({n}, rng, 0.05);
                   const Tensor state = full({n}, 0.0);  // RMSProp's square average, SGD's momentum buffer
                   std::function<void()> step;
                   if (rmsprop) step = [=] { dev().rmsprop_step(param, grads, state, 1e-4, 0.99, 1e-8, 0); };
                   else step = [=] { dev().sgd_step(param, grads, state, 0.01, 0.9, 1e-4, false); };
                   return Prepared{shape_str({n}) + ", " + std::to_string(grads.size()) + " gradients", step};
                 }});
}

// Every op of one training step of ResNet50-MDFF-SH (taps = all) at the first scale, in the order of
// the forward pass, then the loss's J1 product and the optimizer steps.
std::vector<Op> training_step_ops(int input, int batch, const MdffConfig& config) {
  std::vector<Op> ops;
  const auto convs = bench::resnet50_convs(input);
  // Batch norms with their ReLU fused (after the stem, reduce and spatial convolutions), without (after the
  // expand and downsample ones), all of them for the backward; residual joins (add + ReLU); standalone
  // ReLUs (the head's); every ReLU, for the backward of ReLU.
  ShapeCounts batch_norms_relu, batch_norms_plain, batch_norms, residual_joins, head_relus, relus;
  std::vector<Shape> stage_outputs;  // layer1..layer4's outputs: C2, C3, C4, C5
  for (const auto& s : convs) {
    add_conv(ops, s, batch, false, s.role != bench::ConvRole::Stem);
    const Shape out{batch, s.cout, s.out_size(), s.out_size()};
    const bool relu_follows = s.role != bench::ConvRole::Expand && s.role != bench::ConvRole::Downsample;
    add_count(relu_follows ? batch_norms_relu : batch_norms_plain, out, s.count);
    add_count(batch_norms, out, s.count);
    if (s.role == bench::ConvRole::Expand) {
      add_count(residual_joins, out, s.count);
      if (stage_outputs.empty() || stage_outputs.back() != out) stage_outputs.push_back(out);
    }
    if (s.role != bench::ConvRole::Downsample) add_count(relus, out, s.count);  // after the add for Expand
  }
  const Shape& c5 = stage_outputs.back();
  const int lateral = config.lateral_channels, bits = config.bits;
  for (const Shape& head : {Shape{batch, config.fc1_features}, Shape{batch, config.fusion_features}}) {
    add_count(head_relus, head, 1);
    add_count(relus, head, 1);
  }

  for (const auto& [shape, count] : batch_norms_relu) add_batch_norm_forward(ops, shape, count, true);
  for (const auto& [shape, count] : batch_norms_plain) add_batch_norm_forward(ops, shape, count, false);
  for (const auto& [shape, count] : batch_norms) add_batch_norm_backward(ops, shape, count);
  for (const auto& [shape, count] : residual_joins) add_residual_join(ops, shape, count);
  for (const auto& [shape, count] : head_relus) add_relu_forward(ops, shape, count);
  for (const auto& [shape, count] : relus) add_relu_backward(ops, shape, count);

  // The stem's 3x3/2 max pool, padding 1: (N,64,H/2,W/2) -> (N,64,H/4,W/4)
  const auto& stem = convs.front();
  const int pooled = (stem.out_size() + 2 - 3) / 2 + 1;
  const Shape pool_in{batch, stem.cout, stem.out_size(), stem.out_size()}, pool_out{batch, stem.cout, pooled, pooled};
  const Pool2dParams pool{3, 2, 1};
  ops.push_back({"max pool fwd", 1, [=] {
                   Rng rng(11);
                   const Tensor x = randn(pool_in, rng), y = empty(pool_out);
                   const Tensor argmax = empty(pool_out, DType::I32);
                   return Prepared{arrow(pool_in, pool_out), [=] { dev().max_pool2d_forward(x, pool, y, argmax); }};
                 }});
  ops.push_back({"max pool bwd", 1, [=] {
                   Rng rng(12);
                   const Tensor x = randn(pool_in, rng), y = empty(pool_out);
                   const Tensor argmax = empty(pool_out, DType::I32);
                   dev().max_pool2d_forward(x, pool, y, argmax);
                   const Tensor gy = randn(pool_out, rng), gx = empty(pool_in);
                   return Prepared{arrow(pool_out, pool_in), [=] { dev().max_pool2d_backward(gy, argmax, gx); }};
                 }});

  // The head: 1x1 lateral convolutions C3, C4, C5 -> P3, P4, P5 (with bias), global average pools of
  // C5 (for fc1) and of P3, P4, P5, and the linear layers.
  const char* laterals[3] = {"lateral3 1x1", "lateral4 1x1", "lateral5 1x1"};
  std::vector<Shape> pooled_maps{c5};
  for (int i = 0; i < 3; ++i) {
    const Shape& tap = stage_outputs[i + 1];
    const int size = static_cast<int>(tap[2]);
    add_conv(ops, {laterals[i], static_cast<int>(tap[1]), lateral, 1, 1, 0, size, 1, bench::ConvRole::Reduce}, batch,
             true, true);
    pooled_maps.push_back({batch, lateral, size, size});
  }
  for (const Shape& map : pooled_maps) {
    const Shape vector{map[0], map[1]};
    ops.push_back({"gap fwd", 1, [=] {
                     Rng rng(13);
                     const Tensor x = randn(map, rng), y = empty(vector);
                     return Prepared{arrow(map, vector), [=] { dev().global_avg_pool_forward(x, y); }};
                   }});
    ops.push_back({"gap bwd", 1, [=] {
                     Rng rng(14);
                     const Tensor gy = randn(vector, rng), gx = empty(map);
                     return Prepared{arrow(vector, map), [=] { dev().global_avg_pool_backward(gy, gx); }};
                   }});
  }
  add_linear(ops, "fc1", batch, static_cast<int>(c5[1]), config.fc1_features, 1);
  add_linear(ops, "fusion", batch, 3 * lateral + config.fc1_features, config.fusion_features, 1);
  add_linear(ops, "hash3/4/5", batch, lateral, bits, 3);
  add_linear(ops, "hash_fusion", batch, config.fusion_features, bits, 1);
  add_linear(ops, "hash", batch, 4 * bits, bits, 1);
  add_linear(ops, "classifier", batch, bits, config.classes, 1);

  // J1 against the U matrix: theta (N,T) = u (N,L) U^T (L,T); backward du (N,L) = dtheta (N,T) U (T,L).
  const Shape u{batch, bits}, codes{kTrainSize, bits}, theta{batch, kTrainSize};
  ops.push_back({"j1 gemm fwd", 1, [=] {
                   Rng rng(15);
                   const Tensor ut = randn(u, rng), ct = randn(codes, rng), tt = empty(theta);
                   return Prepared{arrow(u, theta), [=] { dev().gemm(false, true, 1.0, ut, ct, 0.0, tt); }};
                 }});
  ops.push_back({"j1 gemm bwd", 1, [=] {
                   Rng rng(16);
                   const Tensor gt = randn(theta, rng), ct = randn(codes, rng), gu = empty(u);
                   return Prepared{arrow(theta, u), [=] { dev().gemm(false, false, 1.0, gt, ct, 0.0, gu); }};
                 }});

  add_optimizer_step(ops, config, true);
  add_optimizer_step(ops, config, false);
  return ops;
}

struct Measured {
  double seconds, flops, bytes;  // median seconds of one call; FLOPs and bytes of one call
};

// Times `call` with the profiler off (unless `timed` is false: seconds 0), after counting one call's FLOPs and
// bytes with it on.
Measured measure(const std::function<void()>& call, int repeat, bool timed = true) {
  profiler::reset();
  profiler::enable(true);
  call();
  profiler::enable(false);
  Measured m{0, 0, 0};
  for (const auto& e : profiler::entries()) {
    m.flops += e.flops;
    m.bytes += e.bytes;
  }
  profiler::reset();
  if (timed) m.seconds = bench::device_median_seconds(g_device, call, repeat, 0.0);
  return m;
}

// Median seconds of one call of `fused` and of `unfused`, timed in alternating rounds (3 each), so that a
// drift of the machine's speed between them does not pass for a difference.
std::pair<double, double> alternating_seconds(const std::function<void()>& fused, const std::function<void()>& unfused,
                                              int repeat) {
  std::vector<double> fused_rounds, unfused_rounds;
  for (int round = 0; round < 3; ++round) {
    fused_rounds.push_back(bench::device_median_seconds(g_device, fused, repeat, 0.0));
    unfused_rounds.push_back(bench::device_median_seconds(g_device, unfused, repeat, 0.0));
  }
  return {bench::median(fused_rounds), bench::median(unfused_rounds)};
}

std::string format_rate(double rate) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", rate);
  return text;
}

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Times each op of a ResNet50-MDFF-SH training step on the CPU or the GPU against the device's "
               "roofline, and what each fusion saves"};
  std::string device = "cpu", precision = "tf32";
  int input = 32, batch = 32, bits = 48, repeat = 5;
  std::string filter, json_path;
  app.add_option("--device", device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", precision, "GPU math: tf32 (tensor cores, the engine's default) or fp32")
      ->capture_default_str()
      ->check(CLI::IsMember({"tf32", "fp32"}));
  app.add_option("--input", input, "input image size (square)")->capture_default_str()->transform(cli::whole_number(32, 1024));
  app.add_option("--batch", batch, "batch size")->capture_default_str()->transform(cli::whole_number(2, 4096));
  app.add_option("--bits", bits, "code length L")->capture_default_str()->transform(cli::whole_number(1, 1024));
  app.add_option("--repeat", repeat,
                 "timed calls per op, after one warm-up call (the median is reported; on the GPU, rounds of 5 calls)")
      ->capture_default_str()->transform(cli::whole_number(1, 1000));
  app.add_option("--filter", filter, "only the ops whose name contains this text (e.g. conv, bn, linear, step)");
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row as it is measured, also into a log a timeout may cut short
  try {  // --device cuda without a usable GPU is a usage error (exit 2), as in train_mdff and bench_model
    g_device = cli::choose_device(device);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_ops: %s\nRun with --help for more information.\n", e.reason());
    return 2;
  }
  if (!json_path.empty()) io::check_writable(json_path);  // fails now, not after the timing
  set_tf32_allowed(precision == "tf32");
  const bool on_gpu = g_device == Device::CUDA;
  // Every convolution on its plan's fastest algorithm (cuda/conv.cpp): the memory mark of
  // core/workspace_policy.h would otherwise send the ops that hold more memory than any before them to the
  // lean algorithm, which a training step takes at its peak only.
  if (on_gpu) setenv("MDFF_CONV_LEAN", "0", 1);

  const bench::RandomOperands random(g_device);
  g_random = &random;
  MdffConfig config;
  config.bits = bits;
  std::vector<Op> selected;
  for (Op& op : training_step_ops(input, batch, config))
    if (op.name.find(filter) != std::string::npos) selected.push_back(std::move(op));
  if (selected.empty()) {
    std::fprintf(stderr, "bench_ops: no op name contains '%s' (try conv, bn, relu, pool, gap, linear, j1, step)\n"
                 "Run with --help for more information.\n", filter.c_str());
    return 2;
  }

  const double peak = bench::gemm_peak_gflops(g_device), bandwidth = bench::memory_bandwidth_gbs(g_device);
  if (on_gpu)
    std::printf("roofline: %s, GEMM peak %.1f GFLOP/s (cuBLAS, %s), memory bandwidth %.1f GB/s (the add kernel)\n",
                bench::device_name(g_device).c_str(), peak, precision.c_str(), bandwidth);
  else
    std::printf("roofline: SGEMM peak %.1f GFLOP/s (%s), memory bandwidth %.1f GB/s (triad), %d threads\n", peak,
                blas::describe().c_str(), bandwidth, omp_get_max_threads());
  std::printf("ResNet50-MDFF-SH at %dx%d, batch %d, %d bits, float32%s; median of %d %s; n = calls per pass;\n"
              "%% roof = share of the GEMM peak (GFLOP/s) or of the bandwidth (GB/s)\n\n",
              input, input, batch, bits, on_gpu ? (precision == "tf32" ? " (TF32 products)" : "") : "", repeat,
              on_gpu ? "rounds of 5 queued calls" : "calls");
  int name_width = 2;
  for (const Op& op : selected) name_width = std::max(name_width, static_cast<int>(op.name.size()));
  std::printf("%-*s %-32s %3s %10s %9s %9s %7s\n", name_width, "op", "shapes", "n", "median ms", "GFLOP/s", "GB/s",
              "% roof");
  json rows = json::array();
  struct Fusion {
    std::string name, shapes;
    int count;
    double fused_s, unfused_s;
  };
  std::vector<Fusion> fusions;
  double weighted_seconds = 0;
  for (const Op& op : selected) {
    const Prepared prepared = op.prepare();
    Measured m = measure(prepared.call, repeat, !op.unfused);
    Measured unfused{0, 0, 0};
    if (op.unfused) {  // timed in turns with the fused op
      const Prepared twin = op.unfused();
      unfused = measure(twin.call, repeat, false);
      std::tie(m.seconds, unfused.seconds) = alternating_seconds(prepared.call, twin.call, repeat);
    }
    const bool compute = m.flops > 0;  // else memory-bound: rated by bytes
    const double rate = (compute ? m.flops : m.bytes) / m.seconds / 1e9;
    const double roof = rate / (compute ? peak : bandwidth);
    const std::string shown = format_rate(rate);
    std::printf("%-*s %-32s %3d %10.3f %9s %9s %6.1f%%\n", name_width, op.name.c_str(), prepared.shapes.c_str(),
                op.count, m.seconds * 1e3, compute ? shown.c_str() : "-", compute ? "-" : shown.c_str(), 100 * roof);
    weighted_seconds += op.count * m.seconds;
    json row{{"name", op.name}, {"shapes", prepared.shapes}, {"count", op.count}, {"median_s", m.seconds},
             {"flops", m.flops}, {"bytes", m.bytes}, {compute ? "gflops" : "gbs", rate}, {"roofline_fraction", roof}};
    if (op.unfused) {
      fusions.push_back({op.name, prepared.shapes, op.count, m.seconds, unfused.seconds});
      row["unfused_median_s"] = unfused.seconds;
      row["unfused_bytes"] = unfused.bytes;
    }
    rows.push_back(row);
  }
  std::printf("\nsum of n x median over these %zu ops: %.1f ms\n", selected.size(), weighted_seconds * 1e3);
  if (!fusions.empty()) {
    std::printf("\nfusions, forward (the backward runs the same kernels either way; what a fusion saves there is "
                "memory: no pre-ReLU activation kept):\n%-*s %-32s %3s %10s %10s %10s\n",
                name_width, "op", "shapes", "n", "fused ms", "unfused ms", "n x saved");
    std::vector<std::pair<std::string, std::pair<double, double>>> totals;  // name -> (fused, unfused) x n
    for (const Fusion& f : fusions) {
      std::printf("%-*s %-32s %3d %10.3f %10.3f %10.3f\n", name_width, f.name.c_str(), f.shapes.c_str(), f.count,
                  f.fused_s * 1e3, f.unfused_s * 1e3, f.count * (f.unfused_s - f.fused_s) * 1e3);
      auto it = std::find_if(totals.begin(), totals.end(), [&](const auto& t) { return t.first == f.name; });
      if (it == totals.end()) it = totals.insert(totals.end(), {f.name, {0.0, 0.0}});
      it->second.first += f.count * f.fused_s;
      it->second.second += f.count * f.unfused_s;
    }
    for (const auto& [name, sums] : totals)
      std::printf("%s: %.2f ms per pass fused, %.2f ms as separate kernels: %.2f ms (%.0f%%) saved\n", name.c_str(),
                  sums.first * 1e3, sums.second * 1e3, (sums.second - sums.first) * 1e3,
                  100 * (sums.second - sums.first) / sums.second);
  }
  if (!json_path.empty()) {
    json result{{"device", bench::device_name(g_device)}, {"input", input}, {"batch", batch}, {"bits", bits},
                {"repeat", repeat}, {"gemm_peak_gflops", peak}, {"memory_bandwidth_gbs", bandwidth}, {"ops", rows}};
    if (on_gpu) result["precision"] = precision;
    else result["threads"] = omp_get_max_threads();
    io::write_file_atomic(json_path, result.dump(2) + "\n");
  }
  return 0;
} catch (const std::exception& e) {  // a kernel, the GPU or the JSON's write failed: the results are not all there
  std::fprintf(stderr, "bench_ops: error: %s\n", e.what());
  return 1;
}
