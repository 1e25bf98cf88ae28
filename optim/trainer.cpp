// The training loop (see trainer.h).
#include "optim/trainer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>

#include "core/autograd.h"
#include "core/error.h"
#include "core/ops.h"

namespace mdff {

namespace {
Tensor label_matrix(const data::Dataset& dataset, const std::vector<int64_t>& rows) {
  Tensor labels = Tensor::empty({static_cast<int64_t>(rows.size()), dataset.classes});  // (n,K) float multi-hot
  float* out = labels.data<float>();
  for (size_t i = 0; i < rows.size(); ++i)
    for (int k = 0; k < dataset.classes; ++k) out[i * dataset.classes + k] = dataset.label_row(rows[i])[k];
  return labels;
}
}  // namespace

Trainer::Trainer(MdffSh& model, const data::Dataset& dataset, std::vector<int64_t> train_rows,
                 const TrainSettings& settings)
    : model_(model), settings_(settings) {
  MDFF_CHECK(settings.epochs >= 1 && settings.batch_size >= 2, "training needs epochs >= 1 and a batch size >= 2");
  MDFF_CHECK(settings.optimizer == "rmsprop" || settings.optimizer == "sgd", "unknown optimizer '", settings.optimizer,
             "': use rmsprop or sgd");
  MDFF_CHECK(settings.warmup_epochs >= 0 && settings.warmup_epochs <= settings.epochs, "warm-up of ",
             settings.warmup_epochs, " epochs: it must be between 0 and the ", settings.epochs, " epochs of training");
  MDFF_CHECK(settings.schedule == "constant" || settings.schedule == "cosine", "unknown schedule '", settings.schedule,
             "': use constant or cosine");
  const Device device = model.parameters().front().device();
  memory_ = std::make_unique<PairMemory>(label_matrix(dataset, train_rows).to(device), model.config().bits);
  data::LoaderOptions loader;
  loader.batch_size = settings.batch_size;
  loader.drop_last = static_cast<int64_t>(train_rows.size()) > settings.batch_size;  // batch norm needs >= 2
  loader.seed = settings.seed;
  loader.batch = settings.batch;
  loader.batch.train = true;
  loader_ = std::make_unique<data::BatchLoader>(dataset, std::move(train_rows), loader);
  parameters_ = std::make_unique<ParameterBuffer>(model.named_parameters());
  buffers_ = model.named_buffers();
  for (const auto& [name, statistic] : buffers_) statistics_.push_back(statistic);
  if (settings.optimizer == "rmsprop")
    optimizer_ = std::make_unique<RMSProp>(*parameters_, RMSPropOptions{settings.lr, 0.99, 1e-8, settings.weight_decay});
  else
    optimizer_ = std::make_unique<Sgd>(*parameters_, SgdOptions{settings.lr, settings.momentum, settings.weight_decay});
  total_steps_ = static_cast<int64_t>(settings.epochs) * loader_->batches_per_epoch();
  epoch_rng_state_ = loader_->rng_state();
}

double scheduled_learning_rate(const TrainSettings& settings, int64_t step, int64_t steps_per_epoch,
                               int64_t total_steps) {
  const double warmup_steps = settings.warmup_epochs * static_cast<double>(steps_per_epoch);
  // Capped at 1: with a warm-up that is not a whole number of steps, (step + 1) / warmup_steps passes 1 on its
  // last step (25x --lr for a warm-up of 0.04 steps).
  const double warmup = std::min(1.0, (static_cast<double>(step) + 1) / warmup_steps);
  if (settings.schedule == "constant" || total_steps == 0) return warmup * settings.lr;
  const double progress = static_cast<double>(step) / static_cast<double>(total_steps);
  return warmup * 0.5 * settings.lr * (1 + std::cos(M_PI * progress));
}

double Trainer::scheduled_lr() const {
  return scheduled_learning_rate(settings_, optimizer_->steps(), loader_->batches_per_epoch(), total_steps_);
}

EpochReport Trainer::train_epoch(const std::function<void(int64_t, int64_t, double, double)>& progress,
                                 const std::atomic<bool>* stop) {
  MDFF_CHECK(epochs_done_ < settings_.epochs, "train_epoch: all ", settings_.epochs, " epochs are done");
  model_.train();
  if (batches_done_ == 0) {
    partial_ = EpochReport();
    partial_.epoch = epochs_done_ + 1;
    partial_.lr = scheduled_lr();
  }
  loader_->set_rng_state(epoch_rng_state_);  // an interrupted epoch repeats its order and augmentations
  loader_->start_epoch(batches_done_);
  const Device device = model_.parameters().front().device();
  const double seconds_before = partial_.seconds;
  const auto start = std::chrono::steady_clock::now();
  auto seconds_so_far = [&] {
    return seconds_before + std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const int readout_every = settings_.readout_every > 0 ? settings_.readout_every : device == Device::CPU ? 1 : 20;
  std::vector<StepRecord> pending;
  auto read_and_report = [&] {
    read_out(pending);
    if (progress) progress(batches_done_, loader_->batches_per_epoch(), partial_.loss / batches_done_,
                           images_done_ / seconds_so_far());
  };
  data::Batch batch;
  while (!(stop && stop->load()) && loader_->next(batch)) {
    optimizer_->lr = scheduled_lr();
    parameters_->zero_grad();
    const MdffOutput out = model_.forward(batch.images.to(device));
    const LossTerms terms = mdff_loss(out.u, out.logits, batch.labels.to(device), batch.index.to(device),
                                      memory_.get(), settings_.loss);
    terms.total.backward();
    StepRecord record{terms.total.detach(), terms.j1.detach(), terms.j2.detach(), terms.j3.detach(),
                      Tensor::zeros({}, DType::I32, device), Tensor::zeros({}, DType::I32, device),
                      batches_done_ + static_cast<int64_t>(pending.size()) + 1, batch.images.size(0), optimizer_->lr};
    ops::count_non_finite_(parameters_->grads(), record.bad_grads);
    optimizer_->step();
    // Activations that overflow in training mode (where batch norm normalises by the batch) reach only
    // the running statistics.
    ops::count_non_finite_(statistics_, record.bad_stats);
    pending.push_back(std::move(record));
    if (static_cast<int>(pending.size()) >= readout_every) read_and_report();
  }
  if (!pending.empty()) read_and_report();
  parameters_->zero_grad();  // the last step's gradients, read: not held through evaluation
  // Finite gradients times a learning rate far too high can overflow a parameter. The next step's loss
  // almost always shows it; this check, once before every checkpoint rather than after every step (a
  // second pass over the parameters would cost ResNet50 2% more), makes sure no checkpoint keeps it. The
  // values are counted where they are (4 bytes come back, not the 114 MB of ResNet50's parameters) and
  // searched on the host only when one is bad.
  Tensor bad_values = Tensor::zeros({}, DType::I32, device);
  ops::count_non_finite_({parameters_->values()}, bad_values);
  if (bad_values.item() > 0)
    if (const std::optional<NonFinite> bad = parameters_->first_non_finite_value())
      throw TrainingDiverged(detail::concat("after epoch ", partial_.epoch, ", step ", batches_done_, ", parameter ",
                                            bad->name, " is ", bad->value, " (element ", bad->index, "), although "
                                            "every gradient was finite: an update overflowed it, the learning rate (",
                                            optimizer_->lr, " at that step) is far too high; lower --lr"));
  partial_.seconds = seconds_so_far();
  EpochReport report = partial_;
  report.images_per_second = images_done_ / report.seconds;
  if (batches_done_ < loader_->batches_per_epoch()) {
    report.complete = false;
    return report;
  }
  MDFF_CHECK(batches_done_ > 0, "the training split has no full batch: use a smaller --batch-size");
  for (double* sum : {&report.loss, &report.j1, &report.j2, &report.j3}) *sum /= static_cast<double>(batches_done_);
  ++epochs_done_;
  batches_done_ = images_done_ = 0;
  epoch_rng_state_ = loader_->rng_state();  // start_epoch drew this epoch's randomness: the next one's state
  return report;
}

void Trainer::read_out(std::vector<StepRecord>& pending) {
  std::vector<StepRecord> records;
  records.swap(pending);
  if (records.empty()) return;
  // Every record's values come to the host in two copies (the loss terms, the counts): the host waits for
  // the device once per read-out, not once per value.
  std::vector<Tensor> term_parts, count_parts;
  for (const StepRecord& r : records) {
    for (const Tensor* t : {&r.total, &r.j1, &r.j2, &r.j3}) term_parts.push_back(t->reshape({1}));
    for (const Tensor* t : {&r.bad_grads, &r.bad_stats}) count_parts.push_back(t->reshape({1}));
  }
  const std::vector<double> terms = ops::concat(term_parts, 0).to_vector();    // (records x 4)
  const std::vector<double> counts = ops::concat(count_parts, 0).to_vector();  // (records x 2)
  for (size_t i = 0; i < records.size(); ++i) {
    const StepRecord& r = records[i];
    const double loss = terms[4 * i], j1 = terms[4 * i + 1], j2 = terms[4 * i + 2], j3 = terms[4 * i + 3];
    const double bad_grads = counts[2 * i], bad_stats = counts[2 * i + 1];
    const std::string at = detail::concat("at epoch ", partial_.epoch, ", step ", r.step);
    if (!std::isfinite(loss))
      throw TrainingDiverged(detail::concat("the loss became ", loss, " ", at, " (J1 ", j1, ", J2 ", j2, ", J3 ", j3,
                                            "); lower --lr"));
    if (bad_grads > 0) {
      // The parameters' gradients are this step's only when it is the last one read.
      const std::optional<NonFinite> bad =
          i + 1 == records.size() ? parameters_->first_non_finite_grad() : std::optional<NonFinite>();
      if (bad)
        throw TrainingDiverged(detail::concat("the gradient of ", bad->name, " became ", bad->value, " (element ",
                                              bad->index, ") ", at, ", with the loss still finite (", loss,
                                              "); it is the first parameter, in the model's order, whose gradient is "
                                              "not finite. Lower --lr"));
      throw TrainingDiverged(detail::concat(bad_grads, " gradient values became NaN or infinite ", at,
                                            ", with the loss still finite (", loss, "). Lower --lr"));
    }
    // A non-finite running statistic stays non-finite ((1 - m) r + m s), so the statistics still show it.
    if (bad_stats > 0)
      if (const std::optional<NonFinite> bad = first_non_finite(buffers_))
        throw TrainingDiverged(detail::concat("the batch-norm statistic ", bad->name, " became ", bad->value,
                                              " (element ", bad->index, ") ", at, ": the activations overflow, the "
                                              "learning rate (", r.lr, " at this step) is far too high; lower --lr"));
    ++batches_done_;
    images_done_ += r.images;
    partial_.loss += loss;
    partial_.j1 += j1;
    partial_.j2 += j2;
    partial_.j3 += j3;
  }
}

std::string Trainer::progress() const {
  if (batches_done_ == 0) return detail::concat(epochs_done_, " of ", settings_.epochs, " epochs done");
  return detail::concat("epoch ", epochs_done_ + 1, ": ", batches_done_, " of ", loader_->batches_per_epoch(),
                        " steps done");
}

namespace {
constexpr const char* kOptimizerPrefix = "optimizer.";
constexpr const char* kCodesName = "trainer.codes";

// Copies the checkpoint's tensor `name` into `target` (same shape), or fails naming it.
void restore_tensor(const io::SafetensorsFile& checkpoint, const std::string& name, Tensor& target) {
  const io::SafetensorsEntry* entry = checkpoint.find(name);
  MDFF_CHECK(entry, "checkpoint: no tensor '", name, "' (it was not written by train_mdff's trainer, or by an "
             "older version)");
  MDFF_CHECK(entry->shape == target.shape(), "checkpoint: '", name, "' has shape ", shape_str(entry->shape),
             ", expected ", shape_str(target.shape()), " (a different model or training set)");
  target.copy_(io::to_tensor(*entry, target.dtype()).to(target.device()));
}
}  // namespace

void Trainer::save_state(NamedTensors& tensors, std::map<std::string, std::string>& metadata) const {
  for (const auto& [name, tensor] : optimizer_->state()) tensors.emplace_back(kOptimizerPrefix + name, tensor);
  tensors.emplace_back(kCodesName, memory_->codes());
  // nlohmann::json writes doubles with 17 significant digits and 64-bit integers whole: both round-trip.
  metadata["trainer"] = nlohmann::json{
      {"optimizer", optimizer_->name()},
      {"steps", optimizer_->steps()},
      {"epochs_done", epochs_done_},
      {"batches_done", batches_done_},
      {"images_done", images_done_},
      {"epoch_rng_state", epoch_rng_state_},
      {"partial", {partial_.loss, partial_.j1, partial_.j2, partial_.j3, partial_.seconds, partial_.lr}}}.dump();
}

void Trainer::restore_state(const io::SafetensorsFile& checkpoint) {
  const auto found = checkpoint.metadata.find("trainer");
  MDFF_CHECK(found != checkpoint.metadata.end(), "checkpoint: no training state (metadata 'trainer')");
  try {
    const nlohmann::json state = nlohmann::json::parse(found->second);
    MDFF_CHECK(state.value("optimizer", "") == optimizer_->name(), "checkpoint: written by the ",
               state.value("optimizer", "?"), " optimizer, this run uses ", optimizer_->name());
    for (auto& [name, tensor] : optimizer_->state()) restore_tensor(checkpoint, kOptimizerPrefix + name, tensor);
    restore_tensor(checkpoint, kCodesName, memory_->codes());
    optimizer_->set_steps(state.at("steps").get<int64_t>());
    epochs_done_ = state.at("epochs_done").get<int>();
    batches_done_ = state.at("batches_done").get<int64_t>();
    images_done_ = state.at("images_done").get<int64_t>();
    MDFF_CHECK(epochs_done_ <= settings_.epochs && batches_done_ < loader_->batches_per_epoch(),
               "checkpoint: epoch ", epochs_done_, ", batch ", batches_done_, " does not fit this run's ",
               settings_.epochs, " epochs of ", loader_->batches_per_epoch(), " batches");
    epoch_rng_state_ = state.at("epoch_rng_state").get<Rng::State>();
    const std::array<double, 6> partial = state.at("partial").get<std::array<double, 6>>();
    partial_ = EpochReport();
    partial_.epoch = epochs_done_ + 1;
    partial_.loss = partial[0];
    partial_.j1 = partial[1];
    partial_.j2 = partial[2];
    partial_.j3 = partial[3];
    partial_.seconds = partial[4];
    partial_.lr = partial[5];
  } catch (const nlohmann::json::exception& e) {
    MDFF_FAIL("checkpoint: the training state (metadata 'trainer') is damaged: ", e.what());
  }
}

}  // namespace mdff
