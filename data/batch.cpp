// make_batch and BatchLoader (see batch.h).
#include "data/batch.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/ops.h"

namespace mdff::data {

namespace {
// The random choices for one image, drawn before the parallel loop.
struct Augmentation {
  bool flip = false;
  double crop_y = 0.5, crop_x = 0.5;  // where the crop window sits in [0,1) of its free range (0.5: centred)
  int shift_y = 0, shift_x = 0;       // translation: output pixel (y,x) shows source pixel (y+shift_y, x+shift_x)
};

// Image `row` as a (1,3,h,w) float tensor with values in [0,1].
Tensor load_image(const Dataset& d, int64_t row) {
  if (d.in_memory()) {
    MDFF_CHECK(d.channels == 3, d.name, ": images have ", d.channels, " channels; make_batch needs 3");
    Tensor x = Tensor::empty({1, 3, d.height, d.width});
    const uint8_t* src = d.image(row);
    float* dst = x.data<float>();
    for (int64_t i = 0; i < x.numel(); ++i) dst[i] = src[i] / 255.0f;
    return x;
  }
  const Image image = decode_image(d.image_paths[row]);
  const int64_t plane = int64_t(image.height) * image.width;
  Tensor x = Tensor::empty({1, 3, image.height, image.width});
  float* dst = x.data<float>();
  for (int64_t p = 0; p < plane; ++p) {
    for (int c = 0; c < 3; ++c) dst[c * plane + p] = image.pixels[p * 3 + c] / 255.0f;  // HWC -> CHW
  }
  return x;
}

Tensor resize_to(const Tensor& x, int64_t height, int64_t width) {
  return x.size(2) == height && x.size(3) == width ? x : ops::resize_bilinear(x, height, width);
}

// Resizes and crops image x (1,3,h,w) as the options say, flips it if asked, and writes it normalised into
// out (3,S,S).
void prepare_image(const Tensor& x, const BatchOptions& options, const Augmentation& aug, float* out) {
  const int64_t size = options.output_size();
  Tensor resized;
  int64_t top = 0, left = 0;
  if (options.crop_mode) {
    // The shorter side becomes `resize`, the longer one keeps the aspect ratio (torchvision's Resize(int)).
    const int64_t h = x.size(2), w = x.size(3), shorter = std::min(h, w), longer = std::max(h, w);
    const auto scaled = static_cast<int64_t>(double(options.resize) * longer / shorter);
    resized = h <= w ? resize_to(x, options.resize, scaled) : resize_to(x, scaled, options.resize);
    // Random offsets as torchvision's RandomCrop (uniform over all windows); centred as its CenterCrop
    // (round half to even, like Python's round).
    auto offset = [&](int64_t free, double u) {
      return options.train ? std::min(static_cast<int64_t>(u * (free + 1)), free)
                           : static_cast<int64_t>(std::nearbyint(free / 2.0));
    };
    top = offset(resized.size(2) - size, aug.crop_y);
    left = offset(resized.size(3) - size, aug.crop_x);
  } else {
    resized = resize_to(x, size, size);
  }
  top += aug.shift_y;
  left += aug.shift_x;
  const int64_t height = resized.size(2), width = resized.size(3);
  const float* src = resized.data<float>();
  for (int c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < size; ++y) {
      const int64_t y_in = top + y;
      float* dst = out + (c * size + y) * size;
      for (int64_t x_out = 0; x_out < size; ++x_out) {
        const int64_t x_in = left + (aug.flip ? size - 1 - x_out : x_out);
        const bool inside = y_in >= 0 && y_in < height && x_in >= 0 && x_in < width;
        const float v = inside ? src[(c * height + y_in) * width + x_in] : 0.0f;
        dst[x_out] = (v - kImageNetMean[c]) / kImageNetStd[c];
      }
    }
  }
}

int64_t count_batches(int64_t rows, const LoaderOptions& o) {
  MDFF_CHECK(o.batch_size > 0, "BatchLoader: batch_size must be positive, got ", o.batch_size);
  return o.drop_last ? rows / o.batch_size : (rows + o.batch_size - 1) / o.batch_size;
}

void check_options(const BatchOptions& o) {
  MDFF_CHECK(o.image_size >= 1, "batch options: image_size must be positive, got ", o.image_size);
  MDFF_CHECK(o.shift >= 0 && o.shift < o.image_size, "batch options: shift must be in [0, image_size), got ", o.shift);
  MDFF_CHECK(!o.crop_mode || (o.crop >= 1 && o.resize >= o.crop),
             "batch options: crop mode needs 1 <= crop <= resize, "
             "got crop ",
             o.crop, " and resize ", o.resize);
}
}  // namespace

