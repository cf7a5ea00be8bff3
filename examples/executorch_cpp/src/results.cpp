#include "results.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <regex>
#include <sstream>
#include <thread>

#include "bundle.h"

namespace crossvit {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::uintmax_t kMaxNpyBytes = std::uintmax_t(4) << 30;  // --input-npy

// numpy.percentile's default ("linear"): sorted[(n - 1) * q / 100], interpolated.
double percentile(std::vector<double> sorted, double q) {
  std::sort(sorted.begin(), sorted.end());
  const double position = (sorted.size() - 1) * q / 100.0;
  const size_t below = size_t(std::floor(position));
  const size_t above = std::min(below + 1, sorted.size() - 1);
  return sorted[below] + (sorted[above] - sorted[below]) * (position - below);
}

}  // namespace

json latency_summary(const std::vector<double>& seconds, int batch_size) {
  std::vector<double> ms;
  for (double s : seconds) ms.push_back(s * 1e3);
  const double median = percentile(ms, 50);
  return {
      {"runs", ms.size()},
      {"batch_size", batch_size},
      {"p50_ms", median},
      {"p90_ms", percentile(ms, 90)},
      {"p99_ms", percentile(ms, 99)},
      {"mean_ms", std::accumulate(ms.begin(), ms.end(), 0.0) / ms.size()},
      {"min_ms", *std::min_element(ms.begin(), ms.end())},
      {"throughput_ips", batch_size * 1e3 / median},
  };
}

std::string device_description() {
  std::string cpu;
  std::ifstream cpuinfo("/proc/cpuinfo");
  // x86 names the CPU in "model name"; ARM boards in "Hardware" or not at all
  const std::regex named("^(model name|Hardware|Processor)\\s*:\\s*(.+)$");
  for (std::string line; cpu.empty() && std::getline(cpuinfo, line);) {
    std::smatch m;
    if (std::regex_match(line, m, named)) cpu = m[2];
  }
  std::ifstream model("/sys/firmware/devicetree/base/model");  // Jetson, Raspberry Pi, most boards
  std::string board;
  if (model && std::getline(model, board, '\0') && !board.empty()) cpu = board + (cpu.empty() ? "" : ", " + cpu);
  utsname u{};
  std::string os = uname(&u) == 0 ? std::string(u.sysname) + " " + u.release + " " + u.machine : "unknown OS";
  std::ostringstream out;
  out << os << ", " << (cpu.empty() ? "unknown CPU" : cpu) << ", " << std::thread::hardware_concurrency() << " hardware threads";
  return out.str();
}

std::string architecture() {
#if defined(__aarch64__)
  return "aarch64";
#elif defined(__x86_64__)
  return "x86_64";
#elif defined(__arm__)
  return "arm";
#elif defined(__riscv) && __riscv_xlen == 64
  return "riscv64";
#else
  return "unknown";
#endif
}

long long peak_rss_bytes() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return (long long)usage.ru_maxrss * 1024;  // Linux reports kilobytes
}

void write_npy(const fs::path& path, const std::vector<float>& data, const std::vector<size_t>& shape) {
  std::ostringstream dims;
  for (size_t d : shape) dims << d << ", ";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.str() + "), }";
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string bytes("\x93NUMPY\x01\x00", 8);
  const uint16_t length = uint16_t(header.size());
  bytes += char(length & 0xff);
  bytes += char(length >> 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
  write_text_atomic(path, bytes);
}

std::vector<float> read_npy(const fs::path& path, std::vector<size_t>& shape) {
  // a regular file of bounded size, read once (no FIFO or device node; the header cannot ask for
  // more than the file holds)
  const std::vector<uint8_t> raw = read_regular_file(path, kMaxNpyBytes, path.string());
  if (raw.size() < 10 || std::memcmp(raw.data(), "\x93NUMPY\x01\x00", 8) != 0) throw UserError(path.string() + ": not a version 1.0 .npy file");
  const size_t header_length = raw[8] | (size_t(raw[9]) << 8);
  if (10 + header_length > raw.size()) throw UserError(path.string() + ": truncated .npy header");
  const std::string header(reinterpret_cast<const char*>(raw.data()) + 10, header_length);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr': '<f4', 'fortran_order': False, 'shape': \\(([0-9, ]*)\\)")))
    throw UserError(path.string() + ": expected a C-order float32 (<f4) array");
  shape.clear();
  size_t count = 1;
  std::stringstream dims(m[1].str());
  for (std::string d; std::getline(dims, d, ',');) {
    d.erase(std::remove(d.begin(), d.end(), ' '), d.end());
    if (d.empty()) continue;
    if (d.size() > 9) throw UserError(path.string() + ": array too large");
    shape.push_back(std::stoul(d));
    count *= shape.back();
    if (count > (size_t(1) << 32)) throw UserError(path.string() + ": array too large");
  }
  if (raw.size() - 10 - header_length != count * sizeof(float)) throw UserError(path.string() + ": data does not match its header's shape");
  std::vector<float> data(count);
  std::memcpy(data.data(), raw.data() + 10 + header_length, count * sizeof(float));
  return data;
}

void write_text_atomic(const fs::path& path, const std::string& text) {
  // A new file (mkstemp: O_CREAT | O_EXCL, a random name) beside `path`, renamed onto it when
  // complete: a symlink already at `path` is replaced, never written through; a full disk leaves
  // `path` as it was and no temporary file behind.
  const fs::path parent = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::string temporary = (parent / ("." + path.filename().string() + ".XXXXXX")).string();
  const int fd = ::mkstemp(temporary.data());
  if (fd < 0) throw UserError(path.string() + ": cannot write (" + std::strerror(errno) + ")");
  ::fchmod(fd, 0644);
  size_t done = 0;
  int error = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = n < 0 ? errno : ENOSPC;
      break;
    }
    done += size_t(n);
  }
  if (!error && ::fsync(fd) != 0) error = errno;
  if (::close(fd) != 0 && !error) error = errno;
  if (!error && ::rename(temporary.c_str(), path.c_str()) != 0) error = errno;
  if (error) {
    ::unlink(temporary.c_str());
    throw UserError(path.string() + ": cannot write (" + std::strerror(error) + ")");
  }
}

}  // namespace crossvit
