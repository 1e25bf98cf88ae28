// The per-kernel profiler (see profiler.h): ProfilingBackend's timed forwarding with each kernel's
// signature and cost, the records, their table and JSON, and MDFF_PROFILE.
#include "core/profiler.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <utility>

namespace mdff {

namespace profiler::detail {
std::atomic<bool> enabled_flag{false};
}

namespace {

using Clock = std::chrono::steady_clock;

struct Totals {
  int64_t calls = 0;
  double seconds = 0, flops = 0, bytes = 0;
};

// The records under one mutex (kernels also run on the data loader's thread). Never destroyed:
// kernels may still run, and MDFF_PROFILE's report is printed, while static objects are destroyed.
struct Records {
  std::mutex mutex;
  std::map<std::pair<std::string, std::string>, Totals> totals;  // by (kernel, signature)
};

Records& records() {
  static Records* instance = new Records;
  return *instance;
}

// One call's signature, and its FLOPs (compute kernels) or bytes (the others).
struct Cost {
  std::string signature;
  double flops = 0, bytes = 0;
};

// Bytes of the input tensors plus bytes of the output tensors (undefined optional ones count 0).
double moved(std::initializer_list<const Tensor*> inputs, std::initializer_list<const Tensor*> outputs) {
  double total = 0;
  for (auto list : {inputs, outputs})
    for (const Tensor* t : list)
      if (t->defined()) total += static_cast<double>(t->nbytes());
  return total;
}

// Bytes of a list of tensors (a model's gradients).
double moved(const std::vector<Tensor>& tensors) {
  double total = 0;
  for (const Tensor& t : tensors) total += static_cast<double>(t.nbytes());
  return total;
}
double moved(const std::vector<GradientSlice>& grads) {
  double total = 0;
  for (const GradientSlice& slice : grads) total += static_cast<double>(slice.grad.nbytes());
  return total;
}

// "n tensors of e elements" for the multi-tensor kernels.
std::string dims(const std::vector<Tensor>& tensors) {
  int64_t elements = 0;
  for (const Tensor& t : tensors) elements += t.numel();
  return std::to_string(tensors.size()) + " tensors of " + std::to_string(elements) + " elements";
}

std::string dims(const Tensor& t) { return shape_str(t.shape()); }
std::string arrow(const Tensor& from, const Tensor& to) { return dims(from) + " -> " + dims(to); }

// 2 x the multiply-adds of a convolution with this weight producing y: 2*N*Cout*Ho*Wo*Cin*kh*kw.
double conv_flops(const Tensor& weight, const Tensor& y) {
  return 2.0 * static_cast<double>(y.numel()) * static_cast<double>(weight.numel() / weight.size(0));
}

std::string conv_signature(const Tensor& x, const Tensor& weight, const Conv2dParams& p) {
  return "x" + dims(x) + " w" + dims(weight) + " s" + std::to_string(p.stride) + "p" + std::to_string(p.padding);
}

const char* binary_symbol(BinaryOp op) {
  switch (op) {
    case BinaryOp::Add: return " + ";
    case BinaryOp::Sub: return " - ";
    case BinaryOp::Mul: return " * ";
    case BinaryOp::Div: return " / ";
    case BinaryOp::AddRelu: return " +relu ";
  }
  return " ? ";
}

const char* unary_name(UnaryOp op) {
  switch (op) {
    case UnaryOp::Relu: return "relu ";
    case UnaryOp::Tanh: return "tanh ";
    case UnaryOp::Sign: return "sign ";
    case UnaryOp::Softplus: return "softplus ";
    case UnaryOp::Heaviside: return "heaviside ";
  }
  return "? ";
}

void record(const char* kernel, const Cost& cost, double seconds) {
  Records& r = records();
  std::lock_guard<std::mutex> lock(r.mutex);
  Totals& t = r.totals[{kernel, cost.signature}];
  ++t.calls;
  t.seconds += seconds;
  t.flops += cost.flops;
  t.bytes += cost.bytes;
}

// Runs `call` (the wrapped backend's kernel). While profiling, times it between two synchronize()
// calls and records describe()'s cost under `kernel`; the signature is marked with the dtype of
// `typed` when that is not float32 (nullptr: the signature names its dtypes itself).
template <class Describe, class Call>
void timed(Backend& wrapped, const char* kernel, const Tensor* typed, Describe&& describe, Call&& call) {
  if (!profiler::enabled()) return call();
  wrapped.synchronize();  // work queued earlier is not this kernel's
  const auto start = Clock::now();
  call();
  wrapped.synchronize();  // a GPU kernel has only been queued when its call returns
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  Cost cost = describe();
  if (typed && typed->dtype() != DType::F32) cost.signature += std::string(" ") + dtype_name(typed->dtype());
  record(kernel, cost, seconds);
}

template <class... Args>
std::string format(const char* pattern, Args... args) {
  const int size = std::snprintf(nullptr, 0, pattern, args...);
  std::string out(static_cast<size_t>(size), '\0');
  std::snprintf(out.data(), out.size() + 1, pattern, args...);
  return out;
}

// amount / seconds / 1e9 as text, "-" where the amount was not counted.
std::string rate(double amount, double seconds) {
  return amount > 0 && seconds > 0 ? format("%.1f", amount / seconds / 1e9) : "-";
}

}  // namespace

// ---- ProfilingBackend: each kernel forwarded through timed() ----

void ProfilingBackend::fill(const Tensor& out, double value) {
  timed(wrapped_, "fill", &out, [&] { return Cost{dims(out), 0, moved({}, {&out})}; },
        [&] { wrapped_.fill(out, value); });
}

void ProfilingBackend::cast(const Tensor& src, const Tensor& dst) {
  timed(wrapped_, "cast", nullptr,
        [&] {
          return Cost{dims(src) + " " + dtype_name(src.dtype()) + " -> " + dtype_name(dst.dtype()), 0,
                      moved({&src}, {&dst})};
        },
        [&] { wrapped_.cast(src, dst); });
}

void ProfilingBackend::binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  timed(wrapped_, "binary", &out,
        [&] { return Cost{dims(a) + binary_symbol(op) + dims(b), 0, moved({&a, &b}, {&out})}; },
        [&] { wrapped_.binary(op, a, b, out); });
}

