// The retrieval module: code packing (sign(0) = +1), Hamming ranking with ties by index, the metrics of
// method.md §6 on hand-computed cases (mAP@K with R = 0 queries, P@N, precision-recall by radius,
// P@H<=2 with an empty query, multi-label relevance) and against a plain O(n log n) reference on random
// data, .npy round trips and corrupt files, SVG plots and the PNG retrieval grid.
#include <doctest/doctest.h>
#include "tests/doctest_text.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "retrieval/codes.h"
#include "retrieval/grid.h"
#include "retrieval/metrics.h"
#include "retrieval/npy.h"
#include "retrieval/plots.h"

// stb_image reads the PNG back; static so it cannot clash with another stb user linked into the test.
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC
#define STBI_ONLY_PNG
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb/stb_image.h>
#pragma GCC diagnostic pop

using namespace mdff;
using namespace mdff::retrieval;

namespace {
std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("mdff_test_retrieval_" + name)).string();
}

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// Codes from ±1 rows (a zero counts as +1).
PackedCodes codes_from_signs(const std::vector<std::vector<float>>& rows) {
  std::vector<float> values;
  for (const auto& row : rows) values.insert(values.end(), row.begin(), row.end());
  return pack_codes(Tensor::from_vector(values, {static_cast<int64_t>(rows.size()), static_cast<int64_t>(rows[0].size())}));
}

// `bits`-bit database codes at the given Hamming distances from the all-(+1) code: the first d bits are -1.
PackedCodes codes_at_distances(int bits, const std::vector<int>& distances) {
  std::vector<std::vector<float>> rows;
  for (int d : distances) {
    std::vector<float> row(bits, 1.0f);
    std::fill(row.begin(), row.begin() + d, -1.0f);
    rows.push_back(row);
  }
  return codes_from_signs(rows);
}

// Multi-hot rows from label lists.
std::vector<uint8_t> multi_hot(const std::vector<std::vector<int>>& labels, int classes) {
  std::vector<uint8_t> rows(labels.size() * classes, 0);
  for (size_t i = 0; i < labels.size(); ++i) {
    for (int c : labels[i]) rows[i * classes + c] = 1;
  }
  return rows;
}

// The hand-made case: 8-bit codes, database items at distances 3, 0, 1, 1, 2, 5 from the all-(+1) code,
// so the ranking is 1, 2, 3, 4, 0, 5 (items 2 and 3 tie at distance 1 and go by index).
// Labels (3 classes): items 1, 3 have {0}; item 5 has {0, 2} (multi-label); items 0, 2, 4 have {1}.
const std::vector<int> kDistances = {3, 0, 1, 1, 2, 5};
const std::vector<std::vector<int>> kDatabaseLabels = {{1}, {0}, {1}, {0}, {1}, {0, 2}};
}  // namespace

TEST_CASE("pack_codes: bit j of code i is u[i, j] >= 0, so sign(0) = +1; unpack and Hamming distance") {
  // 70 bits: two words, the second partly used.
  std::vector<float> u(2 * 70, 1.0f);
  u[0] = 0.0f;        // sign(0) = +1
  u[1] = -1e-30f;     // the smallest negative is -1
  u[63] = -0.5f;      // last bit of the first word
  u[64] = -2.0f;      // first bit of the second word
  u[70 + 69] = -3.0f; // last bit of the second code
  const PackedCodes codes = pack_codes(Tensor::from_vector(u, {2, 70}));
  CHECK(codes.bits == 70);
  CHECK(codes.count == 2);
  CHECK(codes.words == 2);
  REQUIRE(codes.data.size() == 4);
  CHECK(codes.data[0] == (~uint64_t{0} & ~(uint64_t{1} << 1) & ~(uint64_t{1} << 63)));
  CHECK(codes.data[1] == (uint64_t{0x3f} & ~uint64_t{1}));  // bits 65..69 set, unused high bits 0
  CHECK(codes.data[2] == ~uint64_t{0});
  CHECK(codes.data[3] == (uint64_t{0x3f} & ~(uint64_t{1} << 5)));

  const std::vector<int8_t> signs = unpack_codes(codes);
  REQUIRE(signs.size() == u.size());
  for (size_t i = 0; i < u.size(); ++i) CHECK(signs[i] == (u[i] >= 0 ? 1 : -1));
  CHECK(hamming(codes, 0, codes, 1) == 4);  // bits 1, 63, 64 and 69 differ
  CHECK(hamming(codes, 1, codes, 1) == 0);
  CHECK(distances(codes, codes, 0) == std::vector<int>{0, 4});

  // float64 input gives the same codes; a NaN, a wrong shape and bad indices are errors
  const PackedCodes from_f64 = pack_codes(Tensor::from_vector(std::vector<double>(u.begin(), u.end()), {2, 70}, DType::F64));
  CHECK(from_f64.data == codes.data);
  u[5] = std::nanf("");
  CHECK_THROWS_WITH_AS(pack_codes(Tensor::from_vector(u, {2, 70})), doctest::Contains("u[0, 5] is NaN"), Error);
  CHECK_THROWS_WITH_AS(pack_codes(Tensor::from_vector(u, {140})), doctest::Contains("must be (N, L)"), Error);
  CHECK_THROWS_WITH_AS(hamming(codes, 0, codes, 2), doctest::Contains("out of range"), Error);
  const PackedCodes other = codes_at_distances(8, {0});
  CHECK_THROWS_WITH_AS(hamming(codes, 0, other, 0), doctest::Contains("different lengths (70 and 8 bits)"), Error);
}

