// The functional ops (see ops.h): shape rules, checks, forward through the backend, and the backward
// formulas as closures recorded in the autograd graph. Backward closures run under NoGradGuard and may
// call ops themselves.
#include "core/ops.h"

#include <algorithm>

#include "core/autograd.h"
#include "core/backend.h"
#include "core/error.h"

namespace mdff::ops {

namespace {

using Grads = std::vector<Tensor>;

Tensor empty_like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype(), t.device()); }
Tensor empty_as(const Tensor& t, const Shape& shape) { return Tensor::empty(shape, t.dtype(), t.device()); }

void check_float(const Tensor& t, const char* op, const char* what) {
  check_defined(t, op, what);
  MDFF_CHECK(is_floating(t.dtype()), op, ": ", what, " must be float32 or float64, got ", dtype_name(t.dtype()));
}

// Checks that every defined tensor is a float tensor on the same device with the same dtype as the first.
void check_compatible(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  const Tensor* first = nullptr;
  for (auto [what, t] : tensors) {
    if (!t->defined()) continue;
    check_float(*t, op, what);
    if (!first) {
      first = t;
      continue;
    }
    check_same_device(*first, *t, op);
    check_same_dtype(*first, *t, op);
  }
}

void check_rank(const Tensor& t, int64_t rank, const char* op, const char* what) {
  MDFF_CHECK(t.dim() == rank, op, ": ", what, " must have ", rank, " dimensions, got shape ", shape_str(t.shape()));
}

Shape broadcast_shape(const Shape& a, const Shape& b, const char* op) {
  Shape out(std::max(a.size(), b.size()), 1);
  for (size_t i = 0; i < out.size(); ++i) {
    const int64_t da = i < a.size() ? a[a.size() - 1 - i] : 1, db = i < b.size() ? b[b.size() - 1 - i] : 1;
    MDFF_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", shape_str(a), " and ", shape_str(b),
               " do not broadcast (dimension ", out.size() - 1 - i, ": ", da, " vs ", db, ")");
    out[out.size() - 1 - i] = std::max(da, db);
  }
  return out;
}

// The gradient of a broadcast input: g summed over the dimensions along which the input was repeated.
Tensor reduce_to(const Tensor& g, const Shape& shape) {
  if (g.shape() == shape) return g;
  Tensor out = empty_as(g, shape);
  backend_of(g).sum_to(g, out);
  return out;
}

// The gradient through a ReLU that the fused ops apply as they write their output y (batch norm's
// kernel, the AddRelu binary kernel): relu(h) > 0 exactly where h > 0, so y itself serves as ReLU's input
// in backward, and the pre-ReLU tensor need not be kept. That is the memory the fused ops save: one
// activation per fusion.
Tensor relu_grad(const Tensor& y, const Tensor& g) {
  Tensor gh = empty_like(g);
  backend_of(g).unary_backward(UnaryOp::Relu, y, Tensor(), g, gh);
  return gh;
}

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, const char* name) {
  check_compatible(name, {{"a", &a}, {"b", &b}});
  Tensor out = empty_as(a, broadcast_shape(a.shape(), b.shape(), name));
  backend_of(a).binary(op, a, b, out);
  const Shape sa = a.shape(), sb = b.shape();
  const bool a_needs = a.requires_grad(), b_needs = b.requires_grad();
  // Mul and Div save the inputs their gradients need, AddRelu its output; Add and Sub save nothing.
  const bool mul_or_div = op == BinaryOp::Mul || op == BinaryOp::Div;
  Tensor saved_a = mul_or_div && b_needs ? a.detach() : Tensor();
  Tensor saved_b = (op == BinaryOp::Mul && a_needs) || (op == BinaryOp::Div && (a_needs || b_needs)) ? b.detach() : Tensor();
  Tensor saved_out = op == BinaryOp::AddRelu ? out.detach() : Tensor();  // ReLU's gradient reads its output
  return record(out, name, {a, b}, [=](const Tensor& g) {
    Tensor ga, gb;
    switch (op) {
      case BinaryOp::Add:
        ga = a_needs ? reduce_to(g, sa) : Tensor();
        gb = b_needs ? reduce_to(g, sb) : Tensor();
        break;
      case BinaryOp::Sub:
        ga = a_needs ? reduce_to(g, sa) : Tensor();
        gb = b_needs ? reduce_to(scale(g, -1.0), sb) : Tensor();
        break;
      case BinaryOp::Mul:
        ga = a_needs ? reduce_to(mul(g, saved_b), sa) : Tensor();
        gb = b_needs ? reduce_to(mul(g, saved_a), sb) : Tensor();
        break;
      case BinaryOp::Div:  // d(a/b)/da = 1/b,  d(a/b)/db = -a/b^2
        ga = a_needs ? reduce_to(div(g, saved_b), sa) : Tensor();
        gb = b_needs ? reduce_to(scale(div(mul(g, saved_a), mul(saved_b, saved_b)), -1.0), sb) : Tensor();
        break;
      case BinaryOp::AddRelu: {
        const Tensor gh = relu_grad(saved_out, g);
        ga = a_needs ? reduce_to(gh, sa) : Tensor();
        gb = b_needs ? reduce_to(gh, sb) : Tensor();
        break;
      }
    }
    return Grads{ga, gb};
  });
}

