// The training loop (see trainer.h).
#include "optim/trainer.h"

#include <chrono>
#include <cmath>

#include "core/autograd.h"
#include "core/error.h"

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
  if (settings.optimizer == "rmsprop")
    optimizer_ = std::make_unique<RMSProp>(*parameters_, RMSPropOptions{settings.lr, 0.99, 1e-8, settings.weight_decay});
  else
    optimizer_ = std::make_unique<Sgd>(*parameters_, SgdOptions{settings.lr, settings.momentum, settings.weight_decay});
  total_steps_ = static_cast<int64_t>(settings.epochs) * loader_->batches_per_epoch();
}

double Trainer::scheduled_lr() const {
  if (settings_.schedule == "constant" || total_steps_ == 0) return settings_.lr;
  return 0.5 * settings_.lr * (1 + std::cos(M_PI * static_cast<double>(step_) / static_cast<double>(total_steps_)));
}

EpochReport Trainer::train_epoch(const std::function<void(int64_t, int64_t, double, double)>& progress) {
  ++epoch_;
  model_.train();
  loader_->start_epoch();
  const Device device = model_.parameters().front().device();
  EpochReport report;
  report.epoch = epoch_;
  report.lr = scheduled_lr();
  const auto start = std::chrono::steady_clock::now();
  int64_t batches = 0, images = 0;
  data::Batch batch;
  while (loader_->next(batch)) {
    optimizer_->lr = scheduled_lr();
    parameters_->zero_grad();
    const MdffOutput out = model_.forward(batch.images.to(device));
    const LossTerms terms = mdff_loss(out.u, out.logits, batch.labels.to(device), batch.index.to(device),
                                      memory_.get(), settings_.loss);
    const double loss = terms.total.item();
    if (!std::isfinite(loss))
      throw TrainingDiverged(detail::concat("the loss became ", loss, " at epoch ", epoch_, ", step ", batches + 1,
                                            " (J1 ", terms.j1.item(), ", J2 ", terms.j2.item(), ", J3 ",
                                            terms.j3.item(), "); lower --lr"));
    terms.total.backward();
    optimizer_->step();
    ++step_;
    ++batches;
    images += batch.images.size(0);
    report.loss += loss;
    report.j1 += terms.j1.item();
    report.j2 += terms.j2.item();
    report.j3 += terms.j3.item();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (progress) progress(batches, loader_->batches_per_epoch(), report.loss / batches, images / seconds);
  }
  MDFF_CHECK(batches > 0, "the training split has no full batch: use a smaller --batch-size");
  report.loss /= batches;
  report.j1 /= batches;
  report.j2 /= batches;
  report.j3 /= batches;
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  report.images_per_second = images / report.seconds;
  return report;
}

}  // namespace mdff