TEST_CASE("rank: ascending distance, ties by ascending database index, top_k") {
  const PackedCodes query = codes_at_distances(8, {0});
  const PackedCodes database = codes_at_distances(8, {2, 0, 2, 1, 0, 8});
  CHECK(rank(database, query, 0) == std::vector<int32_t>{1, 4, 3, 0, 2, 5});
  CHECK(rank(database, query, 0, 3) == std::vector<int32_t>{1, 4, 3});
  CHECK(rank(database, query, 0, 0).empty());
  CHECK(rank(database, query, 0, 100).size() == 6);
  CHECK_THROWS_WITH_AS(rank(database, query, 1), doctest::Contains("query index 1 is out of range"), Error);
  CHECK_THROWS_WITH_AS(order_by_distance({0, 9}, 8), doctest::Contains("distance 9 is outside 0..8"), Error);
}

TEST_CASE("mAP@K by hand: ties by index, truncation, and a query with no relevant item in the top K counts as 0") {
  const PackedCodes database = codes_at_distances(8, kDistances);
  const PackedCodes queries = codes_at_distances(8, {0, 0});
  // query A: label {0}: ranked relevance 1 0 1 0 0 1; query B: label {2}: only item 5 (last) is relevant.
  const std::vector<uint8_t> query_labels = multi_hot({{0}, {2}}, 3);
  const std::vector<uint8_t> database_labels = multi_hot(kDatabaseLabels, 3);
  const auto map_at = [&](int64_t k) {
    return evaluate(queries, query_labels, database, database_labels, 3, k, {}).map;
  };
  // A: (1/1 + 2/3 + 3/6) / 3; B: (1/6) / 1
  const double ap_a_all = (1.0 + 2.0 / 3.0 + 0.5) / 3.0, ap_b_all = 1.0 / 6.0;
  CHECK(map_at(-1) == doctest::Approx((ap_a_all + ap_b_all) / 2).epsilon(1e-12));
  CHECK(map_at(6) == doctest::Approx((ap_a_all + ap_b_all) / 2).epsilon(1e-12));
  // K = 4: A sees 1 0 1 0, AP = (1 + 2/3) / 2; B has R = 0 in its top 4 and scores 0, still counted
  CHECK(map_at(4) == doctest::Approx((1.0 + 2.0 / 3.0) / 2 / 2).epsilon(1e-12));
  CHECK(map_at(2) == doctest::Approx(1.0 / 2).epsilon(1e-12));  // A: 1 0 -> AP 1; B: 0
  CHECK(evaluate(queries, query_labels, database, database_labels, 3, -1, {}).map_at == 6);
}