Tensor unary(UnaryOp op, const Tensor& x, const char* name) {
  check_float(x, name, "input");
  Tensor y = empty_like(x);
  backend_of(x).unary(op, x, y);
  // piecewise constant: no gradient flows, no graph is recorded
  if (op == UnaryOp::Sign || op == UnaryOp::Heaviside) return y;
  // Tanh's derivative is computed from its output; Relu's and Softplus's from the input.
  Tensor saved_x = op == UnaryOp::Tanh ? Tensor() : x.detach();
  Tensor saved_y = op == UnaryOp::Tanh ? y.detach() : Tensor();
  return record(y, name, {x}, [=](const Tensor& g) {
    Tensor gx = empty_like(g);
    backend_of(g).unary_backward(op, saved_x, saved_y, g, gx);
    return Grads{gx};
  });
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Add, a, b, "add"); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Sub, a, b, "sub"); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Mul, a, b, "mul"); }
Tensor div(const Tensor& a, const Tensor& b) { return binary(BinaryOp::Div, a, b, "div"); }

Tensor scale(const Tensor& x, double alpha) {
  check_float(x, "scale", "input");
  Tensor y = empty_like(x);
  backend_of(x).scale(x, alpha, y);
  return record(y, "scale", {x}, [alpha](const Tensor& g) { return Grads{scale(g, alpha)}; });
}

Tensor relu(const Tensor& x) { return unary(UnaryOp::Relu, x, "relu"); }
Tensor tanh(const Tensor& x) { return unary(UnaryOp::Tanh, x, "tanh"); }
Tensor sign(const Tensor& x) { return unary(UnaryOp::Sign, x, "sign"); }
Tensor softplus(const Tensor& x) { return unary(UnaryOp::Softplus, x, "softplus"); }
Tensor heaviside(const Tensor& x) { return unary(UnaryOp::Heaviside, x, "heaviside"); }

Tensor sum(const Tensor& x) {
  check_float(x, "sum", "input");
  Tensor out = empty_as(x, Shape{});
  backend_of(x).sum_to(x, out);
  const Shape shape = x.shape();
  return record(out, "sum", {x}, [shape](const Tensor& g) {
    Tensor gx = empty_as(g, shape);
    backend_of(g).binary(BinaryOp::Add, Tensor::zeros(shape, g.dtype(), g.device()), g, gx);  // broadcast g
    return Grads{gx};
  });
}

