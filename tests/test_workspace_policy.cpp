// Tests of the convolution workspace policy (core/workspace_policy.h) without a GPU: which two algorithms
// a plan keeps, and that a simulated training step's peak is not raised by a workspace after its first step.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <algorithm>
#include <vector>

#include "core/workspace_policy.h"

using namespace mdff;

namespace {
constexpr size_t MiB = size_t(1) << 20;
}

TEST_CASE("a plan keeps the fastest algorithm and the fastest lean one") {
  // workspace, milliseconds
  const std::vector<MeasuredAlgorithm> measured{{64 * MiB, 1.0f}, {0, 3.0f}, {2 * MiB, 2.0f}, {16 * MiB, 1.5f}};
  const AlgorithmPair pair = choose_fastest_and_lean(measured);
  CHECK(pair.fastest == 0);
  CHECK(pair.lean == 2);  // within 4 MiB and faster than the one needing none

  // The fastest is lean: both are the same.
  const AlgorithmPair same = choose_fastest_and_lean({{8 * MiB, 2.0f}, {MiB, 1.0f}});
  CHECK(same.fastest == 1);
  CHECK(same.lean == 1);

  // None is lean: the one needing the least workspace, the faster of two needing as much.
  const AlgorithmPair least = choose_fastest_and_lean({{64 * MiB, 1.0f}, {32 * MiB, 4.0f}, {32 * MiB, 3.0f}});
  CHECK(least.fastest == 0);
  CHECK(least.lean == 2);

  const AlgorithmPair none = choose_fastest_and_lean({});
  CHECK(none.fastest == -1);
  CHECK(none.lean == -1);
}

TEST_CASE("after the first step, a workspace fits only where it stays under the highest level seen") {
  WorkspaceHeadroom headroom;
  // The memory in use at each convolution of a step (MiB): it rises through the forward pass to its peak at
  // the start of backward, then falls as backward frees the activations.
  const std::vector<size_t> step{100, 400, 900, 1000, 950, 600, 200};
  const size_t workspace = 150 * MiB, lean = 1 * MiB;
  auto run_step = [&] {
    std::vector<bool> fastest;
    size_t peak = 0;
    for (size_t level : step) {
      const bool fits = headroom.fits(level * MiB, workspace);
      fastest.push_back(fits);
      peak = std::max(peak, level * MiB + (fits ? workspace : lean));
    }
    return std::make_pair(fastest, peak);
  };
  // The first step: the level rises at every call, so nothing fits until it falls.
  const auto [first, first_peak] = run_step();
  CHECK(first == std::vector<bool>{false, false, false, false, false, true, true});
  CHECK(headroom.mark() == 1000 * MiB);
  // Every later step: the fastest wherever 150 MiB more stays within 1000 MiB; the peak is the activations'
  // peak plus the lean workspace, not plus the fastest's.
  for (int repeat = 0; repeat < 2; ++repeat) {
    const auto [later, later_peak] = run_step();
    CHECK(later == std::vector<bool>{true, true, false, false, false, true, true});
    CHECK(later_peak == 1000 * MiB + lean);
    CHECK(later_peak == first_peak);
  }
  // A workspace of no bytes always fits.
  CHECK(headroom.fits(2000 * MiB, 0));
  CHECK(headroom.mark() == 2000 * MiB);
}

TEST_CASE("a call that takes no workspace (a 1x1 convolution on cuBLAS) still counts toward the mark") {
  WorkspaceHeadroom headroom;
  headroom.observe(100 * MiB);
  CHECK(headroom.mark() == 100 * MiB);
  // A later call at 60 MiB in use has 40 MiB under the mark that call set.
  CHECK(headroom.fits(60 * MiB, 40 * MiB));
  CHECK_FALSE(headroom.fits(60 * MiB, 40 * MiB + 1));
  headroom.observe(50 * MiB);  // lower: the mark stays
  CHECK(headroom.mark() == 100 * MiB);
}