TEST_CASE("P@N, precision-recall by Hamming radius and P@H<=2 by hand") {
  const PackedCodes database = codes_at_distances(8, kDistances);
  const PackedCodes queries = codes_at_distances(8, {0, 0});
  const RetrievalMetrics m = evaluate(queries, multi_hot({{0}, {2}}, 3), database, multi_hot(kDatabaseLabels, 3), 3,
                                      -1, {1, 2, 3, 6});
  // A: 1 0 1 0 0 1; B: 0 0 0 0 0 1
  CHECK(m.pn_at == std::vector<int>{1, 2, 3, 6});
  REQUIRE(m.precision_at_n.size() == 4);
  CHECK(m.precision_at_n[0] == doctest::Approx(0.5));
  CHECK(m.precision_at_n[1] == doctest::Approx(0.25));
  CHECK(m.precision_at_n[2] == doctest::Approx(1.0 / 3));
  CHECK(m.precision_at_n[3] == doctest::Approx((0.5 + 1.0 / 6) / 2));

  // within radius r: A retrieves 1, 3, 4, 5, 5, 6, 6, 6, 6 items with 1, 2, 2, 2, 2, 3, 3, 3, 3 relevant
  // (of 3); B retrieves the same items with 0 relevant until r = 5 (1 of 1).
  const std::vector<double> retrieved = {1, 3, 4, 5, 5, 6, 6, 6, 6};
  const std::vector<double> hits_a = {1, 2, 2, 2, 2, 3, 3, 3, 3};
  REQUIRE(m.pr_precision.size() == 9);
  REQUIRE(m.pr_recall.size() == 9);
  for (int r = 0; r <= 8; ++r) {
    const double hits_b = r >= 5 ? 1 : 0;
    CAPTURE(r);
    CHECK(m.pr_precision[r] == doctest::Approx((hits_a[r] / retrieved[r] + hits_b / retrieved[r]) / 2));
    CHECK(m.pr_recall[r] == doctest::Approx((hits_a[r] / 3 + hits_b / 1) / 2));
  }
  CHECK(m.precision_h2 == m.pr_precision[2]);
  CHECK(m.precision_h2 == doctest::Approx(0.25));
  CHECK(m.empty_share_h2 == 0);
}

TEST_CASE("a query with nothing within radius 2 has precision 0 there and counts in the empty share") {
  const PackedCodes database = codes_at_distances(8, kDistances);
  // A as before; C is the all-(-1) code, at distances 5, 8, 7, 7, 6, 3: nothing within radius 2.
  // D has a label no database item has: nothing relevant anywhere (precision, recall and AP all 0).
  const PackedCodes queries = codes_at_distances(8, {0, 8, 0});
  const RetrievalMetrics m = evaluate(queries, multi_hot({{0}, {0}, {3}}, 4), database,
                                      multi_hot(kDatabaseLabels, 4), 4, -1, {1});
  CHECK(m.precision_h2 == doctest::Approx(0.5 / 3));  // A: 2 of 4; C: 0 (empty); D: 0 of 4
  CHECK(m.empty_share_h2 == doctest::Approx(1.0 / 3));
  CHECK(m.pr_recall[2] == doctest::Approx(2.0 / 3 / 3));
  // C ranks 5 (d 3, relevant), 0, 4, 2, 3 (relevant), 1 (relevant): AP = (1 + 2/5 + 3/6) / 3
  const double ap_a = (1.0 + 2.0 / 3.0 + 0.5) / 3.0, ap_c = (1.0 + 2.0 / 5.0 + 0.5) / 3.0;
  CHECK(m.map == doctest::Approx((ap_a + ap_c + 0) / 3).epsilon(1e-12));
}

TEST_CASE("multi-label relevance: sharing any one label is enough") {
  const PackedCodes database = codes_at_distances(8, {0, 1, 2, 3});
  const PackedCodes queries = codes_at_distances(8, {0});
  // 70 classes: the shared label 66 sits in the second word of the label masks.
  const std::vector<uint8_t> db_labels = multi_hot({{1, 66}, {2}, {3, 5}, {66}}, 70);
  const RetrievalMetrics m = evaluate(queries, multi_hot({{5, 66}}, 70), database, db_labels, 70, -1, {1, 2, 3, 4});
  // ranked relevance 1 0 1 1
  CHECK(m.precision_at_n == std::vector<double>{1.0, 0.5, 2.0 / 3, 0.75});
  CHECK(m.map == doctest::Approx((1.0 + 2.0 / 3 + 3.0 / 4) / 3).epsilon(1e-12));
}

