// Placeholder until the layer kernels land: every call names the missing kernel.
#include "core/error.h"
#include "cuda/kernels.h"

namespace mdff::cuda {
void count_non_finite(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'count_non_finite' is not implemented on the cuda backend"); }
void pack_signs(const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'pack_signs' is not implemented on the cuda backend"); }
void hamming_distances(const Tensor&, const Tensor&, const Tensor&) { MDFF_FAIL("kernel 'hamming_distances' is not implemented on the cuda backend"); }
}  // namespace mdff::cuda