void ProfilingBackend::scale(const Tensor& x, double alpha, const Tensor& out) {
  timed(wrapped_, "scale", &x, [&] { return Cost{dims(x), 0, moved({&x}, {&out})}; },
        [&] { wrapped_.scale(x, alpha, out); });
}

void ProfilingBackend::unary(UnaryOp op, const Tensor& x, const Tensor& out) {
  timed(wrapped_, "unary", &x, [&] { return Cost{unary_name(op) + dims(x), 0, moved({&x}, {&out})}; },
        [&] { wrapped_.unary(op, x, out); });
}

void ProfilingBackend::unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                                      const Tensor& grad_x) {
  timed(wrapped_, "unary_backward", &grad_y,
        [&] { return Cost{unary_name(op) + dims(grad_y), 0, moved({&x, &y, &grad_y}, {&grad_x})}; },
        [&] { wrapped_.unary_backward(op, x, y, grad_y, grad_x); });
}

void ProfilingBackend::sum_to(const Tensor& src, const Tensor& out) {
  timed(wrapped_, "sum_to", &src, [&] { return Cost{arrow(src, out), 0, moved({&src}, {&out})}; },
        [&] { wrapped_.sum_to(src, out); });
}

void ProfilingBackend::count_non_finite(const std::vector<Tensor>& tensors, const Tensor& count) {
  timed(wrapped_, "count_non_finite", tensors.empty() ? nullptr : &tensors.front(),
        [&] { return Cost{dims(tensors), 0, moved(tensors)}; }, [&] { wrapped_.count_non_finite(tensors, count); });
}

void ProfilingBackend::gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta,
                            const Tensor& c) {
  timed(wrapped_, "gemm", &c,
        [&] {
          const int64_t m = c.size(0), n = c.size(1), k = trans_a ? a.size(0) : a.size(1);
          return Cost{format("m=%lld n=%lld k=%lld %c%c", static_cast<long long>(m), static_cast<long long>(n),
                             static_cast<long long>(k), trans_a ? 'T' : 'N', trans_b ? 'T' : 'N'),
                      2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k), 0};
        },
        [&] { wrapped_.gemm(trans_a, trans_b, alpha, a, b, beta, c); });
}

