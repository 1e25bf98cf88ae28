// mdff_search: image search over MDFF-SH hash codes, with a trained train_mdff checkpoint.
//
//   mdff_search index --checkpoint CKPT --out DB (--folder DIR | --list FILE [--classes K] [--list-root DIR])
//                     [--device auto|cpu|cuda] [--precision tf32|fp32]
//   mdff_search query --db DB [--checkpoint CKPT] IMAGE... [--top-k 20 | --radius R] [--json F] [--grid F.png]
//                     [--device auto|cpu|cuda] [--precision tf32|fp32]
//   mdff_search bench [--codes 1000000] [--bits 64] [--queries 1000] [--top-k 100] [--json F] [--device cuda]
//
// index encodes every image into a code database (retrieval/code_db.h) on the device asked for; query
// encodes the query images
// with the same checkpoint and ranks the database by Hamming distance (popcount over 64-bit words, ties by
// database index); bench times that ranking on random codes against NumPy doing the same, in one run.
// Bad options exit 2 with the reason (--device cuda without a usable GPU too); a missing or damaged file
// exits 1 naming it.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <unordered_map>

#include <unistd.h>

#include "apps/cli.h"
#include "apps/progress.h"
#include "core/error.h"
#include "core/file_io.h"
#include "core/ops.h"
#include "core/rng.h"
#include "data/dataset.h"
#include "models/checkpoint.h"
#include "retrieval/code_db.h"
#include "retrieval/encode.h"
#include "retrieval/grid.h"
#include "retrieval/npy.h"

using namespace mdff;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

constexpr int64_t kEncodeBatch = 64;  // images encoded at once (index: the --batch-size default)

struct IndexOptions {
  std::string checkpoint, out, folder, list, list_root, device = "auto", precision = "tf32";
  int classes = 0;
  int64_t batch_size = kEncodeBatch;
};

struct QueryOptions {
  std::string db, checkpoint, json, grid, device = "auto", precision = "tf32";
  std::vector<std::string> images;
  int64_t top_k = 20;
  int radius = -1;  // >= 0: every item within this distance instead of the top k
  int grid_results = 20;
};

struct BenchOptions {
  int64_t codes = 1'000'000, queries = 1000, top_k = 100;
  int bits = 64;
  uint64_t seed = 0;
  std::string json, python = "/usr/bin/python3", device = "cpu";
};

std::string absolute_path(const std::string& path) { return fs::absolute(path).lexically_normal().string(); }

// JSON text for a person or a program; file names that are not valid UTF-8 get U+FFFD instead of an error.
std::string json_text(const json& value) { return value.dump(2, ' ', false, json::error_handler_t::replace) + "\n"; }

// ---- index and query ----

// The image files under `folder` (recursively) with a .png, .jpg, .jpeg or .bmp name, any case, sorted.
std::vector<std::string> find_images(const std::string& folder) {
  MDFF_CHECK(fs::is_directory(folder), folder, ": no such folder");
  std::vector<std::string> paths;
  for (const auto& item : fs::recursive_directory_iterator(fs::absolute(folder).lexically_normal())) {
    std::string extension = item.path().extension().string();
    std::transform(extension.begin(), extension.end(), extension.begin(), [](unsigned char c) { return std::tolower(c); });
    const bool image = extension == ".png" || extension == ".jpg" || extension == ".jpeg" || extension == ".bmp";
    if (image && item.is_regular_file()) paths.push_back(item.path().string());
  }
  MDFF_CHECK(!paths.empty(), folder, ": no .png, .jpg, .jpeg or .bmp files in it or below it");
  std::sort(paths.begin(), paths.end());
  return paths;
}

// Image files as a dataset for retrieval::encode. A data::Dataset counts its images by label rows, so
// the files get one all-zero label column, which encoding never reads.
data::Dataset unlabeled_images(const std::vector<std::string>& paths) {
  data::Dataset dataset;
  dataset.name = "the images";
  dataset.classes = 1;
  dataset.multi_label = true;
  dataset.image_paths = paths;
  dataset.labels.assign(paths.size(), 0);
  return dataset;
}

