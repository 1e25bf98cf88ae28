// Turning dataset rows into model inputs: make_batch decodes (image lists), resizes (bilinear, PyTorch's
// align_corners=False), crops, flips and normalises a list of images into one float tensor; BatchLoader
// walks a list of rows batch by batch, preparing the next batch on a background thread.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"
#include "data/dataset.h"

namespace mdff::data {

// ImageNet statistics, applied after scaling pixels to [0,1]: (x/255 - mean[c]) / std[c].
inline constexpr float kImageNetMean[3] = {0.485f, 0.456f, 0.406f};
inline constexpr float kImageNetStd[3] = {0.229f, 0.224f, 0.225f};

struct BatchOptions {
  int image_size = 32;     // S: images of another size are resized (bilinear) to SxS
  bool flip = false;       // random horizontal flip with probability 1/2 (training only)
  int shift = 0;           // random translation by up to `shift` pixels each way, uncovered pixels black
                           //   (torchvision's RandomCrop(S, padding=shift); training only, not in crop mode)
  bool train = false;      // training: augmentations on, and BatchLoader shuffles every epoch
  bool crop_mode = false;  // instead of the resize to image_size (image lists, as DeepHash-pytorch does):
  int resize = 256;        //   resize the shorter side to `resize` (keeping the aspect ratio), then crop
  int crop = 224;          //   crop x crop, at random (train) or centred (eval); S = crop
  int output_size() const { return crop_mode ? crop : image_size; }
};

struct Batch {
  Tensor images;  // (B,3,S,S) float32, normalised with kImageNetMean / kImageNetStd
  Tensor labels;  // (B,K) float32 multi-hot
  Tensor index;   // (B) int32: the images' positions in the list being iterated (the training list: U's rows)
  std::vector<int64_t> dataset_rows;  // (B) the images' rows in the dataset
};

// The batch of images `rows` of `dataset`; `positions` (same length) become Batch::index. Random
// choices (flip, crop offsets) are drawn from `rng` in image order before the parallel per-image work, so
// the result depends on the rng's state only, not on the number of threads.
Batch make_batch(const Dataset& dataset, const std::vector<int64_t>& rows, const std::vector<int32_t>& positions,
                 const BatchOptions& options, Rng& rng);

struct LoaderOptions {
  int64_t batch_size = 32;
  bool drop_last = false;  // drop the last batch of an epoch when it is smaller than batch_size
  uint64_t seed = 0;       // the order (shuffled each epoch when batch.train) and the augmentations
  BatchOptions batch;
};

// Iterates over `rows` in batches: Batch::index holds each image's position in `rows`. While the caller
// uses one batch, a background thread prepares the next (a one-slot queue); an exception thrown there is
// rethrown by next(). The loader's own Rng, seeded from options.seed, draws each epoch's order and one
// seed per batch, so the batches depend on the seed only, never on thread timing. The dataset must
// outlive the loader.
//   for (int epoch = 0; epoch < epochs; ++epoch) {
//     loader.start_epoch();
//     for (Batch b; loader.next(b);) { ... }
//   }
class BatchLoader {
 public:
  BatchLoader(const Dataset& dataset, std::vector<int64_t> rows, const LoaderOptions& options);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Begins an epoch (abandoning the current one, if any) and starts preparing its first batch; with
  // skip_batches > 0 the epoch continues after that many batches (resuming an interrupted run).
  void start_epoch(int64_t skip_batches = 0);
  // The next batch of the epoch; false at its end. Rethrows an error raised while preparing the batch
  // (the epoch then ends).
  bool next(Batch& out);
  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  // The random state that the next start_epoch draws the order and the augmentations from: restoring
  // it and calling start_epoch repeats that epoch exactly.
  Rng::State rng_state() const { return rng_.state(); }
  void set_rng_state(const Rng::State& state) { rng_.set_state(state); }

 private:
  void work();  // the background thread

  const Dataset& dataset_;
  const std::vector<int64_t> rows_;
  const LoaderOptions options_;
  const int64_t batches_per_epoch_;
  Rng rng_;  // epoch orders and batch seeds; used by the caller's thread only

  // Shared with the worker, guarded by mutex_ (the worker copies what it needs before unlocking).
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<int64_t> order_;         // positions in rows_, this epoch's order
  std::vector<uint64_t> batch_seeds_;  // one per batch of this epoch
  bool running_ = false;               // an epoch is in progress
  bool stopping_ = false;              // the destructor asks the worker to leave
  int64_t epoch_ = 0;                  // counts start_epoch calls: a batch of an abandoned epoch is discarded
  int64_t batches_made_ = 0, batches_taken_ = 0;
  bool slot_full_ = false;
  Batch slot_;
  std::exception_ptr error_;
  std::thread worker_;
};

}  // namespace mdff::data
