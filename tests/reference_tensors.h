// Comparing the engine with reference tensors that a Python script (PyTorch) wrote to a safetensors
// file: reading a named tensor and the max-abs relative error used by the parity tests.
#pragma once
#include "tests/doctest_text.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "core/tensor.h"

namespace mdff::test {

// The tensor `name` of `file` in `dtype`; a missing name fails the test, naming it.
inline Tensor reference_tensor(const io::SafetensorsFile& file, const std::string& name, DType dtype = DType::F32) {
  const io::SafetensorsEntry* entry = file.find(name);
  REQUIRE_MESSAGE(entry, "the reference file has no tensor ", name);
  return io::to_tensor(*entry, dtype);
}

// max |engine - expected| / max |expected|, over tensors of the same shape.
inline double relative_error(const Tensor& engine, const Tensor& expected) {
  REQUIRE_MESSAGE(engine.shape() == expected.shape(), "shape ", shape_str(engine.shape()), " vs ",
                  shape_str(expected.shape()));
  const std::vector<double> a = engine.to_vector(), b = expected.to_vector();
  double diff = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

}  // namespace mdff::test