void ProfilingBackend::conv2d_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Conv2dParams& p,
                                      const Tensor& y) {
  timed(wrapped_, "conv2d_forward", &x,
        [&] { return Cost{conv_signature(x, weight, p) + (bias.defined() ? " bias" : ""), conv_flops(weight, y), 0}; },
        [&] { wrapped_.conv2d_forward(x, weight, bias, p, y); });
}

void ProfilingBackend::conv2d_bn_forward(const Tensor& x, const Tensor& weight, const Conv2dParams& p,
                                         const BatchNormEval& bn, const Tensor& residual, bool relu, const Tensor& y) {
  timed(wrapped_, "conv2d_bn_forward", &x,
        [&] {
          return Cost{conv_signature(x, weight, p) + " bn" + (residual.defined() ? " +residual" : "") +
                          (relu ? " relu" : ""),
                      conv_flops(weight, y), 0};
        },
        [&] { wrapped_.conv2d_bn_forward(x, weight, p, bn, residual, relu, y); });
}

void ProfilingBackend::conv2d_backward(const Tensor& x, const Tensor& weight, const Tensor& grad_y,
                                       const Conv2dParams& p, const Tensor& grad_x, const Tensor& grad_weight,
                                       const Tensor& grad_bias) {
  timed(wrapped_, "conv2d_backward", &x,
        [&] {
          // The data and the weight gradient are each one forward's worth of multiply-adds.
          const int products = grad_x.defined() + grad_weight.defined();
          return Cost{conv_signature(x, weight, p) + (grad_x.defined() ? " dx" : "") +
                          (grad_weight.defined() ? " dw" : "") + (grad_bias.defined() ? " db" : ""),
                      products * conv_flops(weight, grad_y), 0};
        },
        [&] { wrapped_.conv2d_backward(x, weight, grad_y, p, grad_x, grad_weight, grad_bias); });
}

void ProfilingBackend::batch_norm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta,
                                          const Tensor& running_mean, const Tensor& running_var, bool training,
                                          double momentum, double eps, const Tensor& y, const Tensor& save_mean,
                                          const Tensor& save_invstd, bool relu) {
  timed(wrapped_, "batch_norm_forward", &x,
        [&] {
          const Tensor none;  // evaluation leaves the running statistics untouched
          return Cost{dims(x) + (training ? " train" : " eval") + (relu ? " relu" : ""), 0,
                      moved({&x, &gamma, &beta, &running_mean, &running_var},
                            {&y, &save_mean, &save_invstd, training ? &running_mean : &none,
                             training ? &running_var : &none})};
        },
        [&] {
          wrapped_.batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, y, save_mean,
                                      save_invstd, relu);
        });
}

void ProfilingBackend::batch_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean,
                                           const Tensor& invstd, const Tensor& grad_y, bool training,
                                           const Tensor& grad_x, const Tensor& grad_gamma, const Tensor& grad_beta) {
  timed(wrapped_, "batch_norm_backward", &x,
        [&] {
          return Cost{dims(x) + (training ? " train" : " eval"), 0,
                      moved({&x, &gamma, &mean, &invstd, &grad_y}, {&grad_x, &grad_gamma, &grad_beta})};
        },
        [&] { wrapped_.batch_norm_backward(x, gamma, mean, invstd, grad_y, training, grad_x, grad_gamma, grad_beta); });
}

void ProfilingBackend::max_pool2d_forward(const Tensor& x, const Pool2dParams& p, const Tensor& y,
                                          const Tensor& argmax) {
  timed(wrapped_, "max_pool2d_forward", &x,
        [&] {
          return Cost{arrow(x, y) + format(" k%ds%dp%d", p.kernel, p.stride, p.padding), 0,
                      moved({&x}, {&y, &argmax})};
        },
        [&] { wrapped_.max_pool2d_forward(x, p, y, argmax); });
}

void ProfilingBackend::max_pool2d_backward(const Tensor& grad_y, const Tensor& argmax, const Tensor& grad_x) {
  timed(wrapped_, "max_pool2d_backward", &grad_y,
        [&] { return Cost{arrow(grad_y, grad_x), 0, moved({&grad_y, &argmax}, {&grad_x})}; },
        [&] { wrapped_.max_pool2d_backward(grad_y, argmax, grad_x); });
}

