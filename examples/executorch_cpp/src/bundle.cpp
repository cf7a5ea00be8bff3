#include "bundle.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tsv.h"

namespace crossvit {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The same bounds as crossvit_edge/bundle.py: nothing in a manifest may make this program allocate
// or recurse without limit.
constexpr std::uintmax_t kMaxManifestBytes = 64u << 20;
constexpr int kMaxJsonDepth = 64;
constexpr int kMaxBatch = 4096;
constexpr int kMaxInputSize = 4096;
constexpr int kMaxResize = 8192;
constexpr int kMaxClasses = 1000000;
constexpr size_t kMaxName = 4096;
constexpr int kSchemaVersion = 2;
constexpr std::uintmax_t kMaxProgramBytes = std::uintmax_t(4) << 30;
// One static batch of float32 input, what every call pads to, and the sum of the sizes `files`
// lists: MAX_BATCH_INPUT_BYTES and MAX_BUNDLE_BYTES of crossvit_edge/bundle.py.
constexpr long long kMaxBatchInputBytes = 256LL << 20;
constexpr long long kMaxBundleBytes = 8LL << 30;

[[noreturn]] void fail(const std::string& where, const std::string& message) {
  throw UserError("manifest.json: " + where + ": " + message);
}

std::string shown(const json& value) {
  std::string s = value.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

const json& field(const json& parent, const std::string& key, const std::string& where) {
  if (!parent.is_object() || !parent.contains(key) || parent.at(key).is_null()) fail(where, "missing");
  return parent.at(key);
}

const json& object(const json& parent, const std::string& key, const std::string& where) {
  const json& v = field(parent, key, where);
  if (!v.is_object()) fail(where, "expected an object, got " + shown(v));
  return v;
}

std::string string_field(const json& parent, const std::string& key, const std::string& where) {
  const json& v = field(parent, key, where);
  if (!v.is_string()) fail(where, "expected a string, got " + shown(v));
  return v.get<std::string>();
}

long long integer(const json& v, const std::string& where, long long lo, long long hi) {
  if (!v.is_number_integer()) fail(where, "expected an integer, got " + shown(v));
  long long x = v.get<long long>();
  if (x < lo || x > hi) fail(where, "out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]: " + shown(v));
  return x;
}

double number(const json& v, const std::string& where) {
  if (!v.is_number()) fail(where, "expected a number, got " + shown(v));
  double x = v.get<double>();
  if (!std::isfinite(x)) fail(where, "not a finite number");
  return x;
}

void choice(const json& parent, const std::string& key, const std::string& where, const std::string& only, bool required) {
  if (!parent.contains(key) || parent.at(key).is_null()) {
    if (required) fail(where, "missing");
    return;
  }
  const json& v = parent.at(key);
  if (!v.is_string() || v.get<std::string>() != only) fail(where, "expected \"" + only + "\" here, got " + shown(v));
}

// A manifest-named file: a plain relative POSIX name (no absolute path, '..', '.', empty part,
// backslash or control character) that, after symlinks, is a regular file inside the bundle.
fs::path file_in_bundle(const fs::path& root, const std::string& rel, const std::string& where) {
  if (rel.empty() || rel.size() > kMaxName) fail(where, "expected a file name relative to the bundle");
  for (unsigned char c : rel)
    if (c < 32 || c == '\\') fail(where, "contains a control character or backslash");
  if (rel[0] == '/' || (rel.size() > 1 && rel[1] == ':')) fail(where, "an absolute path; a bundle names only files inside itself");
  std::stringstream parts(rel);
  for (std::string part; std::getline(parts, part, '/');)
    if (part.empty() || part == "." || part == "..") fail(where, "not a plain relative name (no '..', '.' or empty parts)");
  if (rel.back() == '/') fail(where, "not a plain relative name (no '..', '.' or empty parts)");
  std::error_code ec;
  fs::path resolved = fs::canonical(root / rel, ec);
  if (ec) fail(where, "\"" + rel + "\" is missing or cannot be resolved");
  fs::path inside = resolved.lexically_relative(root);
  if (inside.empty() || *inside.begin() == "..") fail(where, "\"" + rel + "\" leads outside the bundle (through a symlink)");
  if (!fs::is_regular_file(resolved, ec)) fail(where, "\"" + rel + "\" is not a regular file");
  return resolved;
}

json parse_manifest(const std::vector<uint8_t>& raw) {
  // Depth bound through the parser callback (it reports the depth of every event).
  json::parser_callback_t bounded = [](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonDepth) throw UserError("manifest.json: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    return true;
  };
  try {
    return json::parse(raw.begin(), raw.end(), bounded);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e400 (Python: infinity, refused)
    throw UserError(std::string("manifest.json: not valid JSON (") + e.what() + ")");
  }
}

}  // namespace

std::vector<uint8_t> read_regular_file(const fs::path& path, std::uintmax_t max_bytes, const std::string& what) {
  // stat first: nothing but a regular file is ever opened (a device node may act on open); then
  // O_NONBLOCK, so that a FIFO swapped in meanwhile cannot block, and fstat on what was opened
  struct stat before {};
  if (::stat(path.c_str(), &before) != 0) throw UserError(what + ": cannot read (" + std::strerror(errno) + ")");
  if (!S_ISREG(before.st_mode)) throw UserError(what + ": not a regular file (a folder, FIFO or device)");
  if (std::uintmax_t(before.st_size) > max_bytes)
    throw UserError(what + ": " + std::to_string(before.st_size) + " bytes, more than the " + std::to_string(max_bytes) + " this program reads");
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw UserError(what + ": cannot read (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_ino != before.st_ino || st.st_dev != before.st_dev) {
    ::close(fd);
    throw UserError(what + ": replaced while being opened");
  }
  std::vector<uint8_t> bytes(size_t(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += size_t(n);
  }
  char extra;
  const bool grew = done == bytes.size() && ::read(fd, &extra, 1) > 0;
  ::close(fd);
  if (done != bytes.size() || grew) throw UserError(what + ": cannot read (changed while reading?)");
  return bytes;
}

std::string sha256_hex(const uint8_t* data, size_t size) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(data, size, digest, &length, EVP_sha256(), nullptr) != 1) throw std::runtime_error("sha256 failed (OpenSSL)");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

Bundle open_bundle(const fs::path& bundle_dir) {
  std::error_code ec;
  if (!fs::is_directory(bundle_dir, ec)) throw UserError("bundle " + bundle_dir.string() + ": not found or not a folder");
  Bundle b;
  b.root = fs::canonical(bundle_dir, ec);
  if (ec) throw UserError("bundle " + bundle_dir.string() + ": cannot resolve (" + ec.message() + ")");
  b.name = b.root.filename().string();
  fs::path manifest_path = b.root / "manifest.json";
  if (fs::is_symlink(manifest_path) || !fs::is_regular_file(manifest_path))
    throw UserError("bundle " + bundle_dir.string() + ": not a bundle (no manifest.json file)");
  const json m = parse_manifest(read_regular_file(manifest_path, kMaxManifestBytes, "manifest.json"));
  if (!m.is_object()) fail("(top level)", "expected a JSON object");

  if (integer(field(m, "schema_version", "schema_version"), "schema_version", 0, 1 << 30) != kSchemaVersion)
    fail("schema_version", "not supported; this program reads schema_version " + std::to_string(kSchemaVersion));
  choice(m, "target", "target", "executorch", true);
  b.precision = string_field(m, "precision", "precision");
  b.num_classes = int(integer(field(m, "num_classes", "num_classes"), "num_classes", 1, kMaxClasses));

  // labels: num_classes printable strings, or class indices when the manifest has none. A label is
  // printed as one field of a tab-separated line, so control characters (C0 and C1), line
  // separators and bidi controls are refused, as crossvit_edge/bundle.py refuses them.
  if (m.contains("labels") && !m.at("labels").is_null()) {
    const json& labels = m.at("labels");
    if (!labels.is_array() || labels.size() != size_t(b.num_classes)) fail("labels", "expected num_classes strings");
    for (size_t i = 0; i < labels.size(); ++i) {
      const std::string where = "labels[" + std::to_string(i) + "]";
      if (!labels[i].is_string() || labels[i].get<std::string>().size() > kMaxName) fail(where, "expected a string");
      const long bad = first_unsafe_in_label(labels[i].get<std::string>());
      if (bad == -2) fail(where, "not valid UTF-8");
      if (bad >= 0) {
        char code[24];
        std::snprintf(code, sizeof code, "U+%04lX", bad);
        fail(where, std::string("contains ") + code + ", a control, line separator or bidi character");
      }
      b.labels.push_back(labels[i].get<std::string>());
    }
  } else {
    for (int i = 0; i < b.num_classes; ++i) b.labels.push_back(std::to_string(i));
  }

  const json& input = object(m, "input", "input");
  const json& shape = field(input, "shape", "input.shape");
  if (!shape.is_array() || shape.size() != 4) fail("input.shape", "expected [batch, 3, size, size], got " + shown(shape));
  b.batch_size = int(integer(shape[0], "input.shape[0]", 1, kMaxBatch));
  integer(shape[1], "input.shape[1]", 3, 3);
  const int size = int(integer(shape[2], "input.shape[2]", 1, kMaxInputSize));
  integer(shape[3], "input.shape[3]", size, size);
  const long long batch_bytes = 4LL * b.batch_size * 3 * size * size;
  if (batch_bytes > kMaxBatchInputBytes)
    fail("input.shape", "batch " + std::to_string(b.batch_size) + " of 3 x " + std::to_string(size) + " x " + std::to_string(size) +
                            " float32 is " + std::to_string(batch_bytes >> 20) + " MiB of input a call, more than the " +
                            std::to_string(kMaxBatchInputBytes >> 20) + " MiB allowed");
  choice(input, "dtype", "input.dtype", "float32", true);
  choice(input, "layout", "input.layout", "NCHW", false);
  const json& output = object(m, "output", "output");
  const json& out_shape = field(output, "shape", "output.shape");
  if (out_shape != json::array({b.batch_size, b.num_classes})) fail("output.shape", "expected [batch, num_classes], got " + shown(out_shape));
  choice(output, "dtype", "output.dtype", "float32", true);

  // preprocessing: the transform of crossvit_edge/preprocess.py, nothing else is implemented here
  const json& pre = object(m, "preprocessing", "preprocessing");
  Preprocessing& p = b.preprocessing;
  p.input_size = int(integer(field(pre, "input_size", "preprocessing.input_size"), "preprocessing.input_size", 1, kMaxInputSize));
  if (p.input_size != size) fail("preprocessing.input_size", "differs from the model input's " + std::to_string(size));
  p.crop_pct = number(field(pre, "crop_pct", "preprocessing.crop_pct"), "preprocessing.crop_pct");
  if (!(p.crop_pct > 0.0 && p.crop_pct <= 1.0)) fail("preprocessing.crop_pct", "expected a number in (0, 1]");
  const double resize = std::floor(double(p.input_size) / p.crop_pct);  // Python: math.floor(size / crop_pct)
  if (resize > kMaxResize) fail("preprocessing.crop_pct", "resizes to more than " + std::to_string(kMaxResize) + " pixels");
  p.resize_size = int(resize);
  if (pre.contains("resize_short_side") && !pre.at("resize_short_side").is_null() &&
      integer(pre.at("resize_short_side"), "preprocessing.resize_short_side", 1, kMaxResize) != p.resize_size)
    fail("preprocessing.resize_short_side", "is not floor(input_size / crop_pct) = " + std::to_string(p.resize_size));
  choice(pre, "interpolation", "preprocessing.interpolation", "bicubic", false);
  choice(pre, "channel_order", "preprocessing.channel_order", "RGB", false);
  choice(pre, "layout", "preprocessing.layout", "NCHW", false);
  for (const char* key : {"mean", "std"}) {
    const std::string where = std::string("preprocessing.") + key;
    const json& values = field(pre, key, where);
    if (!values.is_array() || values.size() != 3) fail(where, "expected 3 numbers (R, G, B)");
    for (int c = 0; c < 3; ++c) {
      const double v = number(values[c], where + "[" + std::to_string(c) + "]");
      if (std::string(key) == "std" && !(v > 0)) fail(where, "every channel's std must be positive");
      if (std::fabs(v) > 1e6) fail(where, "out of range");
      // float32, as numpy computes with np.asarray(mean, np.float32)
      (std::string(key) == "mean" ? p.mean : p.std)[c] = float(v);
    }
  }

  // The artifact: a .pte listed in `files` with its size and sha256. It is read once into memory,
  // and those bytes are both verified and executed, so the file cannot change in between.
  const json& artifact = object(m, "artifact", "artifact");
  choice(artifact, "kind", "artifact.kind", "pte", true);
  b.artifact_file = string_field(artifact, "file", "artifact.file");
  const fs::path program_path = file_in_bundle(b.root, b.artifact_file, "artifact.file");
  const json& files = object(m, "files", "files");
  long long listed = 0;
  for (const auto& item : files.items()) {
    listed += integer(field(item.value(), "bytes", "files[" + item.key() + "].bytes"), "files[" + item.key() + "].bytes", 0, 1LL << 50);
    if (listed > kMaxBundleBytes) fail("files", "lists more than " + std::to_string(kMaxBundleBytes >> 30) + " GiB in all");
  }
  if (!files.contains(b.artifact_file)) fail("artifact.file", "\"" + b.artifact_file + "\" is not listed in 'files' (with its sha256 and size), so it cannot be verified");
  const std::string where = "files[" + b.artifact_file + "]";
  const json& entry = object(files, b.artifact_file, where);
  const std::string expected = string_field(entry, "sha256", where + ".sha256");
  if (!std::regex_match(expected, std::regex("[0-9a-f]{64}"))) fail(where + ".sha256", "expected 64 lowercase hex digits");
  const long long expected_bytes = integer(field(entry, "bytes", where + ".bytes"), where + ".bytes", 0, (long long)kMaxProgramBytes);
  std::error_code size_ec;
  const std::uintmax_t on_disk = fs::file_size(program_path, size_ec);
  if (!size_ec && on_disk != std::uintmax_t(expected_bytes))  // the size first: never read more than the manifest lists
    throw UserError("bundle " + b.name + ": " + where + ": " + std::to_string(on_disk) + " bytes, the manifest says " +
                    std::to_string(expected_bytes) + " (modified or corrupt)");
  b.program = read_regular_file(program_path, std::uintmax_t(expected_bytes), "bundle " + b.name + ": " + b.artifact_file);
  if ((long long)b.program.size() != expected_bytes)
    throw UserError("bundle " + b.name + ": " + where + ": " + std::to_string(b.program.size()) + " bytes, the manifest says " +
                    std::to_string(expected_bytes) + " (modified or corrupt)");
  if (sha256_hex(b.program.data(), b.program.size()) != expected)
    throw UserError("bundle " + b.name + ": " + where + ": does not match its sha256 in the manifest (modified or corrupt)");
  return b;
}

}  // namespace crossvit
