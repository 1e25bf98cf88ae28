// Line plots as self-contained SVG files (hand-written SVG text): the precision-recall curves per code
// length, the P@N curves and P@H<=2 against code length. Axes with "nice" ticks, labels, a legend and
// one distinct colour per series; every text is XML-escaped.
#pragma once
#include <string>
#include <vector>

namespace mdff::retrieval {

struct PlotSeries {
  std::string name;        // shown in the legend
  std::vector<double> xs;  // (points)
  std::vector<double> ys;  // (points)
};

// Writes the plot to `path` atomically. Each series needs as many xs as ys, at least one point and finite
// values; the axes span the data, widened to round tick values.
void write_line_plot_svg(const std::string& path, const std::string& title, const std::string& x_label,
                         const std::string& y_label, const std::vector<PlotSeries>& series);

// The SVG text that write_line_plot_svg writes.
std::string line_plot_svg(const std::string& title, const std::string& x_label, const std::string& y_label,
                          const std::vector<PlotSeries>& series);

}  // namespace mdff::retrieval
