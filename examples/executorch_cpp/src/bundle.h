// A crossvit_edge ExecuTorch bundle opened the way crossvit_edge.bundle.open_bundle opens one: the
// bundle is untrusted input (downloaded, copied between machines), so the manifest is read with a
// size bound and checked field by field, every path it names must be a plain relative name that
// stays inside the bundle (symlinks included), and the program is loaded from the very bytes whose
// size and sha256 were checked against the manifest's `files` entry.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace crossvit {

// Bad input (a bundle, an image, a flag): one line on stderr and exit code 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The manifest's "preprocessing" block; crossvit_edge/preprocess.py is the reference.
struct Preprocessing {
  int input_size = 0;   // side of the square model input
  double crop_pct = 0;  // short side is resized to floor(input_size / crop_pct), then centre-cropped
  int resize_size = 0;  // floor(input_size / crop_pct)
  std::array<float, 3> mean{};
  std::array<float, 3> std{};
};

struct Bundle {
  std::filesystem::path root;  // resolved folder
  std::string name;            // folder name (the results file's "bundle")
  std::string precision;
  std::string artifact_file;
  std::vector<uint8_t> program;  // the .pte, verified against the manifest
  int batch_size = 0;            // the program's static batch
  int num_classes = 0;
  std::vector<std::string> labels;  // num_classes entries; class indices when the manifest has none
  Preprocessing preprocessing;
};

// Reads, validates and verifies BUNDLE_DIR; throws UserError naming the manifest key on anything wrong.
Bundle open_bundle(const std::filesystem::path& bundle_dir);

std::string sha256_hex(const uint8_t* data, size_t size);

// The content of a regular file of at most max_bytes (UserError otherwise, naming `what`): a
// folder, FIFO or device node is refused without blocking, a larger file before a byte is read.
std::vector<uint8_t> read_regular_file(const std::filesystem::path& path, std::uintmax_t max_bytes, const std::string& what);

}  // namespace crossvit
