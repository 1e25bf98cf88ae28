// mAP@K, P@N, precision-recall by Hamming radius and P@H<=2 (see metrics.h): each query's ranking is a
// counting sort of its distances; per-query counts are reduced in query order, so results are
// deterministic whatever the number of threads.
#include "retrieval/metrics.h"

#include <algorithm>

#include "core/error.h"

namespace mdff::retrieval {

namespace {
constexpr int kWordBits = 64;

// Multi-hot label rows packed into bit masks: row i is words [i*words, (i+1)*words).
struct LabelMasks {
  int words = 0;
  std::vector<uint64_t> bits;  // (rows, words)

  bool share_a_label(const LabelMasks& other, int64_t row, int64_t other_row) const {
    for (int w = 0; w < words; ++w) {
      if (bits[row * words + w] & other.bits[other_row * words + w]) return true;
    }
    return false;
  }
};

LabelMasks pack_labels(const std::vector<uint8_t>& labels, int64_t rows, int classes, const char* what) {
  MDFF_CHECK(labels.size() == static_cast<size_t>(rows) * classes, "evaluate: ", what, " hold ", labels.size(),
             " values, but ", rows, " codes x ", classes, " classes need ", rows * classes);
  LabelMasks masks;
  masks.words = (classes + kWordBits - 1) / kWordBits;
  masks.bits.assign(static_cast<size_t>(rows) * masks.words, 0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int c = 0; c < classes; ++c) {
      const uint8_t value = labels[i * classes + c];
      MDFF_CHECK(value <= 1, "evaluate: ", what, " must be multi-hot 0/1, but row ", i, ", class ", c, " is ",
                 static_cast<int>(value));
      if (value) masks.bits[i * masks.words + c / kWordBits] |= uint64_t{1} << (c % kWordBits);
    }
  }
  return masks;
}
}  // namespace

std::vector<int> default_pn_at(int64_t database_count) {
  std::vector<int> n(static_cast<size_t>(std::clamp<int64_t>(database_count, 0, 1000)));
  for (size_t i = 0; i < n.size(); ++i) n[i] = static_cast<int>(i) + 1;
  return n;
}