Tensor mean(const Tensor& x) {
  MDFF_CHECK(x.defined() && x.numel() > 0, "mean: the input is empty");
  return scale(sum(x), 1.0 / static_cast<double>(x.numel()));
}

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha) {
  check_compatible("matmul", {{"a", &a}, {"b", &b}});
  check_rank(a, 2, "matmul", "a");
  check_rank(b, 2, "matmul", "b");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  MDFF_CHECK(k == kb, "matmul: inner dimensions differ: ", shape_str(a.shape()), (trans_a ? "^T" : ""), " x ",
             shape_str(b.shape()), (trans_b ? "^T" : ""));
  Tensor c = empty_as(a, {m, n});
  backend_of(a).gemm(trans_a, trans_b, alpha, a, b, 0.0, c);
  const bool a_needs = a.requires_grad(), b_needs = b.requires_grad();
  Tensor saved_a = b_needs ? a.detach() : Tensor(), saved_b = a_needs ? b.detach() : Tensor();
  return record(c, "matmul", {a, b}, [=](const Tensor& g) {
    // C = alpha op(A) op(B): d op(A) = alpha G op(B)^T and d op(B) = alpha op(A)^T G, transposed back where
    // op transposed.
    Tensor ga, gb;
    if (a_needs) ga = trans_a ? matmul(saved_b, g, trans_b, true, alpha) : matmul(g, saved_b, false, !trans_b, alpha);
    if (b_needs) gb = trans_b ? matmul(g, saved_a, true, trans_a, alpha) : matmul(saved_a, g, !trans_a, false, alpha);
    return Grads{ga, gb};
  });
}

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  check_compatible("linear", {{"input", &x}, {"weight", &weight}, {"bias", &bias}});
  check_rank(x, 2, "linear", "input");
  check_rank(weight, 2, "linear", "weight");
  MDFF_CHECK(x.size(1) == weight.size(1), "linear: input has ", x.size(1), " features but the weight ",
             shape_str(weight.shape()), " expects ", weight.size(1));
  MDFF_CHECK(!bias.defined() || bias.shape() == Shape{weight.size(0)}, "linear: bias of shape ",
             shape_str(bias.shape()), " for ", weight.size(0), " outputs");
  Tensor y = empty_as(x, {x.size(0), weight.size(0)});
  backend_of(x).gemm(false, true, 1.0, x, weight, 0.0, y);                 // y (N,out) = x (N,in) W^T
  if (bias.defined()) backend_of(y).binary(BinaryOp::Add, y, bias, y);     // in place, bias repeated over rows
  const bool x_needs = x.requires_grad(), w_needs = weight.requires_grad();
  const bool b_needs = bias.defined() && bias.requires_grad();
  Tensor saved_x = w_needs ? x.detach() : Tensor(), saved_w = x_needs ? weight.detach() : Tensor();
  const Shape bias_shape{weight.size(0)};
  return record(y, "linear", {x, weight, bias}, [=](const Tensor& g) {
    return Grads{x_needs ? matmul(g, saved_w) : Tensor(),               // (N,out) x (out,in)
                 w_needs ? matmul(g, saved_x, true, false) : Tensor(),  // (out,N) x (N,in)
                 b_needs ? reduce_to(g, bias_shape) : Tensor()};
  });
}

namespace {
// The output shape of conv2d, after checking its operands.
Shape conv2d_output_shape(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias, int stride,
                          int padding) {
  check_compatible(op, {{"input", &x}, {"weight", &weight}, {"bias", &bias}});
  check_rank(x, 4, op, "input (N,C,H,W)");
  check_rank(weight, 4, op, "weight (Cout,Cin,kh,kw)");
  MDFF_CHECK(x.size(1) == weight.size(1), op, ": input has ", x.size(1), " channels but the weight ",
             shape_str(weight.shape()), " expects ", weight.size(1));
  MDFF_CHECK(!bias.defined() || bias.shape() == Shape{weight.size(0)}, op, ": bias of shape ",
             shape_str(bias.shape()), " for ", weight.size(0), " output channels");
  MDFF_CHECK(stride >= 1 && padding >= 0, op, ": stride ", stride, " and padding ", padding,
             " must be >= 1 and >= 0");
  MDFF_CHECK(x.size(2) + 2 * padding >= weight.size(2) && x.size(3) + 2 * padding >= weight.size(3),
             op, ": a ", weight.size(2), "x", weight.size(3), " kernel does not fit the padded input ",
             shape_str(x.shape()), " (padding ", padding, ")");
  const int64_t ho = (x.size(2) + 2 * padding - weight.size(2)) / stride + 1;
  const int64_t wo = (x.size(3) + 2 * padding - weight.size(3)) / stride + 1;
  return {x.size(0), weight.size(0), ho, wo};
}

// Checks batch norm's parameters and running statistics against an input of `channels` channels.
void check_batch_norm(const char* op, const Tensor& x, int64_t channels, const Tensor& gamma, const Tensor& beta,
                      const Tensor& running_mean, const Tensor& running_var) {
  check_compatible(op, {{"input", &x}, {"weight", &gamma}, {"bias", &beta}, {"running_mean", &running_mean},
                        {"running_var", &running_var}});
  for (const Tensor* t : {&gamma, &beta, &running_mean, &running_var})
    MDFF_CHECK(t->shape() == Shape{channels}, op, ": parameters and running statistics must have shape ",
               shape_str({channels}), " for ", channels, " channels, got ", shape_str(t->shape()));
  MDFF_CHECK(!running_mean.requires_grad() && !running_var.requires_grad(),
             op, ": running statistics are buffers and must not require grad");
}
}  // namespace