// The continuous codes u (N, L) of every image of `dataset`, with a progress line when `label` is given.
Tensor encode_all(LoadedCheckpoint& loaded, const data::Dataset& dataset, int64_t batch_size, const char* label) {
  std::vector<int64_t> rows(static_cast<size_t>(dataset.size()));
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int64_t>(i);
  if (!label) return retrieval::encode(*loaded.model, dataset, rows, loaded.batch, batch_size);
  cli::Progress progress(label);
  const auto start = Clock::now();
  return retrieval::encode(*loaded.model, dataset, rows, loaded.batch, batch_size, [&](int64_t done, int64_t total) {
    progress.update(done, total, detail::concat(static_cast<int64_t>(done / std::max(seconds_since(start), 1e-9)), " img/s"));
  });
}

// The model on the device chosen (--device, --precision), where encoding (and query's ranking) runs.
void place(LoadedCheckpoint& loaded, Device device, const std::string& precision) {
  set_tf32_allowed(precision == "tf32");
  loaded.model->to(device);
}

// What --out may name, checked before any work (a usage error): a new file in a folder that is or can be made,
// or a code database to replace; never a folder, the checkpoint itself or another file, which the database
// would overwrite.
void check_index_output(const IndexOptions& o) {
  const fs::path out(o.out);
  MDFF_CHECK(out.has_filename(), "--out ", o.out, " names a folder: name the database file to write, e.g. ",
             (out / "codes.db").string());
  std::error_code error;
  for (fs::path folder = out.parent_path(); !folder.empty(); folder = folder.parent_path()) {
    if (fs::exists(folder, error)) {
      MDFF_CHECK(fs::is_directory(folder), "--out ", o.out, ": ", folder.string(), " is a file, not a folder");
      break;
    }
    MDFF_CHECK(!error, "--out ", o.out, ": ", error.message());
    if (folder == folder.parent_path()) break;
  }
  const bool exists = fs::exists(out, error);
  MDFF_CHECK(!error, "--out ", o.out, ": ", error.message());
  if (!exists) return;
  MDFF_CHECK(!fs::is_directory(out), "--out ", o.out, " is a folder: name the database file to write, e.g. ",
             (out / "codes.db").string());
  MDFF_CHECK(!fs::equivalent(out, o.checkpoint, error), "--out ", o.out, " is the checkpoint (--checkpoint): the "
             "database would overwrite the model; name another file");
  try {
    retrieval::read_code_database(o.out);
  } catch (const Error& e) {
    MDFF_FAIL("--out ", o.out, " exists and is not a code database that index may replace (", e.reason(),
              "); name another file, or delete it first");
  }
}

int run_index(const IndexOptions& o, Device device) {
  const auto start = Clock::now();
  LoadedCheckpoint loaded = load_model_checkpoint(o.checkpoint);
  if (fs::exists(o.out)) std::printf("mdff_search index: %s holds a code database; it will be replaced\n", o.out.c_str());
  place(loaded, device, o.precision);
  data::Dataset dataset;
  if (!o.folder.empty()) {
    dataset = unlabeled_images(find_images(o.folder));
  } else {
    dataset = data::load_image_list(o.list, o.list_root.empty() ? fs::path(o.list).parent_path().string() : o.list_root,
                                    o.classes ? o.classes : loaded.classes);
    for (std::string& path : dataset.image_paths) path = absolute_path(path);
  }
  std::printf("mdff_search index: %lld images, %d-bit codes from %s (%s backbone)\n",
              static_cast<long long>(dataset.size()), loaded.model->config().bits, o.checkpoint.c_str(),
              loaded.backbone.c_str());
  retrieval::CodeDatabase db;
  db.codes = retrieval::pack_codes(encode_all(loaded, dataset, o.batch_size, "encoding"));
  db.paths = dataset.image_paths;
  if (!o.list.empty()) {
    db.classes = dataset.classes;
    db.labels = dataset.labels;
  }
  db.checkpoint = absolute_path(o.checkpoint);
  db.checkpoint_crc32 = retrieval::file_crc32(o.checkpoint);
  const fs::path out_folder = fs::path(o.out).parent_path();
  if (!out_folder.empty()) fs::create_directories(out_folder);
  retrieval::write_code_database(o.out, db);
  std::printf("wrote %s: %lld codes%s, in %s\n", o.out.c_str(), static_cast<long long>(db.codes.count),
              db.classes ? detail::concat(" with ", db.classes, " labels each").c_str() : "",
              cli::Progress::duration(seconds_since(start)).c_str());
  return 0;
}

