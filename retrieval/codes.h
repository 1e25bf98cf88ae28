// Binary hash codes packed into 64-bit words, their Hamming distances (popcount of XOR) and the Hamming
// ranking of a database for one query: ascending distance, ties by ascending database index, so a
// ranking is deterministic (method.md §6).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace mdff::retrieval {

// `count` codes of `bits` bits; code i occupies data[i*words, (i+1)*words), bit j of the code is bit
// j%64 of word j/64, and the unused high bits of the last word are 0.
struct PackedCodes {
  int bits = 0;
  int64_t count = 0;
  int words = 0;
  std::vector<uint64_t> data;  // (count, words)

  const uint64_t* code(int64_t i) const { return data.data() + i * words; }
};

// Throws when `codes` is inconsistent: bits < 1, words != ceil(bits / 64), or data not count x words.
// `what` names the codes in the message ("the query codes").
void check_codes(const PackedCodes& codes, const char* what);

// Packs the signs of u (N, L) (float32 or float64, any device: a CUDA tensor is copied to the host):
// bit j of code i is 1 when u[i, j] >= 0, the convention b = sign(u) with sign(0) = +1. A NaN is an error.
PackedCodes pack_codes(const Tensor& u);

// The codes as ±1 values, (count, bits) row-major: +1 for a set bit (the inverse of pack_codes).
std::vector<int8_t> unpack_codes(const PackedCodes& codes);

// The Hamming distance between code a of `as` and code b of `bs` (same bit count).
int hamming(const PackedCodes& as, int64_t a, const PackedCodes& bs, int64_t b);

// The Hamming distances (database.count) from query q of `queries` to every database code.
std::vector<int> distances(const PackedCodes& database, const PackedCodes& queries, int64_t q);

// Database indices ordered by ascending distance, ties by ascending index: a stable counting sort over
// the distances 0..bits, O(count + bits). Keeps the first top_k (all when top_k is -1 or beyond count).
std::vector<int32_t> order_by_distance(const std::vector<int>& distances, int bits, int64_t top_k = -1);

// The Hamming ranking of the database for query q: order_by_distance(distances(database, queries, q)).
std::vector<int32_t> rank(const PackedCodes& database, const PackedCodes& queries, int64_t q, int64_t top_k = -1);

}  // namespace mdff::retrieval
