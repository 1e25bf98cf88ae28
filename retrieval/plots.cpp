// SVG line plots (see plots.h): a fixed 720 x 480 canvas, the plot area on the left, the legend on the
// right; tick values are 1, 2 or 5 times a power of ten.
#include "retrieval/plots.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "core/error.h"
#include "core/file_io.h"

namespace mdff::retrieval {

namespace {
constexpr double kWidth = 720, kHeight = 480;
constexpr double kLeft = 70, kRight = 540, kTop = 40, kBottom = 420;  // the plot area
constexpr int kTargetTicks = 6;
constexpr int kMaxMarkedPoints = 40;  // series with more points are drawn as lines only
constexpr const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
constexpr int kColourCount = sizeof kColours / sizeof kColours[0];

std::string escape_xml(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:  // control characters are not allowed in XML 1.0
        out += (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r') ? '?' : c;
    }
  }
  return out;
}

std::string number(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", value);
  return text;
}

// An axis: the data range widened to whole tick steps, the step 1, 2 or 5 x 10^k.
struct Axis {
  double low, high, step;

  Axis(double data_low, double data_high) {
    if (data_high - data_low < 1e-12 * std::max(1.0, std::abs(data_high))) {  // one value: a unit span around it
      data_low -= 0.5;
      data_high += 0.5;
    }
    const double raw_step = (data_high - data_low) / kTargetTicks;
    const double magnitude = std::pow(10.0, std::floor(std::log10(raw_step)));
    step = magnitude * 10;
    for (double factor : {1.0, 2.0, 5.0}) {
      if (magnitude * factor >= raw_step) {
        step = magnitude * factor;
        break;
      }
    }
    low = std::floor(data_low / step + 1e-9) * step;
    high = std::ceil(data_high / step - 1e-9) * step;
  }

  std::vector<double> ticks() const {
    std::vector<double> values;
    const int count = static_cast<int>(std::lround((high - low) / step));
    for (int i = 0; i <= count; ++i) {
      const double value = low + i * step;
      values.push_back(std::abs(value) < step * 1e-9 ? 0.0 : value);  // no "-0" or "1e-17"
    }
    return values;
  }
  // Maps a value to the pixel interval [from, to].
  double map(double value, double from, double to) const { return from + (value - low) / (high - low) * (to - from); }
};

void check_series(const std::vector<PlotSeries>& series) {
  MDFF_CHECK(!series.empty(), "line plot: there is no series to draw");
  for (const PlotSeries& s : series) {
    MDFF_CHECK(!s.xs.empty() && s.xs.size() == s.ys.size(), "line plot: series '", s.name, "' has ", s.xs.size(),
               " x values and ", s.ys.size(), " y values; it needs as many of each, at least one");
    for (size_t i = 0; i < s.xs.size(); ++i) {
      MDFF_CHECK(std::isfinite(s.xs[i]) && std::isfinite(s.ys[i]), "line plot: series '", s.name, "' point ", i,
                 " is (", s.xs[i], ", ", s.ys[i], "); values must be finite");
    }
  }
}
}  // namespace