// The set labels of image i as indices, e.g. {0, 2}.
std::vector<int> labels_of(const retrieval::CodeDatabase& db, int64_t i) {
  std::vector<int> set;
  for (int k = 0; k < db.classes; ++k)
    if (db.labels[i * db.classes + k]) set.push_back(k);
  return set;
}

std::string labels_text(const std::vector<int>& labels) {
  std::string text;
  for (int k : labels) text += (text.empty() ? "" : ",") + std::to_string(k);
  return text.empty() ? "-" : text;
}

bool share_a_label(const std::vector<int>& a, const std::vector<int>& b) {
  return std::any_of(a.begin(), a.end(), [&](int k) { return std::find(b.begin(), b.end(), k) != b.end(); });
}

retrieval::Image grid_image(const std::string& path) {
  data::Image decoded = data::decode_image(path);
  return {decoded.height, decoded.width, std::move(decoded.pixels)};
}

int run_query(const QueryOptions& o, Device device) {
  const retrieval::CodeDatabase db = retrieval::read_code_database(o.db);
  std::error_code ignored;
  MDFF_CHECK(!o.checkpoint.empty() || fs::exists(db.checkpoint, ignored), o.db, " was indexed with the checkpoint ",
             db.checkpoint, ", which is no longer there: if it has moved, pass --checkpoint PATH with its new place");
  const std::string checkpoint = o.checkpoint.empty() ? db.checkpoint : o.checkpoint;
  const std::string crc = retrieval::file_crc32(checkpoint);
  MDFF_CHECK(crc == db.checkpoint_crc32, o.db, " was indexed with the checkpoint ", db.checkpoint, " (CRC-32 ",
             db.checkpoint_crc32, "), but ", checkpoint, " has CRC-32 ", crc,
             ": codes from different weights cannot be compared; query with the same checkpoint or index again");
  LoadedCheckpoint loaded = load_model_checkpoint(checkpoint);
  MDFF_CHECK(loaded.model->config().bits == db.codes.bits, checkpoint, " makes ", loaded.model->config().bits,
             "-bit codes but ", o.db, " holds ", db.codes.bits, "-bit codes");
  place(loaded, device, o.precision);

  std::vector<std::string> images;
  for (const std::string& image : o.images) images.push_back(absolute_path(image));
  const retrieval::PackedCodes queries =
      retrieval::pack_codes(encode_all(loaded, unlabeled_images(images), kEncodeBatch, nullptr));
  std::unordered_map<std::string, int64_t> index_of;
  for (int64_t i = 0; i < db.codes.count; ++i) index_of.emplace(db.paths[i], i);

  std::printf("database %s: %lld images, %d-bit codes%s\n", o.db.c_str(), static_cast<long long>(db.codes.count),
              db.codes.bits, db.classes ? detail::concat(", ", db.classes, " labels").c_str() : "");
  json report{{"database", absolute_path(o.db)}, {"checkpoint", absolute_path(checkpoint)}, {"bits", db.codes.bits}};
  if (o.radius >= 0) report["radius"] = o.radius;
  else report["top_k"] = o.top_k;
  report["queries"] = json::array();
  std::vector<retrieval::GridRow> grid;
  std::vector<std::vector<retrieval::Match>> top;  // --top-k: every query's, ranked at once on the device
  if (o.radius < 0) top = retrieval::nearest_all(db.codes, queries, o.top_k, device);
  for (int64_t q = 0; q < queries.count; ++q) {
    const std::vector<retrieval::Match> matches =
        o.radius >= 0 ? retrieval::within_radius(db.codes, queries, q, o.radius) : top[q];
    // A query that is itself in a labelled database has labels, and each result is relevant or not.
    const auto found = index_of.find(images[q]);
    const bool judged = db.classes > 0 && found != index_of.end();
    const std::vector<int> query_labels = judged ? labels_of(db, found->second) : std::vector<int>{};

    json entry{{"image", images[q]}, {"database_index", found != index_of.end() ? json(found->second) : json()}};
    if (judged) entry["labels"] = query_labels;
    std::printf("\nquery %lld: %s", static_cast<long long>(q + 1), images[q].c_str());
    if (found != index_of.end()) std::printf("  (database item %lld)", static_cast<long long>(found->second));
    if (judged) std::printf("  labels %s", labels_text(query_labels).c_str());
    if (o.radius >= 0) std::printf("\n%zu within distance %d", matches.size(), o.radius);
    std::printf("\n%6s %8s %8s  %-12s %s\n", "rank", "distance", "index", "labels", "path");
    json results = json::array();
    retrieval::GridRow row;
    for (size_t r = 0; r < matches.size(); ++r) {
      const retrieval::Match& m = matches[r];
      const std::vector<int> labels = labels_of(db, m.index);
      std::printf("%6zu %8d %8d  %-12s %s\n", r + 1, m.distance, m.index, labels_text(labels).c_str(),
                  db.paths[m.index].c_str());
      json result{{"rank", r + 1}, {"index", m.index}, {"distance", m.distance}, {"path", db.paths[m.index]}};
      if (db.classes) result["labels"] = labels;
      if (judged) result["relevant"] = share_a_label(query_labels, labels);
      results.push_back(result);
      if (!o.grid.empty() && static_cast<int>(r) < o.grid_results) {
        row.results.push_back(grid_image(db.paths[m.index]));
        if (judged) row.relevant.push_back(share_a_label(query_labels, labels));
      }
    }
    entry["results"] = results;
    report["queries"].push_back(entry);
    if (!o.grid.empty()) {
      row.query = grid_image(images[q]);
      grid.push_back(std::move(row));
    }
  }
  if (!o.json.empty()) io::write_file_atomic(o.json, json_text(report));
  if (!o.grid.empty()) retrieval::write_retrieval_grid_png(o.grid, grid);
  return 0;
}

