// CPU-vs-CUDA parity: the same random inputs go through each op on both devices, forward and backward
// (autograd), and the CUDA result must match the CPU reference within a bound stated (and justified)
// where it is defined. Covered:
// - fill, cast, the elementwise and broadcasting binary ops, sum / sum_to, matmul and linear (cuBLAS);
// - conv2d (cuDNN) at ResNet50's kinds of convolution (1x1, 3x3 stride 1 and 2, the 7x7 stem, the 1x1
//   stride-2 shortcut, a 3x3 on a 1x1 map), with and without bias, batch 1 and 4, and its algorithm
//   cache; the 1x1 convolutions of stride 1 through cuBLAS and through cuDNN (each route forced, with and
//   without TF32), and the measured route's choice; conv2d_bn_eval against the separate ops; conv2d and
//   matmul with TF32 on, at TF32's accuracy;
// - batch_norm2d (training, with its running statistics, and evaluation), max_pool2d (ties, padding,
//   NaN), global_avg_pool, upsample_nearest, resize_bilinear, concat, log_softmax, the fused losses
//   pairwise_logistic_loss (J1's likelihood: saturated theta, a deterministic mean), quantization_loss
//   (J2) and cross_entropy (J3, soft targets),
//   gather_rows (repeated rows) and scatter_rows_, and a row index out of range, reported at the next
//   synchronisation through the deferred device-error channel;
// - RMSProp and SGD over a ParameterBuffer; pack_signs, hamming_distances, hamming_top_k and count_non_finite_ (exact);
// - the whole ResNet50-MDFF-SH of train_mdff: three training steps in float64 (losses, every gradient,
//   running statistics, RMSProp's updates), a float32 forward and backward in evaluation mode, and
//   inference through the fused conv-bn path (why not a float32 training step: see the model tests);
// - the caching allocator (no cudaMalloc in the steady state, also over full model training steps),
//   memory statistics, and the CUDA error macros (messages carry file:line);
// - the Trainer's steps make the host wait for the device only at its read-outs (Backend::host_waits).
// TF32 is on by default (core/backend.h); float32 parity tests turn it off with a Tf32Guard.
//
// Without a usable GPU (or in a build without CUDA) the executable prints why and exits with 77, which
// CTest reports as skipped.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/autograd.h"
#include "core/backend.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "layers/module.h"
#include "losses/hash_losses.h"
#include "models/mdff.h"
#include "optim/optimizers.h"
#include "optim/trainer.h"

#ifdef MDFF_WITH_CUDA
#include <cublas_v2.h>

#include "cuda/allocator.h"
#include "cuda/check.h"
#include "cuda/conv.h"
#include "cuda/device.h"
#endif

using namespace mdff;

// Read by test_main.cpp: non-empty means "skip this executable, for this reason".
std::string mdff_test_skip_reason() {
  std::string why_not;
  return cuda_available(&why_not) ? std::string() : why_not;
}

namespace {

using UnaryFn = std::function<Tensor(const Tensor&)>;
using BinaryFn = std::function<Tensor(const Tensor&, const Tensor&)>;
using OpFn = std::function<Tensor(const std::vector<Tensor>&)>;

const DType kFloatTypes[] = {DType::F32, DType::F64};

// ---- error measures and bounds ----

// PerElement: max_i |cpu_i - cuda_i| / max(|cpu_i|, 1), relative for large values and absolute near zero
// (where a relative error means nothing): for results computed element by element.
// TensorMax: max_i |cpu_i - cuda_i| / max_i |cpu_i|: for results of long reductions (convolutions, batch
// norm, a whole network), whose rounding error scales with the tensor's magnitude, not each element's.
// A NaN on one side only is an infinite error; NaN on both sides, or equal infinities, count as equal.
enum class Scale { PerElement, TensorMax };

// Elementwise kernels differ from the CPU only by the last bits of the math library (tanh, exp, log1p);
// sums and products by rounding order.
double elementwise_bound(DType dtype) { return dtype == DType::F32 ? 1e-5 : 1e-12; }
double product_bound(DType dtype) { return dtype == DType::F32 ? 1e-4 : 1e-10; }
// Convolutions (TensorMax). Float32 without TF32 (cuDNN's implicit GEMM, Winograd or FFT algorithms)
// stays within about 1e-5 of the output's largest value. TF32 rounds every operand to 10 mantissa bits
// (2^-11 = 4.9e-4 relative), which over a few thousand random dot products gives about 4e-4: so 1e-4
// leaves a 10x margin for float32 and still catches TF32 left on where the test turned it off. Float64:
// about 1e-15 per reduction; 1e-12.
double conv_bound(DType dtype) { return dtype == DType::F32 ? 1e-4 : 1e-12; }
// TF32 on (the default): operands rounded to 10 mantissa bits, float32 accumulation. The worst of
// thousands of outputs measured against the largest is about 1e-3 (see conv_bound); 1e-2 leaves a 10x
// margin and is still far below a wrong result's O(1).
constexpr double kTf32Bound = 1e-2;

double parity_error(const Tensor& cpu, const Tensor& cuda, Scale scale) {
  const std::vector<double> a = cpu.to_vector(), b = cuda.to_vector();
  double worst = 0, largest = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) {
      if (std::isnan(a[i]) != std::isnan(b[i])) return std::numeric_limits<double>::infinity();
      continue;
    }
    if (std::isfinite(a[i])) largest = std::max(largest, std::abs(a[i]));
    if (a[i] == b[i]) continue;
    const double diff = std::abs(a[i] - b[i]);  // infinite when only one side is
    worst = std::max(worst, scale == Scale::PerElement ? diff / std::max(std::abs(a[i]), 1.0) : diff);
  }
  if (scale == Scale::PerElement || worst == 0) return worst;
  return worst / std::max(largest, std::numeric_limits<double>::min());
}

// Checks and returns the error of `cuda` against the CPU reference `cpu`. Bound 0 asks for equality.
double check_close(const Tensor& cpu, const Tensor& cuda, double bound, const std::string& what,
                   Scale scale = Scale::PerElement) {
  INFO(what);
  REQUIRE(cpu.defined());
  REQUIRE(cuda.defined());
  CHECK(cpu.device() == Device::CPU);
  CHECK(cuda.device() == Device::CUDA);
  INFO("cpu ", std::string(dtype_name(cpu.dtype())), " ", shape_str(cpu.shape()), ", cuda ",
       std::string(dtype_name(cuda.dtype())), " ", shape_str(cuda.shape()));
  REQUIRE(cpu.shape() == cuda.shape());
  REQUIRE(cpu.dtype() == cuda.dtype());
  const double err = parity_error(cpu, cuda, scale);
  INFO(std::string(scale == Scale::PerElement ? "max relative error " : "max error / max |cpu| "), err, ", bound ",
       bound);
  CHECK(err <= bound);
  return err;
}

// Turns TF32 on or off (core/backend.h) for its lifetime, then restores the previous setting.
class Tf32Guard {
 public:
  explicit Tf32Guard(bool allowed) : previous_(tf32_allowed()) { set_tf32_allowed(allowed); }
  ~Tf32Guard() { set_tf32_allowed(previous_); }
  Tf32Guard(const Tf32Guard&) = delete;
  Tf32Guard& operator=(const Tf32Guard&) = delete;

 private:
  bool previous_;
};

// A CPU leaf that wants .grad, and its twin on the GPU (same values, its own leaf).
Tensor cpu_leaf(const Shape& shape, Rng& rng, DType dtype, double std = 1.0) {
  Tensor t = Tensor::randn(shape, rng, std, dtype);
  t.set_requires_grad(true);
  return t;
}
Tensor as_leaf(Tensor t) {
  t.set_requires_grad(true);
  return t;
}
Tensor cuda_twin(const Tensor& cpu) {
  Tensor t = cpu.to(Device::CUDA);
  t.set_requires_grad(true);
  return t;
}

// "name (shape) dtype, ..." for the inputs of a parity check.
std::string describe(const NamedTensors& inputs) {
  std::string text;
  for (const auto& [name, t] : inputs) {
    text += (text.empty() ? "" : ", ") + name;
    text += t.defined() ? " " + shape_str(t.shape()) + " " + dtype_name(t.dtype()) : " none";
  }
  return text;
}

struct Bounds {
  double forward;  // on the output
  double grad;     // on each input's gradient
  Scale scale = Scale::PerElement;
};

// The inputs on each device after a parity check (ops may change some in place: running statistics),
// and the largest error it measured.
struct ParityRun {
  std::vector<Tensor> cpu, cuda;
  double worst = 0;
};

// Runs `op` on the CPU inputs and on their GPU twins (inputs that require grad get GPU leaves, others
// plain copies, undefined ones stay undefined), compares the outputs, backpropagates the same random
// upstream gradient on both and compares every gradient.
ParityRun check_op_parity(const OpFn& op, const NamedTensors& inputs, const Bounds& bounds,
                          const std::string& op_name) {
  ParityRun run;
  for (const auto& [name, t] : inputs) {
    run.cpu.push_back(t);
    run.cuda.push_back(!t.defined() ? Tensor() : t.requires_grad() ? cuda_twin(t) : t.to(Device::CUDA));
  }
  const std::string what = op_name + " [" + describe(inputs) + "]";
  const Tensor y = op(run.cpu), yc = op(run.cuda);
  run.worst = check_close(y, yc, bounds.forward, what + " forward", bounds.scale);
  if (!y.requires_grad()) return run;
  Rng rng(99);
  const Tensor gy = Tensor::randn(y.shape(), rng, 1.0, y.dtype());
  y.backward(gy);
  yc.backward(gy.to(Device::CUDA));
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].second.defined() && inputs[i].second.requires_grad())
      run.worst = std::max(run.worst, check_close(run.cpu[i].grad(), run.cuda[i].grad(), bounds.grad,
                                                  what + " gradient of " + inputs[i].first, bounds.scale));
  return run;
}

void check_unary_parity(const UnaryFn& op, const Shape& shape, DType dtype, const std::string& name) {
  Rng rng(1);
  check_op_parity([&](const std::vector<Tensor>& in) { return op(in[0]); }, {{"x", cpu_leaf(shape, rng, dtype, 3.0)}},
                  {elementwise_bound(dtype), elementwise_bound(dtype)}, name);
}

void check_binary_parity(const BinaryFn& op, const Shape& sa, const Shape& sb, DType dtype, const std::string& name) {
  Rng rng(2);
  const Tensor a = cpu_leaf(sa, rng, dtype), b = cpu_leaf(sb, rng, dtype);
  // The gradient of a broadcast input is a sum (sum_to) over the repeated dimensions.
  check_op_parity([&](const std::vector<Tensor>& in) { return op(in[0], in[1]); }, {{"a", a}, {"b", b}},
                  {elementwise_bound(dtype), product_bound(dtype)}, name);
}

// ---- convolutions ----

struct ConvCase {
  const char* role;
  Shape x, weight;
  int stride, padding;
  bool bias;
};

// ResNet50's kinds of convolution, narrowed: batch 1 and 4, with and without bias.
const ConvCase kConvCases[] = {
    {"1x1 stride 1 (bottleneck conv1/conv3)", {1, 16, 9, 9}, {32, 16, 1, 1}, 1, 0, true},
    {"1x1 stride 1 (bottleneck conv1/conv3)", {4, 16, 9, 9}, {32, 16, 1, 1}, 1, 0, false},
    {"3x3 pad 1 stride 1", {1, 8, 10, 10}, {16, 8, 3, 3}, 1, 1, true},
    {"3x3 pad 1 stride 1", {4, 8, 10, 10}, {16, 8, 3, 3}, 1, 1, false},
    {"3x3 pad 1 stride 2 (v1.5's downsampling conv2)", {4, 8, 11, 11}, {16, 8, 3, 3}, 2, 1, true},
    {"3x3 pad 1 stride 2 (v1.5's downsampling conv2)", {1, 8, 10, 10}, {16, 8, 3, 3}, 2, 1, false},
    {"7x7 pad 3 stride 2 (the stem)", {4, 3, 32, 32}, {16, 3, 7, 7}, 2, 3, false},
    {"7x7 pad 3 stride 2 (the stem)", {1, 3, 29, 29}, {16, 3, 7, 7}, 2, 3, true},
    {"1x1 stride 2 (the shortcut's downsample)", {4, 16, 8, 8}, {32, 16, 1, 1}, 2, 0, false},
    {"1x1 stride 2 (the shortcut's downsample)", {1, 16, 7, 7}, {32, 16, 1, 1}, 2, 0, true},
    {"3x3 pad 1 on a 1x1 map (layer4 at the 0.5 scale)", {4, 32, 1, 1}, {16, 32, 3, 3}, 1, 1, true},
};