void ProfilingBackend::global_avg_pool_forward(const Tensor& x, const Tensor& y) {
  timed(wrapped_, "global_avg_pool_forward", &x, [&] { return Cost{arrow(x, y), 0, moved({&x}, {&y})}; },
        [&] { wrapped_.global_avg_pool_forward(x, y); });
}

void ProfilingBackend::global_avg_pool_backward(const Tensor& grad_y, const Tensor& grad_x) {
  timed(wrapped_, "global_avg_pool_backward", &grad_y,
        [&] { return Cost{arrow(grad_y, grad_x), 0, moved({&grad_y}, {&grad_x})}; },
        [&] { wrapped_.global_avg_pool_backward(grad_y, grad_x); });
}

void ProfilingBackend::upsample_nearest_forward(const Tensor& x, const Tensor& y) {
  timed(wrapped_, "upsample_nearest_forward", &x, [&] { return Cost{arrow(x, y), 0, moved({&x}, {&y})}; },
        [&] { wrapped_.upsample_nearest_forward(x, y); });
}

void ProfilingBackend::upsample_nearest_backward(const Tensor& grad_y, const Tensor& grad_x) {
  timed(wrapped_, "upsample_nearest_backward", &grad_y,
        [&] { return Cost{arrow(grad_y, grad_x), 0, moved({&grad_y, &grad_x}, {&grad_x})}; },  // adds into grad_x
        [&] { wrapped_.upsample_nearest_backward(grad_y, grad_x); });
}

void ProfilingBackend::resize_bilinear(const Tensor& x, const Tensor& y) {
  timed(wrapped_, "resize_bilinear", &x, [&] { return Cost{arrow(x, y), 0, moved({&x}, {&y})}; },
        [&] { wrapped_.resize_bilinear(x, y); });
}

void ProfilingBackend::copy_block(const Tensor& part, const Tensor& whole, int64_t outer, int64_t part_inner,
                                  int64_t whole_inner, int64_t offset, bool into_whole) {
  timed(wrapped_, "copy_block", &part,
        [&] {
          // The block of `whole` that is read or written has part's size.
          return Cost{dims(part) + (into_whole ? " into " : " from ") + dims(whole), 0, moved({&part}, {&part})};
        },
        [&] { wrapped_.copy_block(part, whole, outer, part_inner, whole_inner, offset, into_whole); });
}

void ProfilingBackend::pairwise_logistic_forward(const Tensor& theta, const Tensor& s, const Tensor& out) {
  timed(wrapped_, "pairwise_logistic_forward", &theta,
        [&] { return Cost{arrow(theta, out), 0, moved({&theta, &s}, {&out})}; },
        [&] { wrapped_.pairwise_logistic_forward(theta, s, out); });
}

void ProfilingBackend::pairwise_logistic_backward(const Tensor& theta, const Tensor& s, const Tensor& grad_out,
                                                  const Tensor& grad_theta) {
  timed(wrapped_, "pairwise_logistic_backward", &theta,
        [&] { return Cost{dims(theta), 0, moved({&theta, &s, &grad_out}, {&grad_theta})}; },
        [&] { wrapped_.pairwise_logistic_backward(theta, s, grad_out, grad_theta); });
}

void ProfilingBackend::quantization_forward(const Tensor& u, const Tensor& out) {
  timed(wrapped_, "quantization_forward", &u, [&] { return Cost{arrow(u, out), 0, moved({&u}, {&out})}; },
        [&] { wrapped_.quantization_forward(u, out); });
}

void ProfilingBackend::quantization_backward(const Tensor& u, const Tensor& grad_out, const Tensor& grad_u) {
  timed(wrapped_, "quantization_backward", &u, [&] { return Cost{dims(u), 0, moved({&u, &grad_out}, {&grad_u})}; },
        [&] { wrapped_.quantization_backward(u, grad_out, grad_u); });
}

void ProfilingBackend::cross_entropy_forward(const Tensor& logits, const Tensor& target, const Tensor& out,
                                             const Tensor& log_sum_exp) {
  timed(wrapped_, "cross_entropy_forward", &logits,
        [&] { return Cost{arrow(logits, out), 0, moved({&logits, &target}, {&out, &log_sum_exp})}; },
        [&] { wrapped_.cross_entropy_forward(logits, target, out, log_sum_exp); });
}

