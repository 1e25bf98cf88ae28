// Progress of long work for a person: on a terminal, one line redrawn in place with a bar, the
// current figures (loss, img/s) and the time left; when output goes to a file or a pipe, a plain line
// every `interval` seconds and at the end, so logs stay readable.
#pragma once
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace mdff::cli {

class Progress {
 public:
  explicit Progress(std::string label, double interval_seconds = 30)
      : label_(std::move(label)), interval_(interval_seconds), terminal_(isatty(fileno(stdout))) {}

  // `done` of `total` units finished; `figures` is shown after the bar (e.g. "loss 0.53  92 img/s").
  void update(int64_t done, int64_t total, const std::string& figures) {
    total_ = total;
    const double elapsed = seconds_since(start_);
    const bool last = done >= total_;
    if (!terminal_ && !last && seconds_since(last_print_) < interval_) return;
    last_print_ = clock::now();
    const double eta = done > 0 ? elapsed / done * (total_ - done) : 0;
    if (terminal_) {
      constexpr int kWidth = 24;
      const int filled = total_ > 0 ? static_cast<int>(kWidth * done / total_) : kWidth;
      std::printf("\r%s [%s%s] %lld/%lld  %s  %s left ", label_.c_str(), std::string(filled, '#').c_str(),
                  std::string(kWidth - filled, '.').c_str(), static_cast<long long>(done),
                  static_cast<long long>(total_), figures.c_str(), duration(eta).c_str());
      if (last) std::printf(" in %s\n", duration(elapsed).c_str());
    } else {
      std::printf("%s %lld/%lld  %s  elapsed %s, %s left\n", label_.c_str(), static_cast<long long>(done),
                  static_cast<long long>(total_), figures.c_str(), duration(elapsed).c_str(), duration(eta).c_str());
    }
    std::fflush(stdout);
  }

  static std::string duration(double seconds) {
    char text[32];
    const long s = static_cast<long>(seconds + 0.5);
    if (s >= 3600) std::snprintf(text, sizeof text, "%ldh%02ldm", s / 3600, s % 3600 / 60);
    else std::snprintf(text, sizeof text, "%ldm%02lds", s / 60, s % 60);
    return text;
  }

 private:
  using clock = std::chrono::steady_clock;
  static double seconds_since(clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); }
  std::string label_;
  int64_t total_ = 0;
  double interval_;
  bool terminal_;
  clock::time_point start_ = clock::now(), last_print_ = clock::now();
};

}  // namespace mdff::cli
