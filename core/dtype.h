// Element types, devices and shapes: the vocabulary every tensor and kernel shares.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mdff {

// F32 is the working type everywhere; F64 exists on the CPU for gradient checks; I32 holds indices
// (max-pool argmax, row indices of the U matrix).
enum class DType { F32, F64, I32 };
enum class Device { CPU, CUDA };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
const char* device_name(Device device);
inline bool is_floating(DType dtype) { return dtype == DType::F32 || dtype == DType::F64; }

using Shape = std::vector<int64_t>;
int64_t numel(const Shape& shape);
std::string shape_str(const Shape& shape);  // "(2,3,4)"

}  // namespace mdff