Tensor conv2d(const Tensor& x, const Tensor& weight, const Tensor& bias, int stride, int padding) {
  const Shape y_shape = conv2d_output_shape("conv2d", x, weight, bias, stride, padding);
  const Conv2dParams params{stride, padding};
  Tensor y = empty_as(x, y_shape);
  backend_of(x).conv2d_forward(x, weight, bias, params, y);
  const bool x_needs = x.requires_grad(), w_needs = weight.requires_grad();
  const bool b_needs = bias.defined() && bias.requires_grad();
  Tensor saved_x = x.detach(), saved_w = weight.detach();
  return record(y, "conv2d", {x, weight, bias}, [=](const Tensor& g) {
    Tensor gx = x_needs ? empty_like(saved_x) : Tensor();
    Tensor gw = w_needs ? empty_like(saved_w) : Tensor();
    Tensor gb = b_needs ? empty_as(g, {saved_w.size(0)}) : Tensor();
    backend_of(g).conv2d_backward(saved_x, saved_w, g, params, gx, gw, gb);
    return Grads{gx, gw, gb};
  });
}

Tensor conv2d_bn_eval(const Tensor& x, const Tensor& weight, const BatchNormEval& bn, int stride, int padding,
                      const Tensor& residual, bool relu) {
  MDFF_CHECK(!grad_enabled(), "conv2d_bn_eval: records no graph, so it runs only without gradients (NoGradGuard); "
             "use conv2d and batch_norm2d when gradients are needed");
  const Shape y_shape = conv2d_output_shape("conv2d_bn_eval", x, weight, Tensor(), stride, padding);
  check_batch_norm("conv2d_bn_eval", x, weight.size(0), bn.gamma, bn.beta, bn.running_mean, bn.running_var);
  if (residual.defined()) {
    check_compatible("conv2d_bn_eval", {{"input", &x}, {"residual", &residual}});
    MDFF_CHECK(residual.shape() == y_shape, "conv2d_bn_eval: residual of shape ", shape_str(residual.shape()),
               " for an output of shape ", shape_str(y_shape));
  }
  Tensor y = empty_as(x, y_shape);
  backend_of(x).conv2d_bn_forward(x, weight, Conv2dParams{stride, padding}, bn, residual, relu, y);
  return y;
}

