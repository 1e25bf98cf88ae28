// Run-time loading of OpenBLAS (see blas.h for why).
#include "core/blas.h"

#include <dlfcn.h>

#include <cstdlib>

#include "core/error.h"

#ifndef MDFF_OPENBLAS_LIBRARY
#define MDFF_OPENBLAS_LIBRARY "libopenblas.so.0"
#endif

namespace mdff::blas {

namespace {

// CBLAS's enum values (cblas.h), which are part of its ABI.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using Dgemm = void (*)(int, int, int, int, int, int, double, const double*, int, const double*, int, double, double*,
                       int);
using Text = char* (*)();

struct OpenBlas {
  Sgemm sgemm = nullptr;
  Dgemm dgemm = nullptr;
  Text corename = nullptr;
  Text config = nullptr;
  std::string chosen_by_mdff;  // the kernel family mdff asked for, empty if the user or OpenBLAS chose

  OpenBlas() {
    if (!std::getenv("OPENBLAS_CORETYPE")) {
      // OpenBLAS's own detection is right for the models it knows; we only name a family from features.
      __builtin_cpu_init();
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        chosen_by_mdff = "SkylakeX";
      else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        chosen_by_mdff = "Haswell";
      if (!chosen_by_mdff.empty()) setenv("OPENBLAS_CORETYPE", chosen_by_mdff.c_str(), 0);
    }
    void* lib = dlopen(MDFF_OPENBLAS_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    MDFF_CHECK(lib, "cannot load OpenBLAS (", MDFF_OPENBLAS_LIBRARY, "): ", dlerror(),
               ". Install Debian's libopenblas0-openmp (scripts/setup.sh does)");
    sgemm = reinterpret_cast<Sgemm>(dlsym(lib, "cblas_sgemm"));
    dgemm = reinterpret_cast<Dgemm>(dlsym(lib, "cblas_dgemm"));
    corename = reinterpret_cast<Text>(dlsym(lib, "openblas_get_corename"));
    config = reinterpret_cast<Text>(dlsym(lib, "openblas_get_config"));
    MDFF_CHECK(sgemm && dgemm, "the library loaded as OpenBLAS has no cblas_sgemm/cblas_dgemm");
  }
};

const OpenBlas& openblas() {
  static const OpenBlas instance;
  return instance;
}

int op(bool trans) { return trans ? kTrans : kNoTrans; }

}  // namespace

void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
          float beta, float* c, int ldc) {
  openblas().sgemm(kRowMajor, op(ta), op(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
          double beta, double* c, int ldc) {
  openblas().dgemm(kRowMajor, op(ta), op(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

std::string describe() {
  const OpenBlas& lib = openblas();
  std::string text = lib.config ? lib.config() : "OpenBLAS";
  if (lib.corename) text += std::string(", kernels: ") + lib.corename();
  if (!lib.chosen_by_mdff.empty()) text += " (chosen by mdff from the CPU's features)";
  return text;
}

}  // namespace mdff::blas
