// The paper's Figure 4 as a PNG: one row per query with the query image, a gap, then its top results,
// each framed in green (relevant) or red (irrelevant); small images are enlarged by an integer factor
// (nearest neighbour) so they can be seen.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mdff::retrieval {

// An RGB image, (height, width, 3) row-major.
struct Image {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> rgb;
};

// One row of the grid: a query, its results in rank order and whether each result is relevant.
struct GridRow {
  Image query;
  std::vector<Image> results;
  std::vector<bool> relevant;  // (results), or empty: nothing to judge relevance by, no frames
};

// The layout: each image is enlarged by the smallest integer factor that makes its larger side at least
// min_side pixels, and sits in a cell as large as the largest enlarged image. A cell has a 2-pixel frame
// (green or red for judged results, none for the query and unjudged results); rows may hold different
// numbers of results.
Image retrieval_grid(const std::vector<GridRow>& rows, int min_side = 64);

// Writes retrieval_grid(rows, min_side) to `path` as a PNG, atomically.
void write_retrieval_grid_png(const std::string& path, const std::vector<GridRow>& rows, int min_side = 64);

// The frame colours, for readers of the image.
constexpr uint8_t kRelevantFrame[3] = {0, 170, 0};
constexpr uint8_t kIrrelevantFrame[3] = {220, 0, 0};
constexpr uint8_t kGridBackground[3] = {255, 255, 255};

}  // namespace mdff::retrieval
