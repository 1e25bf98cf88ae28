// A code database: the binary codes of a collection of images with their paths, optional labels and
// the checkpoint that encoded them (written by `mdff_search index`, searched by `mdff_search query`), and
// the Hamming search over it. The file is safetensors, so Python reads it with the `safetensors` package
// (framework="numpy") or tools/safetensors_io.py:
//
//   codes         I64 (count, words)  the packed codes, PackedCodes::data: each 64-bit word's bits stored as
//                                     an int64 (NumPy: .view(np.uint64)); bit j of a code is bit j % 64 of
//                                     word j / 64, and bits from `bits` up in the last word are 0
//   path_offsets  I64 (count + 1)     0 = o[0] <= o[1] <= ... <= o[count] = len(path_bytes)
//   path_bytes    U8 (o[count])       the paths, concatenated: image i is path_bytes[o[i]:o[i+1]] (UTF-8 as
//                                     the file system gives it)
//   labels        U8 (count, K)       optional: multi-hot labels, each 0 or 1
//   metadata      format "mdff-code-db", version "1", bits (the code length), checkpoint (its absolute
//                 path) and checkpoint_crc32 (8 hex digits, to recognise the same weights later)
//
// The paths are tensors rather than metadata because metadata is one JSON header, which readers parse
// whole and cap at 100 MB (a million paths come close), and JSON strings must be valid UTF-8 while file
// names need not be.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "retrieval/codes.h"

namespace mdff::retrieval {

struct CodeDatabase {
  PackedCodes codes;               // (count, words)
  std::vector<std::string> paths;  // (count)
  int classes = 0;                 // K; 0 when there are no labels
  std::vector<uint8_t> labels;     // (count, K) multi-hot; empty when classes is 0
  std::string checkpoint;          // the checkpoint the codes came from
  std::string checkpoint_crc32;    // file_crc32(checkpoint) when the codes were made
};

// Writes `db` to `path` (atomically); an inconsistent database (counts that disagree, labels other than
// 0 and 1) is an error and writes nothing.
void write_code_database(const std::string& path, const CodeDatabase& db);

// Reads and checks a database file: every tensor and metadata key above, the counts agreeing, the codes
// fitting their words, the path offsets and the labels. Each violation is an mdff::Error naming the file.
CodeDatabase read_code_database(const std::string& path);

// The CRC-32 of a file's bytes as 8 lowercase hex digits (zlib's crc32).
std::string file_crc32(const std::string& path);

// A database item found for a query.
struct Match {
  int32_t index;  // into the database
  int distance;   // Hamming distance to the query
};

// The top_k database items nearest query q (all when top_k >= database.count), in ranking order:
// ascending distance, ties by ascending index (retrieval::rank).
std::vector<Match> nearest(const PackedCodes& database, const PackedCodes& queries, int64_t q, int64_t top_k);

// Every database item within Hamming distance `radius` (>= 0) of query q, in ranking order.
std::vector<Match> within_radius(const PackedCodes& database, const PackedCodes& queries, int64_t q, int radius);

// nearest() for every query, ranked on `device`: one query per warp on the GPU (ops::hamming_top_k),
// the same ranking as the CPU's. [q] holds query q's matches.
std::vector<std::vector<Match>> nearest_all(const PackedCodes& database, const PackedCodes& queries, int64_t top_k,
                                            Device device);

// The codes as an I32 tensor (count, 2 words) on the CPU, each 64-bit word as its low then its high
// 32 bits: the layout ops::hamming_distances and ops::hamming_top_k read (the distances are unchanged).
Tensor codes_tensor(const PackedCodes& codes);

}  // namespace mdff::retrieval
