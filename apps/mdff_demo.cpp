// mdff_demo: a quick check that the engine learns, end to end. Trains a small convolutional network
// (conv-BN-ReLU-pool twice, global average pooling, a linear classifier) on Fashion-MNIST with the
// engine's autograd and plain SGD with momentum, then reports test accuracy. It exercises every piece
// a training step needs: data, forward, loss, backward, update, evaluation mode.
//
//   mdff_demo [--data-dir DIR] [--steps 1000] [--batch 64] [--lr 0.1] [--seed 0]

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "apps/cli.h"
#include "core/autograd.h"
#include "core/blas.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"
#include "data/idx.h"
#include "optim/optimizers.h"

using namespace mdff;

namespace {

struct Split {
  data::IdxArray images, labels;  // (n,28,28) uint8, (n) uint8
};

Split load_split(const std::string& dir, const std::string& prefix) {
  MDFF_CHECK(std::filesystem::is_directory(dir), dir, ": no such folder. Install the dataset with "
             "`apt-get install dataset-fashion-mnist` (scripts/setup.sh does), or pass --data-dir");
  Split s{data::read_idx(dir + "/" + prefix + "-images-idx3-ubyte.gz"),
          data::read_idx(dir + "/" + prefix + "-labels-idx1-ubyte.gz")};
  MDFF_CHECK(s.images.shape.size() == 3 && s.labels.shape.size() == 1 && s.images.shape[0] == s.labels.shape[0],
             dir, ": ", prefix, " images and labels do not match (", s.images.shape[0], " images, ",
             s.labels.shape[0], " labels)");
  return s;
}

// Images `order[first .. first+count)` as a (count,1,28,28) float batch scaled to [0,1], and one-hot targets.
void make_batch(const Split& s, const std::vector<int64_t>& order, int64_t first, int64_t count, Tensor& x,
                Tensor& target) {
  const int64_t pixels = s.images.shape[1] * s.images.shape[2];
  x = Tensor::empty({count, 1, s.images.shape[1], s.images.shape[2]});
  target = Tensor::zeros({count, 10});
  for (int64_t i = 0; i < count; ++i) {
    const int64_t at = order[first + i];
    for (int64_t p = 0; p < pixels; ++p) x.data<float>()[i * pixels + p] = s.images.values[at * pixels + p] / 255.0f;
    target.data<float>()[i * 10 + s.labels.values[at]] = 1.0f;
  }
}

struct Net {
  std::vector<Tensor> params;  // conv1, bn1 gamma/beta, conv2, bn2 gamma/beta, fc weight/bias
  std::vector<Tensor> running = {Tensor::zeros({16}), Tensor::full({16}, 1.0), Tensor::zeros({32}),
                                 Tensor::full({32}, 1.0)};

  explicit Net(Rng& rng) {
    auto kaiming = [&](const Shape& s, double fan_in) { return Tensor::randn(s, rng, std::sqrt(2.0 / fan_in)); };
    params = {kaiming({16, 1, 3, 3}, 9),      Tensor::full({16}, 1.0), Tensor::zeros({16}),
              kaiming({32, 16, 3, 3}, 144),   Tensor::full({32}, 1.0), Tensor::zeros({32}),
              kaiming({10, 32}, 32),          Tensor::zeros({10})};
    for (Tensor& p : params) p.set_requires_grad();
  }