TEST_CASE("evaluate rejects inconsistent inputs with clear errors") {
  const PackedCodes database = codes_at_distances(8, kDistances);
  const PackedCodes queries = codes_at_distances(8, {0});
  const PackedCodes queries_12 = codes_at_distances(12, {0});
  const auto db_labels = multi_hot(kDatabaseLabels, 3);
  const auto q_labels = multi_hot({{0}}, 3);
  CHECK_THROWS_WITH_AS(evaluate(queries_12, q_labels, database, db_labels, 3, -1, {}),
                       doctest::Contains("query codes have 12 bits but the database codes have 8"), Error);
  CHECK_THROWS_WITH_AS(evaluate(queries, multi_hot({{0}, {1}}, 3), database, db_labels, 3, -1, {}),
                       doctest::Contains("the query labels hold 6 values, but 1 codes x 3 classes need 3"), Error);
  auto not_binary = db_labels;
  not_binary[4] = 2;
  CHECK_THROWS_WITH_AS(evaluate(queries, q_labels, database, not_binary, 3, -1, {}),
                       doctest::Contains("row 1, class 1 is 2"), Error);
  CHECK_THROWS_WITH_AS(evaluate(queries, q_labels, database, db_labels, 3, 7, {}),
                       doctest::Contains("map_at = 7 must be -1 (mAP@ALL) or between 1 and the database size 6"), Error);
  CHECK_THROWS_WITH_AS(evaluate(queries, q_labels, database, db_labels, 3, 0, {}), doctest::Contains("map_at = 0"),
                       Error);
  CHECK_THROWS_WITH_AS(evaluate(queries, q_labels, database, db_labels, 3, -1, {1, 7}),
                       doctest::Contains("got N = 7"), Error);
  PackedCodes broken = database;
  broken.data.pop_back();
  CHECK_THROWS_WITH_AS(evaluate(queries, q_labels, broken, db_labels, 3, -1, {}),
                       doctest::Contains("the database codes are malformed"), Error);
  CHECK(default_pn_at(6) == std::vector<int>{1, 2, 3, 4, 5, 6});
  CHECK(default_pn_at(5000).size() == 1000);
  CHECK(default_pn_at(5000).back() == 1000);
}

TEST_CASE("evaluate equals a plain O(n log n) reference on random codes and labels") {
  std::mt19937 gen(7);
  for (int bits : {6, 12, 48, 70}) {
    const int n = 300, n_queries = 40, classes = 5;
    // codes as ±1 signs; few bits give many ties
    std::uniform_int_distribution<int> coin(0, 1);
    std::vector<float> db_signs(n * bits), q_signs(n_queries * bits);
    for (float& s : db_signs) s = coin(gen) ? 1.0f : -1.0f;
    for (float& s : q_signs) s = coin(gen) ? 1.0f : -1.0f;
    std::bernoulli_distribution label(0.25);  // some rows have no label at all
    std::vector<uint8_t> db_labels(n * classes), q_labels(n_queries * classes);
    for (uint8_t& l : db_labels) l = label(gen);
    for (uint8_t& l : q_labels) l = label(gen);
    const PackedCodes database = pack_codes(Tensor::from_vector(db_signs, {n, bits}));
    const PackedCodes queries = pack_codes(Tensor::from_vector(q_signs, {n_queries, bits}));
    const std::vector<int> pn_at = {1, 7, 100, 300};

    for (int64_t map_at : {int64_t{-1}, int64_t{50}}) {
      CAPTURE(bits);
      CAPTURE(map_at);
      const RetrievalMetrics m = evaluate(queries, q_labels, database, db_labels, classes, map_at, pn_at);
      const int64_t k_max = map_at == -1 ? n : map_at;
      double map = 0;
      std::vector<double> pn(pn_at.size(), 0), precision(bits + 1, 0), recall(bits + 1, 0);
      int empty = 0;
      for (int q = 0; q < n_queries; ++q) {
        std::vector<int> distance(n);
        std::vector<bool> relevant(n);
        for (int i = 0; i < n; ++i) {
          for (int j = 0; j < bits; ++j) distance[i] += q_signs[q * bits + j] != db_signs[i * bits + j];
          for (int c = 0; c < classes; ++c) relevant[i] = relevant[i] || (q_labels[q * classes + c] && db_labels[i * classes + c]);
        }
        std::vector<int> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return distance[a] < distance[b]; });
        double sum = 0;
        int hits = 0;
        for (int k = 1; k <= k_max; ++k) {
          if (relevant[order[k - 1]]) sum += static_cast<double>(++hits) / k;
        }
        map += hits ? sum / hits : 0;
        for (size_t j = 0; j < pn_at.size(); ++j) {
          pn[j] += static_cast<double>(std::count_if(order.begin(), order.begin() + pn_at[j],
                                                     [&](int i) { return relevant[i]; })) / pn_at[j];
        }
        const int all_relevant = static_cast<int>(std::count(relevant.begin(), relevant.end(), true));
        for (int r = 0; r <= bits; ++r) {
          int inside = 0, inside_relevant = 0;
          for (int i = 0; i < n; ++i) {
            inside += distance[i] <= r;
            inside_relevant += distance[i] <= r && relevant[i];
          }
          precision[r] += inside ? static_cast<double>(inside_relevant) / inside : 0;
          recall[r] += all_relevant ? static_cast<double>(inside_relevant) / all_relevant : 0;
          if (r == 2) empty += inside == 0;
        }
      }
      CHECK(m.map == doctest::Approx(map / n_queries).epsilon(1e-12));
      for (size_t j = 0; j < pn_at.size(); ++j) CHECK(m.precision_at_n[j] == doctest::Approx(pn[j] / n_queries).epsilon(1e-12));
      for (int r = 0; r <= bits; ++r) {
        CHECK(m.pr_precision[r] == doctest::Approx(precision[r] / n_queries).epsilon(1e-12));
        CHECK(m.pr_recall[r] == doctest::Approx(recall[r] / n_queries).epsilon(1e-12));
      }
      CHECK(m.empty_share_h2 == doctest::Approx(static_cast<double>(empty) / n_queries));
      // rank() agrees with the reference order for every query
      for (int q = 0; q < n_queries; q += 13) {
        std::vector<int> distance = distances(database, queries, q);
        std::vector<int32_t> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return distance[a] < distance[b]; });
        CHECK(rank(database, queries, q) == order);
      }
    }
  }
}

