// Out-of-line pieces of error.h and dtype.h.
#include "core/error.h"

#include "core/dtype.h"

namespace mdff {
namespace detail {
void fail(const char* file, int line, const char* condition, const std::string& message) {
  std::string text = message;
  if (condition) text += concat(" [check `", condition, "` failed");
  else text += " [";
  text += concat(condition ? " at " : "at ", file, ":", line, "]");
  throw Error(text, message);
}
}  // namespace detail

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::I32: return 4;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::I32: return "int32";
  }
  return "?";
}

const char* device_name(Device device) { return device == Device::CPU ? "cpu" : "cuda"; }

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const Shape& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + ")";
}

}  // namespace mdff
