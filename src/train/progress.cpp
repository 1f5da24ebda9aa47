#include "train/progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

namespace llava::train {
namespace {

constexpr int kBarCells = 10;
// tqdm's UTF-8 bar: eighths of a cell, from empty to full.
const char* const kEighths[] = {" ", "▏", "▎", "▍", "▌", "▋", "▊", "▉", "█"};

std::string printf_string(const char* format, double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, x);
  return buf;
}

// Terminal cells of UTF-8 text: every byte but continuation bytes starts one cell (true for the bar).
size_t cells(const std::string& text) {
  size_t n = 0;
  for (unsigned char c : text) n += (c & 0xC0) != 0x80;
  return n;
}

std::string first_cells(const std::string& text, size_t max_cells) {
  size_t n = 0;
  for (size_t i = 0; i < text.size(); ++i)
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80 && n++ == max_cells) return text.substr(0, i);
  return text;
}

// tqdm: full cells, then the partial cell in eighths, then blanks.
std::string bar_cells(double fraction) {
  const int eighths = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * kBarCells * 8);
  const int full = eighths / 8;
  std::string bar;
  for (int i = 0; i < full; ++i) bar += kEighths[8];
  if (full < kBarCells) {
    bar += kEighths[eighths % 8];
    bar += std::string(kBarCells - full - 1, ' ');
  }
  return bar;
}

// -1 = not known: which std stream `out` is, as a file descriptor.
int std_stream_fd(const std::ostream& out) {
  if (&out == &std::cout) return STDOUT_FILENO;
  if (&out == &std::cerr || &out == &std::clog) return STDERR_FILENO;
  return -1;
}

}  // namespace

std::string format_interval(double seconds) {
  const int64_t total = static_cast<int64_t>(seconds);
  const int64_t h = total / 3600, m = total / 60 % 60, s = total % 60;
  char buf[32];
  if (h > 0)
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(h), static_cast<long long>(m),
                  static_cast<long long>(s));
  else
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", static_cast<long long>(m), static_cast<long long>(s));
  return buf;
}

std::string format_number(double x) {
  std::string s = printf_string("%.3g", x);
  // 2e-05 -> 2e-5, 1.5e+10 -> 1.5e+10 (tqdm drops the exponent's zero padding).
  const size_t e = s.find('e');
  if (e != std::string::npos && e + 2 < s.size() && s[e + 2] == '0') s.erase(e + 2, 1);
  return s;
}

double Progress::steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Progress::Progress(std::ostream& out, bool is_tty, Clock clock, int columns)
    : out_(out), is_tty_(is_tty), clock_(std::move(clock)), columns_(columns), start_time_(clock_()) {}

Progress::~Progress() { finish(); }

std::string Progress::bar(const StepProgress& s, double now) const {
  const double elapsed = now - start_time_;
  const int64_t steps_run = s.step - std::max<int64_t>(first_step_, 0);
  const double rate = elapsed > 0 && steps_run > 0 ? steps_run / elapsed : 0;  // it/s; 0 = unknown
  const double fraction = s.total_steps > 0 ? static_cast<double>(s.step) / s.total_steps : 0;

  std::string text = printf_string("%3.0f", fraction * 100) + "%|" + bar_cells(fraction) + "| " +
                     std::to_string(s.step) + "/" + std::to_string(s.total_steps) + " [" + format_interval(elapsed) + "<";
  if (rate > 0) {
    text += format_interval(std::max<int64_t>(s.total_steps - s.step, 0) / rate) + ", ";
    text += 1 / rate > 1 ? printf_string("%5.2f", 1 / rate) + "s/it" : printf_string("%5.2f", rate) + "it/s";
  } else {
    text += "?, ?it/s";
  }
  // What matters most first: a narrow terminal cuts the end.
  auto known = [](const std::optional<double>& x) { return x ? format_number(*x) : std::string("?"); };
  text += ", loss=" + known(s.loss) + ", lr=" + format_number(s.learning_rate) + ", grad_norm=" + known(s.grad_norm) + ", " +
          (rate > 0 ? printf_string("%.2f", samples_seen_ / elapsed) : std::string("?")) + " samples/s]";
  return text;
}

void Progress::update(const StepProgress& s) {
  if (first_step_ < 0) first_step_ = s.step - 1;
  samples_seen_ += s.samples;
  last_ = s;
  if (is_tty_) draw(bar(s, clock_()));
}

void Progress::log(const std::string& line) {
  if (!is_tty_ || drawn_width_ == 0) {
    out_ << line << '\n' << std::flush;
    return;
  }
  // Like tqdm.write: blank the bar, print the line where it was, draw the bar again below it.
  out_ << '\r' << std::string(drawn_width_, ' ') << '\r' << line << '\n';
  drawn_width_ = 0;
  draw(bar(last_, clock_()));
}

void Progress::finish() {
  if (drawn_width_ == 0) return;
  out_ << '\n' << std::flush;
  drawn_width_ = 0;
}

void Progress::draw(const std::string& text) {
  const std::string shown = columns_ > 1 ? first_cells(text, static_cast<size_t>(columns_ - 1)) : text;
  const size_t width = cells(shown);
  // Blanks cover what is left of a longer previous bar.
  out_ << '\r' << shown << std::string(drawn_width_ > width ? drawn_width_ - width : 0, ' ') << std::flush;
  drawn_width_ = std::max(width, drawn_width_);
}

bool is_terminal(const std::ostream& out) {
  const int fd = std_stream_fd(out);
  return fd >= 0 && isatty(fd);
}

int terminal_columns(const std::ostream& out) {
  const int fd = std_stream_fd(out);
  winsize size{};
  if (fd < 0 || !isatty(fd) || ioctl(fd, TIOCGWINSZ, &size) != 0) return 0;
  return size.ws_col;
}

}  // namespace llava::train