NamedTensors conv_inputs(const ConvCase& c, DType dtype, uint64_t seed) {
  Rng rng(seed);
  NamedTensors in{{"x", cpu_leaf(c.x, rng, dtype)}, {"weight", cpu_leaf(c.weight, rng, dtype, 0.1)}};
  in.emplace_back("bias", c.bias ? cpu_leaf({c.weight[0]}, rng, dtype) : Tensor());
  return in;
}

OpFn conv_op(const ConvCase& c) {
  return [c](const std::vector<Tensor>& in) { return ops::conv2d(in[0], in[1], in[2], c.stride, c.padding); };
}

ParityRun check_conv_parity(const ConvCase& c, DType dtype, double bound) {
  return check_op_parity(conv_op(c), conv_inputs(c, dtype, 20), {bound, bound, Scale::TensorMax},
                         std::string("conv2d ") + c.role);
}

// ---- batch norm ----

// x (N,C,H,W) centred away from 0 (the variance is then a difference of larger numbers), gamma and
// beta (leaves), running mean and variance (C).
NamedTensors batch_norm_inputs(const Shape& shape, DType dtype, Rng& rng) {
  const Shape channels{shape[1]};
  return {{"x", as_leaf(ops::add(Tensor::randn(shape, rng, 3.0, dtype), Tensor::full({}, 5.0, dtype)))},
          {"gamma", as_leaf(Tensor::uniform(channels, rng, 0.5, 1.5, dtype))},
          {"beta", cpu_leaf(channels, rng, dtype)},
          {"running_mean", Tensor::randn(channels, rng, 0.1, dtype)},
          {"running_var", Tensor::uniform(channels, rng, 0.5, 2.0, dtype)}};
}

BatchNormEval batch_norm_eval_params(int64_t channels, DType dtype, Rng& rng) {
  const Shape c{channels};
  return {Tensor::uniform(c, rng, 0.5, 1.5, dtype), Tensor::randn(c, rng, 0.1, dtype),
          Tensor::randn(c, rng, 0.1, dtype), Tensor::uniform(c, rng, 0.5, 2.0, dtype), 1e-5};
}

BatchNormEval to_cuda(const BatchNormEval& bn) {
  return {bn.gamma.to(Device::CUDA), bn.beta.to(Device::CUDA), bn.running_mean.to(Device::CUDA),
          bn.running_var.to(Device::CUDA), bn.eps};
}

// ---- helpers for the other layers ----

// A leaf of N(0,1) values passed through f (ties, offsets, NaN by position).
Tensor mapped_leaf(const Shape& shape, DType dtype, Rng& rng, const std::function<double(double, size_t)>& f) {
  std::vector<double> values = Tensor::randn(shape, rng, 1.0, DType::F64).to_vector();
  for (size_t i = 0; i < values.size(); ++i) values[i] = f(values[i], i);
  return as_leaf(Tensor::from_vector(values, shape, dtype));
}

// (N,K) rows of probabilities (positive, summing to 1): soft targets.
Tensor soft_targets(int64_t n, int64_t k, DType dtype, Rng& rng) {
  std::vector<double> values = Tensor::uniform({n, k}, rng, 0.0, 1.0, DType::F64).to_vector();
  for (int64_t r = 0; r < n; ++r) {
    double total = 0;
    for (int64_t j = 0; j < k; ++j) total += values[r * k + j];
    for (int64_t j = 0; j < k; ++j) values[r * k + j] /= total;
  }
  return Tensor::from_vector(values, {n, k}, dtype);  // a constant, as cross_entropy requires
}

// Pair similarities in {0,1}, about a quarter of them 1 (constants: no gradient).
Tensor similarities(const Shape& shape, DType dtype, Rng& rng) {
  std::vector<double> values = Tensor::uniform(shape, rng, 0.0, 1.0, DType::F64).to_vector();
  for (double& v : values) v = v < 0.25 ? 1.0 : 0.0;
  return Tensor::from_vector(values, shape, dtype);
}

Tensor index_tensor(const std::vector<int32_t>& rows, Device device = Device::CPU) {
  return Tensor::from_vector(rows, {static_cast<int64_t>(rows.size())}, device);
}

// Runs `synchronise`, which must throw the deferred device error of `kernel` naming the bad `value`.
void check_deferred_error(const std::function<void()>& synchronise, const std::string& kernel,
                          const std::string& value) {
  INFO("expecting the error of ", kernel, " at row ", value);
  try {
    synchronise();
    FAIL("no error was reported");
  } catch (const Error& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find(kernel) != std::string::npos);
    CHECK(message.find(value) != std::string::npos);
  }
}

// ---- optimizers ----

// Parameters on `device`: a few, one of them large enough for several chunks of the multi-tensor kernels
// (2^16 elements each); with `many`, 1,200 more small ones, so that the chunks fill more than one
// table (1,000 chunks) and the update takes two launches.
NamedTensors optimizer_parameters(DType dtype, Device device, bool many) {
  Rng rng(40);
  NamedTensors parameters{{"conv.weight", Tensor::randn({8, 3, 3, 3}, rng, 0.1, dtype)},
                          {"conv.bias", Tensor::zeros({8}, dtype)},
                          {"fc.weight", Tensor::randn({300, 400}, rng, 0.05, dtype)}};
  for (int i = 0; many && i < 1200; ++i)
    parameters.emplace_back("bn" + std::to_string(i) + ".weight", Tensor::randn({5}, rng, 1.0, dtype));
  for (auto& [name, p] : parameters) {
    p = p.to(device);
    p.set_requires_grad(true);
  }
  return parameters;
}

// Gives every parameter but `skipped` its range of `flat` (in the model's order) as its gradient, through a
// backward pass of sum(p * g) (exact: d/dp = 1 * g), as an optimizer finds them after backward.
void give_gradients(ParameterBuffer& buffer, const Tensor& flat, const std::string& skipped) {
  buffer.zero_grad();
  int64_t offset = 0;
  for (const auto& [name, p] : buffer.named()) {
    const Tensor g = flat.view_range(offset, p.shape()).to(p.device());
    if (name != skipped) ops::sum(ops::mul(p, g)).backward();
    offset += p.numel();
  }
}

// Three steps of Optim over the same parameters and gradients on both devices: parameters and state
// must match after each. Each element is updated alone, so the bound is the elementwise one. In the
// second step conv.bias gets no gradient: on both devices it and its state stay as they were.
template <class Optim, class Options>
void check_optimizer_parity(const Options& options, DType dtype, bool many, const std::string& name) {
  ParameterBuffer cpu(optimizer_parameters(dtype, Device::CPU, many)),
      gpu(optimizer_parameters(dtype, Device::CUDA, many));
  Optim cpu_optimizer(cpu, options), gpu_optimizer(gpu, options);
  Rng rng(41);
  for (int step = 1; step <= 3; ++step) {
    std::vector<double> g = Tensor::randn({cpu.numel()}, rng, 1.0 / step, DType::F64).to_vector();
    std::fill(g.begin() + 10, g.begin() + 60, 0.0);  // zero gradients: RMSProp divides 0 by eps
    const Tensor grads = Tensor::from_vector(g, {cpu.numel()}, dtype);
    const std::string skipped = step == 2 ? "conv.bias" : "";
    give_gradients(cpu, grads, skipped);
    give_gradients(gpu, grads, skipped);
    const Tensor bias_before = gpu.named()[1].second.to(Device::CPU);
    cpu_optimizer.step();
    gpu_optimizer.step();
    if (!skipped.empty()) check_close(bias_before, gpu.named()[1].second, 0.0, name + ": a parameter without gradient");
    const std::string what = name + " " + dtype_name(dtype) + " after step " + std::to_string(step);
    check_close(cpu.values(), gpu.values(), elementwise_bound(dtype), what + ": parameters");
    const NamedTensors cpu_state = cpu_optimizer.state(), gpu_state = gpu_optimizer.state();
    REQUIRE(cpu_state.size() == gpu_state.size());
    for (size_t i = 0; i < cpu_state.size(); ++i)
      check_close(cpu_state[i].second, gpu_state[i].second, elementwise_bound(dtype), what + ": " + cpu_state[i].first);
  }
}

// ---- binary codes ----

// (N,D) N(0,1) codes with exact zeros and negative zeros sprinkled in (sign(0) = +1: bit set).
Tensor codes_with_zeros(int64_t n, int64_t d, DType dtype, Rng& rng) {
  std::vector<double> values = Tensor::randn({n, d}, rng, 1.0, DType::F64).to_vector();
  for (size_t i = 0; i < values.size(); i += 7) values[i] = 0.0;
  for (size_t i = 3; i < values.size(); i += 11) values[i] = -0.0;
  return Tensor::from_vector(values, {n, d}, dtype);
}

// count_non_finite_ twice into a zero count on the tensors' device: the count after both calls.
double count_twice(const std::vector<Tensor>& tensors) {
  Tensor count = Tensor::zeros({}, DType::I32, tensors.front().device());
  ops::count_non_finite_(tensors, count);
  ops::count_non_finite_(tensors, count);
  return count.item();
}

// ---- the whole model ----

constexpr int kModelBatch = 4, kModelImage = 32, kMemoryRows = 64, kClasses = 10;

// One batch and the training set's labels and codes (the U matrix), on the CPU in float64.
struct ModelData {
  Tensor images, labels, index, train_labels, codes;
};

ModelData model_data(int bits) {
  Rng rng(50);
  std::vector<double> train(kMemoryRows * kClasses, 0.0);
  for (int i = 0; i < kMemoryRows; ++i) {
    train[i * kClasses + i % kClasses] = 1;
    if (i % 3 == 0) train[i * kClasses + (i + 3) % kClasses] = 1;  // some multi-label rows
  }
  const std::vector<int32_t> index{9, 2, 41, 0};
  std::vector<double> labels;
  for (int32_t i : index) labels.insert(labels.end(), train.begin() + i * kClasses, train.begin() + (i + 1) * kClasses);
  ModelData d;
  d.images = Tensor::randn({kModelBatch, 3, kModelImage, kModelImage}, rng, 1.0, DType::F64);
  d.labels = Tensor::from_vector(labels, {kModelBatch, kClasses}, DType::F64);
  d.index = index_tensor(index);
  d.train_labels = Tensor::from_vector(train, {kMemoryRows, kClasses}, DType::F64);
  d.codes = Tensor::uniform({kMemoryRows, bits}, rng, -1, 1, DType::F64);
  return d;
}

// train_mdff's model: ResNet50-MDFF-SH, 48 bits, all taps, scales 1 and 0.5 (MdffConfig's defaults).
MdffConfig model_config() {
  MdffConfig config;
  config.classes = kClasses;
  return config;
}

// An MDFF-SH and what a training step needs (flat parameters, RMSProp with the paper's settings, the U
// matrix of pairs = dataset), on one device in one dtype.
struct ModelRig {
  std::unique_ptr<MdffSh> model;
  std::unique_ptr<ParameterBuffer> parameters;
  std::unique_ptr<RMSProp> optimizer;
  std::unique_ptr<PairMemory> memory;
  Tensor images, labels, index;
  MdffOutput out;
  LossTerms terms;

  ModelRig(const ModelData& d, DType dtype, Device device, bool training) {
    Rng rng(51);
    model = std::make_unique<MdffSh>(model_config(), rng);
    model->to(dtype);
    model->to(device);
    model->train(training);
    parameters = std::make_unique<ParameterBuffer>(model->named_parameters());
    optimizer = std::make_unique<RMSProp>(*parameters, RMSPropOptions{});
    memory = std::make_unique<PairMemory>(d.train_labels.to(dtype).to(device), model->config().bits);
    memory->codes().copy_(d.codes.to(dtype).to(device));
    images = d.images.to(dtype).to(device);
    labels = d.labels.to(dtype).to(device);
    index = d.index.to(device);
  }

