// Encoding images into hash codes with a trained model: evaluation mode, no graph, large batches.
#pragma once
#include <functional>
#include <vector>

#include "data/batch.h"
#include "models/mdff.h"
#include "retrieval/codes.h"

namespace mdff::retrieval {

// The continuous codes u (N,L) of the dataset's `rows`, on the CPU, computed in batches of
// `batch_size` on the model's device; progress(done, total) after each batch.
Tensor encode(MdffSh& model, const data::Dataset& dataset, const std::vector<int64_t>& rows,
              const data::BatchOptions& options, int64_t batch_size,
              const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace mdff::retrieval