namespace {
Tensor batch_norm2d_impl(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                         const Tensor& running_var, bool training, double momentum, double eps, bool relu) {
  const char* name = relu ? "batch_norm2d_relu" : "batch_norm2d";
  check_rank(x, 4, name, "input (N,C,H,W)");
  check_batch_norm(name, x, x.size(1), gamma, beta, running_mean, running_var);
  MDFF_CHECK(!training || x.numel() / x.size(1) > 1, name, ": training needs more than one value per channel, "
             "got input shape ", shape_str(x.shape()), " (use a batch of at least 2, or evaluation mode)");
  const Shape channels{x.size(1)};
  Tensor y = empty_like(x), save_mean = empty_as(x, channels), save_invstd = empty_as(x, channels);
  backend_of(x).batch_norm_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, y, save_mean,
                                   save_invstd, relu);
  const bool x_needs = x.requires_grad(), g_needs = gamma.requires_grad(), b_needs = beta.requires_grad();
  Tensor saved_x = x.detach(), saved_gamma = gamma.detach();
  Tensor saved_y = relu ? y.detach() : Tensor();
  return record(y, name, {x, gamma, beta}, [=](const Tensor& g) {
    const Tensor gh = relu ? relu_grad(saved_y, g) : g;
    Tensor gx = x_needs ? empty_like(saved_x) : Tensor();
    Tensor gg = g_needs ? empty_like(saved_gamma) : Tensor();
    Tensor gb = b_needs ? empty_like(saved_gamma) : Tensor();
    backend_of(gh).batch_norm_backward(saved_x, saved_gamma, save_mean, save_invstd, gh, training, gx, gg, gb);
    return Grads{gx, gg, gb};
  });
}
}  // namespace

Tensor batch_norm2d(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                    const Tensor& running_var, bool training, double momentum, double eps) {
  return batch_norm2d_impl(x, gamma, beta, running_mean, running_var, training, momentum, eps, false);
}

Tensor batch_norm2d_relu(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                         const Tensor& running_var, bool training, double momentum, double eps) {
  return batch_norm2d_impl(x, gamma, beta, running_mean, running_var, training, momentum, eps, true);
}

Tensor add_relu(const Tensor& a, const Tensor& b) {
  check_compatible("add_relu", {{"a", &a}, {"b", &b}});
  MDFF_CHECK(a.shape() == b.shape(), "add_relu: a ", shape_str(a.shape()), " and b ", shape_str(b.shape()),
             " must have the same shape (no broadcasting)");
  return binary(BinaryOp::AddRelu, a, b, "add_relu");
}

Tensor max_pool2d(const Tensor& x, int kernel, int stride, int padding) {
  check_float(x, "max_pool2d", "input");
  check_rank(x, 4, "max_pool2d", "input (N,C,H,W)");
  MDFF_CHECK(kernel >= 1 && stride >= 1 && padding >= 0 && 2 * padding <= kernel, "max_pool2d: kernel ", kernel,
             ", stride ", stride, ", padding ", padding, " are invalid (padding may be at most half the kernel)");
  MDFF_CHECK(x.size(2) + 2 * padding >= kernel && x.size(3) + 2 * padding >= kernel, "max_pool2d: a ", kernel,
             "x", kernel, " window does not fit the input ", shape_str(x.shape()));
  const int64_t ho = (x.size(2) + 2 * padding - kernel) / stride + 1, wo = (x.size(3) + 2 * padding - kernel) / stride + 1;
  Tensor y = empty_as(x, {x.size(0), x.size(1), ho, wo});
  Tensor argmax = Tensor::empty(y.shape(), DType::I32, x.device());
  backend_of(x).max_pool2d_forward(x, Pool2dParams{kernel, stride, padding}, y, argmax);
  const Shape input_shape = x.shape();
  return record(y, "max_pool2d", {x}, [=](const Tensor& g) {
    Tensor gx = empty_as(g, input_shape);
    backend_of(g).max_pool2d_backward(g, argmax, gx);
    return Grads{gx};
  });
}

Tensor global_avg_pool(const Tensor& x) {
  check_float(x, "global_avg_pool", "input");
  check_rank(x, 4, "global_avg_pool", "input (N,C,H,W)");
  Tensor y = empty_as(x, {x.size(0), x.size(1)});
  backend_of(x).global_avg_pool_forward(x, y);
  const Shape input_shape = x.shape();
  return record(y, "global_avg_pool", {x}, [=](const Tensor& g) {
    Tensor gx = empty_as(g, input_shape);
    backend_of(g).global_avg_pool_backward(g, gx);
    return Grads{gx};
  });
}

namespace {
void check_resize(const Tensor& x, int64_t height, int64_t width, const char* op) {
  check_float(x, op, "input");
  check_rank(x, 4, op, "input (N,C,H,W)");
  MDFF_CHECK(height >= 1 && width >= 1, op, ": target size ", height, "x", width, " must be positive");
}
}  // namespace

