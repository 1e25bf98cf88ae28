// The distinct convolution shapes of torchvision's ResNet50 (v1.5) for a square input, with how many
// times each occurs in one forward pass. Shared by the benchmarks.
#pragma once
#include <string>
#include <vector>

namespace mdff::bench {

// What a convolution is in its block, which says what follows it: every one is followed by a batch
// norm; Stem, Reduce and Spatial then by a ReLU; Expand by the residual add (of the block's input or
// of its Downsample) and a ReLU.
enum class ConvRole { Stem, Reduce, Spatial, Expand, Downsample };

struct ConvShape {
  std::string name;  // where it occurs
  int cin, cout, kernel, stride, padding, size;  // size: input height = width
  int count;         // occurrences in ResNet50
  ConvRole role;
  int out_size() const { return (size + 2 * padding - kernel) / stride + 1; }
  double flops(int batch) const {  // multiply-adds x 2 of the forward pass
    return 2.0 * batch * cout * out_size() * out_size() * cin * kernel * kernel;
  }
};

inline std::vector<ConvShape> resnet50_convs(int input) {
  std::vector<ConvShape> shapes{{"conv1 7x7/2", 3, 64, 7, 2, 3, input, 1, ConvRole::Stem}};
  const int widths[4] = {64, 128, 256, 512}, blocks[4] = {3, 4, 6, 3};
  int cin = 64;
  int size = ((input + 6 - 7) / 2 + 1 + 2 - 3) / 2 + 1;  // after conv1 (7x7/2, pad 3) and the 3x3/2 max pool
  for (int l = 0; l < 4; ++l) {
    const int w = widths[l], stride = l == 0 ? 1 : 2, out = (size + 2 - 3) / stride + 1;
    const std::string layer = "layer" + std::to_string(l + 1);
    const int more = blocks[l] - 1;  // the blocks after the first
    shapes.push_back({layer + ".0 1x1 reduce", cin, w, 1, 1, 0, size, 1, ConvRole::Reduce});
    shapes.push_back({layer + ".0 3x3/" + std::to_string(stride), w, w, 3, stride, 1, size, 1, ConvRole::Spatial});
    shapes.push_back({layer + ".0 1x1 expand", w, 4 * w, 1, 1, 0, out, 1, ConvRole::Expand});
    shapes.push_back({layer + ".0 downsample 1x1/" + std::to_string(stride), cin, 4 * w, 1, stride, 0, size, 1,
                      ConvRole::Downsample});
    shapes.push_back({layer + ".k 1x1 reduce", 4 * w, w, 1, 1, 0, out, more, ConvRole::Reduce});
    shapes.push_back({layer + ".k 3x3", w, w, 3, 1, 1, out, more, ConvRole::Spatial});
    shapes.push_back({layer + ".k 1x1 expand", w, 4 * w, 1, 1, 0, out, more, ConvRole::Expand});
    cin = 4 * w;
    size = out;
  }
  return shapes;
}

}  // namespace mdff::bench
