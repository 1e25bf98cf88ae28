// Encoding (see encode.h).
#include "retrieval/encode.h"

#include <algorithm>
#include <cstring>
#include <deque>

#include "core/autograd.h"

namespace mdff::retrieval {

Tensor encode(MdffSh& model, const data::Dataset& dataset, const std::vector<int64_t>& rows,
              const data::BatchOptions& options, int64_t batch_size,
              const std::function<void(int64_t, int64_t)>& progress) {
  const bool was_training = model.is_training();
  model.eval();
  NoGradGuard no_grad;
  const Device device = model.parameters().front().device();
  const int64_t n = static_cast<int64_t>(rows.size()), bits = model.config().bits;
  Tensor codes = Tensor::empty({n, bits});  // (N,L)
  data::BatchOptions eval = options;
  eval.train = false;
  Rng unused(0);  // evaluation batches draw no random numbers
  // Batches in flight: the codes of a batch are read back (which waits for the device) only after
  // kInFlight more have been queued, so the host assembles the next images while a GPU computes.
  // On the CPU every batch is computed when its forward returns; the window changes nothing there.
  constexpr size_t kInFlight = 4;
  std::deque<std::pair<int64_t, Tensor>> pending;  // (first row, u (count,L) on the device)
  auto read_back = [&] {
    const auto& [first, u_device] = pending.front();
    const Tensor u = u_device.cpu();
    std::memcpy(codes.data<float>() + first * bits, u.data<float>(), u.numel() * sizeof(float));
    if (progress) progress(first + u.size(0), n);
    pending.pop_front();
  };
  for (int64_t first = 0; first < n; first += batch_size) {
    const int64_t count = std::min(batch_size, n - first);
    const std::vector<int64_t> chunk(rows.begin() + first, rows.begin() + first + count);
    std::vector<int32_t> positions(count);
    for (int64_t i = 0; i < count; ++i) positions[i] = static_cast<int32_t>(first + i);
    const data::Batch batch = data::make_batch(dataset, chunk, positions, eval, unused);
    pending.emplace_back(first, model.forward(batch.images.to(device)).u);
    if (pending.size() > kInFlight) read_back();
  }
  while (!pending.empty()) read_back();
  model.train(was_training);
  return codes;
}

}  // namespace mdff::retrieval