std::string line_plot_svg(const std::string& title, const std::string& x_label, const std::string& y_label,
                          const std::vector<PlotSeries>& series) {
  check_series(series);
  double x_min = std::numeric_limits<double>::infinity(), x_max = -x_min, y_min = x_min, y_max = -x_min;
  for (const PlotSeries& s : series) {
    for (size_t i = 0; i < s.xs.size(); ++i) {
      x_min = std::min(x_min, s.xs[i]);
      x_max = std::max(x_max, s.xs[i]);
      y_min = std::min(y_min, s.ys[i]);
      y_max = std::max(y_max, s.ys[i]);
    }
  }
  const Axis x_axis(x_min, x_max), y_axis(y_min, y_max);

  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + number(kWidth) + "\" height=\"" +
                    number(kHeight) + "\" viewBox=\"0 0 " + number(kWidth) + " " + number(kHeight) +
                    "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  svg += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg += "<text x=\"" + number((kLeft + kRight) / 2) + "\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">" +
         escape_xml(title) + "</text>\n";

  // grid lines and tick labels
  for (double tick : x_axis.ticks()) {
    const std::string x = number(x_axis.map(tick, kLeft, kRight));
    svg += "<line x1=\"" + x + "\" y1=\"" + number(kTop) + "\" x2=\"" + x + "\" y2=\"" + number(kBottom) +
           "\" stroke=\"#e0e0e0\"/>\n";
    svg += "<text x=\"" + x + "\" y=\"" + number(kBottom + 16) + "\" text-anchor=\"middle\">" + number(tick) +
           "</text>\n";
  }
  for (double tick : y_axis.ticks()) {
    const std::string y = number(y_axis.map(tick, kBottom, kTop));
    svg += "<line x1=\"" + number(kLeft) + "\" y1=\"" + y + "\" x2=\"" + number(kRight) + "\" y2=\"" + y +
           "\" stroke=\"#e0e0e0\"/>\n";
    svg += "<text x=\"" + number(kLeft - 6) + "\" y=\"" + y + "\" text-anchor=\"end\" dominant-baseline=\"middle\">" +
           number(tick) + "</text>\n";
  }
  svg += "<rect x=\"" + number(kLeft) + "\" y=\"" + number(kTop) + "\" width=\"" + number(kRight - kLeft) +
         "\" height=\"" + number(kBottom - kTop) + "\" fill=\"none\" stroke=\"black\"/>\n";
  svg += "<text x=\"" + number((kLeft + kRight) / 2) + "\" y=\"" + number(kBottom + 40) +
         "\" text-anchor=\"middle\">" + escape_xml(x_label) + "</text>\n";
  svg += "<text transform=\"translate(18 " + number((kTop + kBottom) / 2) +
         ") rotate(-90)\" text-anchor=\"middle\">" + escape_xml(y_label) + "</text>\n";

  // the series, then the legend; colours cycle with a dash pattern after the tenth series
  for (size_t k = 0; k < series.size(); ++k) {
    const PlotSeries& s = series[k];
    const std::string colour = kColours[k % kColourCount];
    const std::string dash = k >= kColourCount ? " stroke-dasharray=\"6 3\"" : "";
    std::string points;
    for (size_t i = 0; i < s.xs.size(); ++i) {
      points += (i ? " " : "") + number(x_axis.map(s.xs[i], kLeft, kRight)) + "," +
                number(y_axis.map(s.ys[i], kBottom, kTop));
    }
    svg += "<polyline fill=\"none\" stroke=\"" + colour + "\" stroke-width=\"2\"" + dash + " points=\"" + points +
           "\"/>\n";
    if (s.xs.size() <= kMaxMarkedPoints) {
      for (size_t i = 0; i < s.xs.size(); ++i) {
        svg += "<circle cx=\"" + number(x_axis.map(s.xs[i], kLeft, kRight)) + "\" cy=\"" +
               number(y_axis.map(s.ys[i], kBottom, kTop)) + "\" r=\"3\" fill=\"" + colour + "\"/>\n";
      }
    }
    const std::string y = number(kTop + 10 + 20 * static_cast<double>(k));
    svg += "<line x1=\"" + number(kRight + 16) + "\" y1=\"" + y + "\" x2=\"" + number(kRight + 40) + "\" y2=\"" + y +
           "\" stroke=\"" + colour + "\" stroke-width=\"2\"" + dash + "/>\n";
    svg += "<text x=\"" + number(kRight + 46) + "\" y=\"" + y + "\" dominant-baseline=\"middle\">" +
           escape_xml(s.name) + "</text>\n";
  }
  svg += "</svg>\n";
  return svg;
}

void write_line_plot_svg(const std::string& path, const std::string& title, const std::string& x_label,
                         const std::string& y_label, const std::vector<PlotSeries>& series) {
  const std::string svg = line_plot_svg(title, x_label, y_label, series);
  io::write_file_atomic(path, svg);
}

}  // namespace mdff::retrieval
