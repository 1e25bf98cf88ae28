// Placeholder until the cuDNN convolutions land (cuda/conv.h): every call names the missing kernel.
#include "cuda/conv.h"

#include "core/error.h"

namespace mdff::cuda {
void conv2d_forward(const Tensor&, const Tensor&, const Tensor&, const Conv2dParams&, const Tensor&) {
  MDFF_FAIL("kernel 'conv2d_forward' is not implemented on the cuda backend");
}
void conv2d_backward(const Tensor&, const Tensor&, const Tensor&, const Conv2dParams&, const Tensor&, const Tensor&,
                     const Tensor&) {
  MDFF_FAIL("kernel 'conv2d_backward' is not implemented on the cuda backend");
}
ConvStats conv_stats() { return {}; }
}  // namespace mdff::cuda