  // What Trainer::train_epoch does before the update: zero_grad, forward, J1 + beta J2 + gamma J3, backward.
  void forward_backward() {
    parameters->zero_grad();
    out = model->forward(images);
    terms = mdff_loss(out.u, out.logits, labels, index, memory.get(), LossConfig{});
    terms.total.backward();
  }
};

// Makes `to` hold `from`'s state: parameters, RMSProp's square_avg, batch-norm statistics, U.
void copy_state(ModelRig& to, ModelRig& from) {
  Tensor values = to.parameters->values();
  values.copy_(from.parameters->values());
  NamedTensors to_state = to.optimizer->state(), from_state = from.optimizer->state();
  for (size_t i = 0; i < to_state.size(); ++i) to_state[i].second.copy_(from_state[i].second);
  NamedTensors to_buffers = to.model->named_buffers(), from_buffers = from.model->named_buffers();
  for (size_t i = 0; i < to_buffers.size(); ++i) to_buffers[i].second.copy_(from_buffers[i].second);
  to.memory->codes().copy_(from.memory->codes());
}

struct Worst {
  double error = 0;
  std::string name = "(none)";
};

// The largest TensorMax error over tensors paired by name (part picks the value or the gradient).
Worst worst_of(const NamedTensors& cpu, const NamedTensors& cuda, const UnaryFn& part) {
  REQUIRE(cpu.size() == cuda.size());
  Worst worst;
  for (size_t i = 0; i < cpu.size(); ++i) {
    REQUIRE(cpu[i].first == cuda[i].first);
    const double e = parity_error(part(cpu[i].second), part(cuda[i].second), Scale::TensorMax);
    if (e > worst.error) worst = {e, cpu[i].first};
  }
  return worst;
}

void check_worst(const Worst& worst, size_t tensors, double bound, const std::string& what) {
  INFO(what, " (", tensors, " tensors, max error / max |cpu| each): worst ", worst.name, " at ", worst.error,
       ", bound ", bound);
  CHECK(worst.error <= bound);
}

struct ModelBounds {
  double forward;     // u, logits, J1, J2, J3, the total, U (TensorMax)
  double gradient;    // each parameter's gradient
  double statistics;  // each running mean and variance
  double square_avg;  // RMSProp's state
  double update;      // each parameter's change in an RMSProp step
};

void compare_forward_backward(ModelRig& cpu, ModelRig& gpu, const ModelBounds& b, const std::string& what) {
  const std::vector<std::tuple<std::string, Tensor, Tensor>> outputs = {
      {"u", cpu.out.u, gpu.out.u},
      {"logits", cpu.out.logits, gpu.out.logits},
      {"J1", cpu.terms.j1, gpu.terms.j1},
      {"J2", cpu.terms.j2, gpu.terms.j2},
      {"J3", cpu.terms.j3, gpu.terms.j3},
      {"total loss", cpu.terms.total, gpu.terms.total},
      {"U after the batch's rows were written", cpu.memory->codes(), gpu.memory->codes()}};
  for (const auto& [name, a, c] : outputs) check_close(a, c, b.forward, what + ": " + name, Scale::TensorMax);
  const NamedTensors cpu_parameters = cpu.model->named_parameters(), gpu_parameters = gpu.model->named_parameters();
  check_worst(worst_of(cpu_parameters, gpu_parameters, [](const Tensor& p) { return p.grad(); }), cpu_parameters.size(),
              b.gradient, what + ": parameter gradients");
  const NamedTensors cpu_buffers = cpu.model->named_buffers();
  check_worst(worst_of(cpu_buffers, gpu.model->named_buffers(), [](const Tensor& t) { return t; }), cpu_buffers.size(),
              b.statistics, what + ": batch-norm running statistics");
}

// After an RMSProp step from the same state (`before`: the CPU's parameters): each parameter's change.
void compare_update(ModelRig& cpu, ModelRig& gpu, const Tensor& before, const ModelBounds& b, const std::string& what) {
  const Tensor cpu_delta = ops::sub(cpu.parameters->values(), before);
  const Tensor gpu_delta = ops::sub(gpu.parameters->values().cpu(), before);
  NamedTensors cpu_changes, gpu_changes;
  int64_t offset = 0;
  for (const auto& [name, p] : cpu.parameters->named()) {
    cpu_changes.emplace_back(name, cpu_delta.view_range(offset, p.shape()));
    gpu_changes.emplace_back(name, gpu_delta.view_range(offset, p.shape()));
    offset += p.numel();
  }
  check_worst(worst_of(cpu_changes, gpu_changes, [](const Tensor& t) { return t; }), cpu_changes.size(), b.update,
              what + ": RMSProp's change of each parameter");
  check_close(cpu.optimizer->square_avg(), gpu.optimizer->square_avg(), b.square_avg, what + ": RMSProp's square_avg",
              Scale::TensorMax);
}

}  // namespace

TEST_CASE("cuda device is detected and named") {
#ifdef MDFF_WITH_CUDA
  const cuda::DeviceInfo& info = cuda::device_info();
  CHECK(info.usable);
  CHECK(info.why_not.empty());
  CHECK(!info.name.empty());
  CHECK(info.major >= 9);
  CHECK(info.multiprocessors > 0);
  MESSAGE("running on ", info.name, " (compute capability ", info.major, ".", info.minor, ")");
#endif
  CHECK(std::string(backend(Device::CUDA).name()) == "cuda");
}

TEST_CASE("fill writes the value in every dtype") {
  for (DType dtype : {DType::F32, DType::F64, DType::I32}) {
    const Tensor t = Tensor::full({7, 300}, -3.25, dtype, Device::CUDA);
    const Tensor expected = Tensor::full({7, 300}, -3.25, dtype);
    CHECK(t.device() == Device::CUDA);
    CHECK(t.to_vector() == expected.to_vector());  // exact: no arithmetic involved
  }
  CHECK(Tensor::zeros({0, 4}, DType::F32, Device::CUDA).numel() == 0);  // empty: no launch, no error
}

TEST_CASE("cast between float32 and float64, and same-type copies") {
  Rng rng(3);
  for (DType from : kFloatTypes) {
    for (DType to : kFloatTypes) {
      const Tensor x = Tensor::randn({5, 33}, rng, 10.0, from);
      const Tensor on_cpu = Tensor::empty(x.shape(), to);
      backend(Device::CPU).cast(x, on_cpu);
      const Tensor on_gpu = Tensor::empty(x.shape(), to, Device::CUDA);
      backend(Device::CUDA).cast(x.to(Device::CUDA), on_gpu);
      INFO(std::string(dtype_name(from)), " -> ", std::string(dtype_name(to)));
      CHECK(on_gpu.to_vector() == on_cpu.to_vector());  // conversions are exactly rounded on both
    }
  }
  const Tensor x = Tensor::randn({1000}, rng, 1.0, DType::F32, Device::CUDA);
  CHECK(x.to(DType::F64).to(DType::F32).to_vector() == x.to_vector());
  CHECK(x.clone().to_vector() == x.to_vector());  // copy_on_device
}

TEST_CASE("unary ops match the CPU forward and backward") {
  for (DType dtype : kFloatTypes) {
    for (const Shape& shape : {Shape{1000}, Shape{4, 3, 5, 5}, Shape{}}) {
      check_unary_parity([](const Tensor& x) { return ops::relu(x); }, shape, dtype, "relu");
      check_unary_parity([](const Tensor& x) { return ops::tanh(x); }, shape, dtype, "tanh");
      check_unary_parity([](const Tensor& x) { return ops::softplus(x); }, shape, dtype, "softplus");
      check_unary_parity([](const Tensor& x) { return ops::heaviside(x); }, shape, dtype, "heaviside");
      check_unary_parity([](const Tensor& x) { return ops::scale(x, -2.5); }, shape, dtype, "scale");
    }
    // Large blocks exercise the grid-stride loop (more items than threads).
    check_unary_parity([](const Tensor& x) { return ops::tanh(x); }, Shape{3, 1 << 20}, dtype, "tanh large");
  }
}

TEST_CASE("softplus is stable at large |x|") {
  const std::vector<double> values = {-1000, -80, -30, -1e-3, 0, 1e-3, 30, 80, 1000};
  for (DType dtype : kFloatTypes) {
    const Tensor x = Tensor::from_vector(values, {9}, dtype);
    const Tensor yc = ops::softplus(x.to(Device::CUDA));
    for (double v : yc.to_vector()) CHECK(std::isfinite(v));
    check_close(ops::softplus(x), yc, elementwise_bound(dtype), std::string("softplus extremes ") + dtype_name(dtype));
    const Tensor gx = Tensor::empty({9}, dtype, Device::CUDA), gx_cpu = Tensor::empty({9}, dtype);
    const Tensor ones = Tensor::full({9}, 1.0, dtype);
    backend(Device::CUDA).unary_backward(UnaryOp::Softplus, x.to(Device::CUDA), Tensor(), ones.to(Device::CUDA), gx);
    backend(Device::CPU).unary_backward(UnaryOp::Softplus, x, Tensor(), ones, gx_cpu);
    check_close(gx_cpu, gx, elementwise_bound(dtype), std::string("sigmoid extremes ") + dtype_name(dtype));
  }
}

TEST_CASE("sign is +1 at zero and has a zero gradient") {
  for (DType dtype : kFloatTypes) {
    const Tensor x = Tensor::from_vector(std::vector<double>{-2, -1e-30, 0, 1e-30, 3}, {5}, dtype);
    CHECK(ops::sign(x.to(Device::CUDA)).to_vector() == std::vector<double>{-1, -1, 1, 1, 1});
    Rng rng(4);
    const Tensor r = Tensor::randn({4, 3, 5, 5}, rng, 1.0, dtype);
    CHECK(ops::sign(r.to(Device::CUDA)).to_vector() == ops::sign(r).to_vector());
    // ops::sign records no graph; its backward kernel still exists and writes zeros.
    const Tensor gy = Tensor::full({5}, 7.0, dtype, Device::CUDA), gx = Tensor::full({5}, 9.0, dtype, Device::CUDA);
    backend(Device::CUDA).unary_backward(UnaryOp::Sign, x.to(Device::CUDA), Tensor(), gy, gx);
    CHECK(gx.to_vector() == std::vector<double>(5, 0.0));
  }
}

TEST_CASE("binary ops with broadcasting match the CPU forward and backward") {
  const BinaryFn add = [](const Tensor& a, const Tensor& b) { return ops::add(a, b); };
  const BinaryFn sub = [](const Tensor& a, const Tensor& b) { return ops::sub(a, b); };
  const BinaryFn mul = [](const Tensor& a, const Tensor& b) { return ops::mul(a, b); };
  const std::vector<std::pair<Shape, Shape>> shapes = {
      {{4, 3, 5, 5}, {4, 3, 5, 5}},    // same shape: the fast path
      {{4, 3, 5, 5}, {1, 3, 1, 1}},    // per-channel bias
      {{1, 3, 1, 1}, {4, 3, 5, 5}},    // ... on the left
      {{8, 16}, {16}},                 // fewer dims: aligned to the right
      {{3, 1, 5}, {1, 4, 1}},          // both inputs broadcast
      {{6, 7}, {}},                    // a 0-dim scalar
      {{2, 3, 4, 5, 6}, {2, 1, 4, 1, 6}},
      {{64, 32, 16, 16}, {1, 32, 1, 1}},  // sum_to over long contiguous runs: a block per output
      {{512, 300}, {300}},               // sum_to down columns: a thread per output
  };
  for (DType dtype : kFloatTypes) {
    for (const auto& [sa, sb] : shapes) {
      check_binary_parity(add, sa, sb, dtype, "add");
      check_binary_parity(sub, sa, sb, dtype, "sub");
      check_binary_parity(mul, sa, sb, dtype, "mul");
    }
  }
}

TEST_CASE("broadcasting that needs more than 8 dimensions is a clear error on the GPU") {
  // Every other dimension repeats b, so no two neighbours merge: 9 dimensions remain.
  const Tensor a = Tensor::zeros({2, 2, 2, 2, 2, 2, 2, 2, 2}, DType::F32, Device::CUDA);
  const Tensor b = Tensor::zeros({2, 1, 2, 1, 2, 1, 2, 1, 2}, DType::F32, Device::CUDA);
  CHECK_THROWS_WITH_AS(ops::add(a, b), doctest::Contains("needs more than 8 dimensions"), Error);
  // Dimensions that merge are fine however many there are.
  const Tensor c = Tensor::full({2, 2, 2, 2, 2, 2, 2, 2, 2, 2}, 1.0, DType::F32, Device::CUDA);
  const Tensor d = Tensor::full({1, 1, 1, 1, 1, 2, 2, 2, 2, 2}, 2.0, DType::F32, Device::CUDA);
  CHECK(ops::sum(ops::add(c, d)).item() == 3.0 * 1024);
}

