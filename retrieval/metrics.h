// The retrieval metrics of method.md §6 over the Hamming ranking of packed codes: mAP@K, P@N, the
// precision-recall curve by Hamming radius and P@H<=2. A database item is relevant to a query when their
// multi-hot label rows share at least one label.
#pragma once
#include <cstdint>
#include <vector>

#include "retrieval/codes.h"

namespace mdff::retrieval {

struct RetrievalMetrics {
  double map = 0;      // mAP@map_at, averaged over every query (a query with no relevant item in the top K scores 0)
  int64_t map_at = 0;  // K: the database size for mAP@ALL
  std::vector<int> pn_at;                // the N of each P@N, as given
  std::vector<double> precision_at_n;    // [j]: precision of the top pn_at[j], averaged over queries
  std::vector<double> pr_precision;      // [r], r = 0..bits: precision within Hamming radius r (0 if nothing inside)
  std::vector<double> pr_recall;         // [r]: recall within radius r (0 for a query with no relevant item at all)
  double precision_h2 = 0;               // pr_precision[2]: P@H<=2 (pr_precision[1] for 1-bit codes)
  double empty_share_h2 = 0;             // the share of queries that retrieved nothing within radius 2
};

// N = 1, 2, ..., min(1000, database_count): the P@N curve of the paper.
std::vector<int> default_pn_at(int64_t database_count);

// Evaluates the queries against the database, per method.md §6. Labels are multi-hot rows of 0/1
// bytes: query_labels (queries.count, classes) and database_labels (database.count, classes), row-major.
//   AP = (1/R) sum over ranks k <= K whose item is relevant of P@k, with R the relevant items in the top K;
//   mAP is the mean over all queries, those with R = 0 counting as 0.
// map_at: K, -1 for mAP@ALL (K = database.count), otherwise 1..database.count.
// pn_at: the N of P@N, each in 1..database.count (default_pn_at gives the paper's curve).
// The ranking is ascending Hamming distance with ties by database index. Runs in parallel over queries
// (OpenMP), O(database.count + bits) per query; the result does not depend on the thread count.
RetrievalMetrics evaluate(const PackedCodes& queries, const std::vector<uint8_t>& query_labels,
                          const PackedCodes& database, const std::vector<uint8_t>& database_labels, int classes,
                          int64_t map_at, const std::vector<int>& pn_at);

}  // namespace mdff::retrieval
