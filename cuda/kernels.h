// The hand-written CUDA kernels, one function per Backend method (core/backend.h documents each
// contract; the CPU twin in core/ is the reference). Each function checks dtypes and shapes, picks the
// kernel for the dtype and queues it on stream(). Defined in elementwise.cu.
#pragma once
#include "core/backend.h"

namespace mdff::cuda {

void fill(const Tensor& out, double value);  // F32, F64 and I32
void cast(const Tensor& src, const Tensor& dst);  // F32 <-> F64, or a copy when the dtypes match
void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out);  // writes, broadcasting
void scale(const Tensor& x, double alpha, const Tensor& out);                   // writes out = alpha * x
void unary(UnaryOp op, const Tensor& x, const Tensor& out);                     // writes
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& grad_y,
                    const Tensor& grad_x);                                       // writes grad_x
void sum_to(const Tensor& src, const Tensor& out);                              // writes

}  // namespace mdff::cuda
