// mdff_walkthrough: follows one Fashion-MNIST image through MDFF-SH and prints the numbers that
// docs/walkthrough.md explains: its pixels as read (data/dataset.cpp) and as normalised (data/batch.cpp),
// the output shape of each stage (models/mdff.cpp), its continuous code u and its 48-bit code packed into
// a 64-bit word (retrieval/codes.cpp), and its Hamming ranking against a small database with the query's
// AP (retrieval/metrics.cpp). A teaching aid: it computes nothing the library does not.
//
//   mdff_walkthrough [--checkpoint CKPT] [--data-dir DIR] [--query 0] [--database 1000] [--top 10]
//
// Without --checkpoint the model is ResNet50-MDFF-SH (48 bits, scales 1 and 0.5) with random weights (seed 0).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>

#include "apps/cli.h"
#include "core/autograd.h"
#include "core/error.h"
#include "data/batch.h"
#include "data/idx.h"
#include "data/protocol.h"
#include "models/checkpoint.h"
#include "retrieval/encode.h"
#include "retrieval/metrics.h"

using namespace mdff;

namespace {
int class_of(const data::Dataset& d, int64_t row) {
  const uint8_t* labels = d.label_row(row);
  return static_cast<int>(std::find(labels, labels + d.classes, 1) - labels);
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Follows one Fashion-MNIST image from its pixels to its hash code and its ranking (docs/walkthrough.md)"};
  std::string checkpoint, data_dir = data::kFashionMnistDir;
  int64_t query = 0, database_size = 1000;
  int top = 10;
  app.add_option("--checkpoint", checkpoint, "a train_mdff checkpoint (default: random weights, seed 0)");
  app.add_option("--data-dir", data_dir, "the Fashion-MNIST folder")->capture_default_str();
  app.add_option("--query", query, "which query of the split (seed 0) to follow")->capture_default_str()->transform(cli::whole_number(0, 999));
  app.add_option("--database", database_size, "database images to rank (the first of the split's database)")
      ->capture_default_str()->transform(cli::whole_number(1, 69000));
  app.add_option("--top", top, "results to print")->capture_default_str()->transform(cli::whole_number(1, 100));
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;
  try {
    // 1. Reading and the split.
    const data::Dataset d = data::load_fashion_mnist(data_dir);
    const data::Split split = data::make_split(d, "paper", 0);
    const int64_t row = split.query[static_cast<size_t>(query)];
    std::printf("1. read %lld images; split (seed 0): %zu queries, %zu training, %zu database\n",
                static_cast<long long>(d.size()), split.query.size(), split.train.size(), split.database.size());
    std::printf("   query %lld = dataset row %lld, class %d (%s); stored as (3,%d,%d) uint8, channel 0:\n",
                static_cast<long long>(query), static_cast<long long>(row), class_of(d, row),
                d.class_names[class_of(d, row)].c_str(), d.height, d.width);
    const uint8_t* pixels = d.image(row);
    for (int y = 0; y < d.height; ++y) {
      std::string line = "   ";
      for (int x = 0; x < d.width; ++x) line.append(2, " .:-=+*#%@"[pixels[y * d.width + x] * 10 / 256]);
      std::printf("%s\n", line.substr(0, line.find_last_not_of(' ') + 1).c_str());
    }
    // The centre pixel, row and column, of the image as read; the batch's own size may differ (below).
    const int centre_y = d.height / 2, centre_x = d.width / 2;
    std::printf("   row %d:", centre_y);
    for (int x = 0; x < d.width; ++x) std::printf(" %d", pixels[centre_y * d.width + x]);
    std::printf("\n");

    // The model: from a checkpoint, or the default configuration with random weights.
    std::unique_ptr<MdffSh> model;
    data::BatchOptions options;
    if (!checkpoint.empty()) {
      LoadedCheckpoint loaded = load_model_checkpoint(checkpoint);
      model = std::move(loaded.model);
      options = loaded.batch;
    } else {
      Rng rng(0);
      model = std::make_unique<MdffSh>(MdffConfig{}, rng);
    }
    model->eval();

    // 2. The batch of one image.
    Rng unused(0);
    const data::Batch batch = data::make_batch(d, {row}, {0}, options, unused);
    // The batch is the checkpoint's image size (--image-size, or the crop), not the 32x32 read: its own
    // centre pixel is shown next to the raw image's, about the same place in the picture when the sizes differ.
    const float* x = batch.images.data<float>();
    const int64_t h = batch.images.size(2), w = batch.images.size(3);
    std::printf("2. batch images %s; centre pixel: raw (%d,%d) %d -> batch (%lld,%lld)",
                shape_str(batch.images.shape()).c_str(), centre_y, centre_x, pixels[centre_y * d.width + centre_x],
                static_cast<long long>(h / 2), static_cast<long long>(w / 2));
    for (int c = 0; c < 3; ++c) std::printf(" %+.4f", x[(c * h + h / 2) * w + w / 2]);
    std::printf("; pixel (0,0): raw %d ->", pixels[0]);
    for (int c = 0; c < 3; ++c) std::printf(" %+.4f", x[c * h * w]);
    std::printf("\n");

    // 3. The forward pass, stage by stage.
    NoGradGuard no_grad;
    std::vector<TraceRow> trace;
    const MdffOutput out = model->forward(batch.images, &trace);
    std::printf("3. forward (evaluation mode)\n");
    for (const TraceRow& r : trace) std::printf("   %-32s %s\n", r.stage.c_str(), shape_str(r.shape).c_str());
    const std::vector<double> u = out.u.to_vector(), logits = out.logits.to_vector();
    std::printf("   u =");
    for (size_t j = 0; j < u.size(); ++j) std::printf("%s%+.3f", j % 12 ? " " : "\n     ", u[j]);
    const auto predicted = std::max_element(logits.begin(), logits.end()) - logits.begin();
    std::printf("\n   logits argmax: class %lld (%s)\n", static_cast<long long>(predicted),
                predicted < d.classes ? d.class_names[predicted].c_str() : "?");

    // 4. The binary code.
    const retrieval::PackedCodes code = retrieval::pack_codes(out.u);
    std::printf("4. code: %d bits in %d word(s); word 0 = 0x%016llx\n   bits j = 0..%d: ", code.bits, code.words,
                static_cast<unsigned long long>(code.data[0]), code.bits - 1);
    for (int j = 0; j < code.bits; ++j) std::printf("%d", static_cast<int>((code.data[j / 64] >> (j % 64)) & 1));
    std::printf("\n");

    // 5. Ranking a small database and the query's AP.
    const std::vector<int64_t> rows(split.database.begin(),
                                    split.database.begin() + std::min<int64_t>(database_size, split.database.size()));
    const retrieval::PackedCodes database = retrieval::pack_codes(retrieval::encode(*model, d, rows, options, 64));
    const std::vector<int> distance = retrieval::distances(database, code, 0);
    const std::vector<int32_t> order = retrieval::order_by_distance(distance, code.bits, top);
    std::printf("5. ranking %zu database images\n   %4s %6s %8s %8s  %s\n", rows.size(), "rank", "index", "row",
                "distance", "class");
    for (size_t k = 0; k < order.size(); ++k) {
      const int64_t r = rows[order[k]];
      std::printf("   %4zu %6d %8lld %8d  %d %s%s\n", k + 1, order[k], static_cast<long long>(r), distance[order[k]],
                  class_of(d, r), d.class_names[class_of(d, r)].c_str(),
                  class_of(d, r) == class_of(d, row) ? "  (relevant)" : "");
    }
    std::vector<uint8_t> query_labels(d.label_row(row), d.label_row(row) + d.classes), database_labels;
    for (int64_t r : rows) database_labels.insert(database_labels.end(), d.label_row(r), d.label_row(r) + d.classes);
    const int n_at = static_cast<int>(std::min<int64_t>(top, database.count));
    const retrieval::RetrievalMetrics m =
        retrieval::evaluate(code, query_labels, database, database_labels, d.classes, -1, {n_at});
    std::printf("   AP@ALL %.4f, P@%d %.4f, P@H<=2 %.4f (%s within radius 2)\n", m.map, n_at, m.precision_at_n[0],
                m.precision_h2, m.empty_share_h2 > 0 ? "nothing" : "some images");
  } catch (const Error& e) {
    std::fprintf(stderr, "mdff_walkthrough: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