TEST_CASE("binary writes in place when out is an input") {
  Rng rng(5);
  for (DType dtype : kFloatTypes) {
    const Tensor y = Tensor::randn({8, 16}, rng, 1.0, dtype), bias = Tensor::randn({16}, rng, 1.0, dtype);
    const Tensor yc = y.to(Device::CUDA);
    backend(Device::CPU).binary(BinaryOp::Add, y, bias, y);  // what ops::linear does with its bias
    backend(Device::CUDA).binary(BinaryOp::Add, yc, bias.to(Device::CUDA), yc);
    check_close(y, yc, elementwise_bound(dtype), "in-place add");
  }
}

TEST_CASE("sum (a full reduction through sum_to) matches the CPU forward and backward") {
  for (DType dtype : kFloatTypes) {
    for (const Shape& shape : {Shape{1}, Shape{37}, Shape{4, 3, 5, 5}, Shape{3, 1 << 18}}) {
      check_unary_parity([](const Tensor& x) { return ops::sum(x); }, shape, dtype, "sum");
      check_unary_parity([](const Tensor& x) { return ops::mean(x); }, shape, dtype, "mean");
    }
  }
}

TEST_CASE("sum_to with size-1 dims kept in the output") {
  Rng rng(6);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{4, 3, 5, 5}, {1, 3, 1, 1}}, {{4, 3, 5, 5}, {3, 1, 1}}, {{4, 3, 5, 5}, {4, 1, 5, 1}},
      {{4, 3, 5, 5}, {5}},          {{2, 1, 3}, {1, 1, 3}},    {{6, 9}, {6, 9}},
      {{0, 4}, {4}},  // nothing to sum: zeros
  };
  for (DType dtype : kFloatTypes) {
    for (const auto& [from, to] : cases) {
      const Tensor src = Tensor::randn(from, rng, 1.0, dtype);
      const Tensor out = Tensor::empty(to, dtype), out_c = Tensor::full(to, 123.0, dtype, Device::CUDA);
      backend(Device::CPU).sum_to(src, out);
      backend(Device::CUDA).sum_to(src.to(Device::CUDA), out_c);
      check_close(out, out_c, product_bound(dtype), "sum_to " + shape_str(from) + " -> " + shape_str(to));
    }
  }
}

TEST_CASE("matmul and linear (cuBLAS gemm) match the CPU forward and backward") {
  const Tf32Guard exact(false);
  for (DType dtype : kFloatTypes) {
    for (bool trans_a : {false, true}) {
      for (bool trans_b : {false, true}) {
        Rng rng(7);
        const int64_t m = 13, k = 37, n = 21;
        const Tensor a = cpu_leaf(trans_a ? Shape{k, m} : Shape{m, k}, rng, dtype);
        const Tensor b = cpu_leaf(trans_b ? Shape{n, k} : Shape{k, n}, rng, dtype);
        const Tensor ac = cuda_twin(a), bc = cuda_twin(b);
        const double alpha = trans_b ? 0.5 : -1.5;  // J1's theta = 0.5 u U^T: alpha inside the GEMM
        const Tensor c = ops::matmul(a, b, trans_a, trans_b, alpha), cc = ops::matmul(ac, bc, trans_a, trans_b, alpha);
        const std::string what = std::string("matmul ") + dtype_name(dtype) + (trans_a ? " A^T" : " A") +
                                 (trans_b ? " B^T" : " B");
        check_close(c, cc, product_bound(dtype), what + " forward");
        const Tensor gc = Tensor::randn(c.shape(), rng, 1.0, dtype);
        c.backward(gc);
        cc.backward(gc.to(Device::CUDA));
        check_close(a.grad(), ac.grad(), product_bound(dtype), what + " grad a");
        check_close(b.grad(), bc.grad(), product_bound(dtype), what + " grad b");
      }
    }
    Rng rng(8);
    const Tensor x = cpu_leaf({32, 50}, rng, dtype), w = cpu_leaf({10, 50}, rng, dtype), bias = cpu_leaf({10}, rng, dtype);
    const Tensor xc = cuda_twin(x), wc = cuda_twin(w), biasc = cuda_twin(bias);
    const Tensor y = ops::linear(x, w, bias), yc = ops::linear(xc, wc, biasc);
    check_close(y, yc, product_bound(dtype), std::string("linear forward ") + dtype_name(dtype));
    ops::sum(ops::tanh(y)).backward();
    ops::sum(ops::tanh(yc)).backward();
    check_close(x.grad(), xc.grad(), product_bound(dtype), "linear grad x");
    check_close(w.grad(), wc.grad(), product_bound(dtype), "linear grad weight");
    check_close(bias.grad(), biasc.grad(), product_bound(dtype), "linear grad bias");
  }
}

TEST_CASE("gemm accumulates with beta and handles k = 0") {
  const Tf32Guard exact(false);
  Rng rng(9);
  for (DType dtype : kFloatTypes) {
    const Tensor a = Tensor::randn({6, 4}, rng, 1.0, dtype), b = Tensor::randn({4, 5}, rng, 1.0, dtype);
    const Tensor c = Tensor::randn({6, 5}, rng, 1.0, dtype), cc = c.to(Device::CUDA);
    backend(Device::CPU).gemm(false, false, 0.5, a, b, 2.0, c);  // C = 0.5 AB + 2 C
    backend(Device::CUDA).gemm(false, false, 0.5, a.to(Device::CUDA), b.to(Device::CUDA), 2.0, cc);
    check_close(c, cc, product_bound(dtype), "gemm beta = 2");
    // An empty inner dimension: C = beta C.
    const Tensor e = Tensor::full({3, 2}, 4.0, dtype, Device::CUDA);
    backend(Device::CUDA).gemm(false, false, 1.0, Tensor::empty({3, 0}, dtype, Device::CUDA),
                               Tensor::empty({0, 2}, dtype, Device::CUDA), 0.5, e);
    CHECK(e.to_vector() == std::vector<double>(6, 2.0));
  }
}

TEST_CASE("a chain of ops on the GPU matches the CPU end to end") {
  for (DType dtype : kFloatTypes) {
    Rng rng(10);
    const Tensor x = cpu_leaf({4, 3, 5, 5}, rng, dtype), b = cpu_leaf({1, 3, 1, 1}, rng, dtype);
    const Tensor z = cpu_leaf({3, 5, 5}, rng, dtype);
    const Tensor xc = cuda_twin(x), bc = cuda_twin(b), zc = cuda_twin(z);
    auto loss = [](const Tensor& x, const Tensor& b, const Tensor& z) {
      const Tensor h = ops::tanh(ops::add(x, b));                        // (4,3,5,5)
      const Tensor s = ops::mul(h, ops::softplus(z));                    // (4,3,5,5) * (3,5,5)
      return ops::mean(ops::sub(ops::relu(s), ops::scale(h, 0.25)));  // ()
    };
    const Tensor l = loss(x, b, z), lc = loss(xc, bc, zc);
    check_close(l, lc, product_bound(dtype), std::string("chain loss ") + dtype_name(dtype));
    l.backward();
    lc.backward();
    check_close(x.grad(), xc.grad(), product_bound(dtype), "chain grad x");
    check_close(b.grad(), bc.grad(), product_bound(dtype), "chain grad b");
    check_close(z.grad(), zc.grad(), product_bound(dtype), "chain grad z");
    // Backward accumulates: a second pass doubles the gradient on both devices.
    loss(x, b, z).backward();
    loss(xc, bc, zc).backward();
    check_close(b.grad(), bc.grad(), product_bound(dtype), "chain grad b after two passes");
  }
}

TEST_CASE("conv2d (cuDNN) matches the CPU forward and backward at ResNet50's kinds of convolution") {
  const Tf32Guard exact(false);
  for (DType dtype : kFloatTypes)
    for (const ConvCase& c : kConvCases) check_conv_parity(c, dtype, conv_bound(dtype));
}

TEST_CASE("with TF32 on (the default), conv2d and matmul stay within TF32's accuracy; float64 ignores TF32") {
  const Tf32Guard on(true);
  // Wider than kConvCases: K = 32 * 9 = 288 and 512 terms per dot product, where TF32 rounding shows.
  const ConvCase wide{"3x3 pad 1 stride 1, 32 -> 64 channels", {4, 32, 16, 16}, {64, 32, 3, 3}, 1, 1, true};
  const OpFn matmul = [](const std::vector<Tensor>& in) { return ops::matmul(in[0], in[1]); };
  Rng rng(22);
  for (DType dtype : kFloatTypes) {
    const double conv = dtype == DType::F32 ? kTf32Bound : conv_bound(dtype);
    const double product = dtype == DType::F32 ? kTf32Bound : product_bound(dtype);
    const double conv_error = check_conv_parity(wide, dtype, conv).worst;
    const double stem_error = check_conv_parity(kConvCases[6], dtype, conv).worst;
    const double matmul_error =
        check_op_parity(matmul, {{"a", cpu_leaf({128, 512}, rng, dtype)}, {"b", cpu_leaf({512, 96}, rng, dtype)}},
                        {product, product, Scale::TensorMax}, "matmul with TF32 allowed")
            .worst;
    MESSAGE("TF32 allowed, ", std::string(dtype_name(dtype)), ": largest error / max |cpu| of conv2d ", conv_error,
            ", the stem ", stem_error, ", matmul ", matmul_error, " (bounds ", conv, ", ", product, ")");
  }
}

TEST_CASE("conv2d_bn_eval on the GPU equals conv2d -> batch_norm2d (evaluation) -> + residual -> relu there") {
  const Tf32Guard exact(false);
  const NoGradGuard no_grad;  // conv2d_bn_eval is inference only
  struct FusedCase {
    ConvCase conv;
    bool residual, relu;
  };
  const FusedCase cases[] = {{kConvCases[3], true, true},  // a bottleneck's conv3 + bn3 + shortcut + ReLU
                             {kConvCases[0], false, true},
                             {kConvCases[8], false, false},  // the shortcut's downsample + its BN
                             {kConvCases[6], false, true}};  // the stem
  for (DType dtype : kFloatTypes)
    for (const FusedCase& c : cases) {
      Rng rng(31);
      const Tensor x = Tensor::randn(c.conv.x, rng, 1.0, dtype), w = Tensor::randn(c.conv.weight, rng, 0.1, dtype);
      const BatchNormEval bn = batch_norm_eval_params(c.conv.weight[0], dtype, rng);
      const int64_t ho = (c.conv.x[2] + 2 * c.conv.padding - c.conv.weight[2]) / c.conv.stride + 1;
      const int64_t wo = (c.conv.x[3] + 2 * c.conv.padding - c.conv.weight[3]) / c.conv.stride + 1;
      const Shape y_shape{c.conv.x[0], c.conv.weight[0], ho, wo};
      const Tensor residual = c.residual ? Tensor::randn(y_shape, rng, 1.0, dtype) : Tensor();
      const Tensor xc = x.to(Device::CUDA), wc = w.to(Device::CUDA);
      const Tensor rc = c.residual ? residual.to(Device::CUDA) : Tensor();
      const BatchNormEval bnc = to_cuda(bn);
      const Tensor fused = ops::conv2d_bn_eval(xc, wc, bnc, c.conv.stride, c.conv.padding, rc, c.relu);
      Tensor separate = ops::batch_norm2d(ops::conv2d(xc, wc, Tensor(), c.conv.stride, c.conv.padding), bnc.gamma,
                                          bnc.beta, bnc.running_mean, bnc.running_var, false, 0.1, bnc.eps);
      if (c.residual) separate = ops::add(separate, rc);
      if (c.relu) separate = ops::relu(separate);
      const std::string what = std::string("conv2d_bn_eval ") + c.conv.role + " " + dtype_name(dtype) +
                               (c.residual ? " + residual" : "") + (c.relu ? " + relu" : "");
      INFO(what);
      REQUIRE(fused.shape() == separate.shape());
      // The contract (core/backend.h): equal bit for bit to the separate kernels.
      CHECK(parity_error(separate, fused, Scale::PerElement) == 0);
      check_close(ops::conv2d_bn_eval(x, w, bn, c.conv.stride, c.conv.padding, residual, c.relu), fused,
                  conv_bound(dtype), what + " against the CPU", Scale::TensorMax);
    }
}

