// Per-op speed on the CPU at the shapes of one ResNet50-MDFF-SH training step (batch 32, 32x32 input,
// the first scale; 48 bits): each kernel's median time with its GFLOP/s (compute-bound ops) or GB/s
// (memory-bound ops), next to this machine's roofline measured in the same run: the SGEMM peak and
// the memory bandwidth of a triad. The FLOPs and bytes of a call are those the profiler counts
// (core/profiler.h), so the benchmark and the profiler agree; "n" is how often the op runs per pass.
// An op whose operands fit in the caches can go beyond the memory bandwidth (more than 100% of it).
// The second scale (the 0.5x image) repeats the backbone's ops at half the size and is not listed.
//
//   bench_ops [--input 32] [--batch 32] [--bits 48] [--repeat 5] [--filter SUBSTRING] [--json FILE]
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "apps/cli.h"
#include "bench/resnet50_convs.h"
#include "bench/timing.h"
#include "core/backend.h"
#include "core/blas.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "models/mdff.h"

using namespace mdff;
using json = nlohmann::json;

namespace {

// Rows of the U matrix that J1 compares each batch against (the training set of the paper's protocol).
constexpr int kTrainSize = 5000;

Backend& cpu() { return backend(Device::CPU); }  // looked up per call, so the profiler sees it when on

// An op with its operands allocated: its shapes (input -> output) and the call to time.
struct Prepared {
  std::string shapes;
  std::function<void()> call;
};

struct Op {
  std::string name;  // what it is, e.g. "conv fwd layer1.k 3x3"; --filter matches it
  int count;         // how often it runs in one forward (or backward) pass
  std::function<Prepared()> prepare;
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
                   const Tensor xt = Tensor::randn(x, rng), wt = Tensor::randn(w, rng, 0.05), yt = Tensor::empty(y);
                   const Tensor bt = bias ? Tensor::randn({s.cout}, rng) : Tensor();
                   return Prepared{arrow(x, y), [=] { cpu().conv2d_forward(xt, wt, bt, p, yt); }};
                 }});
  ops.push_back({"conv bwd " + s.name, s.count, [=] {
                   Rng rng(2);
                   const Tensor xt = Tensor::randn(x, rng), wt = Tensor::randn(w, rng, 0.05), gy = Tensor::randn(y, rng);
                   const Tensor gx = input_grad ? Tensor::empty(x) : Tensor(), gw = Tensor::empty(w);
                   const Tensor gb = bias ? Tensor::empty({s.cout}) : Tensor();
                   return Prepared{arrow(y, x), [=] { cpu().conv2d_backward(xt, wt, gy, p, gx, gw, gb); }};
                 }});
}

// Operands of a training-mode batch norm of shape x: parameters, running statistics, and the batch
// statistics of one forward pass.
struct BatchNorm {
  Tensor x, gamma, beta, running_mean, running_var, y, mean, invstd;
  explicit BatchNorm(const Shape& shape) {
    Rng rng(3);
    const Shape channels{shape[1]};
    x = Tensor::randn(shape, rng);
    gamma = Tensor::full(channels, 1.0);
    beta = Tensor::zeros(channels);
    running_mean = Tensor::zeros(channels);
    running_var = Tensor::full(channels, 1.0);
    y = Tensor::empty(shape);
    mean = Tensor::empty(channels);
    invstd = Tensor::empty(channels);
    forward();
  }
  void forward() const {
    cpu().batch_norm_forward(x, gamma, beta, running_mean, running_var, true, 0.1, 1e-5, y, mean, invstd, false);
  }
};

void add_batch_norm(std::vector<Op>& ops, const Shape& shape, int count) {
  ops.push_back({"bn fwd train", count, [=] {
                   const BatchNorm bn(shape);
                   return Prepared{shape_str(shape), [=] { bn.forward(); }};
                 }});
  ops.push_back({"bn bwd train", count, [=] {
                   const BatchNorm bn(shape);
                   Rng rng(4);
                   const Tensor gy = Tensor::randn(shape, rng), gx = Tensor::empty(shape);
                   const Tensor gg = Tensor::empty({shape[1]}), gb = Tensor::empty({shape[1]});
                   return Prepared{shape_str(shape), [=] {
                                     cpu().batch_norm_backward(bn.x, bn.gamma, bn.mean, bn.invstd, gy, true, gx, gg, gb);
                                   }};
                 }});
}