void ProfilingBackend::cross_entropy_backward(const Tensor& logits, const Tensor& target, const Tensor& log_sum_exp,
                                              const Tensor& grad_out, const Tensor& grad_logits) {
  timed(wrapped_, "cross_entropy_backward", &logits,
        [&] { return Cost{dims(logits), 0, moved({&logits, &target, &log_sum_exp, &grad_out}, {&grad_logits})}; },
        [&] { wrapped_.cross_entropy_backward(logits, target, log_sum_exp, grad_out, grad_logits); });
}

void ProfilingBackend::log_softmax_forward(const Tensor& x, const Tensor& y) {
  timed(wrapped_, "log_softmax_forward", &x, [&] { return Cost{dims(x), 0, moved({&x}, {&y})}; },
        [&] { wrapped_.log_softmax_forward(x, y); });
}

void ProfilingBackend::log_softmax_backward(const Tensor& y, const Tensor& grad_y, const Tensor& grad_x) {
  timed(wrapped_, "log_softmax_backward", &y, [&] { return Cost{dims(y), 0, moved({&y, &grad_y}, {&grad_x})}; },
        [&] { wrapped_.log_softmax_backward(y, grad_y, grad_x); });
}

void ProfilingBackend::gather_rows(const Tensor& src, const Tensor& index, const Tensor& out) {
  timed(wrapped_, "gather_rows", &src,
        [&] { return Cost{arrow(src, out), 0, moved({&index, &out}, {&out})}; },  // reads out's size of src
        [&] { wrapped_.gather_rows(src, index, out); });
}

void ProfilingBackend::scatter_rows(const Tensor& src, const Tensor& index, const Tensor& dst, bool accumulate) {
  timed(wrapped_, "scatter_rows", &src,
        [&] {
          // Writes src's size of dst, and reads it first when accumulating.
          const Tensor none;
          return Cost{arrow(src, dst) + (accumulate ? " add" : ""), 0,
                      moved({&index, &src, accumulate ? &src : &none}, {&src})};
        },
        [&] { wrapped_.scatter_rows(src, index, dst, accumulate); });
}

// The optimizers read and write the parameters and the state of the elements that have a gradient; the
// signature counts the parameters and the gradients.
void ProfilingBackend::rmsprop_step(const Tensor& params, const std::vector<GradientSlice>& grads,
                                    const Tensor& square_avg, double lr, double alpha, double eps,
                                    double weight_decay) {
  timed(wrapped_, "rmsprop_step", &params,
        [&] { return Cost{dims(params) + ", " + std::to_string(grads.size()) + " gradients", 0, 5 * moved(grads)}; },
        [&] { wrapped_.rmsprop_step(params, grads, square_avg, lr, alpha, eps, weight_decay); });
}

void ProfilingBackend::sgd_step(const Tensor& params, const std::vector<GradientSlice>& grads, const Tensor& buffer,
                                double lr, double momentum, double weight_decay, bool first_step) {
  timed(wrapped_, "sgd_step", &params,
        [&] {  // the first step only writes the momentum buffer
          return Cost{dims(params) + ", " + std::to_string(grads.size()) + " gradients", 0,
                      (first_step ? 4 : 5) * moved(grads)};
        },
        [&] { wrapped_.sgd_step(params, grads, buffer, lr, momentum, weight_decay, first_step); });
}

void ProfilingBackend::pack_signs(const Tensor& x, const Tensor& codes) {
  timed(wrapped_, "pack_signs", &x, [&] { return Cost{arrow(x, codes), 0, moved({&x}, {&codes})}; },
        [&] { wrapped_.pack_signs(x, codes); });
}

void ProfilingBackend::hamming_distances(const Tensor& queries, const Tensor& database, const Tensor& distances) {
  timed(wrapped_, "hamming_distances", &distances,
        [&] { return Cost{dims(distances), 0, moved({&queries, &database}, {&distances})}; },
        [&] { wrapped_.hamming_distances(queries, database, distances); });
}

void ProfilingBackend::hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k, const Tensor& indices,
                                     const Tensor& distances) {
  timed(wrapped_, "hamming_top_k", &indices,
        [&] { return Cost{arrow(database, indices), 0, moved({&queries, &database}, {&indices, &distances})}; },
        [&] { wrapped_.hamming_top_k(queries, database, k, indices, distances); });
}