TEST_CASE("batch_norm2d in training (running statistics updated) and evaluation matches the CPU") {
  struct BnCase {
    Shape x;
    double momentum, eps;
  };
  // Reductions over N*H*W per channel (up to 6272 values) in another order: TensorMax, product bound
  // (float32 against float64 on the CPU: at most 3.3e-7 here).
  const BnCase cases[] = {{{4, 8, 5, 5}, 0.1, 1e-5},
                          {{32, 64, 1, 1}, 0.1, 1e-5},  // layer4's 1x1 maps: a channel's values span the batch
                          {{8, 16, 28, 28}, 0.1, 1e-5},
                          // 4 values per channel (layer4 at the 0.5 scale, batch 4), other momentum and eps. Not
                          // 2 values: there the gradient of x is 0 in exact arithmetic, all rounding noise.
                          {{4, 3, 1, 1}, 0.3, 1e-3}};
  for (DType dtype : kFloatTypes)
    for (const BnCase& c : cases)
      for (bool training : {true, false}) {
        Rng rng(32);
        const OpFn op = [&](const std::vector<Tensor>& in) {
          return ops::batch_norm2d(in[0], in[1], in[2], in[3], in[4], training, c.momentum, c.eps);
        };
        const std::string what = std::string("batch_norm2d ") + (training ? "training" : "evaluation");
        const double bound = product_bound(dtype);
        const ParityRun run =
            check_op_parity(op, batch_norm_inputs(c.x, dtype, rng), {bound, bound, Scale::TensorMax}, what);
        // Training updates both devices' statistics alike; evaluation leaves them exactly as they were.
        check_close(run.cpu[3], run.cuda[3], training ? bound : 0.0, what + ": running_mean after", Scale::TensorMax);
        check_close(run.cpu[4], run.cuda[4], training ? bound : 0.0, what + ": running_var after", Scale::TensorMax);
      }
}

TEST_CASE("the fused batch_norm2d_relu and add_relu match the CPU forward and backward") {
  for (DType dtype : kFloatTypes) {
    Rng rng(33);
    const double bound = product_bound(dtype);
    check_op_parity([](const std::vector<Tensor>& in) {
                      return ops::batch_norm2d_relu(in[0], in[1], in[2], in[3], in[4], true);
                    },
                    batch_norm_inputs({8, 16, 7, 7}, dtype, rng), {bound, bound, Scale::TensorMax},
                    "batch_norm2d_relu training");
    check_binary_parity([](const Tensor& a, const Tensor& b) { return ops::add_relu(a, b); }, {4, 8, 5, 5},
                        {4, 8, 5, 5}, dtype, "add_relu");
  }
}

TEST_CASE("max_pool2d 3/2/1 matches the CPU: odd sizes, ties (first maximum wins), padding, NaN") {
  const OpFn pool = [](const std::vector<Tensor>& in) { return ops::max_pool2d(in[0], 3, 2, 1); };
  const std::pair<const char*, std::function<double(double, size_t)>> inputs[] = {
      {"N(0,1)", [](double v, size_t) { return v; }},
      // Values on a grid of 1: most windows hold ties, and the gradient goes where the tie-break put it.
      {"ties", [](double v, size_t) { return std::round(v); }},
      // All negative: padding must act as -inf, not as 0.
      {"negative", [](double v, size_t) { return v - 10; }},
      // NaN propagates (PyTorch): the window's output is NaN, its gradient goes to the NaN.
      {"NaN", [](double v, size_t i) { return i % 23 == 5 ? std::nan("") : v; }},
  };
  for (DType dtype : kFloatTypes)
    for (const Shape& shape : {Shape{2, 3, 9, 9}, Shape{4, 8, 16, 16}, Shape{1, 2, 7, 10}, Shape{2, 4, 2, 2}})
      for (const auto& [kind, f] : inputs) {
        Rng rng(33);
        // The maximum is exact; an input under up to four overlapping windows sums their gradients.
        check_op_parity(pool, {{"x", mapped_leaf(shape, dtype, rng, f)}}, {0.0, elementwise_bound(dtype)},
                        std::string("max_pool2d ") + kind);
      }
}

TEST_CASE("global_avg_pool and upsample_nearest match the CPU forward and backward") {
  const OpFn gap = [](const std::vector<Tensor>& in) { return ops::global_avg_pool(in[0]); };
  for (DType dtype : kFloatTypes) {
    Rng rng(34);
    for (const Shape& shape : {Shape{4, 8, 5, 5}, Shape{2, 2048, 1, 1}, Shape{3, 16, 7, 7}, Shape{2, 4, 28, 28}})
      check_op_parity(gap, {{"x", cpu_leaf(shape, rng, dtype)}}, {product_bound(dtype), product_bound(dtype)},
                      "global_avg_pool");
    // Integer ratios (the top-down path: 7 -> 14), non-integer ones, shrinking, and 2 -> 26, where the
    // source index floor(13 * float(2/26)) is 0 in float arithmetic (PyTorch's, the CPU's) and 1 in exact.
    const std::pair<Shape, Shape> sizes[] = {
        {{7, 7}, {14, 14}}, {{5, 5}, {12, 12}}, {{4, 6}, {9, 13}}, {{8, 8}, {5, 5}}, {{2, 3}, {26, 39}}};
    for (const auto& [from, to] : sizes) {
      const OpFn up = [to = to](const std::vector<Tensor>& in) { return ops::upsample_nearest(in[0], to[0], to[1]); };
      // Forward copies (exact); backward sums the outputs that share a source.
      check_op_parity(up, {{"x", cpu_leaf({2, 3, from[0], from[1]}, rng, dtype)}}, {0.0, product_bound(dtype)},
                      "upsample_nearest to " + shape_str(to));
    }
  }
}

TEST_CASE("resize_bilinear (align_corners = false) matches the CPU, down and up") {
  const std::pair<Shape, Shape> sizes[] = {
      {{32, 32}, {224, 224}}, {{37, 37}, {16, 16}}, {{10, 20}, {7, 33}}, {{5, 5}, {5, 5}}, {{32, 32}, {16, 16}}};
  for (DType dtype : kFloatTypes) {
    Rng rng(35);
    for (const auto& [from, to] : sizes) {
      const OpFn resize = [to = to](const std::vector<Tensor>& in) {
        return ops::resize_bilinear(in[0], to[0], to[1]);
      };
      // Forward only (it resizes input images). Two-tap weights from coordinates computed in the dtype.
      check_op_parity(resize, {{"x", Tensor::randn({2, 3, from[0], from[1]}, rng, 1.0, dtype)}},
                      {product_bound(dtype), 0.0}, "resize_bilinear to " + shape_str(to));
    }
  }
}

TEST_CASE("concat matches the CPU forward and backward (exact: copies)") {
  const std::pair<int64_t, std::vector<Shape>> cases[] = {
      {1, {{2, 3, 4, 4}, {2, 5, 4, 4}, {2, 1, 4, 4}}},  // channels, as the fusion of scales
      {0, {{3, 6}, {1, 6}}},
      {-1, {{4, 3}, {4, 7}, {4, 1}}},  // features, as [g3, g4, g5, fc1]
  };
  for (DType dtype : kFloatTypes)
    for (const auto& [dim, shapes] : cases) {
      Rng rng(36);
      NamedTensors parts;
      for (const Shape& shape : shapes)
        parts.emplace_back("part " + std::to_string(parts.size()), cpu_leaf(shape, rng, dtype));
      const OpFn op = [dim = dim](const std::vector<Tensor>& in) { return ops::concat(in, dim); };
      check_op_parity(op, parts, {0.0, 0.0}, "concat along dim " + std::to_string(dim));
    }
}

TEST_CASE("log_softmax and cross_entropy with soft targets match the CPU forward and backward") {
  const OpFn log_softmax = [](const std::vector<Tensor>& in) { return ops::log_softmax(in[0]); };
  const OpFn cross_entropy = [](const std::vector<Tensor>& in) { return ops::cross_entropy(in[0], in[1]); };
  for (DType dtype : kFloatTypes) {
    Rng rng(37);
    const Bounds bounds{product_bound(dtype), product_bound(dtype)};  // a max, a sum of exponentials, a log
    for (const Shape& shape : {Shape{4, 10}, Shape{64, 1000}, Shape{3, 1}})
      check_op_parity(log_softmax, {{"x", cpu_leaf(shape, rng, dtype)}}, bounds, "log_softmax");
    // Logits far apart: exp would overflow without subtracting the row's maximum.
    check_op_parity(log_softmax, {{"x", cpu_leaf({8, 10}, rng, dtype, 50.0)}}, bounds, "log_softmax of large logits");
    // the fused J3: CIFAR-10's classes at a small batch, NUS-WIDE's 21 at batch 128, one class, more
    // classes than a warp's lanes (each lane loops over the row), and more rows than the grid has warps
    // (132 SMs x 16 blocks x 8 warps on the H200: each warp loops over rows)
    for (const Shape& shape : {Shape{8, 10}, Shape{128, 21}, Shape{5, 1}, Shape{64, 100}, Shape{20000, 3}}) {
      const Tensor logits = cpu_leaf(shape, rng, dtype, 3.0), target = soft_targets(shape[0], shape[1], dtype, rng);
      check_op_parity(cross_entropy, {{"logits", logits}, {"target", target}}, bounds, "cross_entropy");
    }
  }
}

TEST_CASE("quantization_loss (the fused J2) matches the CPU forward and backward, and its sum is deterministic") {
  const OpFn loss = [](const std::vector<Tensor>& in) { return ops::quantization_loss(in[0]); };
  for (DType dtype : kFloatTypes) {
    Rng rng(44);
    const Bounds bounds{product_bound(dtype), elementwise_bound(dtype)};  // a sum in double; 2 (u - sign(u))
    // one block; a batch of 64-bit codes; more elements than the grid's threads (each thread loops)
    for (const Shape& shape : {Shape{3, 7}, Shape{128, 64}, Shape{8192, 128}})
      check_op_parity(loss, {{"u", cpu_leaf(shape, rng, dtype, 0.6)}}, bounds, "quantization_loss");
    // exact zeros: sign(0) = +1 on both devices
    check_op_parity(loss, {{"u", as_leaf(Tensor::zeros({4, 8}, dtype))}}, {0.0, 0.0}, "quantization_loss at u = 0");
    const Tensor u = Tensor::randn({8192, 128}, rng, 0.6, dtype).to(Device::CUDA);
    CHECK(ops::quantization_loss(u).item() == ops::quantization_loss(u).item());
  }
}

TEST_CASE("pairwise_logistic_loss matches the CPU forward and backward, and its mean is deterministic") {
  const OpFn loss = [](const std::vector<Tensor>& in) { return ops::pairwise_logistic_loss(in[0], in[1]); };
  for (DType dtype : kFloatTypes) {
    Rng rng(43);
    const Bounds bounds{product_bound(dtype), product_bound(dtype)};  // a mean in double; softplus, sigmoid
    // one block; batch pairs (N,N); dataset pairs over many blocks (a partial sum each)
    for (const Shape& shape : {Shape{3, 7}, Shape{32, 32}, Shape{128, 5000}})
      check_op_parity(loss, {{"theta", cpu_leaf(shape, rng, dtype, 8.0)}, {"s", similarities(shape, dtype, rng)}},
                      bounds, "pairwise_logistic_loss");
    // Saturated: softplus must not overflow, sigmoid - s must be exactly 0 or +-1 (before the 1/numel).
    const auto extremes = [](double, size_t i) { return i % 2 ? -1e3 : 1e3; };
    const ParityRun run = check_op_parity(loss, {{"theta", mapped_leaf({4, 6}, dtype, rng, extremes)},
                                                 {"s", similarities({4, 6}, dtype, rng)}},
                                          bounds, "pairwise_logistic_loss at |theta| = 1e3");
    for (double g : run.cuda[0].grad().to_vector()) CHECK(std::isfinite(g));
    const Tensor theta = Tensor::randn({128, 5000}, rng, 8.0, dtype).to(Device::CUDA);
    const Tensor s = similarities({128, 5000}, dtype, rng).to(Device::CUDA);
    CHECK(ops::pairwise_logistic_loss(theta, s).item() == ops::pairwise_logistic_loss(theta, s).item());
  }
}