Tensor upsample_nearest(const Tensor& x, int64_t height, int64_t width) {
  check_resize(x, height, width, "upsample_nearest");
  Tensor y = empty_as(x, {x.size(0), x.size(1), height, width});
  backend_of(x).upsample_nearest_forward(x, y);
  const Shape input_shape = x.shape();
  return record(y, "upsample_nearest", {x}, [=](const Tensor& g) {
    Tensor gx = Tensor::zeros(input_shape, g.dtype(), g.device());
    backend_of(g).upsample_nearest_backward(g, gx);
    return Grads{gx};
  });
}

Tensor resize_bilinear(const Tensor& x, int64_t height, int64_t width) {
  check_resize(x, height, width, "resize_bilinear");
  MDFF_CHECK(!needs_grad({x}), "resize_bilinear has no backward: it resizes input images, which need no gradient "
             "(call it on a tensor that does not require grad, or under NoGradGuard)");
  Tensor y = empty_as(x, {x.size(0), x.size(1), height, width});
  backend_of(x).resize_bilinear(x, y);
  return y;
}

Tensor concat(const std::vector<Tensor>& parts, int64_t dim) {
  MDFF_CHECK(!parts.empty(), "concat: no tensors to concatenate");
  const Tensor& first = parts[0];
  check_defined(first, "concat", "part 0");
  MDFF_CHECK(is_floating(first.dtype()) || first.dtype() == DType::I32, "concat: the parts must be float32, "
             "float64 or int32 (indices, counts), got ", dtype_name(first.dtype()));
  const int64_t rank = first.dim();
  if (dim < 0) dim += rank;
  MDFF_CHECK(dim >= 0 && dim < rank, "concat: dimension out of range for tensors of shape ", shape_str(first.shape()));
  Shape out_shape = first.shape();
  out_shape[dim] = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Tensor& p = parts[i];
    check_defined(p, "concat", "a part");
    check_same_device(first, p, "concat");
    check_same_dtype(first, p, "concat");
    bool compatible = p.dim() == rank;
    for (int64_t d = 0; compatible && d < rank; ++d) compatible = d == dim || p.size(d) == first.size(d);
    MDFF_CHECK(compatible, "concat: part ", i, " has shape ", shape_str(p.shape()), ", incompatible with part 0 ",
               shape_str(first.shape()), " along dimensions other than ", dim);
    out_shape[dim] += p.size(dim);
  }
  Tensor out = empty_as(first, out_shape);
  int64_t outer = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= out_shape[d];
  const int64_t whole_inner = out.numel() / std::max<int64_t>(outer, 1);
  std::vector<int64_t> inner(parts.size()), offsets(parts.size());
  std::vector<Shape> shapes(parts.size());
  for (size_t i = 0, offset = 0; i < parts.size(); ++i) {
    inner[i] = parts[i].numel() / std::max<int64_t>(outer, 1);
    offsets[i] = static_cast<int64_t>(offset);
    shapes[i] = parts[i].shape();
    backend_of(out).copy_block(parts[i], out, outer, inner[i], whole_inner, offsets[i], true);
    offset += inner[i];
  }
  return record(out, "concat", parts, [=](const Tensor& g) {
    Grads grads;
    for (size_t i = 0; i < shapes.size(); ++i) {
      Tensor gi = empty_as(g, shapes[i]);
      backend_of(g).copy_block(gi, g, outer, inner[i], whole_inner, offsets[i], false);
      grads.push_back(gi);
    }
    return grads;
  });
}

Tensor log_softmax(const Tensor& x) {
  check_float(x, "log_softmax", "input");
  check_rank(x, 2, "log_softmax", "input (N,K)");
  Tensor y = empty_like(x);
  backend_of(x).log_softmax_forward(x, y);
  Tensor saved_y = y.detach();
  return record(y, "log_softmax", {x}, [=](const Tensor& g) {
    Tensor gx = empty_like(g);
    backend_of(g).log_softmax_backward(saved_y, g, gx);
    return Grads{gx};
  });
}

