// Packing codes into words, Hamming distances by popcount and the counting-sort ranking (see codes.h).
#include "retrieval/codes.h"

#include <cmath>
#include <limits>

#include "core/error.h"

namespace mdff::retrieval {

namespace {
constexpr int kWordBits = 64;

template <class T>
void pack_rows(const T* values, PackedCodes& codes) {
  for (int64_t i = 0; i < codes.count; ++i) {
    uint64_t* code = codes.data.data() + i * codes.words;
    for (int j = 0; j < codes.bits; ++j) {
      const T v = values[i * codes.bits + j];
      MDFF_CHECK(!std::isnan(v), "pack_codes: u[", i, ", ", j, "] is NaN, which has no sign; the codes come from a ",
                 "diverged model");
      if (v >= T(0)) code[j / kWordBits] |= uint64_t{1} << (j % kWordBits);
    }
  }
}

// Popcount of a XOR b over `words` words; the caller has checked indices and bit counts.
int hamming_words(const uint64_t* a, const uint64_t* b, int words) {
  int distance = 0;
  for (int w = 0; w < words; ++w) distance += __builtin_popcountll(a[w] ^ b[w]);
  return distance;
}

void check_index(const PackedCodes& codes, int64_t i, const char* what) {
  MDFF_CHECK(i >= 0 && i < codes.count, what, " index ", i, " is out of range: there are ", codes.count, " codes");
}
}  // namespace

void check_codes(const PackedCodes& codes, const char* what) {
  MDFF_CHECK(codes.bits >= 1 && codes.count >= 0, what, " are malformed: ", codes.count, " codes of ", codes.bits,
             " bits");
  MDFF_CHECK(codes.words == (codes.bits + kWordBits - 1) / kWordBits, what, " are malformed: ", codes.bits,
             "-bit codes need ", (codes.bits + kWordBits - 1) / kWordBits, " words, not ", codes.words);
  MDFF_CHECK(codes.data.size() == static_cast<size_t>(codes.count) * codes.words, what, " are malformed: ",
             codes.count, " codes of ", codes.words, " words need ", codes.count * codes.words, " words of data, not ",
             codes.data.size());
}

PackedCodes pack_codes(const Tensor& u) {
  check_defined(u, "pack_codes", "u");
  MDFF_CHECK(u.dim() == 2, "pack_codes: u must be (N, L), got shape ", shape_str(u.shape()));
  MDFF_CHECK(is_floating(u.dtype()), "pack_codes: u must be float32 or float64, got ", dtype_name(u.dtype()));
  MDFF_CHECK(u.size(1) >= 1 && u.size(1) <= std::numeric_limits<int>::max() - kWordBits,
             "pack_codes: the code length L = ", u.size(1), " is out of range");
  const Tensor host = u.cpu();
  PackedCodes codes;
  codes.bits = static_cast<int>(host.size(1));
  codes.count = host.size(0);
  codes.words = (codes.bits + kWordBits - 1) / kWordBits;
  codes.data.assign(static_cast<size_t>(codes.count * codes.words), 0);
  if (host.dtype() == DType::F32) {
    pack_rows(host.data<float>(), codes);
  } else {
    pack_rows(host.data<double>(), codes);
  }
  return codes;
}

std::vector<int8_t> unpack_codes(const PackedCodes& codes) {
  check_codes(codes, "unpack_codes: the codes");
  std::vector<int8_t> signs(static_cast<size_t>(codes.count * codes.bits));
  for (int64_t i = 0; i < codes.count; ++i) {
    const uint64_t* code = codes.code(i);
    for (int j = 0; j < codes.bits; ++j) {
      const bool set = (code[j / kWordBits] >> (j % kWordBits)) & 1;
      signs[i * codes.bits + j] = set ? 1 : -1;
    }
  }
  return signs;
}

int hamming(const PackedCodes& as, int64_t a, const PackedCodes& bs, int64_t b) {
  check_codes(as, "hamming: the first codes");
  check_codes(bs, "hamming: the second codes");
  MDFF_CHECK(as.bits == bs.bits, "hamming: the codes have different lengths (", as.bits, " and ", bs.bits, " bits)");
  check_index(as, a, "hamming: the first code's");
  check_index(bs, b, "hamming: the second code's");
  return hamming_words(as.code(a), bs.code(b), as.words);
}

std::vector<int> distances(const PackedCodes& database, const PackedCodes& queries, int64_t q) {
  check_codes(database, "distances: the database codes");
  check_codes(queries, "distances: the query codes");
  MDFF_CHECK(database.bits == queries.bits, "distances: the database codes have ", database.bits,
             " bits but the query codes have ", queries.bits);
  check_index(queries, q, "distances: the query");
  const uint64_t* query = queries.code(q);
  std::vector<int> result(static_cast<size_t>(database.count));
  for (int64_t i = 0; i < database.count; ++i) result[i] = hamming_words(query, database.code(i), database.words);
  return result;
}

std::vector<int32_t> order_by_distance(const std::vector<int>& distances, int bits, int64_t top_k) {
  const int64_t count = static_cast<int64_t>(distances.size());
  MDFF_CHECK(count <= std::numeric_limits<int32_t>::max(), "order_by_distance: ", count,
             " database items do not fit the int32 indices of a ranking");
  MDFF_CHECK(top_k >= -1, "order_by_distance: top_k must be -1 (all) or a count, got ", top_k);
  // first[d]: the ranking position of the first item at distance d (a prefix sum of the histogram).
  std::vector<int64_t> first(static_cast<size_t>(bits) + 2, 0);
  for (int d : distances) {
    MDFF_CHECK(d >= 0 && d <= bits, "order_by_distance: distance ", d, " is outside 0..", bits);
    ++first[d + 1];
  }
  for (int d = 0; d <= bits; ++d) first[d + 1] += first[d];
  // Only the first `keep` positions are written, so a short top k costs the pass over the distances alone.
  const int64_t keep = top_k >= 0 && top_k < count ? top_k : count;
  std::vector<int32_t> order(static_cast<size_t>(keep));
  for (int32_t i = 0; i < count; ++i) {  // ascending i: ties stay in index order
    const int64_t position = first[distances[i]]++;
    if (position < keep) order[position] = i;
  }
  return order;
}

std::vector<int32_t> rank(const PackedCodes& database, const PackedCodes& queries, int64_t q, int64_t top_k) {
  return order_by_distance(distances(database, queries, q), database.bits, top_k);
}

}  // namespace mdff::retrieval