void add_relu(std::vector<Op>& ops, const Shape& shape, int count) {
  ops.push_back({"relu fwd", count, [=] {
                   Rng rng(5);
                   const Tensor x = Tensor::randn(shape, rng), y = Tensor::empty(shape);
                   return Prepared{shape_str(shape), [=] { cpu().unary(UnaryOp::Relu, x, y); }};
                 }});
  ops.push_back({"relu bwd", count, [=] {
                   Rng rng(6);
                   const Tensor x = Tensor::randn(shape, rng), gy = Tensor::randn(shape, rng);
                   const Tensor gx = Tensor::empty(shape);
                   return Prepared{shape_str(shape), [=] { cpu().unary_backward(UnaryOp::Relu, x, Tensor(), gy, gx); }};
                 }});
}

// y (N,out) = x (N,in) W^T + b; backward: dx = dy W, dW = dy^T x, db = the column sums of dy.
void add_linear(std::vector<Op>& ops, const std::string& name, int batch, int in, int out, int count) {
  const Shape x{batch, in}, w{out, in}, y{batch, out};
  ops.push_back({"linear fwd " + name, count, [=] {
                   Rng rng(7);
                   const Tensor xt = Tensor::randn(x, rng), wt = Tensor::randn(w, rng, 0.05);
                   const Tensor b = Tensor::randn({out}, rng), yt = Tensor::empty(y);
                   return Prepared{arrow(x, y), [=] {
                                     cpu().gemm(false, true, 1.0, xt, wt, 0.0, yt);
                                     cpu().binary(BinaryOp::Add, yt, b, yt);
                                   }};
                 }});
  ops.push_back({"linear bwd " + name, count, [=] {
                   Rng rng(8);
                   const Tensor xt = Tensor::randn(x, rng), wt = Tensor::randn(w, rng, 0.05), gy = Tensor::randn(y, rng);
                   const Tensor gx = Tensor::empty(x), gw = Tensor::empty(w), gb = Tensor::empty({out});
                   return Prepared{arrow(y, x), [=] {
                                     cpu().gemm(false, false, 1.0, gy, wt, 0.0, gx);
                                     cpu().gemm(true, false, 1.0, gy, xt, 0.0, gw);
                                     cpu().sum_to(gy, gb);
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
                     grads.push_back({Tensor::randn(p.shape(), rng, 1e-3), n});
                     n += p.numel();
                   }
                   const Tensor param = Tensor::randn({n}, rng, 0.05);
                   const Tensor state = Tensor::zeros({n});  // RMSProp's square average, SGD's momentum buffer
                   std::function<void()> step;
                   if (rmsprop) step = [=] { cpu().rmsprop_step(param, grads, state, 1e-4, 0.99, 1e-8, 0); };
                   else step = [=] { cpu().sgd_step(param, grads, state, 0.01, 0.9, 1e-4, false); };
                   return Prepared{shape_str({n}) + ", " + std::to_string(grads.size()) + " gradients", step};
                 }});
}

// Every op of one training step of ResNet50-MDFF-SH (taps = all) at the first scale, in the order of
// the forward pass, then the loss's J1 product and the optimizer steps.
std::vector<Op> training_step_ops(int input, int batch, const MdffConfig& config) {
  std::vector<Op> ops;
  const auto convs = bench::resnet50_convs(input);
  ShapeCounts batch_norms, relus, residual_adds;
  std::vector<Shape> stage_outputs;  // layer1..layer4's outputs: C2, C3, C4, C5
  for (const auto& s : convs) {
    add_conv(ops, s, batch, false, s.role != bench::ConvRole::Stem);
    const Shape out{batch, s.cout, s.out_size(), s.out_size()};
    add_count(batch_norms, out, s.count);
    if (s.role == bench::ConvRole::Expand) {
      add_count(residual_adds, out, s.count);
      if (stage_outputs.empty() || stage_outputs.back() != out) stage_outputs.push_back(out);
    }
    if (s.role != bench::ConvRole::Downsample) add_count(relus, out, s.count);  // after the add for Expand
  }
  const Shape& c5 = stage_outputs.back();
  const int lateral = config.lateral_channels, bits = config.bits;
  add_count(relus, {batch, config.fc1_features}, 1);
  add_count(relus, {batch, config.fusion_features}, 1);

  for (const auto& [shape, count] : batch_norms) add_batch_norm(ops, shape, count);
  for (const auto& [shape, count] : relus) add_relu(ops, shape, count);
  for (const auto& [shape, count] : residual_adds)
    ops.push_back({"residual add", count, [shape = shape] {
                     Rng rng(10);
                     const Tensor a = Tensor::randn(shape, rng), b = Tensor::randn(shape, rng), y = Tensor::empty(shape);
                     return Prepared{shape_str(shape), [=] { cpu().binary(BinaryOp::Add, a, b, y); }};
                   }});

  // The stem's 3x3/2 max pool, padding 1: (N,64,H/2,W/2) -> (N,64,H/4,W/4)
  const auto& stem = convs.front();
  const int pooled = (stem.out_size() + 2 - 3) / 2 + 1;
  const Shape pool_in{batch, stem.cout, stem.out_size(), stem.out_size()}, pool_out{batch, stem.cout, pooled, pooled};
  const Pool2dParams pool{3, 2, 1};
  ops.push_back({"max pool fwd", 1, [=] {
                   Rng rng(11);
                   const Tensor x = Tensor::randn(pool_in, rng), y = Tensor::empty(pool_out);
                   const Tensor argmax = Tensor::empty(pool_out, DType::I32);
                   return Prepared{arrow(pool_in, pool_out), [=] { cpu().max_pool2d_forward(x, pool, y, argmax); }};
                 }});
  ops.push_back({"max pool bwd", 1, [=] {
                   Rng rng(12);
                   const Tensor x = Tensor::randn(pool_in, rng), y = Tensor::empty(pool_out);
                   const Tensor argmax = Tensor::empty(pool_out, DType::I32);
                   cpu().max_pool2d_forward(x, pool, y, argmax);
                   const Tensor gy = Tensor::randn(pool_out, rng), gx = Tensor::empty(pool_in);
                   return Prepared{arrow(pool_out, pool_in), [=] { cpu().max_pool2d_backward(gy, argmax, gx); }};
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
                     const Tensor x = Tensor::randn(map, rng), y = Tensor::empty(vector);
                     return Prepared{arrow(map, vector), [=] { cpu().global_avg_pool_forward(x, y); }};
                   }});
    ops.push_back({"gap bwd", 1, [=] {
                     Rng rng(14);
                     const Tensor gy = Tensor::randn(vector, rng), gx = Tensor::empty(map);
                     return Prepared{arrow(vector, map), [=] { cpu().global_avg_pool_backward(gy, gx); }};
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
                   const Tensor ut = Tensor::randn(u, rng), ct = Tensor::randn(codes, rng), tt = Tensor::empty(theta);
                   return Prepared{arrow(u, theta), [=] { cpu().gemm(false, true, 1.0, ut, ct, 0.0, tt); }};
                 }});
  ops.push_back({"j1 gemm bwd", 1, [=] {
                   Rng rng(16);
                   const Tensor gt = Tensor::randn(theta, rng), ct = Tensor::randn(codes, rng), gu = Tensor::empty(u);
                   return Prepared{arrow(theta, u), [=] { cpu().gemm(false, false, 1.0, gt, ct, 0.0, gu); }};
                 }});

  add_optimizer_step(ops, config, true);
  add_optimizer_step(ops, config, false);
  return ops;
}

struct Measured {
  double seconds, flops, bytes;  // median seconds of one call; FLOPs and bytes of one call
};

// Times `call` with the profiler off, after counting one call's FLOPs and bytes with it on.
Measured measure(const std::function<void()>& call, int repeat) {
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
  m.seconds = bench::median_seconds(call, repeat, 0.0);
  return m;
}

std::string format_rate(double rate) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f", rate);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Times each op of a ResNet50-MDFF-SH training step on the CPU against this machine's roofline"};
  int input = 32, batch = 32, bits = 48, repeat = 5;
  std::string filter, json_path;
  app.add_option("--input", input, "input image size (square)")->capture_default_str()->check(CLI::Range(32, 1024));
  app.add_option("--batch", batch, "batch size")->capture_default_str()->check(CLI::Range(2, 4096));
  app.add_option("--bits", bits, "code length L")->capture_default_str()->check(CLI::Range(1, 1024));
  app.add_option("--repeat", repeat, "timed calls per op, after one warm-up call (the median is reported)")
      ->capture_default_str()->check(CLI::Range(1, 1000));
  app.add_option("--filter", filter, "only the ops whose name contains this text (e.g. conv, bn, linear, step)");
  app.add_option("--json", json_path, "write the results to this JSON file");
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;

  MdffConfig config;
  config.bits = bits;
  std::vector<Op> selected;
  for (Op& op : training_step_ops(input, batch, config))
    if (op.name.find(filter) != std::string::npos) selected.push_back(std::move(op));
  if (selected.empty()) {
    std::fprintf(stderr, "bench_ops: no op name contains '%s' (try conv, bn, relu, pool, gap, linear, j1, step)\n",
                 filter.c_str());
    return 2;
  }

  const double peak = bench::sgemm_peak_gflops(), bandwidth = bench::memory_bandwidth_gbs();
  std::printf("roofline: SGEMM peak %.1f GFLOP/s (%s), memory bandwidth %.1f GB/s (triad), %d threads\n", peak,
              blas::describe().c_str(), bandwidth, omp_get_max_threads());
  std::printf("ResNet50-MDFF-SH at %dx%d, batch %d, %d bits, float32; median of %d calls; n = calls per pass;\n"
              "%% roof = share of the SGEMM peak (GFLOP/s) or of the bandwidth (GB/s)\n\n",
              input, input, batch, bits, repeat);
  int name_width = 2;
  for (const Op& op : selected) name_width = std::max(name_width, static_cast<int>(op.name.size()));
  std::printf("%-*s %-32s %3s %10s %9s %9s %7s\n", name_width, "op", "shapes", "n", "median ms", "GFLOP/s", "GB/s",
              "% roof");
  json rows = json::array();
  double weighted_seconds = 0;
  for (const Op& op : selected) {
    const Prepared prepared = op.prepare();
    const Measured m = measure(prepared.call, repeat);
    const bool compute = m.flops > 0;  // else memory-bound: rated by bytes
    const double rate = (compute ? m.flops : m.bytes) / m.seconds / 1e9;
    const double roof = rate / (compute ? peak : bandwidth);
    const std::string shown = format_rate(rate);
    std::printf("%-*s %-32s %3d %10.3f %9s %9s %6.1f%%\n", name_width, op.name.c_str(), prepared.shapes.c_str(),
                op.count, m.seconds * 1e3, compute ? shown.c_str() : "-", compute ? "-" : shown.c_str(), 100 * roof);
    weighted_seconds += op.count * m.seconds;
    rows.push_back({{"name", op.name}, {"shapes", prepared.shapes}, {"count", op.count}, {"median_s", m.seconds},
                    {"flops", m.flops}, {"bytes", m.bytes}, {compute ? "gflops" : "gbs", rate},
                    {"roofline_fraction", roof}});
  }
  std::printf("\nsum of n x median over these %zu ops: %.1f ms\n", selected.size(), weighted_seconds * 1e3);
  if (!json_path.empty()) {
    const json result{{"input", input}, {"batch", batch}, {"bits", bits}, {"repeat", repeat},
                      {"threads", omp_get_max_threads()}, {"sgemm_peak_gflops", peak},
                      {"memory_bandwidth_gbs", bandwidth}, {"ops", rows}};
    std::ofstream(json_path) << result.dump(2) << "\n";
  }
  return 0;
}
