// CPU matrix products through OpenBLAS, loaded at run time.
//
// Why not link it: OpenBLAS chooses its kernels once, when the library loads, from the CPU model
// number, and Debian's 0.3.21 does not know recent Xeons (model 207 here): it falls back to its SSE3
// "Prescott" kernels, 18 GFLOP/s on this 2-core machine instead of 200 with its AVX-512 kernels.
// Loading it ourselves lets us name the kernel family from the CPU's features first
// (OPENBLAS_CORETYPE; a value the user set is kept). We load OpenBLAS's OpenMP build, so GEMM shares
// the engine's OpenMP threads instead of contending with a second pool for the same cores.
#pragma once
#include <string>

namespace mdff::blas {

// Row-major C (m,n) = alpha op(A) op(B) + beta C, with leading dimensions lda, ldb, ldc.
void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
          int ldb, float beta, float* c, int ldc);
void gemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
          int ldb, double beta, double* c, int ldc);

// "OpenBLAS 0.3.21 ... SkylakeX (kernels chosen by mdff from CPU features)", for logs and benchmarks.
std::string describe();

}  // namespace mdff::blas
