// Convolutions on the GPU through cuDNN 9 (NCHW): forward, backward-data and backward-filter, with the
// algorithms chosen once per shape and cached (the fastest, and a lean one for the moments when memory is
// at its peak), each call's workspace from the caching allocator, and TF32 tensor-core math while
// mdff::tf32_allowed() (core/backend.h). A 1x1 convolution of stride 1 without padding is a matrix
// product per image: for those, each product also goes through cuBLAS where that measured faster.
// The contracts are Backend::conv2d_forward / conv2d_backward.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/backend.h"

namespace mdff::cuda {

void conv2d_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, const Conv2dParams& p, const Tensor& y);
// Writes each defined gradient.
void conv2d_backward(const Tensor& x, const Tensor& weight, const Tensor& grad_y, const Conv2dParams& p,
                     const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias);

// Which library runs the products of a 1x1 convolution of stride 1 without padding (the others always go to
// cuDNN). Measured, the default: the one that ran faster when the product was first called on a route other
// than Cudnn (cuBLAS's GEMMs and cuDNN's fastest algorithm, each timed the same way on that call's tensors).
// Cudnn and Cublas: always that one (the tests prove both routes; bench_conv times both); on Cudnn nothing
// runs on cuBLAS, timings included. The environment sets the first route: MDFF_CONV_1X1=measured|cudnn|cublas.
enum class Conv1x1Route { Measured, Cudnn, Cublas };
void set_conv1x1_route(Conv1x1Route route);
Conv1x1Route conv1x1_route();

struct ConvStats {
  int64_t cached_plans = 0;      // (shape, dtype, precision) entries in the algorithm cache
  int64_t algorithm_searches = 0;  // cache misses: times an algorithm was chosen
  size_t largest_workspace_bytes = 0;  // the most workspace a plan's fastest cuDNN algorithm takes while it runs
  int64_t plans_with_lean_variant = 0;  // plans whose lean algorithm needs less workspace than their fastest
  int64_t lean_calls = 0;  // calls that ran the lean algorithm: the fastest's workspace would have raised the
                           // mark, or did not fit in the device's memory
  size_t memory_mark_bytes = 0;  // the highest memory in use seen at a convolution call of a pass that records
                                 // a graph (core/workspace_policy.h)
  size_t inference_mark_bytes = 0;  // the same, at the forward calls of passes that record none (encoding)
  int64_t plans_timed_on_cublas = 0;  // plans of 1x1 stride-1 products timed on cuBLAS and cuDNN (Measured)
  int64_t plans_faster_on_cublas = 0;  // of those, the ones where cuBLAS ran faster than cuDNN's fastest
  int64_t cublas_calls = 0;  // calls that ran through cuBLAS (Conv1x1Route)
};
ConvStats conv_stats();
// Starts both memory marks (ConvStats) again from nothing, for a test that lifted them.
void reset_conv_memory_mark();

}  // namespace mdff::cuda
