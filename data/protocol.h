// Retrieval protocols (docs: /work/shared/guide/method.md section 5): which images are queries, which
// train the model, which form the database that queries search. Splits are drawn from a seed and can be
// written next to the results and read back, so a run can be repeated exactly.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace mdff::data {

// Row numbers into a Dataset, each list sorted ascending.
struct Split {
  std::vector<int64_t> query, train, database;
};

// How many images the protocol draws; the defaults are the paper's. Smaller sizes make quick runs and tests.
struct SplitSizes {
  int64_t queries_per_class = 100;  // single-label datasets (CIFAR-10, Fashion-MNIST): 1,000 queries for 10 classes
  int64_t train_per_class = 500;    //   5,000 training images
  int64_t queries = 5000;           // multi-label datasets (image lists: NUS-WIDE, MS-COCO)
  int64_t train = 10000;
};

// protocol "paper" (the default) or "deephash54k":
//  single-label, "paper":       100 per class -> queries; all the others -> database; 500 per class of the
//                               database -> training (training images stay in the database): 1,000 / 5,000 /
//                               59,000 for CIFAR-10 (69,000 for Fashion-MNIST).
//  single-label, "deephash54k": the same queries and training, training left out of the database (54,000).
//  multi-label, "paper":        5,000 random queries; 10,000 random training images from the rest; database =
//                               the rest, training included. ("deephash54k" is single-label only.)
// Deterministic from `seed` (mdff::Rng): the same seed gives the same split on every platform.
Split make_split(const Dataset& dataset, const std::string& protocol, uint64_t seed, const SplitSizes& sizes = {});

// query.txt, train.txt and database.txt in `dir` (created if needed), one row number a line.
void write_split(const std::string& dir, const Split& split);
// Removes the files write_split writes in `dir`, then `dir` if nothing else is left there (a run that
// failed before it started takes back what it wrote; other files in `dir` are left). For a `dir` that
// write_split made.
void remove_split(const std::string& dir);
// Reads a split written by write_split and checks it against a dataset of `dataset_size` images: row
// numbers in range, each list sorted without repeats, no query in the training set or the database.
Split read_split(const std::string& dir, int64_t dataset_size);

}  // namespace mdff::data
