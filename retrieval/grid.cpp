// The retrieval grid (see grid.h): layout, nearest-neighbour enlargement, frames, and PNG encoding with
// stb_image_write into memory, then an atomic write.
#include "retrieval/grid.h"

#include <algorithm>
#include <limits>

#include "core/error.h"
#include "core/file_io.h"

// The implementation lives in this file only, with internal linkage, so it cannot clash with another
// user of stb in the program.
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STB_IMAGE_WRITE_STATIC
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wunused-function"
#include <stb/stb_image_write.h>
#pragma GCC diagnostic pop

namespace mdff::retrieval {

namespace {
constexpr int kFrame = 2;          // frame width around each cell
constexpr int kMargin = 8;         // around the whole grid
constexpr int kSpacing = 4;        // between cells of a row and between rows
constexpr int kQueryGap = 20;      // between the query and its first result
constexpr int64_t kMaxPixels = int64_t{1} << 28;

void check_image(const Image& image, const std::string& what) {
  MDFF_CHECK(image.height >= 1 && image.width >= 1, "retrieval grid: ", what, " is ", image.height, " x ",
             image.width, "; images need at least one pixel");
  MDFF_CHECK(image.rgb.size() == static_cast<size_t>(image.height) * image.width * 3, "retrieval grid: ", what,
             " is ", image.height, " x ", image.width, " but holds ", image.rgb.size(), " bytes instead of ",
             static_cast<int64_t>(image.height) * image.width * 3);
}

int scale_factor(const Image& image, int min_side) {
  const int side = std::max(image.height, image.width);
  return std::max(1, (min_side + side - 1) / side);
}

void fill(Image& canvas, int top, int left, int height, int width, const uint8_t colour[3]) {
  for (int y = top; y < top + height; ++y) {
    for (int x = left; x < left + width; ++x) std::copy(colour, colour + 3, &canvas.rgb[(y * canvas.width + x) * 3]);
  }
}

// Draws `image` enlarged by `factor`, centred in the cell whose interior starts at (top, left).
void draw(Image& canvas, const Image& image, int factor, int top, int left, int cell_height, int cell_width) {
  top += (cell_height - image.height * factor) / 2;
  left += (cell_width - image.width * factor) / 2;
  for (int y = 0; y < image.height * factor; ++y) {
    for (int x = 0; x < image.width * factor; ++x) {
      const uint8_t* pixel = &image.rgb[((y / factor) * image.width + x / factor) * 3];
      std::copy(pixel, pixel + 3, &canvas.rgb[((top + y) * canvas.width + left + x) * 3]);
    }
  }
}
}  // namespace

Image retrieval_grid(const std::vector<GridRow>& rows, int min_side) {
  MDFF_CHECK(!rows.empty(), "retrieval grid: there are no queries to show");
  MDFF_CHECK(min_side >= 1 && min_side <= 4096, "retrieval grid: min_side must be in 1..4096, got ", min_side);
  int64_t cell_height = 0, cell_width = 0;
  size_t columns = 0;
  const auto grow_cell = [&](const Image& image) {
    const int factor = scale_factor(image, min_side);
    cell_height = std::max<int64_t>(cell_height, int64_t{image.height} * factor);
    cell_width = std::max<int64_t>(cell_width, int64_t{image.width} * factor);
  };
  for (size_t r = 0; r < rows.size(); ++r) {
    const GridRow& row = rows[r];
    check_image(row.query, "query " + std::to_string(r));
    MDFF_CHECK(row.relevant.empty() || row.relevant.size() == row.results.size(), "retrieval grid: query ", r,
               " has ", row.results.size(), " results but ", row.relevant.size(), " relevance flags");
    grow_cell(row.query);
    for (size_t i = 0; i < row.results.size(); ++i) {
      check_image(row.results[i], "result " + std::to_string(i) + " of query " + std::to_string(r));
      grow_cell(row.results[i]);
    }
    columns = std::max(columns, row.results.size());
  }
  const int64_t box_height = cell_height + 2 * kFrame, box_width = cell_width + 2 * kFrame;
  const int64_t height = 2 * kMargin + static_cast<int64_t>(rows.size()) * (box_height + kSpacing) - kSpacing;
  const int64_t width = 2 * kMargin + box_width + (columns ? kQueryGap + static_cast<int64_t>(columns) *
                                                                            (box_width + kSpacing) - kSpacing : 0);
  MDFF_CHECK(height * width <= kMaxPixels, "retrieval grid: the image would be ", height, " x ", width,
             " pixels; show fewer queries or results, or smaller images");

  Image canvas{static_cast<int>(height), static_cast<int>(width), {}};
  canvas.rgb.resize(static_cast<size_t>(height * width) * 3);
  fill(canvas, 0, 0, canvas.height, canvas.width, kGridBackground);
  const int box_h = static_cast<int>(box_height), box_w = static_cast<int>(box_width);
  const int cell_h = static_cast<int>(cell_height), cell_w = static_cast<int>(cell_width);
  for (size_t r = 0; r < rows.size(); ++r) {
    const GridRow& row = rows[r];
    const int top = kMargin + static_cast<int>(r) * (box_h + kSpacing);
    draw(canvas, row.query, scale_factor(row.query, min_side), top + kFrame, kMargin + kFrame, cell_h, cell_w);
    for (size_t i = 0; i < row.results.size(); ++i) {
      const int left = kMargin + box_w + kQueryGap + static_cast<int>(i) * (box_w + kSpacing);
      if (!row.relevant.empty()) {
        fill(canvas, top, left, box_h, box_w, row.relevant[i] ? kRelevantFrame : kIrrelevantFrame);
        fill(canvas, top + kFrame, left + kFrame, cell_h, cell_w, kGridBackground);
      }
      draw(canvas, row.results[i], scale_factor(row.results[i], min_side), top + kFrame, left + kFrame, cell_h, cell_w);
    }
  }
  return canvas;
}

void write_retrieval_grid_png(const std::string& path, const std::vector<GridRow>& rows, int min_side) {
  const Image canvas = retrieval_grid(rows, min_side);
  std::string png;
  const auto append = [](void* context, void* data, int size) {
    static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<size_t>(size));
  };
  MDFF_CHECK(stbi_write_png_to_func(append, &png, canvas.width, canvas.height, 3, canvas.rgb.data(), canvas.width * 3),
             "cannot write ", path, ": PNG encoding of the ", canvas.height, " x ", canvas.width, " grid failed");
  io::write_file_atomic(path, png);
}

}  // namespace mdff::retrieval