// ---- bench ----

// `count` random codes of `bits` bits (the unused high bits of the last word 0).
retrieval::PackedCodes random_codes(int64_t count, int bits, Rng& rng) {
  retrieval::PackedCodes codes;
  codes.bits = bits;
  codes.count = count;
  codes.words = (bits + 63) / 64;
  codes.data.resize(static_cast<size_t>(count * codes.words));
  const uint64_t last_word_mask = bits % 64 ? (uint64_t{1} << (bits % 64)) - 1 : ~uint64_t{0};
  for (int64_t i = 0; i < count; ++i)
    for (int w = 0; w < codes.words; ++w)
      codes.data[i * codes.words + w] = rng.next_u64() & (w == codes.words - 1 ? last_word_mask : ~uint64_t{0});
  return codes;
}

// The packed words as a uint8 (count, words * 8) .npy array: NumPy views it as (count, words) uint64.
void write_codes_npy(const std::string& path, const retrieval::PackedCodes& codes) {
  std::vector<uint8_t> bytes(codes.data.size() * 8);
  std::memcpy(bytes.data(), codes.data.data(), bytes.size());
  retrieval::write_npy(path, bytes, {codes.count, int64_t{codes.words} * 8});
}

constexpr int kRepeats = 5;  // single-query timings: the median of this many runs

// The four timings, in seconds, in the same order as the NumPy script reports them.
struct BenchTimes {
  double one_full_ranking = 0, one_top_k = 0, queries_distances = 0, queries_top_k = 0;
};
const char* const kTimeNames[] = {"one_query_full_ranking_s", "one_query_top_k_s", "queries_distances_s",
                                  "queries_top_k_s"};

json times_json(const BenchTimes& t) {
  return {{kTimeNames[0], t.one_full_ranking}, {kTimeNames[1], t.one_top_k}, {kTimeNames[2], t.queries_distances},
          {kTimeNames[3], t.queries_top_k}};
}

