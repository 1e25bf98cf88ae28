// Rng: the engine's deterministic random generator (xoshiro256** seeded through splitmix64), with its
// own uniform and normal transforms so that a seed gives the same numbers on every compiler and
// platform (std::normal_distribution does not). Used for initialisation, data order and augmentation.
#pragma once
#include <array>
#include <cstdint>

namespace mdff {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0);
  uint64_t next_u64();
  double uniform();                       // [0, 1) with 53 random bits
  double uniform(double low, double high);
  double normal();                        // N(0, 1) by Box-Muller
  uint64_t below(uint64_t n);             // uniform integer in [0, n), unbiased

  using State = std::array<uint64_t, 4>;  // everything needed to resume the sequence exactly
  State state() const { return s_; }
  void set_state(const State& s) { s_ = s; }

 private:
  State s_;
};

}  // namespace mdff