Tensor cross_entropy(const Tensor& logits, const Tensor& target) {
  check_compatible("cross_entropy", {{"logits", &logits}, {"target", &target}});
  MDFF_CHECK(logits.shape() == target.shape(), "cross_entropy: logits ", shape_str(logits.shape()),
             " and target ", shape_str(target.shape()), " must have the same shape (N,K)");
  MDFF_CHECK(logits.dim() == 2 && logits.numel() > 0, "cross_entropy: logits must be (N,K) with N, K >= 1, got ",
             shape_str(logits.shape()));
  MDFF_CHECK(!target.requires_grad(), "cross_entropy: the target is a constant and gets no gradient; it must not "
             "require grad (detach it)");
  Tensor out = empty_as(logits, Shape{});
  Tensor log_sum_exp = empty_as(logits, Shape{logits.size(0)});
  backend_of(logits).cross_entropy_forward(logits, target, out, log_sum_exp);
  Tensor saved_logits = logits.detach(), saved_target = target.detach();
  return record(out, "cross_entropy", {logits}, [=](const Tensor& g) {
    Tensor gl = empty_like(saved_logits);
    backend_of(g).cross_entropy_backward(saved_logits, saved_target, log_sum_exp, g, gl);
    return Grads{gl};
  });
}

Tensor pairwise_logistic_loss(const Tensor& theta, const Tensor& s) {
  check_compatible("pairwise_logistic_loss", {{"theta", &theta}, {"s", &s}});
  MDFF_CHECK(theta.shape() == s.shape(), "pairwise_logistic_loss: theta ", shape_str(theta.shape()), " and s ",
             shape_str(s.shape()), " must have the same shape");
  MDFF_CHECK(theta.numel() > 0, "pairwise_logistic_loss: no pairs (theta is empty)");
  MDFF_CHECK(!s.requires_grad(), "pairwise_logistic_loss: s holds constant similarities and gets no gradient; "
             "it must not require grad (detach it)");
  Tensor out = empty_as(theta, Shape{});
  backend_of(theta).pairwise_logistic_forward(theta, s, out);
  Tensor saved_theta = theta.detach(), saved_s = s.detach();
  return record(out, "pairwise_logistic_loss", {theta}, [=](const Tensor& g) {
    Tensor gt = empty_like(saved_theta);
    backend_of(g).pairwise_logistic_backward(saved_theta, saved_s, g, gt);
    return Grads{gt};
  });
}

Tensor quantization_loss(const Tensor& u) {
  check_float(u, "quantization_loss", "u");
  check_rank(u, 2, "quantization_loss", "u (N,L)");
  MDFF_CHECK(u.numel() > 0, "quantization_loss: u ", shape_str(u.shape()), " holds no codes");
  Tensor out = empty_as(u, Shape{});
  backend_of(u).quantization_forward(u, out);
  Tensor saved_u = u.detach();
  return record(out, "quantization_loss", {u}, [=](const Tensor& g) {
    Tensor gu = empty_like(saved_u);
    backend_of(g).quantization_backward(saved_u, g, gu);
    return Grads{gu};
  });
}

namespace {
void check_index(const Tensor& index, const Tensor& rows, const char* op) {
  check_defined(index, op, "index");
  MDFF_CHECK(index.dtype() == DType::I32 && index.dim() == 1, op, ": index must be a 1-D int32 tensor, got ",
             dtype_name(index.dtype()), " ", shape_str(index.shape()));
  check_same_device(index, rows, op);
  MDFF_CHECK(rows.dim() >= 1, op, ": the row tensor needs at least one dimension");
}
}  // namespace

Tensor gather_rows(const Tensor& src, const Tensor& index) {
  check_float(src, "gather_rows", "source");
  check_index(index, src, "gather_rows");
  Shape out_shape = src.shape();
  out_shape[0] = index.size(0);
  Tensor out = empty_as(src, out_shape);
  backend_of(src).gather_rows(src, index, out);
  const Shape src_shape = src.shape();
  return record(out, "gather_rows", {src}, [=](const Tensor& g) {
    Tensor gs = Tensor::zeros(src_shape, g.dtype(), g.device());
    backend_of(g).scatter_rows(g, index, gs, true);  // repeated rows get summed gradients
    return Grads{gs};
  });
}

