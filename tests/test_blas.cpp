// OpenBLAS as mdff loads it (core/blas.h chooses its kernel family from CPU features): GEMM against a
// naive triple loop, every transpose combination, odd sizes, alpha/beta, float and double.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <cmath>
#include <tuple>
#include <vector>

#include "core/blas.h"
#include "core/rng.h"

using namespace mdff;

namespace {
template <class T>
void check_gemm(bool ta, bool tb, int m, int n, int k, T alpha, T beta, double tolerance) {
  Rng rng(static_cast<uint64_t>(m * 10007 + n * 101 + k));
  const int lda = ta ? m : k, ldb = tb ? k : n;
  std::vector<T> a(static_cast<size_t>(m) * k), b(static_cast<size_t>(k) * n), c(static_cast<size_t>(m) * n);
  for (T& v : a) v = static_cast<T>(rng.normal());
  for (T& v : b) v = static_cast<T>(rng.normal());
  for (T& v : c) v = static_cast<T>(rng.normal());
  std::vector<T> expected = c;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double dot = 0;
      for (int p = 0; p < k; ++p) dot += double(ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      expected[i * n + j] = static_cast<T>(alpha * dot + beta * double(c[i * n + j]));
    }
  blas::gemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), n);
  double worst = 0;
  for (size_t i = 0; i < c.size(); ++i) worst = std::max(worst, std::abs(double(c[i]) - expected[i]) / std::sqrt(double(k)));
  CHECK_MESSAGE(worst < tolerance, "ta=", ta, " tb=", tb, " m=", m, " n=", n, " k=", k, " error ", worst);
}
}  // namespace

TEST_CASE("OpenBLAS GEMM as loaded by mdff matches a naive product") {
  MESSAGE(blas::describe());
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [m, n, k] : {std::tuple{1, 1, 1}, {7, 13, 5}, {64, 33, 129}, {257, 100, 96}, {3, 500, 2048}}) {
        check_gemm<float>(ta, tb, m, n, k, 1.0f, 0.0f, 1e-5);
        check_gemm<float>(ta, tb, m, n, k, -0.5f, 2.0f, 1e-5);
        check_gemm<double>(ta, tb, m, n, k, 1.5, 1.0, 1e-13);
      }
}