Batch make_batch(const Dataset& dataset, const std::vector<int64_t>& rows, const std::vector<int32_t>& positions,
                 const BatchOptions& options, Rng& rng) {
  check_options(options);
  MDFF_CHECK(positions.size() == rows.size(), "make_batch: ", rows.size(), " rows but ", positions.size(),
             " positions; give one position per row");
  const auto count = static_cast<int64_t>(rows.size());
  for (int64_t row : rows) {
    MDFF_CHECK(row >= 0 && row < dataset.size(), "make_batch: row ", row, " is outside ", dataset.name, " (",
               dataset.size(), " images)");
  }
  std::vector<Augmentation> augmentations(rows.size());
  for (Augmentation& aug : augmentations) {
    if (options.train && options.flip) aug.flip = rng.uniform() < 0.5;
    if (options.train && options.crop_mode) {
      aug.crop_y = rng.uniform();
      aug.crop_x = rng.uniform();
    }
    if (options.train && options.shift > 0 && !options.crop_mode) {
      aug.shift_y = static_cast<int>(rng.below(2 * options.shift + 1)) - options.shift;
      aug.shift_x = static_cast<int>(rng.below(2 * options.shift + 1)) - options.shift;
    }
  }

  const int64_t size = options.output_size(), image_numel = 3 * size * size;
  Batch batch;
  batch.dataset_rows = rows;
  batch.images = Tensor::empty({count, 3, size, size});
  batch.labels = Tensor::empty({count, dataset.classes});
  batch.index = Tensor::from_vector(positions, {count});
  float* images = batch.images.data<float>();
  float* labels = batch.labels.data<float>();
  std::vector<std::exception_ptr> errors(rows.size());  // exceptions cannot leave an OpenMP loop
#pragma omp parallel for schedule(dynamic)
  for (int64_t i = 0; i < count; ++i) {
    try {
      prepare_image(load_image(dataset, rows[i]), options, augmentations[i], images + i * image_numel);
      const uint8_t* label = dataset.label_row(rows[i]);
      std::copy(label, label + dataset.classes, labels + i * dataset.classes);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  }
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return batch;
}

BatchLoader::BatchLoader(const Dataset& dataset, std::vector<int64_t> rows, const LoaderOptions& options)
    : dataset_(dataset),
      rows_(std::move(rows)),
      options_(options),
      batches_per_epoch_(count_batches(static_cast<int64_t>(rows_.size()), options)),
      rng_(options.seed) {
  MDFF_CHECK(rows_.size() <= size_t(INT32_MAX), "BatchLoader: ", rows_.size(), " rows do not fit int32 positions");
  check_options(options.batch);
  worker_ = std::thread(&BatchLoader::work, this);
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  worker_.join();
}

void BatchLoader::start_epoch(int64_t skip_batches) {
  MDFF_CHECK(skip_batches >= 0 && skip_batches <= batches_per_epoch_, "BatchLoader: cannot skip ", skip_batches,
             " of ", batches_per_epoch_, " batches");
  std::vector<int64_t> order(rows_.size());
  std::iota(order.begin(), order.end(), 0);
  if (options_.batch.train) {
    for (int64_t i = static_cast<int64_t>(order.size()) - 1; i > 0; --i) {
      std::swap(order[i], order[rng_.below(static_cast<uint64_t>(i + 1))]);
    }
  }
  std::vector<uint64_t> seeds(static_cast<size_t>(batches_per_epoch_));
  for (uint64_t& seed : seeds) seed = rng_.next_u64();

  std::unique_lock<std::mutex> lock(mutex_);
  order_ = std::move(order);
  batch_seeds_ = std::move(seeds);
  ++epoch_;
  running_ = true;
  batches_made_ = batches_taken_ = skip_batches;
  slot_full_ = false;
  slot_ = Batch();
  error_ = nullptr;
  lock.unlock();
  changed_.notify_all();
}

bool BatchLoader::next(Batch& out) {
  std::unique_lock<std::mutex> lock(mutex_);
  MDFF_CHECK(epoch_ > 0, "BatchLoader::next: call start_epoch() first");
  changed_.wait(lock, [&] { return slot_full_ || error_ || !running_ || batches_taken_ == batches_per_epoch_; });
  if (error_) {
    const std::exception_ptr error = error_;
    error_ = nullptr;
    running_ = false;
    std::rethrow_exception(error);
  }
  if (!slot_full_) {
    running_ = false;
    return false;
  }
  out = std::move(slot_);
  slot_ = Batch();
  slot_full_ = false;
  ++batches_taken_;
  lock.unlock();
  changed_.notify_all();
  return true;
}

void BatchLoader::work() {
  // One thread: the training step already keeps every core busy, and a second OpenMP team on this
  // thread would only contend with it (a 32x32 batch takes 0.6 ms on one core).
  omp_set_num_threads(1);
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(
        lock, [&] { return stopping_ || (running_ && !slot_full_ && !error_ && batches_made_ < batches_per_epoch_); });
    if (stopping_) return;
    const int64_t epoch = epoch_, b = batches_made_++;
    const int64_t first = b * options_.batch_size;
    const int64_t last = std::min<int64_t>(first + options_.batch_size, static_cast<int64_t>(order_.size()));
    std::vector<int64_t> rows;
    std::vector<int32_t> positions;
    for (int64_t p = first; p < last; ++p) {
      positions.push_back(static_cast<int32_t>(order_[p]));
      rows.push_back(rows_[order_[p]]);
    }
    Rng rng(batch_seeds_[b]);
    lock.unlock();
    Batch batch;
    std::exception_ptr error;
    try {
      batch = make_batch(dataset_, rows, positions, options_.batch, rng);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (epoch == epoch_) {  // not abandoned by start_epoch meanwhile
      if (error) {
        error_ = error;
      } else {
        slot_ = std::move(batch);
        slot_full_ = true;
      }
    }
    changed_.notify_all();
  }
}

}  // namespace mdff::data