void scatter_rows_(Tensor& dst, const Tensor& index, const Tensor& src) {
  check_compatible("scatter_rows_", {{"destination", &dst}, {"source", &src}});
  check_index(index, dst, "scatter_rows_");
  Shape expected = dst.shape();
  expected[0] = index.size(0);
  MDFF_CHECK(src.shape() == expected, "scatter_rows_: source of shape ", shape_str(src.shape()), " for ",
             index.size(0), " rows of ", shape_str(dst.shape()), " (expected ", shape_str(expected), ")");
  MDFF_CHECK(!dst.requires_grad(), "scatter_rows_: the destination is written in place and must not require grad");
  backend_of(dst).scatter_rows(src, index, dst, false);
}

Tensor pack_signs(const Tensor& x) {
  MDFF_CHECK(x.dim() == 2 && is_floating(x.dtype()), "pack_signs: needs (N,D) float codes, got ", shape_str(x.shape()),
             " ", dtype_name(x.dtype()));
  Tensor codes = Tensor::empty({x.size(0), (x.size(1) + 31) / 32}, DType::I32, x.device());
  if (codes.numel() > 0) backend_of(x).pack_signs(x, codes);
  return codes;
}

namespace {
void check_codes_pair(const Tensor& queries, const Tensor& database, const char* op) {
  check_same_device(queries, database, op);
  MDFF_CHECK(queries.dim() == 2 && database.dim() == 2 && queries.dtype() == DType::I32 &&
                 database.dtype() == DType::I32 && queries.size(1) == database.size(1),
             op, ": needs I32 codes (Q,W) and (N,W) from pack_signs, got ", shape_str(queries.shape()), " ",
             dtype_name(queries.dtype()), " and ", shape_str(database.shape()), " ", dtype_name(database.dtype()));
}
}  // namespace

Tensor hamming_distances(const Tensor& queries, const Tensor& database) {
  check_codes_pair(queries, database, "hamming_distances");
  Tensor distances = Tensor::empty({queries.size(0), database.size(0)}, DType::I32, queries.device());
  if (distances.numel() > 0) backend_of(queries).hamming_distances(queries, database, distances);
  return distances;
}

std::pair<Tensor, Tensor> hamming_top_k(const Tensor& queries, const Tensor& database, int64_t k) {
  check_codes_pair(queries, database, "hamming_top_k");
  MDFF_CHECK(k >= 1, "hamming_top_k: k must be at least 1, got ", k);
  k = std::min(k, database.size(0));
  Tensor indices = Tensor::empty({queries.size(0), k}, DType::I32, queries.device());
  Tensor distances = Tensor::empty({queries.size(0), k}, DType::I32, queries.device());
  if (indices.numel() > 0) backend_of(queries).hamming_top_k(queries, database, k, indices, distances);
  return {indices, distances};
}

void count_non_finite_(const std::vector<Tensor>& tensors, Tensor& count) {
  MDFF_CHECK(count.dtype() == DType::I32 && count.numel() == 1, "count_non_finite_: the count must be one I32, got ",
             shape_str(count.shape()), " ", dtype_name(count.dtype()));
  int64_t elements = 0;
  for (const Tensor& x : tensors) {
    check_same_device(x, count, "count_non_finite_");
    MDFF_CHECK(is_floating(x.dtype()), "count_non_finite_: needs float tensors, got ", dtype_name(x.dtype()));
    MDFF_CHECK(x.dtype() == tensors.front().dtype(), "count_non_finite_: the tensors mix ",
               dtype_name(tensors.front().dtype()), " and ", dtype_name(x.dtype()));
    elements += x.numel();
  }
  MDFF_CHECK(elements <= INT32_MAX, "count_non_finite_: ", elements, " elements do not fit the I32 count");
  if (elements > 0) backend_of(count).count_non_finite(tensors, count);
}

}  // namespace mdff::ops