TEST_CASE(".npy round trips: int8 codes, uint8 labels, float32 in 1-D and 2-D") {
  const PackedCodes codes = codes_at_distances(12, {0, 3, 12});
  const std::string codes_path = temp_path("codes.npy");
  write_npy_codes(codes_path, codes);
  const std::vector<uint8_t> bytes = file_bytes(codes_path);
  const std::string header(bytes.begin() + 10, bytes.begin() + 10 + (bytes[8] | bytes[9] << 8));
  CHECK(std::string(bytes.begin(), bytes.begin() + 8) == std::string("\x93NUMPY\x01\x00", 8));
  CHECK(header.rfind("{'descr': '|i1', 'fortran_order': False, 'shape': (3, 12), }", 0) == 0);
  CHECK(header.back() == '\n');
  CHECK((10 + header.size()) % 64 == 0);
  CHECK(bytes.size() == 10 + header.size() + 36);
  const NpyArray read_codes = read_npy(codes_path);
  CHECK(read_codes.dtype == NpyDType::Int8);
  CHECK(read_codes.shape == Shape{3, 12});
  CHECK(read_codes.int8_values() == unpack_codes(codes));
  CHECK_THROWS_WITH_AS(read_codes.float32_values(), doctest::Contains("holds int8 values, not float32"), Error);

  const std::vector<uint8_t> labels = multi_hot({{0, 2}, {1}}, 3);
  write_npy(temp_path("labels.npy"), labels, {2, 3});
  const NpyArray read_labels = read_npy(temp_path("labels.npy"));
  CHECK(read_labels.dtype == NpyDType::UInt8);
  CHECK(read_labels.uint8_values() == labels);

  const std::vector<float> curve = {0.5f, -1.25f, 3e-8f};
  write_npy(temp_path("curve.npy"), curve, {3});
  const NpyArray read_curve = read_npy(temp_path("curve.npy"));
  CHECK(read_curve.shape == Shape{3});
  CHECK(read_curve.float32_values() == curve);
  write_npy(temp_path("matrix.npy"), std::vector<float>{1, 2, 3, 4, 5, 6}, {3, 2});
  CHECK(read_npy(temp_path("matrix.npy")).shape == Shape{3, 2});
  write_npy(temp_path("empty.npy"), std::vector<float>{}, {0, 4});
  CHECK(read_npy(temp_path("empty.npy")).shape == Shape{0, 4});
  // An empty array's values: no memcpy from a null buffer (found by fuzz_npy; UBSan fails it in CI's
  // sanitizer run).
  CHECK(read_npy(temp_path("empty.npy")).float32_values().empty());

  CHECK_THROWS_WITH_AS(write_npy(temp_path("bad.npy"), curve, {2, 2}),
                       doctest::Contains("shape (2,2) holds 4 values but 3 were given"), Error);
  CHECK_THROWS_WITH_AS(write_npy("/nonexistent-dir/x.npy", curve, {3}), doctest::Contains("cannot write"), Error);
  CHECK_FALSE(std::filesystem::exists(temp_path("bad.npy")));
}