// What both sides compute, to check they agree: the top k of query 0 and the sum of all distances.
struct BenchCheck {
  std::vector<int64_t> first_top_k;
  int64_t distance_sum = 0;
};

template <class F>
double median_seconds(F&& work) {
  std::vector<double> times;
  for (int i = 0; i < kRepeats; ++i) {
    const auto start = Clock::now();
    work();
    times.push_back(seconds_since(start));
  }
  std::sort(times.begin(), times.end());
  return times[kRepeats / 2];
}

BenchTimes bench_engine(const retrieval::PackedCodes& database, const retrieval::PackedCodes& queries, int64_t top_k,
                        BenchCheck& check) {
  BenchTimes t;
  t.one_full_ranking = median_seconds([&] { retrieval::rank(database, queries, 0); });
  t.one_top_k = median_seconds([&] { retrieval::rank(database, queries, 0, top_k); });
  for (int64_t q = 0; q < queries.count; ++q) {
    const auto start = Clock::now();
    const std::vector<int> d = retrieval::distances(database, queries, q);
    const double distances_done = seconds_since(start);
    const std::vector<int32_t> top = retrieval::order_by_distance(d, database.bits, top_k);
    t.queries_top_k += seconds_since(start);
    t.queries_distances += distances_done;
    for (int distance : d) check.distance_sum += distance;
    if (q == 0) check.first_top_k.assign(top.begin(), top.end());
  }
  return t;
}

// The NumPy side: XOR the uint64 words, count bits with a uint8 lookup table over the bytes (NumPy 1.x
// has no bitwise_count), then a stable argsort (full ranking) or an argpartition whose candidates are
// ordered stably (top k): both give ties in index order, like the engine.
constexpr const char* kNumpyScript = R"PY(
import json, sys, time
import numpy as np
database_path, queries_path, top_k, repeats, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
database = np.load(database_path).view('<u8')  # (n, words) uint64
queries = np.load(queries_path).view('<u8')    # (q, words) uint64
POPCOUNT = np.array([bin(i).count('1') for i in range(256)], dtype=np.uint8)

def distances(q):
    x = np.bitwise_xor(database, queries[q])       # (n, words)
    return POPCOUNT[x.view(np.uint8)].sum(axis=1)   # (n,): the popcounts of each code's bytes, summed

def full_ranking(d):
    return np.argsort(d, kind='stable')

def top(d):
    k = min(top_k, len(d))
    kth = np.partition(d, k - 1)[k - 1]
    candidates = np.flatnonzero(d <= kth)           # ascending index
    return candidates[np.argsort(d[candidates], kind='stable')][:k]

def median_seconds(work):
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); work(); times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]

result = {'version': np.__version__,
          'one_query_full_ranking_s': median_seconds(lambda: full_ranking(distances(0))),
          'one_query_top_k_s': median_seconds(lambda: top(distances(0)))}
distances_s = top_k_s = 0.0
distance_sum = 0
for q in range(len(queries)):
    start = time.perf_counter()
    d = distances(q)
    distances_done = time.perf_counter() - start
    t = top(d)
    top_k_s += time.perf_counter() - start
    distances_s += distances_done
    distance_sum += int(d.sum())
    if q == 0:
        result['first_top_k'] = t.tolist()
result.update(queries_distances_s=distances_s, queries_top_k_s=top_k_s, distance_sum=distance_sum)
with open(out_path, 'w') as f:
    json.dump(result, f)
)PY";

