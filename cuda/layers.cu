// Placeholder until the layer kernels land: every call names the missing kernel.
#include "core/error.h"
#include "cuda/kernels.h"

namespace mdff::cuda {
void batch_norm_forward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double, double, const Tensor&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'batch_norm_forward' is not implemented on the cuda backend"); }
void batch_norm_backward(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, const Tensor&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'batch_norm_backward' is not implemented on the cuda backend"); }
void max_pool2d_forward(const Tensor&, const Pool2dParams&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'max_pool2d_forward' is not implemented on the cuda backend"); }
void max_pool2d_backward(const Tensor&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'max_pool2d_backward' is not implemented on the cuda backend"); }
void global_avg_pool_forward(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'global_avg_pool_forward' is not implemented on the cuda backend"); }
void global_avg_pool_backward(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'global_avg_pool_backward' is not implemented on the cuda backend"); }
void upsample_nearest_forward(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'upsample_nearest_forward' is not implemented on the cuda backend"); }
void upsample_nearest_backward(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'upsample_nearest_backward' is not implemented on the cuda backend"); }
void resize_bilinear(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'resize_bilinear' is not implemented on the cuda backend"); }
void copy_block(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t, bool) { MDFF_FAIL("kernel 'copy_block' is not implemented on the cuda backend"); }
void log_softmax_forward(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'log_softmax_forward' is not implemented on the cuda backend"); }
void log_softmax_backward(const Tensor&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'log_softmax_backward' is not implemented on the cuda backend"); }
void gather_rows(const Tensor&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'gather_rows' is not implemented on the cuda backend"); }
void scatter_rows(const Tensor&, const Tensor&, const Tensor&, bool) { MDFF_FAIL("kernel 'scatter_rows' is not implemented on the cuda backend"); }
void rmsprop_step(const Tensor&, const Tensor&, const Tensor&, double, double, double, double) { MDFF_FAIL("kernel 'rmsprop_step' is not implemented on the cuda backend"); }
void sgd_step(const Tensor&, const Tensor&, const Tensor&, double, double, double, bool) { MDFF_FAIL("kernel 'sgd_step' is not implemented on the cuda backend"); }
void check_device_errors() {}
}  // namespace mdff::cuda