TEST_CASE("gather_rows (repeated rows: the backward accumulates) and scatter_rows_ match the CPU") {
  const OpFn gather = [](const std::vector<Tensor>& in) { return ops::gather_rows(in[0], in[1]); };
  struct RowsCase {
    Shape src;
    std::vector<int32_t> index;
  };
  const RowsCase cases[] = {{{20, 7}, {3, 3, 0, 19, 3, 7}}, {{6, 2, 3}, {5, 0, 5, 5}}, {{64, 48}, {9, 2, 41, 0}}};
  for (DType dtype : kFloatTypes) {
    Rng rng(38);
    for (const RowsCase& c : cases)
      check_op_parity(gather, {{"src", cpu_leaf(c.src, rng, dtype)}, {"index", index_tensor(c.index)}},
                      {0.0, product_bound(dtype)}, "gather_rows");
    for (const RowsCase& c : {RowsCase{{10, 6}, {7, 2, 9}}, RowsCase{{5, 2, 3}, {4, 0}}}) {
      Tensor dst = Tensor::randn(c.src, rng, 1.0, dtype), dst_gpu = dst.to(Device::CUDA);
      Shape rows = c.src;
      rows[0] = static_cast<int64_t>(c.index.size());
      const Tensor src = Tensor::randn(rows, rng, 1.0, dtype);
      ops::scatter_rows_(dst, index_tensor(c.index), src);
      ops::scatter_rows_(dst_gpu, index_tensor(c.index, Device::CUDA), src.to(Device::CUDA));
      check_close(dst, dst_gpu, 0.0, std::string("scatter_rows_ ") + dtype_name(dtype) + " into " + shape_str(c.src));
    }
  }
}

TEST_CASE("a row index out of range on the GPU is an error at the next synchronisation, naming the kernel") {
  // The kernels cannot throw: they skip the bad row and record it in the device's error word, which every
  // synchronisation (synchronize(), a copy to the host) reads and clears (cuda/kernels.h).
  const Tensor src = Tensor::zeros({4, 3}, DType::F32, Device::CUDA);
  Tensor out;
  CHECK_NOTHROW(out = ops::gather_rows(src, index_tensor({1, 1234567, 2}, Device::CUDA)));  // queued, no wait
  check_deferred_error([] { backend(Device::CUDA).synchronize(); }, "gather_rows", "1234567");
  CHECK_NOTHROW(backend(Device::CUDA).synchronize());  // reported once

  Tensor dst = Tensor::zeros({4, 3}, DType::F64, Device::CUDA);
  const Tensor row = Tensor::full({1, 3}, 1.0, DType::F64, Device::CUDA);
  CHECK_NOTHROW(ops::scatter_rows_(dst, index_tensor({-5}, Device::CUDA), row));
  check_deferred_error([&] { static_cast<void>(dst.cpu()); }, "scatter_rows", "-5");  // a copy to the host
  // The error word was cleared and the device is usable.
  CHECK(dst.to_vector() == std::vector<double>(12, 0.0));  // the bad row was skipped
  CHECK(ops::sum(Tensor::full({3}, 1.0, DType::F32, Device::CUDA)).item() == 3.0);
}

TEST_CASE("pack_signs, hamming_distances and hamming_top_k equal the CPU's exactly; zeros set their bit") {
  for (DType dtype : kFloatTypes) {
    Rng rng(39);
    for (int64_t d : {1, 32, 48, 64, 70, 100}) {  // whole words and a partial last word
      const std::string what = std::string(dtype_name(dtype)) + " D = " + std::to_string(d);
      const Tensor x = codes_with_zeros(9, d, dtype, rng), database = codes_with_zeros(300, d, dtype, rng);
      const Tensor codes = ops::pack_signs(x), codes_gpu = ops::pack_signs(x.to(Device::CUDA));
      check_close(codes, codes_gpu, 0.0, "pack_signs " + what);
      const Tensor db = ops::pack_signs(database), db_gpu = ops::pack_signs(database.to(Device::CUDA));
      check_close(ops::hamming_distances(codes, db), ops::hamming_distances(codes_gpu, db_gpu), 0.0,
                  "hamming_distances " + what);
      // The ranking, ties by index (D = 1 or 32: nearly every distance ties), cut at several k.
      for (int64_t k : {1, 7, 300}) {
        const auto [indices, distances] = ops::hamming_top_k(codes, db, k);
        const auto [indices_gpu, distances_gpu] = ops::hamming_top_k(codes_gpu, db_gpu, k);
        check_close(indices, indices_gpu, 0.0, "hamming_top_k indices " + what + " k = " + std::to_string(k));
        check_close(distances, distances_gpu, 0.0, "hamming_top_k distances " + what + " k = " + std::to_string(k));
      }
    }
    // 70 zeros: two full words of ones, then bits 0..5 of the third; the unused high bits stay 0.
    CHECK(ops::pack_signs(Tensor::zeros({1, 70}, dtype, Device::CUDA)).to_vector() == std::vector<double>{-1, -1, 63});
  }
}

TEST_CASE("hamming_top_k over 20,000 codes of 64 bits equals the CPU's ranking") {
  Rng rng(40);
  const Tensor db = ops::pack_signs(Tensor::randn({20000, 64}, rng)), queries = ops::pack_signs(Tensor::randn({5, 64}, rng));
  for (int64_t k : {100, 20000}) {  // a top list, and the whole ranking (what mAP@ALL walks)
    const auto [indices, distances] = ops::hamming_top_k(queries, db, k);
    const auto [indices_gpu, distances_gpu] = ops::hamming_top_k(queries.to(Device::CUDA), db.to(Device::CUDA), k);
    check_close(indices, indices_gpu, 0.0, "hamming_top_k indices k = " + std::to_string(k));
    check_close(distances, distances_gpu, 0.0, "hamming_top_k distances k = " + std::to_string(k));
  }
}

TEST_CASE("count_non_finite_ counts NaN and infinities like the CPU, over lists of tensors, and accumulates") {
  for (DType dtype : kFloatTypes) {
    std::vector<double> small(5000, 0.5);
    small[0] = small[2500] = std::nan("");
    small[17] = std::numeric_limits<double>::infinity();
    small[4999] = -std::numeric_limits<double>::infinity();
    std::vector<double> large(3 << 20, -1.0);  // many chunks of 2^16
    for (size_t i : {size_t(0), size_t(12345), size_t(1) << 20, size_t(2999999), large.size() - 1})
      large[i] = std::nan("");
    auto tensor = [&](const std::vector<double>& values) {
      return Tensor::from_vector(values, {static_cast<int64_t>(values.size())}, dtype);
    };
    // 1,500 tensors of 7 elements, every 100th with an infinity: more chunks than one launch's table holds.
    std::vector<Tensor> many;
    for (int i = 0; i < 1500; ++i) {
      std::vector<double> values(7, 1.0);
      if (i % 100 == 99) values[i % 7] = -std::numeric_limits<double>::infinity();
      many.push_back(tensor(values));
    }
    std::vector<Tensor> many_and_large = many;
    many_and_large.push_back(tensor(large));
    const std::pair<std::vector<Tensor>, double> cases[] = {
        {{tensor(small)}, 4}, {{tensor(large)}, 5}, {{tensor(std::vector<double>(1000, 2.0))}, 0},
        {{tensor(small), tensor(large)}, 9}, {many, 15}, {many_and_large, 20}};
    for (const auto& [listed, count] : cases) {
      const std::vector<Tensor>& tensors = listed;  // INFO captures in a lambda, which in C++17 cannot name a binding
      const double expected = count;
      std::vector<Tensor> on_gpu;
      for (const Tensor& x : tensors) on_gpu.push_back(x.to(Device::CUDA));
      INFO(std::string(dtype_name(dtype)), ", ", tensors.size(), " tensors, ", expected, " values not finite");
      CHECK(count_twice(on_gpu) == 2 * expected);
      CHECK(count_twice(tensors) == 2 * expected);
    }
  }
}

// The whole network. Why float64 for the training steps: at batch 4 and 32x32 with the 0.5 scale,
// layer3 and layer4 see 1x1 maps, so their batch norms normalise 4 values per channel and amplify
// rounding about a millionfold (tests/test_torch_parity.cpp). Measured on the CPU: float32 against
// float64 differs by 5e-2 in u and by O(1) (relative to each tensor's largest value) in most parameter
// gradients, so two float32 implementations cannot agree to any useful bound there. In float64, a
// relative perturbation of 1e-15 of the weights (what a different summation order does) moves u by
// 2e-10, the losses by 1e-11, the running statistics by 1.3e-10, the worst parameter gradient by 1.1e-8,
// square_avg by 4e-9 and RMSProp's change of a parameter by at most 1.0e-5 (the first step is about
// lr * sign(g) wherever 0.1 |g| >> eps, and g / (0.1 |g| + eps) is steep where |g| ~ eps / 0.1). The
// bounds below are 50-100x those. Training is chaotic here: with that 1e-15 perturbation, parameters
// differ by 0.9 (relative) after three free-running steps even in float64; so the steps run in lock
// step: before each, the GPU model takes the CPU's state (parameters, square_avg, running statistics, U).
TEST_CASE("ResNet50-MDFF-SH: three RMSProp training steps in float64 match the CPU (losses, every gradient, "
          "running statistics, updates)") {
  const MdffConfig config = model_config();
  CHECK(config.scales == std::vector<double>{1.0, 0.5});  // train_mdff's default: both scales
  const ModelData data = model_data(config.bits);
  ModelRig cpu(data, DType::F64, Device::CPU, true), gpu(data, DType::F64, Device::CUDA, true);
  const ModelBounds bounds{1e-8, 1e-6, 1e-8, 1e-6, 1e-3};
  for (int step = 1; step <= 3; ++step) {
    const std::string what = "float64 training step " + std::to_string(step);
    copy_state(gpu, cpu);
    cpu.forward_backward();
    gpu.forward_backward();
    compare_forward_backward(cpu, gpu, bounds, what);
    const Tensor before = cpu.parameters->values().clone();
    cpu.optimizer->step();
    gpu.optimizer->step();
    compare_update(cpu, gpu, before, bounds, what);
  }
}

// Float32 where the network is well conditioned: in evaluation mode batch norm uses the running
// statistics, and float32 against float64 (measured on the CPU) differs by 1.5e-6 in u, 3e-8 in the
// losses and at most 2.5e-6 in any parameter gradient (relative to its largest value). The bound 1e-3
// leaves room for cuDNN's float32 algorithms (Winograd, FFT: ~1e-5 per layer), amplified about 30x over
// the 53 layers (the measured growth of float32 rounding, 6e-8 -> 2e-6), with a 3x margin; a wrong
// kernel anywhere in the network gives O(1e-2..1).
TEST_CASE("ResNet50-MDFF-SH in float32 (TF32 off), evaluation mode: forward, every gradient, and inference "
          "through the fused conv-bn path match the CPU") {
  const Tf32Guard exact(false);
  const MdffConfig config = model_config();
  const ModelData data = model_data(config.bits);
  ModelRig cpu(data, DType::F32, Device::CPU, false), gpu(data, DType::F32, Device::CUDA, false);
  copy_state(gpu, cpu);
  cpu.forward_backward();
  gpu.forward_backward();
  // Evaluation mode leaves the running statistics untouched on both: bound 0.
  compare_forward_backward(cpu, gpu, ModelBounds{1e-3, 1e-3, 0.0, 0.0, 0.0}, "float32, evaluation mode");

  // Without gradients every conv + batch norm (+ shortcut, ReLU) runs as one conv2d_bn_eval.
  const NoGradGuard no_grad;
  const MdffOutput cpu_inference = cpu.model->forward(cpu.images), gpu_inference = gpu.model->forward(gpu.images);
  check_close(cpu_inference.u, gpu_inference.u, 1e-3, "float32 inference: u", Scale::TensorMax);
  check_close(cpu_inference.logits, gpu_inference.logits, 1e-3, "float32 inference: logits", Scale::TensorMax);
}

