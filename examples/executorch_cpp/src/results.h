// What the app writes besides its stdout lines: the results file `python -m crossvit_edge.profile
// --merge` reads (the same keys as converters/tensorrt/device.py's results: images relative to the
// image folder, their logits, latency percentiles, device description), and .npy arrays.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace crossvit {

// crossvit_edge.metrics.latency_summary: milliseconds per batch, numpy's linear percentiles.
nlohmann::json latency_summary(const std::vector<double>& seconds, int batch_size);

// OS, CPU model and hardware threads of this machine, for the report's notes.
std::string device_description();

// The instruction set this program was compiled for ("aarch64", "x86_64", ...): the architecture its
// kernels ran on (device_description()'s machine is the kernel's, which a 32-bit program on a 64-bit
// kernel, or an emulator's host, can make different).
std::string architecture();

// Peak resident memory of this process in bytes (0 where unknown).
long long peak_rss_bytes();

// float32 C-order .npy files (numpy's format, version 1.0).
void write_npy(const std::filesystem::path& path, const std::vector<float>& data, const std::vector<size_t>& shape);
std::vector<float> read_npy(const std::filesystem::path& path, std::vector<size_t>& shape);

// Written to a temporary file beside `path`, then renamed: never a half-written results file.
void write_text_atomic(const std::filesystem::path& path, const std::string& text);

}  // namespace crossvit
