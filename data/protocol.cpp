// Retrieval splits (see protocol.h): drawn from a seeded Fisher-Yates shuffle, written and read as text.
#include "data/protocol.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>

#include "core/error.h"
#include "core/rng.h"

namespace mdff::data {

namespace {
std::vector<int64_t> shuffled_rows(int64_t n, uint64_t seed) {
  std::vector<int64_t> rows(static_cast<size_t>(n));
  std::iota(rows.begin(), rows.end(), 0);
  Rng rng(seed);
  for (int64_t i = n - 1; i > 0; --i) std::swap(rows[i], rows[rng.below(static_cast<uint64_t>(i + 1))]);
  return rows;
}

// The class of a single-label row (its only 1).
int single_label(const Dataset& d, int64_t row) {
  const uint8_t* labels = d.label_row(row);
  const int64_t ones = std::count(labels, labels + d.classes, 1);
  MDFF_CHECK(ones == 1, d.name, ": image ", row, " has ", ones, " labels; a single-label dataset needs exactly one");
  return static_cast<int>(std::find(labels, labels + d.classes, 1) - labels);
}

Split single_label_split(const Dataset& d, bool train_in_database, uint64_t seed, const SplitSizes& sizes) {
  std::vector<int64_t> queries_taken(d.classes, 0), train_taken(d.classes, 0);
  Split split;
  for (int64_t row : shuffled_rows(d.size(), seed)) {
    const int c = single_label(d, row);
    if (queries_taken[c] < sizes.queries_per_class) {
      ++queries_taken[c];
      split.query.push_back(row);
      continue;
    }
    const bool is_train = train_taken[c] < sizes.train_per_class;
    if (is_train) {
      ++train_taken[c];
      split.train.push_back(row);
    }
    if (!is_train || train_in_database) split.database.push_back(row);
  }
  for (int c = 0; c < d.classes; ++c) {
    MDFF_CHECK(train_taken[c] == sizes.train_per_class, d.name, ": class ", c, " has only ",
               queries_taken[c] + train_taken[c], " images; the protocol takes ", sizes.queries_per_class,
               " queries and ", sizes.train_per_class,
               " training images from each class");
  }
  return split;
}

Split multi_label_split(const Dataset& d, uint64_t seed, const SplitSizes& sizes) {
  const int64_t n = d.size();
  MDFF_CHECK(n >= sizes.queries + sizes.train, d.name, ": ", n, " images are too few for the protocol, which takes ",
             sizes.queries, " queries and ", sizes.train, " training images (at least ", sizes.queries + sizes.train,
             " images); choose fewer with train_mdff's --queries and --train-images");
  const std::vector<int64_t> rows = shuffled_rows(n, seed);
  Split split;
  split.query.assign(rows.begin(), rows.begin() + sizes.queries);
  split.train.assign(rows.begin() + sizes.queries, rows.begin() + sizes.queries + sizes.train);
  split.database.assign(rows.begin() + sizes.queries, rows.end());
  return split;
}

std::string list_path(const std::string& dir, const char* name) { return dir + "/" + name + ".txt"; }
// The split's three lists, by name: the queries, the training images, the database.
constexpr const char* kSplitLists[] = {"query", "train", "database"};

std::vector<int64_t> read_rows(const std::string& path, int64_t dataset_size) {
  std::ifstream in(path);
  MDFF_CHECK(std::filesystem::exists(path) && in, path, ": cannot open the split file (no such file?)");
  std::vector<int64_t> rows;
  int64_t line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::istringstream fields(line);
    int64_t row;
    std::string rest;
    MDFF_CHECK((fields >> row) && !(fields >> rest), path, ":", line_number, ": '", line,
               "' is not a row number (one integer a line)");
    MDFF_CHECK(row >= 0 && row < dataset_size, path, ":", line_number, ": row ", row, " is outside the dataset (0..",
               dataset_size - 1, "); was the split made for another dataset?");
    MDFF_CHECK(rows.empty() || row > rows.back(), path, ":", line_number, ": row ", row,
               " is not greater than the row before it; a split file is sorted without repeats");
    rows.push_back(row);
  }
  MDFF_CHECK(!rows.empty(), path, ": the split file is empty");
  return rows;
}

// Whether two sorted lists share a row.
bool overlap(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  std::vector<int64_t> common;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(common));
  return !common.empty();
}
}  // namespace

Split make_split(const Dataset& dataset, const std::string& protocol, uint64_t seed, const SplitSizes& sizes) {
  MDFF_CHECK(sizes.queries_per_class >= 1 && sizes.train_per_class >= 1 && sizes.queries >= 1 && sizes.train >= 1,
             "make_split: every split size must be at least 1");
  MDFF_CHECK(protocol == "paper" || protocol == "deephash54k", "unknown protocol '", protocol,
             "'; the protocols are: paper, deephash54k");
  MDFF_CHECK(dataset.size() > 0, "make_split: the dataset ", dataset.name, " is empty");
  Split split;
  if (dataset.multi_label) {
    MDFF_CHECK(protocol == "paper", "protocol '", protocol, "' is for single-label datasets (CIFAR-10 style); ",
               dataset.name, " is multi-label: use the protocol 'paper'");
    split = multi_label_split(dataset, seed, sizes);
  } else {
    split = single_label_split(dataset, protocol == "paper", seed, sizes);
  }
  for (auto* list : {&split.query, &split.train, &split.database}) std::sort(list->begin(), list->end());
  return split;
}

void remove_split(const std::string& dir) {
  std::error_code ignored;  // a file that is not there, or a folder that is not empty, stays as it is
  for (const char* name : kSplitLists) std::filesystem::remove(list_path(dir, name), ignored);
  std::filesystem::remove(dir, ignored);
}

void write_split(const std::string& dir, const Split& split) {
  std::filesystem::create_directories(dir);
  const std::pair<const char*, const std::vector<int64_t>*> lists[] = {
      {kSplitLists[0], &split.query}, {kSplitLists[1], &split.train}, {kSplitLists[2], &split.database}};
  for (const auto& [name, rows] : lists) {
    const std::string path = list_path(dir, name);
    std::ofstream out(path);
    MDFF_CHECK(out, path, ": cannot open for writing");
    for (int64_t row : *rows) out << row << '\n';
    MDFF_CHECK(out.flush(), path, ": write error (disk full?)");
  }
}

Split read_split(const std::string& dir, int64_t dataset_size) {
  Split split{read_rows(list_path(dir, kSplitLists[0]), dataset_size),
              read_rows(list_path(dir, kSplitLists[1]), dataset_size),
              read_rows(list_path(dir, kSplitLists[2]), dataset_size)};
  MDFF_CHECK(!overlap(split.query, split.train), dir, ": a query is also a training image; the split is inconsistent");
  MDFF_CHECK(!overlap(split.query, split.database), dir,
             ": a query is also in the database; the split is inconsistent");
  return split;
}

}  // namespace mdff::data