#ifdef MDFF_WITH_CUDA

// The tests of the cache itself say nothing with it off (MDFF_CUDA_NO_CACHING=1, as gpu_check.sh runs
// compute-sanitizer memcheck): they say so and stop.
bool cache_off() {
  if (cuda::caching_enabled()) return false;
  MESSAGE("not checked: MDFF_CUDA_NO_CACHING=1 turns the allocator's cache off");
  return true;
}

TEST_CASE("RMSProp and SGD steps over a ParameterBuffer match the CPU, parameters and state") {
  // The two-launch variants' 1,200 extra parameters take a backward pass each per step: some 14,000 passes,
  // which under compute-sanitizer do not fit its time limit (racecheck was stopped here after 150 s on the
  // H200; memcheck runs with the allocator's cache off, MDFF_CUDA_NO_CACHING=1, every tensor then a cudaMalloc).
  // Under a tool (gpu_check.sh sets MDFF_UNDER_SANITIZER=1) or without the cache they run with the few
  // parameters: the same kernel, one launch; the split into launches is host code, checked in the plain runs.
  const bool many = cuda::caching_enabled() && !cuda::env_equals("MDFF_UNDER_SANITIZER", "1");
  if (!many) MESSAGE("under compute-sanitizer or MDFF_CUDA_NO_CACHING=1: the two-launch variants run with the few "
                     "parameters, one launch");
  const std::string launches = many ? ", two launches" : "";
  for (DType dtype : kFloatTypes) {
    check_optimizer_parity<RMSProp>(RMSPropOptions{1e-2, 0.9, 1e-8, 1e-2}, dtype, false, "rmsprop");
    check_optimizer_parity<RMSProp>(RMSPropOptions{}, dtype, many, "rmsprop (the paper's settings)" + launches);
    check_optimizer_parity<Sgd>(SgdOptions{0.05, 0.9, 1e-3}, dtype, many, "sgd with momentum" + launches);
    check_optimizer_parity<Sgd>(SgdOptions{0.05, 0.0, 0.0}, dtype, false, "plain sgd");
  }
}

// The pool's rules (rounding, best fit, splitting, merging, giving back) are tested on a fake device in
// tests/test_block_pool.cpp; here, that the CUDA allocator runs on it with real cudaMalloc'd segments.
TEST_CASE("allocator reuses freed blocks and counts bytes") {
  if (cache_off()) return;
  cuda::empty_cache();
  const cuda::AllocatorStats start = cuda::allocator_stats();

  void* p = cuda::allocate(3000);  // a 3072-byte block
  cuda::AllocatorStats s = cuda::allocator_stats();
  CHECK(s.segment_allocations <= start.segment_allocations + 1);  // a 2 MiB segment, unless one has room
  CHECK(s.bytes_in_use == start.bytes_in_use + 3072);
  CHECK(s.peak_bytes_in_use >= s.bytes_in_use);
  CHECK(s.bytes_reserved >= s.bytes_in_use);
  const Tensor marked = Tensor::full({768}, 7.0, DType::F32, Device::CUDA);  // the block is usable memory
  MDFF_CUDA_CHECK(cudaMemcpyAsync(p, marked.raw(), 3072, cudaMemcpyDeviceToDevice, cuda::stream()));
  backend(Device::CUDA).synchronize();  // a bad block would fail here, in this test
  cuda::deallocate(p, 3000);
  s = cuda::allocator_stats();
  CHECK(s.bytes_in_use == start.bytes_in_use + marked.nbytes());

  const int64_t segments = s.segment_allocations;
  void* q = cuda::allocate(2900);  // served from the cache
  CHECK(q != nullptr);
  CHECK(cuda::allocator_stats().segment_allocations == segments);
  cuda::deallocate(q, 2900);
  CHECK_THROWS_WITH_AS(cuda::deallocate(q, 2900), doctest::Contains("freed twice"), Error);

  // A block larger than all the cached memory gets a segment of its own, which empty_cache gives back
  // once the block is freed.
  cuda::empty_cache();
  const size_t reserved = cuda::allocator_stats().bytes_reserved;
  const size_t big_bytes = cuda::allocator_stats().bytes_cached() + (size_t(30) << 20);
  void* big = cuda::allocate(big_bytes);
  CHECK(cuda::allocator_stats().bytes_reserved >= reserved + big_bytes);
  cuda::deallocate(big, big_bytes);
  const int64_t frees_before = cuda::allocator_stats().segment_frees;
  cuda::empty_cache();
  s = cuda::allocator_stats();
  CHECK(s.segment_frees == frees_before + 1);
  CHECK(s.bytes_reserved == reserved);
  CHECK(cuda::allocate(0) == nullptr);
}

TEST_CASE("a training-like loop performs no cudaMalloc after warm-up") {
  if (cache_off()) return;
  Rng rng(11);
  Tensor w = Tensor::randn({256, 300}, rng, 0.1, DType::F32, Device::CUDA).set_requires_grad(true);
  auto step = [&] {
    const Tensor x = Tensor::randn({64, 300}, rng, 1.0, DType::F32, Device::CUDA);
    const Tensor loss = ops::mean(ops::softplus(ops::matmul(x, w, false, true)));  // (64,256) -> ()
    loss.backward();
    w.zero_grad();
  };
  for (int i = 0; i < 3; ++i) step();  // warm-up fills the cache
  const cuda::AllocatorStats before = cuda::allocator_stats();
  for (int i = 0; i < 20; ++i) step();
  const cuda::AllocatorStats after = cuda::allocator_stats();
  CHECK(after.segment_allocations == before.segment_allocations);
  CHECK(after.bytes_in_use == before.bytes_in_use);

  // The same with raw same-size allocate/free pairs, large blocks included.
  for (size_t bytes : {size_t(100), size_t(70000), size_t(5) << 20, size_t(50) << 20}) {
    cuda::deallocate(cuda::allocate(bytes), bytes);  // warm-up
    const int64_t mallocs = cuda::allocator_stats().segment_allocations;
    for (int i = 0; i < 100; ++i) cuda::deallocate(cuda::allocate(bytes), bytes);
    CHECK(cuda::allocator_stats().segment_allocations == mallocs);
  }
}

TEST_CASE("allocator is thread-safe") {
  const size_t in_use = cuda::allocator_stats().bytes_in_use;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < 200; ++i) {
        const size_t bytes = 512 * size_t(1 + (i + t) % 7);
        void* p = cuda::allocate(bytes);
        cuda::deallocate(p, bytes);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  CHECK(cuda::allocator_stats().bytes_in_use == in_use);
}

TEST_CASE("cuBLAS's workspace is a block of the caching allocator, counted in the memory in use") {
  const size_t block = cuda::block_in_use_bytes(cuda::cublas_workspace());  // created with the handle if needed
  INFO("block ", block, " bytes, cuBLAS workspace ", cuda::cublas_workspace_bytes());
  CHECK(block >= cuda::cublas_workspace_bytes());
  CHECK(cuda::allocator_stats().bytes_in_use >= block);
}

TEST_CASE("running out of GPU memory is a clear error, and the device stays usable") {
  // OutOfMemory, which train_mdff catches to name the batch size and image size.
  CHECK_THROWS_WITH_AS(cuda::allocate(size_t(1) << 50), doctest::Contains("out of GPU memory: requested"),
                       OutOfMemory);
  const Tensor x = Tensor::full({10}, 2.0, DType::F32, Device::CUDA);
  CHECK(ops::sum(x).item() == 20.0);
}

TEST_CASE("CUDA and cuBLAS errors carry the call, the library's message and file:line") {
  int line = 0;
  try {
    line = __LINE__; MDFF_CUDA_CHECK(cudaSetDevice(-1));
    FAIL("MDFF_CUDA_CHECK did not throw");
  } catch (const Error& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find("test_cuda.cpp:" + std::to_string(line)) != std::string::npos);
    CHECK(message.find("cudaSetDevice(-1)") != std::string::npos);
    CHECK(message.find("cudaErrorInvalidDevice") != std::string::npos);
  }
  try {
    const float one = 1.0f;
    line = __LINE__; MDFF_CUBLAS_CHECK(cublasSgemm(cuda::cublas_handle(), CUBLAS_OP_N, CUBLAS_OP_N, -1, 1, 1, &one,
                                                   nullptr, 1, nullptr, 1, &one, nullptr, 1));
    FAIL("MDFF_CUBLAS_CHECK did not throw");
  } catch (const Error& e) {
    const std::string message = e.what();
    INFO(message);
    CHECK(message.find("test_cuda.cpp:" + std::to_string(line)) != std::string::npos);
    CHECK(message.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
  }
  // The failed calls left no error behind for the next launch check.
  CHECK(ops::sum(Tensor::full({3}, 1.0, DType::F32, Device::CUDA)).item() == 3.0);
}


TEST_CASE("the convolution algorithm cache: a shape seen before searches no algorithm and adds no plan") {
  const Tf32Guard exact(false);  // the precision is part of the cache key
  auto run_all = [] {
    for (DType dtype : kFloatTypes)
      for (const ConvCase& c : kConvCases) check_conv_parity(c, dtype, conv_bound(dtype));  // forward and backward
  };
  run_all();  // chooses every shape's algorithms (unless an earlier test did)
  const cuda::ConvStats warm = cuda::conv_stats();
  CHECK(warm.cached_plans > 0);
  CHECK(warm.algorithm_searches > 0);
  run_all();  // the same shapes again: cache hits only, and the cached plans give the same results
  const cuda::ConvStats again = cuda::conv_stats();
  INFO("plans ", warm.cached_plans, " -> ", again.cached_plans, ", searches ", warm.algorithm_searches, " -> ",
       again.algorithm_searches, ", largest workspace ", again.largest_workspace_bytes, " bytes");
  CHECK(again.cached_plans == warm.cached_plans);
  CHECK(again.algorithm_searches == warm.algorithm_searches);
  // A shape never seen is a miss: the counters do move.
  check_conv_parity({"3x3, a shape no other test uses", {2, 5, 13, 13}, {7, 5, 3, 3}, 1, 1, true}, DType::F32,
                    conv_bound(DType::F32));
  CHECK(cuda::conv_stats().algorithm_searches > again.algorithm_searches);
  CHECK(cuda::conv_stats().cached_plans > again.cached_plans);
}