std::string shell_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// A temporary folder, removed with everything in it when this goes out of scope.
struct TempFolder {
  fs::path path;
  TempFolder() {
    std::string pattern = (fs::temp_directory_path() / "mdff_search_bench_XXXXXX").string();
    MDFF_CHECK(::mkdtemp(pattern.data()), "cannot make a temporary folder ", pattern, ": ", std::strerror(errno));
    path = pattern;
  }
  ~TempFolder() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

// Runs the NumPy side on the same codes. Returns its report, with the Python that ran it, or null with `why`
// when it cannot run.
json bench_numpy(const BenchOptions& o, const retrieval::PackedCodes& database, const retrieval::PackedCodes& queries,
                 std::string& why) {
  const std::string python = cli::find_program(o.python, why);
  if (python.empty()) return nullptr;
  if (std::system((shell_quote(python) + " -c 'import numpy' 2>/dev/null").c_str()) != 0) {
    why = python + " cannot import numpy";
    return nullptr;
  }
  const TempFolder folder;
  const fs::path script = folder.path / "bench.py", db_npy = folder.path / "database.npy",
                 queries_npy = folder.path / "queries.npy", out = folder.path / "numpy.json";
  io::write_file_atomic(script.string(), kNumpyScript);
  write_codes_npy(db_npy.string(), database);
  write_codes_npy(queries_npy.string(), queries);
  const std::string command = detail::concat(shell_quote(python), " ", shell_quote(script.string()), " ",
                                             shell_quote(db_npy.string()), " ", shell_quote(queries_npy.string()), " ",
                                             o.top_k, " ", kRepeats, " ", shell_quote(out.string()));
  const int status = std::system(command.c_str());
  if (status != 0 || !fs::exists(out)) {
    why = detail::concat("the NumPy script failed (status ", status, ")");
    return nullptr;
  }
  const std::vector<uint8_t> text = io::read_file(out.string());
  json report = json::parse(text.begin(), text.end());
  report["python"] = python;
  return report;
}

std::string time_text(double seconds) {
  char text[32];
  if (seconds < 1) std::snprintf(text, sizeof text, "%.3f ms", seconds * 1e3);
  else std::snprintf(text, sizeof text, "%.3f s", seconds);
  return text;
}

// The GPU's ranking (ops::hamming_top_k, one query per warp) of every query, its results copied back: the
// median of kRepeats runs after one warm-up, the codes already on the GPU. Checked against the CPU's top k
// of query 0; false (after saying so) when they differ.
bool bench_gpu(const retrieval::PackedCodes& database, const retrieval::PackedCodes& queries, int64_t top_k,
               const BenchCheck& check, json& report) {
  const Tensor db = retrieval::codes_tensor(database).to(Device::CUDA);
  const Tensor q = retrieval::codes_tensor(queries).to(Device::CUDA);
  std::pair<Tensor, Tensor> ranked;
  auto rank_all = [&] {
    ranked = ops::hamming_top_k(q, db, top_k);
    ranked.first = ranked.first.cpu();
    ranked.second = ranked.second.cpu();
  };
  rank_all();
  const double seconds = median_seconds(rank_all);
  const Tensor& first = ranked.first;
  const std::vector<int64_t> gpu_first(first.data<int32_t>(), first.data<int32_t>() + first.size(1));
  const bool agree = gpu_first == check.first_top_k;
  std::printf("%-34s %12s   (GPU: ranking + copy back; results %s the CPU's)\n",
              detail::concat(queries.count, " queries, top ", top_k, " each").c_str(), time_text(seconds).c_str(),
              agree ? "agree with" : "DIFFER from");
  report["gpu"] = {{"queries_top_k_s", seconds}, {"agree", agree}};
  if (!agree) std::fprintf(stderr, "mdff_search bench: error: the GPU's top %lld of query 0 differ from the CPU's\n",
                           static_cast<long long>(top_k));
  return agree;
}

int run_bench(const BenchOptions& o, Device device) {
  Rng rng(o.seed);
  const retrieval::PackedCodes database = random_codes(o.codes, o.bits, rng);
  const retrieval::PackedCodes queries = random_codes(o.queries, o.bits, rng);
  std::printf("mdff_search bench: %lld random %d-bit codes, %lld random queries, top %lld; one thread each side\n",
              static_cast<long long>(o.codes), o.bits, static_cast<long long>(o.queries),
              static_cast<long long>(o.top_k));
  std::fflush(stdout);
  BenchCheck check;
  const BenchTimes engine = bench_engine(database, queries, o.top_k, check);
  std::string why;
  const json numpy = bench_numpy(o, database, queries, why);

  const double engine_times[] = {engine.one_full_ranking, engine.one_top_k, engine.queries_distances,
                                 engine.queries_top_k};
  const std::string tasks[] = {"1 query, full ranking", detail::concat("1 query, top ", o.top_k),
                               detail::concat(o.queries, " queries, distances only"),
                               detail::concat(o.queries, " queries, top ", o.top_k, " each")};
  json report{{"codes", o.codes}, {"bits", o.bits}, {"queries", o.queries}, {"top_k", o.top_k}, {"seed", o.seed},
              {"repeats", kRepeats}, {"mdff", times_json(engine)}, {"numpy", nullptr}};
  std::printf("\n%-34s %12s %12s %13s\n", "", "mdff", "NumPy", "NumPy / mdff");
  json ratios = json::object();
  for (int i = 0; i < 4; ++i) {
    if (numpy.is_null()) {
      std::printf("%-34s %12s\n", tasks[i].c_str(), time_text(engine_times[i]).c_str());
      continue;
    }
    const double theirs = numpy[kTimeNames[i]].get<double>(), ratio = theirs / engine_times[i];
    ratios[kTimeNames[i]] = ratio;
    std::printf("%-34s %12s %12s %12.1fx\n", tasks[i].c_str(), time_text(engine_times[i]).c_str(),
                time_text(theirs).c_str(), ratio);
  }
  if (numpy.is_null()) {
    std::printf("NumPy comparison skipped: %s; the engine's numbers only\n", why.c_str());
    report["numpy_skipped"] = why;
  } else {
    const bool agree = numpy["first_top_k"].get<std::vector<int64_t>>() == check.first_top_k &&
                       numpy["distance_sum"].get<int64_t>() == check.distance_sum;
    std::printf("NumPy %s (%s): XOR, uint8 popcount table, stable ordering; results %s\n",
                numpy["version"].get<std::string>().c_str(), numpy["python"].get<std::string>().c_str(),
                agree ? "agree" : "DIFFER");
    report["numpy"] = {{"version", numpy["version"]}, {"python", numpy["python"]}};
    for (const char* name : kTimeNames) report["numpy"][name] = numpy[name];
    report["ratio"] = ratios;
    report["agree"] = agree;
    if (!agree) {
      std::fprintf(stderr, "mdff_search bench: error: NumPy's top %lld of query 0 or its distance sum differ from the "
                   "engine's\n", static_cast<long long>(o.top_k));
      return 1;
    }
  }
  if (device == Device::CUDA && !bench_gpu(database, queries, o.top_k, check, report)) return 1;
  if (!o.json.empty()) io::write_file_atomic(o.json, json_text(report));
  return 0;
}

void add_device_options(CLI::App& command, std::string& device, std::string& precision) {
  command.add_option("--device", device, "where the images are encoded: auto (the GPU when there is one), cpu or cuda")
      ->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  command.add_option("--precision", precision, "GPU math: tf32 (tensor cores, about 1e-3 relative error: a code bit "
                     "whose value is that close to 0 may flip) or fp32")->capture_default_str()
      ->check(CLI::IsMember({"tf32", "fp32"}));
}

}  // namespace

