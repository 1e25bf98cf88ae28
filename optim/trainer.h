// The MDFF-SH training loop: batches from a data::BatchLoader, the model's forward pass, the loss
// J = J1 + beta J2 + gamma J3 (with the U matrix of the training images), backward, one optimizer step
// over the flat parameter buffer, and the learning-rate schedule. It stops with a TrainingDiverged
// error, naming the epoch and step, the moment the loss is not finite.
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "core/error.h"
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
  LossConfig loss;
  data::BatchOptions batch;           // augmentation and image size of the training batches
  uint64_t seed = 0;
};

struct TrainingDiverged : Error {
  using Error::Error;
};

struct EpochReport {
  int epoch = 0;               // 1-based
  double loss = 0, j1 = 0, j2 = 0, j3 = 0;  // means over the epoch's batches
  double seconds = 0, images_per_second = 0, lr = 0;
};

class Trainer {
 public:
  // `train_rows`: the training images' rows in the dataset; their order is U's row order.
  Trainer(MdffSh& model, const data::Dataset& dataset, std::vector<int64_t> train_rows, const TrainSettings& settings);
  // One pass over the training images. progress(done, total, running loss, images/s) after each batch.
  EpochReport train_epoch(const std::function<void(int64_t, int64_t, double, double)>& progress = {});
  int epochs_done() const { return epoch_; }
  const TrainSettings& settings() const { return settings_; }

 private:
  double scheduled_lr() const;
  MdffSh& model_;
  TrainSettings settings_;
  std::unique_ptr<data::BatchLoader> loader_;
  std::unique_ptr<ParameterBuffer> parameters_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<PairMemory> memory_;
  int epoch_ = 0;
  int64_t step_ = 0, total_steps_ = 0;
};

}  // namespace mdff