TEST_CASE(".npy reader: NumPy's own layout (version 1.0 and 2.0) and every corrupt header is a clear error") {
  // How numpy.save writes a (2, 3) uint8 array: a 128-byte preamble + header, then the data.
  const auto npy = [](const std::string& dict, const std::vector<uint8_t>& data, int version = 1) {
    std::vector<uint8_t> bytes = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<uint8_t>(version), 0};
    const size_t preamble = version == 1 ? 10 : 12;
    std::string header = dict;
    header.append(127 - preamble - dict.size(), ' ');
    header += '\n';
    for (size_t i = 0; i < preamble - 8; ++i) bytes.push_back(static_cast<uint8_t>(header.size() >> (8 * i)));
    bytes.insert(bytes.end(), header.begin(), header.end());
    bytes.insert(bytes.end(), data.begin(), data.end());
    return bytes;
  };
  const std::string good = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), }";
  const std::vector<uint8_t> data = {1, 0, 1, 0, 1, 0};
  const std::string path = temp_path("numpy.npy");
  for (int version : {1, 2}) {
    write_bytes(path, npy(good, data, version));
    const NpyArray a = read_npy(path);
    CHECK(a.shape == Shape{2, 3});
    CHECK(a.uint8_values() == data);
  }
  write_bytes(path, npy("{\"shape\": (6,), \"fortran_order\": False, \"descr\": \"|i1\"}", data));
  CHECK(read_npy(path).shape == Shape{6});  // other key order and quotes are valid Python

  const auto rejects = [&](const std::vector<uint8_t>& bytes, const std::string& message) {
    write_bytes(path, bytes);
    CAPTURE(message);
    CHECK_THROWS_WITH_AS(read_npy(path), doctest::Contains(message.c_str()), Error);
  };
  auto bad_magic = npy(good, data);
  bad_magic[1] = 'X';
  rejects(bad_magic, "does not start with the magic string");
  auto bad_version = npy(good, data);
  bad_version[6] = 4;
  rejects(bad_version, "version 4.0 is not supported");
  rejects({0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0x80}, "ends inside the header length");
  auto short_header = npy(good, data);
  short_header.resize(60);
  rejects(short_header, "the header should have 118 bytes but the file ends after 50");
  rejects(npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", data), "dtype '<f8' is not supported");
  rejects(npy("{'descr': '|u1', 'fortran_order': True, 'shape': (2, 3), }", data), "Fortran order");
  rejects(npy("{'descr': '|u1', 'fortran_order': Maybe, 'shape': (2, 3), }", data), "must be True or False");
  rejects(npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, -3), }", data), "tuple of non-negative integers");
  rejects(npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}", data), "unexpected key 'extra'");
  rejects(npy("{'descr': '|u1', 'shape': (2, 3), }", data), "needs the keys");
  rejects(npy("{'descr' '|u1', 'fortran_order': False, 'shape': (2, 3), }", data), "expected ':'");
  rejects(npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), 'open}", data), "unterminated string");
  rejects(npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3)", data), "expected '}'");
  rejects(npy("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), } x", data), "unexpected text after the dict");
  rejects(npy("{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999999999999, 3), }", data), "too large");
  rejects(npy(good, {1, 0, 1, 0, 1}), "should have 6 bytes but the file holds 5 (truncated)");
  rejects(npy(good, {1, 0, 1, 0, 1, 0, 1}), "should have 6 bytes but the file holds 7 (trailing bytes)");
  rejects({}, "does not start with the magic string");
  CHECK_THROWS_WITH_AS(read_npy(temp_path("missing.npy")), doctest::Contains("No such file"), Error);
}

namespace {
// A minimal well-formedness check: tags nest and close, attribute values are quoted, and every '&' in
// text or attributes starts one of XML's five entities.
bool well_formed_xml(const std::string& xml, std::string& problem) {
  std::vector<std::string> open;
  for (size_t i = 0; i < xml.size();) {
    if (xml[i] == '&') {
      const size_t end = xml.find(';', i);
      const std::string entity = end == std::string::npos ? "" : xml.substr(i, end - i + 1);
      if (entity != "&amp;" && entity != "&lt;" && entity != "&gt;" && entity != "&quot;" && entity != "&apos;") {
        problem = "bad entity at " + std::to_string(i);
        return false;
      }
      i = end + 1;
    } else if (xml[i] == '<') {
      const size_t end = xml.find('>', i);
      if (end == std::string::npos) return (problem = "unclosed tag", false);
      std::string tag = xml.substr(i + 1, end - i - 1);
      if (std::count(tag.begin(), tag.end(), '"') % 2 || tag.find('<') != std::string::npos) {
        return (problem = "bad tag <" + tag + ">", false);
      }
      if (tag[0] == '/') {
        if (open.empty() || open.back() != tag.substr(1)) return (problem = "mismatched </" + tag + ">", false);
        open.pop_back();
      } else if (tag.back() != '/') {
        open.push_back(tag.substr(0, tag.find(' ')));
      }
      i = end + 1;
    } else if (xml[i] == '>') {
      return (problem = "stray '>' at " + std::to_string(i), false);
    } else {
      ++i;
    }
  }
  if (!open.empty()) return (problem = "unclosed <" + open.back() + ">", false);
  return true;
}
}  // namespace