int main(int argc, char** argv) {
  // Line by line into a log file too, so that a line printed before an error message (stderr) comes first.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  CLI::App app{"Image search over MDFF-SH hash codes: index a collection with a train_mdff checkpoint, query it "
               "with images, or benchmark the Hamming ranking."};
  app.require_subcommand(1);

  IndexOptions index_options;
  CLI::App* index = app.add_subcommand("index", "encode every image of a folder or an image list into a code database");
  index->add_option("--checkpoint", index_options.checkpoint, "a train_mdff checkpoint_{L}bits.safetensors")->required();
  index->add_option("--out", index_options.out, "the code database to write (safetensors)")->required();
  CLI::Option* folder = index->add_option("--folder", index_options.folder, "index the .png, .jpg, .jpeg and .bmp files in this "
                                          "folder and below it (no labels)");
  CLI::Option* list = index->add_option("--list", index_options.list, "index an image list: `path l1 ... lK` lines (labels kept)");
  folder->excludes(list);
  index->add_option("--classes", index_options.classes, "labels per line of the list (default: the checkpoint's classes)")
      ->needs(list)->transform(cli::whole_number(1, 10000));
  index->add_option("--list-root", index_options.list_root, "folder the list's paths are relative to (default: the list's)")
      ->needs(list);
  index->add_option("--batch-size", index_options.batch_size, "images encoded at once")->capture_default_str()
      ->transform(cli::whole_number(1, 100000));
  add_device_options(*index, index_options.device, index_options.precision);

  QueryOptions query_options;
  CLI::App* query = app.add_subcommand("query", "find the database images whose codes are nearest the query images'");
  query->add_option("--db", query_options.db, "a code database written by `mdff_search index`")->required();
  query->add_option("--checkpoint", query_options.checkpoint, "the checkpoint the database was indexed with (default: the one "
                    "it records; another one is refused)");
  query->add_option("images", query_options.images, "query images (any format stb_image reads)")->required();
  CLI::Option* top_k = query->add_option("--top-k", query_options.top_k, "results per query")->capture_default_str()
                           ->transform(cli::whole_number(int64_t{1}, int64_t{1} << 40));
  query->add_option("--radius", query_options.radius, "instead of the top k: every image within this Hamming distance")
      ->excludes(top_k)->transform(cli::whole_number(0, 1 << 20));
  query->add_option("--json", query_options.json, "also write the results as JSON to this file");
  query->add_option("--grid", query_options.grid, "also draw each query and its results as a PNG grid, framed green or red by "
                    "label agreement when the query is a labelled database image");
  query->add_option("--grid-results", query_options.grid_results, "results per query in the grid")->capture_default_str()
      ->transform(cli::whole_number(1, 1000));
  add_device_options(*query, query_options.device, query_options.precision);

  BenchOptions bench_options;
  CLI::App* bench = app.add_subcommand("bench", "time the Hamming ranking on random codes, against NumPy");
  bench->add_option("--codes", bench_options.codes, "database codes")->capture_default_str()
      ->transform(cli::whole_number(int64_t{1}, int64_t{std::numeric_limits<int32_t>::max()}));
  bench->add_option("--bits", bench_options.bits, "code length")->capture_default_str()->transform(cli::whole_number(1, 4096));
  bench->add_option("--queries", bench_options.queries, "queries")->capture_default_str()
      ->transform(cli::whole_number(int64_t{1}, int64_t{1} << 24));
  bench->add_option("--top-k", bench_options.top_k, "results per query")->capture_default_str()
      ->transform(cli::whole_number(int64_t{1}, int64_t{std::numeric_limits<int32_t>::max()}));
  bench->add_option("--seed", bench_options.seed, "seed of the random codes")->capture_default_str();
  bench->add_option("--json", bench_options.json, "also write the results as JSON to this file");
  bench->add_option("--python", bench_options.python, "the Python with NumPy to compare with (a name without a '/' is "
                    "looked for on PATH)")->capture_default_str();
  bench->add_option("--device", bench_options.device, "cuda: also time the GPU's ranking of every query")
      ->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));

  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  if (index->parsed() && index_options.folder.empty() && index_options.list.empty()) {
    std::fprintf(stderr, "mdff_search index: give --folder DIR or --list FILE\nRun with --help for more information.\n");
    return 2;
  }
  // --device cuda without a usable GPU, or an index --out that cannot be written, is a usage error, like
  // CLI11's own, found before any work.
  Device device{};
  try {
    device = cli::choose_device(index->parsed() ? index_options.device
                                : query->parsed() ? query_options.device
                                                  : bench_options.device);
    if (index->parsed()) check_index_output(index_options);
  } catch (const Error& e) {
    std::fprintf(stderr, "mdff_search: %s\nRun with --help for more information.\n", e.reason());
    return 2;
  }
  try {
    if (index->parsed()) return run_index(index_options, device);
    if (query->parsed()) return run_query(query_options, device);
    return run_bench(bench_options, device);
  } catch (const std::exception& e) {  // mdff::Error, and the file system's errors
    std::fprintf(stderr, "mdff_search: error: %s\n", e.what());
    return 1;
  }
}