  Tensor forward(const Tensor& x, bool training) {
    const auto& p = params;
    Tensor h = ops::relu(ops::batch_norm2d(ops::conv2d(x, p[0], Tensor(), 1, 1), p[1], p[2], running[0], running[1],
                                           training));
    h = ops::max_pool2d(h, 3, 2, 1);  // (N,16,14,14)
    h = ops::relu(ops::batch_norm2d(ops::conv2d(h, p[3], Tensor(), 1, 1), p[4], p[5], running[2], running[3],
                                    training));
    h = ops::max_pool2d(h, 3, 2, 1);  // (N,32,7,7)
    return ops::linear(ops::global_avg_pool(h), p[6], p[7]);  // (N,10)
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Trains a small CNN classifier on Fashion-MNIST with the mdff engine and reports its test accuracy: "
               "a quick check that the engine learns (train_mdff trains MDFF-SH hashing models)"};
  std::string data_dir = data::kFashionMnistDir;
  int steps = 1000, batch = 64;
  double lr = 0.1;
  uint64_t seed = 0;
  app.add_option("--data-dir", data_dir, "folder with the Fashion-MNIST *-ubyte.gz files (Debian: dataset-fashion-mnist)")
      ->capture_default_str();
  app.add_option("--steps", steps, "SGD steps")->capture_default_str()->transform(cli::whole_number(1, 1000000));
  app.add_option("--batch", batch, "batch size")->capture_default_str()->transform(cli::whole_number(2, 4096));
  app.add_option("--lr", lr, "learning rate (SGD, momentum 0.9)")->capture_default_str()->check(cli::finite_number(0, true));
  app.add_option("--seed", seed, "seed for initialisation and data order")->capture_default_str();
  if (auto exit_code = cli::parse(app, argc, argv)) return *exit_code;

  try {
    std::printf("mdff demo: %s\n", blas::describe().c_str());
    const Split train = load_split(data_dir, "train"), test = load_split(data_dir, "t10k");
    std::printf("Fashion-MNIST: %lld training and %lld test images from %s\n", (long long)train.labels.shape[0],
                (long long)test.labels.shape[0], data_dir.c_str());
    Rng rng(seed);
    Net net(rng);
    NamedTensors named;
    for (size_t i = 0; i < net.params.size(); ++i) named.emplace_back(std::to_string(i), net.params[i]);
    ParameterBuffer parameters(named);
    Sgd optimizer(parameters, {lr, 0.9, 0.0});

    std::vector<int64_t> order(static_cast<size_t>(train.labels.shape[0]));
    std::iota(order.begin(), order.end(), 0);
    int64_t cursor = static_cast<int64_t>(order.size());
    const auto start = std::chrono::steady_clock::now();
    double smoothed = 0;
    for (int step = 1; step <= steps; ++step) {
      if (cursor + batch > static_cast<int64_t>(order.size())) {  // new epoch: reshuffle
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
        cursor = 0;
      }
      Tensor x, target;
      make_batch(train, order, cursor, batch, x, target);
      cursor += batch;
      Tensor loss = ops::cross_entropy(net.forward(x, true), target);
      parameters.zero_grad();
      loss.backward();
      const double value = loss.item();
      MDFF_CHECK(std::isfinite(value), "the loss became ", value, " at step ", step, "; try a smaller --lr");
      optimizer.step();  // v <- 0.9 v + g;  p <- p - lr v
      smoothed = step == 1 ? value : 0.95 * smoothed + 0.05 * value;
      if (step % 25 == 0 || step == steps) {
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::printf("step %4d/%d  loss %.4f  %6.0f img/s  ETA %4.0f s\n", step, steps, smoothed, step * batch / elapsed,
                    elapsed / step * (steps - step));
        std::fflush(stdout);
      }
    }

    NoGradGuard no_grad;
    std::vector<int64_t> all(static_cast<size_t>(test.labels.shape[0]));
    std::iota(all.begin(), all.end(), 0);
    int64_t correct = 0;
    for (int64_t first = 0; first < static_cast<int64_t>(all.size()); first += 500) {
      const int64_t count = std::min<int64_t>(500, static_cast<int64_t>(all.size()) - first);
      Tensor x, target;
      make_batch(test, all, first, count, x, target);
      const std::vector<double> logits = net.forward(x, false).to_vector();
      for (int64_t i = 0; i < count; ++i) {
        const auto row = logits.begin() + i * 10;
        correct += (std::max_element(row, row + 10) - row) == test.labels.values[first + i];
      }
    }
    std::printf("test accuracy: %.2f%% (%lld / %lld)\n", 100.0 * correct / all.size(), (long long)correct,
                (long long)all.size());
  } catch (const Error& e) {
    std::fprintf(stderr, "mdff_demo: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