TEST_CASE("SVG line plot: well-formed, series in the legend, text escaped, written atomically") {
  const std::vector<PlotSeries> series = {{"12 bits", {0.0, 0.5, 1.0}, {1.0, 0.8, 0.1}},
                                          {"48 bits & more", {0.0, 0.6, 1.0}, {0.95, 0.9, 0.2}}};
  const std::string svg = line_plot_svg("PR <CIFAR-10>", "recall", "precision \"y\"", series);
  CHECK(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
  CHECK(svg.find("12 bits") != std::string::npos);
  CHECK(svg.find("48 bits &amp; more") != std::string::npos);
  CHECK(svg.find("PR &lt;CIFAR-10&gt;") != std::string::npos);
  CHECK(svg.find("<CIFAR") == std::string::npos);
  CHECK(svg.find("precision &quot;y&quot;") != std::string::npos);
  CHECK(svg.find("#1f77b4") != std::string::npos);  // two distinct colours
  CHECK(svg.find("#d62728") != std::string::npos);
  CHECK(std::count(svg.begin(), svg.end(), '\n') > 10);
  std::string problem;
  CHECK_MESSAGE(well_formed_xml(svg, problem), problem);
  // the checker itself catches what it is there for
  CHECK_FALSE(well_formed_xml("<svg><text>a < b</text></svg>", problem));
  CHECK_FALSE(well_formed_xml("<svg><text>a & b</text></svg>", problem));
  CHECK_FALSE(well_formed_xml("<svg><g></svg>", problem));

  // one point, a single x value (P@H<=2 at one code length): still a valid axis
  const std::string single = line_plot_svg("one", "bits", "P@H<=2", {{"CIFAR-10", {48}, {0.7}}});
  CHECK(well_formed_xml(single, problem));
  CHECK(single.find(">48<") != std::string::npos);

  const std::string path = temp_path("plot.svg");
  write_line_plot_svg(path, "PR <CIFAR-10>", "recall", "precision \"y\"", series);
  const std::vector<uint8_t> bytes = file_bytes(path);
  CHECK(std::string(bytes.begin(), bytes.end()) == svg);

  CHECK_THROWS_WITH_AS(line_plot_svg("t", "x", "y", {}), doctest::Contains("no series"), Error);
  CHECK_THROWS_WITH_AS(line_plot_svg("t", "x", "y", {{"s", {1, 2}, {1}}}), doctest::Contains("2 x values and 1 y"),
                       Error);
  CHECK_THROWS_WITH_AS(line_plot_svg("t", "x", "y", {{"s", {1}, {std::nan("")}}}), doctest::Contains("must be finite"),
                       Error);
}

namespace {
// An image whose every pixel is distinct enough to check nearest-neighbour enlargement.
Image pattern(int height, int width, int seed) {
  Image image{height, width, std::vector<uint8_t>(static_cast<size_t>(height) * width * 3)};
  for (size_t i = 0; i < image.rgb.size(); ++i) image.rgb[i] = static_cast<uint8_t>(i * 7 + seed * 31);
  return image;
}
}  // namespace

TEST_CASE("retrieval grid: results without relevance flags get no frame, and a flag count that differs is an error") {
  std::vector<GridRow> rows(1);
  rows[0] = {pattern(32, 32, 0), {pattern(32, 32, 1), pattern(32, 32, 2)}, {}};
  const Image canvas = retrieval_grid(rows);
  const std::vector<uint8_t> white(kGridBackground, kGridBackground + 3);
  for (int i = 0; i < 2; ++i) {
    const int left = 8 + 68 + 20 + i * 72;  // as in the framed layout below: the cells keep their size
    for (auto [y, x] : {std::pair{8, left}, std::pair{8 + 67, left + 67}, std::pair{9, left + 1}}) {
      CAPTURE(i);
      const uint8_t* p = &canvas.rgb[(y * canvas.width + x) * 3];
      CHECK(std::vector<uint8_t>(p, p + 3) == white);
    }
  }
  rows[0].relevant = {true};
  CHECK_THROWS_WITH_AS(retrieval_grid(rows), doctest::Contains("has 2 results but 1 relevance flags"), Error);
}

TEST_CASE("retrieval grid PNG: layout, enlargement, green and red frames, read back with stb_image") {
  std::vector<GridRow> rows(2);
  rows[0] = {pattern(32, 32, 0), {pattern(32, 32, 1), pattern(32, 32, 2), pattern(32, 32, 3)}, {true, false, true}};
  rows[1] = {pattern(32, 32, 4), {pattern(32, 32, 5), pattern(32, 32, 6)}, {false, false}};
  const std::string path = temp_path("grid.png");
  write_retrieval_grid_png(path, rows);

  int width = 0, height = 0, channels = 0;
  uint8_t* decoded = stbi_load(path.c_str(), &width, &height, &channels, 3);
  REQUIRE(decoded != nullptr);
  const std::vector<uint8_t> pixels(decoded, decoded + static_cast<size_t>(width) * height * 3);
  stbi_image_free(decoded);
  // 32 px images are enlarged 2x to 64 px cells; a framed cell is 68 px; margins 8, spacing 4, query gap 20
  CHECK(height == 8 + 68 + 4 + 68 + 8);
  CHECK(width == 8 + 68 + 20 + 3 * 68 + 2 * 4 + 8);
  CHECK(channels == 3);
  const Image canvas = retrieval_grid(rows);
  CHECK(canvas.height == height);
  CHECK(canvas.width == width);
  CHECK(canvas.rgb == pixels);  // PNG is lossless

  const auto pixel = [&](int y, int x) { return std::vector<uint8_t>(&pixels[(y * width + x) * 3], &pixels[(y * width + x) * 3] + 3); };
  const std::vector<uint8_t> green(kRelevantFrame, kRelevantFrame + 3), red(kIrrelevantFrame, kIrrelevantFrame + 3),
      white(kGridBackground, kGridBackground + 3);
  const int results_left = 8 + 68 + 20;
  for (int i = 0; i < 3; ++i) {
    const int left = results_left + i * 72;
    CAPTURE(i);
    CHECK(pixel(8, left) == (rows[0].relevant[i] ? green : red));           // top-left corner of the frame
    CHECK(pixel(8 + 67, left + 67) == (rows[0].relevant[i] ? green : red)); // bottom-right corner
    CHECK(pixel(8 + 1, left + 1) == (rows[0].relevant[i] ? green : red));   // 2 pixels wide
    // nearest neighbour: canvas pixel (2y + dy, 2x + dx) inside the frame is image pixel (y, x)
    const Image& image = rows[0].results[i];
    for (int y : {0, 13, 31}) {
      for (int x : {0, 20, 31}) {
        const std::vector<uint8_t> source(&image.rgb[(y * 32 + x) * 3], &image.rgb[(y * 32 + x) * 3] + 3);
        CHECK(pixel(8 + 2 + 2 * y, left + 2 + 2 * x) == source);
        CHECK(pixel(8 + 2 + 2 * y + 1, left + 2 + 2 * x + 1) == source);
      }
    }
  }
  CHECK(pixel(80, results_left) == red);                 // row 2, first result: irrelevant
  CHECK(pixel(80, results_left + 2 * 72) == white);      // row 2 has only two results
  CHECK(pixel(8, 8) == white);                           // the query has no frame
  CHECK(pixel(10, 10) == std::vector<uint8_t>(rows[0].query.rgb.begin(), rows[0].query.rgb.begin() + 3));

  // mixed sizes: a 16 x 24 image is enlarged 3x to 48 x 72, so cells become 64 x 72
  const Image mixed = retrieval_grid({{pattern(32, 32, 0), {pattern(16, 24, 1)}, {true}}});
  CHECK(mixed.height == 8 + 68 + 8);
  CHECK(mixed.width == 8 + 76 + 20 + 76 + 8);

  CHECK_THROWS_WITH_AS(retrieval_grid({{pattern(32, 32, 0), {pattern(32, 32, 1)}, {true, false}}}),
                       doctest::Contains("1 results but 2 relevance flags"), Error);
  Image broken = pattern(32, 32, 0);
  broken.rgb.pop_back();
  CHECK_THROWS_WITH_AS(retrieval_grid({{broken, {}, {}}}), doctest::Contains("holds 3071 bytes instead of 3072"), Error);
  CHECK_THROWS_WITH_AS(retrieval_grid({}), doctest::Contains("no queries"), Error);
}