// ---- the records ----

namespace profiler {

void enable(bool on) { detail::enabled_flag.store(on, std::memory_order_relaxed); }

void reset() {
  Records& r = records();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.totals.clear();
}

std::vector<Entry> entries() {
  std::vector<Entry> out;
  {
    Records& r = records();
    std::lock_guard<std::mutex> lock(r.mutex);
    for (const auto& [key, t] : r.totals)
      out.push_back(Entry{key.first, key.second, t.calls, t.seconds, t.flops, t.bytes});
  }
  std::stable_sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
  return out;
}

std::string table(double total_seconds, size_t max_rows) {
  const std::vector<Entry> all = entries();
  if (all.empty()) return "mdff profiler: no kernel calls recorded\n";
  double kernel_seconds = 0;
  int64_t calls = 0;
  for (const Entry& e : all) {
    kernel_seconds += e.seconds;
    calls += e.calls;
  }
  const double share_of = total_seconds > 0 ? total_seconds : kernel_seconds;
  const size_t shown = std::min(max_rows, all.size());
  int kernel_width = 6, signature_width = 9;
  for (size_t i = 0; i < shown; ++i) {
    kernel_width = std::max(kernel_width, static_cast<int>(all[i].kernel.size()));
    signature_width = std::max(signature_width, static_cast<int>(all[i].signature.size()));
  }
  std::string out = format("%-*s  %-*s %8s %11s %8s %9s %9s\n", kernel_width, "kernel", signature_width, "signature",
                           "calls", "ms total", "% total", "GFLOP/s", "GB/s");
  for (size_t i = 0; i < shown; ++i) {
    const Entry& e = all[i];
    out += format("%-*s  %-*s %8lld %11.3f %7.1f%% %9s %9s\n", kernel_width, e.kernel.c_str(), signature_width,
                  e.signature.c_str(), static_cast<long long>(e.calls), e.seconds * 1e3, 100 * e.seconds / share_of,
                  rate(e.flops, e.seconds).c_str(), rate(e.bytes, e.seconds).c_str());
  }
  if (shown < all.size()) {
    double rest = 0;
    for (size_t i = shown; i < all.size(); ++i) rest += all[i].seconds;
    out += format("(%zu more rows: %.3f ms)\n", all.size() - shown, rest * 1e3);
  }
  out += format("%lld kernel calls, %.3f ms in kernels", static_cast<long long>(calls), kernel_seconds * 1e3);
  if (total_seconds > 0)
    out += format(" of %.3f ms (%.1f%%)", total_seconds * 1e3, 100 * kernel_seconds / total_seconds);
  return out + "\n";
}

nlohmann::json to_json() {
  nlohmann::json list = nlohmann::json::array();
  double total = 0;
  for (const Entry& e : entries()) {
    list.push_back({{"kernel", e.kernel}, {"signature", e.signature}, {"calls", e.calls}, {"seconds", e.seconds},
                    {"flops", e.flops}, {"bytes", e.bytes}});
    total += e.seconds;
  }
  return {{"total_seconds", total}, {"entries", list}};
}

}  // namespace profiler

namespace {

// MDFF_PROFILE set (to anything but "" or "0"): profiling from start-up, and at exit the table, with
// each kernel's share of the process's wall time, on stderr: 40 rows, or N rows for MDFF_PROFILE=N > 1.
struct ProfileFromEnvironment {
  const bool requested = [] {
    const char* value = std::getenv("MDFF_PROFILE");
    return value && *value && std::string(value) != "0";
  }();
  const Clock::time_point start = Clock::now();

  ProfileFromEnvironment() {
    if (requested) profiler::enable(true);
  }
  ~ProfileFromEnvironment() {
    if (!requested) return;
    const double wall = std::chrono::duration<double>(Clock::now() - start).count();
    const long rows = std::strtol(std::getenv("MDFF_PROFILE"), nullptr, 10);
    std::fprintf(stderr, "\nmdff profiler (MDFF_PROFILE), share of the process's %.3f s:\n%s", wall,
                 profiler::table(wall, rows > 1 ? static_cast<size_t>(rows) : 40).c_str());
  }
};
const ProfileFromEnvironment profile_from_environment;

}  // namespace

}  // namespace mdff