TEST_CASE("a convolution at the memory mark runs its lean algorithm; either algorithm matches the CPU") {
  // core/workspace_policy.h: a call runs its plan's fastest algorithm unless that one's workspace would lift
  // the memory in use above the highest level seen at a convolution before.
  if (const char* lean = std::getenv("MDFF_CONV_LEAN"); lean && std::string(lean) == "0") {
    MESSAGE("MDFF_CONV_LEAN=0: every call runs the fastest algorithm, so there is nothing to check here");
    return;
  }
  const Tf32Guard on(true);
  // Small enough for the compute-sanitizer runs (a tenth of a GFLOP), a shape no other test uses.
  const ConvCase layer1{"3x3 pad 1, 64 channels at 28x28 (layer1's conv2 at 112x112 images)", {2, 64, 28, 28},
                        {64, 64, 3, 3}, 1, 1, false};
  Rng rng(31);
  const Tensor x = Tensor::randn(layer1.x, rng), weight = Tensor::randn(layer1.weight, rng, 0.05);
  const Tensor expected = ops::conv2d(x, weight, Tensor(), layer1.stride, layer1.padding);
  const Tensor xc = x.to(Device::CUDA), wc = weight.to(Device::CUDA);
  auto convolve = [&] { return ops::conv2d(xc, wc, Tensor(), layer1.stride, layer1.padding); };
  cuda::reset_conv_memory_mark();  // the no-graph mark too, which earlier tests' encodings lifted
  const cuda::ConvStats before = cuda::conv_stats();
  const cuda::ConvStats at_mark = [&] {
    // Ballast lifts the memory in use to the mark and 1 GiB beyond: the shape's first call (its plan is new)
    // is at a new mark. Once the ballast is gone, the same call is 1 GiB under the mark, more than any
    // workspace a search lends, so it fits the fastest algorithm's.
    const size_t in_use = cuda::bytes_in_use(), extra = size_t(1) << 30;
    const size_t ballast_bytes = (before.memory_mark_bytes > in_use ? before.memory_mark_bytes - in_use : 0) + extra;
    const Tensor ballast = Tensor::empty({static_cast<int64_t>(ballast_bytes / 4)}, DType::F32, Device::CUDA);
    check_close(expected, convolve(), kTf32Bound, std::string(layer1.role) + ", at the mark", Scale::TensorMax);
    return cuda::conv_stats();
  }();
  const int64_t lean_plans = at_mark.plans_with_lean_variant - before.plans_with_lean_variant;
  REQUIRE(at_mark.cached_plans == before.cached_plans + 1);  // the forward plan, new
  CHECK(at_mark.lean_calls - before.lean_calls == lean_plans);  // lean, where the plan has a lean algorithm
  // Without the ballast the same call is more than 1 GiB under the mark: the fastest algorithm.
  check_close(expected, convolve(), kTf32Bound, std::string(layer1.role) + ", under the mark", Scale::TensorMax);
  CHECK(cuda::conv_stats().lean_calls == at_mark.lean_calls);
  {
    // A pass that records no graph (encoding) has a mark of its own, not yet lifted: this call lifts it to
    // the memory in use, runs at it (lean again, where the plan has a lean algorithm) though 1 GiB under
    // the training mark, and leaves the training mark as it was.
    const NoGradGuard encoding;
    const size_t in_use = cuda::bytes_in_use();
    check_close(expected, convolve(), kTf32Bound, std::string(layer1.role) + ", no graph, at its own mark",
                Scale::TensorMax);
    const cuda::ConvStats no_graph = cuda::conv_stats();
    CHECK(no_graph.lean_calls - at_mark.lean_calls == lean_plans);
    CHECK(no_graph.inference_mark_bytes >= in_use);
    CHECK(no_graph.inference_mark_bytes < at_mark.memory_mark_bytes);
    CHECK(no_graph.memory_mark_bytes == at_mark.memory_mark_bytes);
  }
  MESSAGE(std::string(layer1.role), ": the forward plan ",
          std::string(lean_plans ? "has a lean algorithm besides the fastest" : "has one algorithm, fastest and lean"),
          "; the largest workspace of a fastest algorithm so far ",
          at_mark.largest_workspace_bytes, " bytes; ", at_mark.plans_with_lean_variant, " of ", at_mark.cached_plans,
          " plans have a lean algorithm");
  cuda::reset_conv_memory_mark();  // the ballast's mark would keep later tests' convolutions from ever reaching it
}

// Sets the route of 1x1 convolutions of stride 1 (cuda/conv.h) for its lifetime, then restores the previous one.
class Conv1x1RouteGuard {
 public:
  explicit Conv1x1RouteGuard(cuda::Conv1x1Route route) : previous_(cuda::conv1x1_route()) {
    cuda::set_conv1x1_route(route);
  }
  ~Conv1x1RouteGuard() { cuda::set_conv1x1_route(previous_); }
  Conv1x1RouteGuard(const Conv1x1RouteGuard&) = delete;
  Conv1x1RouteGuard& operator=(const Conv1x1RouteGuard&) = delete;

 private:
  cuda::Conv1x1Route previous_;
};

// The calls that have run through cuBLAS while `run` ran.
int64_t cublas_conv_calls(const std::function<void()>& run) {
  const int64_t before = cuda::conv_stats().cublas_calls;
  run();
  return cuda::conv_stats().cublas_calls - before;
}

TEST_CASE("1x1 convolutions of stride 1 match the CPU through cuBLAS and through cuDNN, forward and backward") {
  // Besides ResNet50's kind: a map that is not square, more output channels than input and fewer, batch 3
  // (the filter gradient adds one GEMM per image).
  const ConvCase cases[] = {
      kConvCases[0], kConvCases[1],
      {"1x1 stride 1 on a 5x7 map, 24 -> 40 channels", {3, 24, 5, 7}, {40, 24, 1, 1}, 1, 0, true},
      {"1x1 stride 1 on a 5x7 map, 40 -> 24 channels", {3, 40, 5, 7}, {24, 40, 1, 1}, 1, 0, false}};
  for (bool tf32 : {false, true}) {
    const Tf32Guard precision(tf32);
    for (DType dtype : kFloatTypes) {
      const double bound = dtype == DType::F32 && tf32 ? kTf32Bound : conv_bound(dtype);
      for (cuda::Conv1x1Route route : {cuda::Conv1x1Route::Cublas, cuda::Conv1x1Route::Cudnn}) {
        const Conv1x1RouteGuard guard(route);
        for (const ConvCase& c : cases) {
          INFO(c.role, ", ", dtype_name(dtype), ", TF32 ", tf32, ", through ",
               route == cuda::Conv1x1Route::Cublas ? "cuBLAS" : "cuDNN");
          // One forward and one backward: forward, backward-data and backward-filter, all three through the route.
          const int64_t calls = cublas_conv_calls([&] { check_conv_parity(c, dtype, bound); });
          CHECK(calls == (route == cuda::Conv1x1Route::Cublas ? 3 : 0));
        }
      }
    }
  }
  // What is not a matrix product goes to cuDNN on every route: a 1x1 of stride 2, a 3x3.
  const Conv1x1RouteGuard cublas(cuda::Conv1x1Route::Cublas);
  const Tf32Guard exact(false);
  CHECK(cublas_conv_calls([] {
          check_conv_parity(kConvCases[8], DType::F32, conv_bound(DType::F32));
          check_conv_parity(kConvCases[2], DType::F32, conv_bound(DType::F32));
        }) == 0);
}

TEST_CASE("the measured route times each 1x1 stride-1 product on cuBLAS and cuDNN and runs the faster; the cuDNN "
          "route runs nothing on cuBLAS") {
  const Tf32Guard on(true);
  // A shape no other test uses: its three plans are made here.
  const ConvCase fresh{"1x1 stride 1, 48 -> 96 channels on 12x12", {2, 48, 12, 12}, {96, 48, 1, 1}, 1, 0, true};
  const cuda::ConvStats before = cuda::conv_stats();
  {
    // MDFF_CONV_1X1=cudnn's way out: the plans are made, none is timed on cuBLAS, no call runs there.
    const Conv1x1RouteGuard cudnn(cuda::Conv1x1Route::Cudnn);
    CHECK(cublas_conv_calls([&] { check_conv_parity(fresh, DType::F32, kTf32Bound); }) == 0);
    CHECK(cuda::conv_stats().cached_plans == before.cached_plans + 3);
    CHECK(cuda::conv_stats().plans_timed_on_cublas == before.plans_timed_on_cublas);
  }
  const Conv1x1RouteGuard measured(cuda::Conv1x1Route::Measured);
  // The first calls on the measured route time the three plans, then run each on the faster library.
  const int64_t calls = cublas_conv_calls([&] { check_conv_parity(fresh, DType::F32, kTf32Bound); });
  const cuda::ConvStats after = cuda::conv_stats();
  CHECK(after.plans_timed_on_cublas - before.plans_timed_on_cublas == 3);
  CHECK(calls == after.plans_faster_on_cublas - before.plans_faster_on_cublas);
  // The same shape again: no new plan or timing, the same choices.
  CHECK(cublas_conv_calls([&] { check_conv_parity(fresh, DType::F32, kTf32Bound); }) == calls);
  CHECK(cuda::conv_stats().plans_timed_on_cublas == after.plans_timed_on_cublas);
  CHECK(cuda::conv_stats().cached_plans == after.cached_plans);
  MESSAGE(fresh.role, ": ", calls, " of its 3 products ran faster on cuBLAS than on cuDNN's fastest algorithm; "
          "over all the plans so far, ", after.plans_faster_on_cublas, " of ", after.plans_timed_on_cublas);
}

TEST_CASE("full ResNet50-MDFF-SH training steps perform no cudaMalloc after warm-up") {
  if (cache_off()) return;
  const MdffConfig config = model_config();
  ModelRig gpu(model_data(config.bits), DType::F32, Device::CUDA, true);  // train_mdff's float32, TF32 as set
  auto step = [&] {
    gpu.forward_backward();
    CHECK(std::isfinite(gpu.terms.total.item()));
    gpu.optimizer->step();
  };
  // Warm-up: the convolution plans are chosen and the allocator's segments settle (best fit over the
  // segments the first steps made: a step may still carve them differently from the one before). The first
  // step runs lean algorithms while the memory mark rises (cuda/conv.cpp); the fastest algorithms' workspaces
  // appear from the second on.
  for (int i = 0; i < 4; ++i) step();
  Backend& device = backend(Device::CUDA);
  device.synchronize();
  const cuda::AllocatorStats before = cuda::allocator_stats();
  const cuda::ConvStats convs = cuda::conv_stats();
  device.reset_peak_memory();
  CHECK(device.memory_stats().peak_bytes_in_use == before.bytes_in_use);
  for (int i = 0; i < 3; ++i) step();
  device.synchronize();
  const cuda::AllocatorStats after = cuda::allocator_stats();
  const MemoryStats memory = device.memory_stats();
  INFO("lean convolution calls in the 3 steps: ", cuda::conv_stats().lean_calls - convs.lean_calls);
  INFO("cudaMalloc calls ", before.segment_allocations, " -> ", after.segment_allocations, "; bytes in use ",
       before.bytes_in_use, " -> ", after.bytes_in_use, ", peak ", memory.peak_bytes_in_use, ", cached ",
       memory.bytes_cached, ", reserved peak ", memory.peak_bytes_reserved);
  CHECK(after.segment_allocations == before.segment_allocations);
  CHECK(memory.device_malloc_calls == after.segment_allocations);  // memory_stats reports the allocator
  CHECK(memory.peak_bytes_reserved >= memory.peak_bytes_in_use);
  CHECK(after.bytes_in_use == before.bytes_in_use);              // nothing accumulates from step to step
  CHECK(memory.peak_bytes_in_use > 0);
  CHECK(memory.peak_bytes_in_use > before.bytes_in_use);  // the activations of a step
  CHECK(cuda::conv_stats().algorithm_searches == convs.algorithm_searches);
}

// The "no host synchronisation inside a training step except the periodic loss read-out", through
// the Trainer that train_mdff runs: 8 steps read out every 4. Each read-out copies its records to the host
// in two transfers (the loss terms, the counts), and the end of an epoch checks the parameters once: 5
// waits in all. One wait inside each step would make it 13. (Not counted: an upload that finds its staging
// buffer not yet read by the GPU, when the host runs more than 8 uploads ahead: a throttle, not a sync.)
TEST_CASE("the trainer's steps on the GPU never wait for the whole stream: only its read-outs do") {
  // The profiler (MDFF_PROFILE) synchronises around every kernel to time it: off for this test.
  const bool profiling = profiler::enabled();
  profiler::enable(false);
  data::Dataset dataset;
  dataset.name = "random";
  dataset.classes = kClasses;
  dataset.channels = 3;
  dataset.height = dataset.width = kModelImage;
  constexpr int64_t kImages = 64;
  Rng rng(53);
  for (int64_t i = 0; i < kImages * 3 * kModelImage * kModelImage; ++i)
    dataset.pixels.push_back(static_cast<uint8_t>(rng.below(256)));
  for (int64_t i = 0; i < kImages; ++i)
    for (int k = 0; k < kClasses; ++k) dataset.labels.push_back(k == i % kClasses);
  MdffSh model(model_config(), rng);
  model.to(Device::CUDA);
  TrainSettings settings;
  settings.epochs = 2;
  settings.batch_size = 8;
  settings.readout_every = 4;
  std::vector<int64_t> rows(kImages);
  for (int64_t i = 0; i < kImages; ++i) rows[i] = i;
  Trainer trainer(model, dataset, rows, settings);
  trainer.train_epoch();  // warm-up: the convolution plans and the allocator's cache fill
  const Backend& gpu = backend(Device::CUDA);
  const int64_t before = gpu.host_waits();
  std::vector<int64_t> at_readouts;
  const EpochReport report = trainer.train_epoch(
      [&](int64_t, int64_t, double, double) { at_readouts.push_back(gpu.host_waits() - before); });
  CHECK(std::isfinite(report.loss));
  REQUIRE(at_readouts.size() == 2);
  CHECK(at_readouts[0] == 2);
  CHECK(at_readouts[1] == 4);
  CHECK(gpu.host_waits() - before == 5);
  profiler::enable(profiling);
}

#endif  // MDFF_WITH_CUDA
