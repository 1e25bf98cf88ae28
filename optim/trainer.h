// The MDFF-SH training loop: batches from a data::BatchLoader, the model's forward pass, the loss
// J = J1 + beta J2 + gamma J3 (with the U matrix of the training images), backward, one optimizer step
// over the flat parameter buffer, and the learning-rate schedule. It stops with a TrainingDiverged
// error, naming the epoch and step, the moment the loss, a gradient or (after the update) a batch-norm
// statistic is not finite, and when a parameter is not finite at the end of an epoch or an interrupted
// one (before any checkpoint of it); the first such tensor in the model's order is named.
//
// Read-outs: a step queues its work and its checks on the device and records, without waiting, the
// loss terms and the counts of non-finite gradients and statistics (ops::count_non_finite_). Every
// `readout_every` steps (and at the end of an epoch or a stop) the trainer reads those records: that
// read-out is the only place a training step waits for the device. On the CPU it happens after every
// step (reading is free there); on the GPU every 20 steps by default, so a divergence is reported up to
// 19 steps after it happened, still naming its step, and the gradient's parameter only when it is the
// last step read (no checkpoint is written in between, so no work is lost).
//
// Exact resume: save_state adds to a checkpoint everything beyond the model that the rest of the run
// depends on (optimizer buffers and step count, the U matrix, the position in the current epoch, the
// data order's random state, the running sums of the epoch's losses); restore_state puts it back, and
// training continues as if it had never stopped (bit for bit on the CPU).
#pragma once
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "data/batch.h"
#include "losses/hash_losses.h"
#include "models/mdff.h"
#include "optim/optimizers.h"

namespace mdff {

struct TrainSettings {
  int epochs = 10;
  int64_t batch_size = 32;
  std::string optimizer = "rmsprop";  // "rmsprop" | "sgd"
  double lr = 1e-5;
  double weight_decay = 1e-5;
  double momentum = 0.9;              // SGD only
  std::string schedule = "constant";  // "constant" | "cosine" (to 0 over all steps)
  double warmup_epochs = 0;           // over these first epochs, the schedule is scaled by a linear ramp to 1
  LossConfig loss;
  data::BatchOptions batch;           // augmentation and image size of the training batches
  uint64_t seed = 0;
  int readout_every = 0;  // steps between read-outs (see above); 0: 1 on the CPU, 20 on the GPU
};

// The learning rate of the 0-based step `step`: --lr times the schedule (constant: 1; cosine: from 1 to 0 over all
// `total_steps`), times the warm-up ramp min(1, (step + 1) / warm-up steps). The ramp scales the cosine rather
// than coming before it, so a warm-up peaks at the cosine's value there: 0.99 --lr after 1 of 16 epochs (the
// scratch recipe), 0.5 --lr after 1 of 2.
double scheduled_learning_rate(const TrainSettings& settings, int64_t step, int64_t steps_per_epoch,
                               int64_t total_steps);

struct TrainingDiverged : Error {
  using Error::Error;
};

struct EpochReport {
  int epoch = 0;               // 1-based
  double loss = 0, j1 = 0, j2 = 0, j3 = 0;  // means over the epoch's batches
  double seconds = 0, images_per_second = 0, lr = 0;
  bool complete = true;        // false: stopped early on request; the epoch continues at the next call
};

class Trainer {
 public:
  // `train_rows`: the training images' rows in the dataset; their order is U's row order.
  Trainer(MdffSh& model, const data::Dataset& dataset, std::vector<int64_t> train_rows, const TrainSettings& settings);
  // One pass over the training images (or the rest of an interrupted one). progress(done, total,
  // running loss, images/s) after each read-out. When *stop becomes true, it returns after the current
  // step with complete = false.
  EpochReport train_epoch(const std::function<void(int64_t, int64_t, double, double)>& progress = {},
                          const std::atomic<bool>* stop = nullptr);
  int epochs_done() const { return epochs_done_; }
  // Where training stands, for messages: "2 of 3 epochs done", or "epoch 3: 4 of 6 steps done" when a
  // checkpoint was written inside an epoch.
  std::string progress() const;
  const TrainSettings& settings() const { return settings_; }

  // Adds the optimizer's buffers ("optimizer.<name>") and U ("trainer.codes") to `tensors` and the
  // counters as JSON to metadata["trainer"].
  void save_state(NamedTensors& tensors, std::map<std::string, std::string>& metadata) const;
  // The inverse, from a checkpoint that save_state wrote for the same settings; a missing or
  // mismatched entry is an Error naming it.
  void restore_state(const io::SafetensorsFile& checkpoint);

 private:
  // What a step leaves for the next read-out: its loss terms and counts of non-finite values, still on
  // the device.
  struct StepRecord {
    Tensor total, j1, j2, j3;      // 0-dim, detached
    Tensor bad_grads, bad_stats;   // I32 scalars: non-finite gradients, non-finite batch-norm statistics
    int64_t step = 0;              // 1-based within the epoch
    int64_t images = 0;
    double lr = 0;
  };
  double scheduled_lr() const;
  // Reads the records (waiting for the device), adds them to the epoch's sums, and throws
  // TrainingDiverged at the first bad one.
  void read_out(std::vector<StepRecord>& pending);
  MdffSh& model_;
  TrainSettings settings_;
  std::unique_ptr<data::BatchLoader> loader_;
  std::unique_ptr<ParameterBuffer> parameters_;
  NamedTensors buffers_;             // the model's batch-norm statistics, checked for NaN after every step...
  std::vector<Tensor> statistics_;  // ...the same tensors, as the NaN count takes them
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<PairMemory> memory_;
  int epochs_done_ = 0;
  int64_t total_steps_ = 0;
  // The epoch in progress (or the next one, when batches_done_ is 0): batches done, the running sums
  // of its report, and the loader's random state at its start (restored to repeat its order and
  // augmentations after an interruption).
  int64_t batches_done_ = 0, images_done_ = 0;
  EpochReport partial_;
  Rng::State epoch_rng_state_{};
};

}  // namespace mdff
