// Retrieval splits (data/protocol.h) on label-only datasets of the real sizes: the sizes and per-class
// counts of each protocol, which lists overlap, reproducibility from the seed, and the split files'
// round trip and validation.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "data/protocol.h"

using namespace mdff;
using namespace mdff::data;
namespace fs = std::filesystem;

namespace {
// n single-label images (no pixels: splits need only labels), image i in class i % 10.
Dataset single_label(int64_t n) {
  Dataset d;
  d.name = "single";
  d.classes = 10;
  d.class_names.assign(10, "c");
  d.labels.assign(static_cast<size_t>(n * 10), 0);
  for (int64_t i = 0; i < n; ++i) d.labels[i * 10 + i % 10] = 1;
  return d;
}

// n multi-label images over 5 classes, each with one to five random labels.
Dataset multi_label(int64_t n) {
  Dataset d;
  d.name = "multi";
  d.classes = 5;
  d.multi_label = true;
  Rng rng(99);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t bits = 1 + rng.below(31);
    for (int k = 0; k < 5; ++k) d.labels.push_back((bits >> k) & 1);
  }
  return d;
}

std::vector<int64_t> per_class(const Dataset& d, const std::vector<int64_t>& rows) {
  std::vector<int64_t> counts(d.classes, 0);
  for (int64_t r : rows) {
    for (int k = 0; k < d.classes; ++k) counts[k] += d.label_row(r)[k];
  }
  return counts;
}

bool sorted_unique(const std::vector<int64_t>& rows) {
  return std::adjacent_find(rows.begin(), rows.end(), std::greater_equal<>()) == rows.end();
}

std::vector<int64_t> common(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  std::vector<int64_t> both;
  std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
  return both;
}

std::vector<int64_t> merged(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  std::vector<int64_t> all;
  std::set_union(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(all));
  return all;
}

std::string temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("mdff_test_data_protocol_" + name);
  fs::remove_all(dir);
  return dir.string();
}
}  // namespace

TEST_CASE("paper protocol, CIFAR-10 sizes: 1,000 queries, 5,000 training inside the 59,000 database") {
  const Dataset d = single_label(60000);
  const Split s = make_split(d, "paper", 1);
  CHECK(s.query.size() == 1000);
  CHECK(s.train.size() == 5000);
  CHECK(s.database.size() == 59000);
  CHECK(per_class(d, s.query) == std::vector<int64_t>(10, 100));
  CHECK(per_class(d, s.train) == std::vector<int64_t>(10, 500));
  for (const auto* list : {&s.query, &s.train, &s.database}) CHECK(sorted_unique(*list));
  CHECK(common(s.query, s.train).empty());
  CHECK(common(s.query, s.database).empty());
  CHECK(common(s.train, s.database) == s.train);       // training images stay in the database
  CHECK(merged(s.query, s.database).size() == 60000);  // every image is a query or in the database

  CHECK(make_split(single_label(70000), "paper", 1).database.size() == 69000);  // Fashion-MNIST
}

TEST_CASE("deephash54k protocol: the same queries and training, training left out of the database") {
  const Dataset d = single_label(60000);
  const Split paper = make_split(d, "paper", 5);
  const Split s = make_split(d, "deephash54k", 5);
  CHECK(s.query == paper.query);
  CHECK(s.train == paper.train);
  CHECK(s.database.size() == 54000);
  CHECK(common(s.train, s.database).empty());
  CHECK(common(s.query, s.database).empty());
  CHECK(merged(merged(s.query, s.train), s.database).size() == 60000);
}

TEST_CASE("splits are reproducible from the seed and differ between seeds") {
  const Dataset d = single_label(60000);
  const Split a = make_split(d, "paper", 42), b = make_split(d, "paper", 42), c = make_split(d, "paper", 43);
  CHECK(a.query == b.query);
  CHECK(a.train == b.train);
  CHECK(a.database == b.database);
  CHECK(a.query != c.query);
  CHECK(a.train != c.train);
}

TEST_CASE("multi-label protocol: 5,000 random queries, 10,000 training from the rest, database = the rest") {
  const Dataset d = multi_label(20000);
  const Split s = make_split(d, "paper", 3);
  CHECK(s.query.size() == 5000);
  CHECK(s.train.size() == 10000);
  CHECK(s.database.size() == 15000);
  for (const auto* list : {&s.query, &s.train, &s.database}) CHECK(sorted_unique(*list));
  CHECK(common(s.query, s.database).empty());
  CHECK(common(s.train, s.database) == s.train);
  CHECK(make_split(d, "paper", 3).query == s.query);
  CHECK(make_split(d, "paper", 4).query != s.query);
  CHECK_THROWS_WITH_AS(make_split(multi_label(14999), "paper", 0),
                       doctest::Contains("14999 images are too few for the protocol, which takes 5000 queries and 10000 training images "
                                         "(at least 15000 images); choose fewer with train_mdff's --queries and "
                                         "--train-images"), Error);
  CHECK_THROWS_WITH_AS(make_split(d, "deephash54k", 0), doctest::Contains("multi-label: use the protocol 'paper'"),
                       Error);
}

TEST_CASE("splits: unknown protocols, small classes and non single-label data are clear errors") {
  const Dataset d = single_label(60000);
  CHECK_THROWS_WITH_AS(make_split(d, "cifar", 0),
                       doctest::Contains("unknown protocol 'cifar'; the protocols are: paper, "
                                         "deephash54k"),
                       Error);
  Dataset small = single_label(6000);
  small.labels[3 * 10 + 3] = 0;  // class 3 loses one image
  small.labels[3 * 10 + 4] = 1;
  CHECK_THROWS_WITH_AS(make_split(small, "paper", 0), doctest::Contains("class 3 has only 599 images"), Error);
  small.labels[3 * 10 + 3] = 1;  // image 3 now has two labels
  CHECK_THROWS_WITH_AS(make_split(small, "paper", 0), doctest::Contains("image 3 has 2 labels"), Error);
}

TEST_CASE("write_split and read_split: round trip and validation") {
  const Dataset d = single_label(7000);
  const Split s = make_split(d, "paper", 8);
  const std::string dir = temp_dir("round_trip");
  write_split(dir, s);
  const Split back = read_split(dir, d.size());
  CHECK(back.query == s.query);
  CHECK(back.train == s.train);
  CHECK(back.database == s.database);

  auto write = [&](const char* name, const std::string& text) { std::ofstream(dir + "/" + name + ".txt") << text; };
  CHECK_THROWS_WITH_AS(read_split(dir, 100), doctest::Contains("is outside the dataset (0..99)"), Error);
  write("query", "1\n2x\n");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("query.txt:2: '2x' is not a row number"), Error);
  write("query", "5\n3\n");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("query.txt:2: row 3 is not greater"), Error);
  write("query", "3\n3\n");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("query.txt:2: row 3 is not greater"), Error);
  write("query", "\n");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("query.txt: the split file is empty"), Error);
  write("query", std::to_string(s.train[0]) + "\n");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("a query is also a training image"), Error);
  const auto database_only = std::find_if(s.database.begin(), s.database.end(), [&](int64_t r) {
    return !std::binary_search(s.train.begin(), s.train.end(), r);
  });
  REQUIRE(database_only != s.database.end());
  write("query", std::to_string(*database_only) + "\n");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("a query is also in the database"), Error);
  fs::remove(dir + "/train.txt");
  CHECK_THROWS_WITH_AS(read_split(dir, d.size()), doctest::Contains("train.txt: cannot open"), Error);
}