RetrievalMetrics evaluate(const PackedCodes& queries, const std::vector<uint8_t>& query_labels,
                          const PackedCodes& database, const std::vector<uint8_t>& database_labels, int classes,
                          int64_t map_at, const std::vector<int>& pn_at) {
  check_codes(queries, "evaluate: the query codes");
  check_codes(database, "evaluate: the database codes");
  MDFF_CHECK(queries.bits == database.bits, "evaluate: the query codes have ", queries.bits,
             " bits but the database codes have ", database.bits);
  MDFF_CHECK(queries.count >= 1, "evaluate: there are no queries");
  MDFF_CHECK(database.count >= 1, "evaluate: the database is empty");
  MDFF_CHECK(classes >= 1, "evaluate: classes must be at least 1, got ", classes);
  const int64_t n = database.count;
  MDFF_CHECK(map_at == -1 || (map_at >= 1 && map_at <= n), "evaluate: map_at = ", map_at,
             " must be -1 (mAP@ALL) or between 1 and the database size ", n);
  for (int at : pn_at) {
    MDFF_CHECK(at >= 1 && at <= n, "evaluate: P@N needs 1 <= N <= the database size ", n, ", got N = ", at);
  }
  const LabelMasks query_masks = pack_labels(query_labels, queries.count, classes, "the query labels");
  const LabelMasks database_masks = pack_labels(database_labels, n, classes, "the database labels");

  const int64_t top_k = map_at == -1 ? n : map_at;
  const int max_n = pn_at.empty() ? 0 : *std::max_element(pn_at.begin(), pn_at.end());
  const int64_t walk = std::max<int64_t>(top_k, max_n);  // ranking positions each query looks at
  const int bits = database.bits;
  const int64_t q_count = queries.count;
  const size_t radii = static_cast<size_t>(bits) + 1;

  // Per-query results, reduced in query order below.
  std::vector<double> average_precision(q_count);
  std::vector<int64_t> hits_at_n(q_count * pn_at.size());       // (queries, pn_at): relevant items in the top N
  std::vector<int64_t> retrieved_within(q_count * radii);       // (queries, radii): items at distance <= r
  std::vector<int64_t> relevant_within(q_count * radii);        // (queries, radii): relevant items at distance <= r
  std::vector<int64_t> relevant_total(q_count);                 // relevant items in the whole database

#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t q = 0; q < q_count; ++q) {
    const std::vector<int> distance = distances(database, queries, q);
    std::vector<uint8_t> relevant(static_cast<size_t>(n));
    int64_t* retrieved = &retrieved_within[q * radii];
    int64_t* relevant_r = &relevant_within[q * radii];
    for (int64_t i = 0; i < n; ++i) {
      relevant[i] = query_masks.share_a_label(database_masks, q, i);
      ++retrieved[distance[i]];
      relevant_r[distance[i]] += relevant[i];
    }
    for (size_t r = 1; r < radii; ++r) {
      retrieved[r] += retrieved[r - 1];
      relevant_r[r] += relevant_r[r - 1];
    }
    relevant_total[q] = relevant_r[bits];

    // Walk the ranking once, counting the relevant items among the first k.
    const std::vector<int32_t> order = order_by_distance(distance, bits, walk);
    std::vector<int64_t> hits_upto(static_cast<size_t>(max_n) + 1, 0);  // [k] for k <= max_n
    int64_t hits = 0, relevant_in_top_k = 0;
    double precision_sum = 0;  // sum of P@k over the relevant ranks k <= top_k
    for (int64_t k = 1; k <= walk; ++k) {
      const bool hit = relevant[order[k - 1]];
      hits += hit;
      if (k <= max_n) hits_upto[k] = hits;
      if (k == top_k) relevant_in_top_k = hits;
      if (hit && k <= top_k) precision_sum += static_cast<double>(hits) / static_cast<double>(k);
    }
    average_precision[q] = relevant_in_top_k > 0 ? precision_sum / static_cast<double>(relevant_in_top_k) : 0.0;
    for (size_t j = 0; j < pn_at.size(); ++j) hits_at_n[q * pn_at.size() + j] = hits_upto[pn_at[j]];
  }

  RetrievalMetrics result;
  result.map_at = top_k;
  result.pn_at = pn_at;
  result.precision_at_n.assign(pn_at.size(), 0.0);
  result.pr_precision.assign(radii, 0.0);
  result.pr_recall.assign(radii, 0.0);
  const size_t h2 = std::min<size_t>(2, bits);  // radius 2 (1-bit codes: every item is within radius 1)
  int64_t empty_h2 = 0;
  for (int64_t q = 0; q < q_count; ++q) {
    result.map += average_precision[q];
    for (size_t j = 0; j < pn_at.size(); ++j) {
      result.precision_at_n[j] += static_cast<double>(hits_at_n[q * pn_at.size() + j]) / pn_at[j];
    }
    for (size_t r = 0; r < radii; ++r) {
      const int64_t retrieved = retrieved_within[q * radii + r];
      const int64_t hits = relevant_within[q * radii + r];
      if (retrieved > 0) result.pr_precision[r] += static_cast<double>(hits) / static_cast<double>(retrieved);
      if (relevant_total[q] > 0) result.pr_recall[r] += static_cast<double>(hits) / static_cast<double>(relevant_total[q]);
    }
    empty_h2 += retrieved_within[q * radii + h2] == 0;
  }
  const double queries_d = static_cast<double>(q_count);
  result.map /= queries_d;
  for (double& p : result.precision_at_n) p /= queries_d;
  for (double& p : result.pr_precision) p /= queries_d;
  for (double& r : result.pr_recall) r /= queries_d;
  result.precision_h2 = result.pr_precision[h2];
  result.empty_share_h2 = static_cast<double>(empty_h2) / queries_d;
  return result;
}

}  // namespace mdff::retrieval
