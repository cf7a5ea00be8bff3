// crossvit_classify: classify images with a crossvit_edge ExecuTorch bundle, and benchmark it.
//
//   crossvit_classify BUNDLE IMAGE_OR_FOLDER... [--top-k K]
//       one line per image: path<TAB>label<TAB>probability (K label/probability pairs with --top-k),
//       every field escaped as crossvit_edge/tsv.py escapes it (tsv.h)
//   crossvit_classify BUNDLE FOLDER --results out.json [--data-root DIR] [--bench N] [--warmup W]
//       also writes the results file `python -m crossvit_edge.profile --merge` reads: every image's
//       logits (paths relative to DIR, or to FOLDER when it is the only one given) and, with
//       --bench, the latency of N timed runs of one batch after W warm-up runs; the file says the
//       program's architecture, and `--emulator TEXT` records that this run was emulated (for example
//       "qemu-aarch64 10.0.2, -cpu neoverse-n1": a program cannot tell an emulator from hardware)
//   crossvit_classify BUNDLE IMAGE... --dump-input x.npy      the preprocessed images, (n, 3, H, W)
//   crossvit_classify BUNDLE --input-npy x.npy --logits-npy y.npy   run preprocessed input as given
//
// Bad input (a bundle that fails its checks, an image that is not a readable PNG/JPEG, a flag):
// one line on stderr and exit code 2. A runtime failure: one line and exit code 1.
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <executorch/extension/data_loader/buffer_data_loader.h>
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <nlohmann/json.hpp>

#include "bundle.h"
#include "image.h"
#include "results.h"
#include "tsv.h"

#ifndef CROSSVIT_EXECUTORCH_VERSION
#define CROSSVIT_EXECUTORCH_VERSION "unknown"
#endif

namespace fs = std::filesystem;
using crossvit::UserError;
using executorch::extension::BufferDataLoader;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::Program;

namespace {

constexpr const char* kProg = "crossvit_classify";
constexpr const char* kUsage =
    "usage: crossvit_classify BUNDLE IMAGE_OR_FOLDER... [--top-k K] [--results FILE [--data-root DIR] [--bench N] [--warmup W]\n"
    "                         [--emulator TEXT]] [--dump-input FILE.npy] [-v]\n"
    "       crossvit_classify BUNDLE --input-npy FILE.npy --logits-npy FILE.npy\n";

// The runtime's log goes through this. With --verbose everything is printed; otherwise nothing is,
// and the last error is kept for the one line this program prints when the runtime fails (a
// program that does not load is bad input: one line, exit 2).
bool g_verbose = false;
std::string g_last_runtime_error;

void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* filename, const char*, size_t line, const char* message,
              size_t length) {
  if (g_verbose) std::fprintf(stderr, "executorch %c %s:%zu: %.*s\n", char(level), filename, line, int(length), message);
  if (level == kError || level == kFatal) g_last_runtime_error.assign(message, length);
}

std::string runtime_said() { return g_last_runtime_error.empty() ? "" : " (runtime: " + g_last_runtime_error + ")"; }

struct Options {
  fs::path bundle;
  std::vector<fs::path> inputs;
  int top_k = 1;
  fs::path results, data_root, dump_input, input_npy, logits_npy;
  std::string emulator;
  int bench = 0;
  int warmup = 5;
};

int parse_count(const std::string& flag, const std::string& value, int lo, int hi) {
  size_t used = 0;
  long v = 0;
  try {
    v = std::stol(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || v < lo || v > hi)
    throw UserError(flag + " " + value + ": expected a whole number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return int(v);
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](void) -> std::string {
      if (i + 1 >= argc) throw UserError(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (a == "-v" || a == "--verbose") g_verbose = true;
    else if (a == "--top-k") o.top_k = parse_count(a, value(), 1, 1000000);
    else if (a == "--results") o.results = value();
    else if (a == "--data-root") o.data_root = value();
    else if (a == "--bench") o.bench = parse_count(a, value(), 1, 1000000);
    else if (a == "--warmup") o.warmup = parse_count(a, value(), 0, 1000000);
    else if (a == "--emulator") o.emulator = value();
    else if (a == "--dump-input") o.dump_input = value();
    else if (a == "--input-npy") o.input_npy = value();
    else if (a == "--logits-npy") o.logits_npy = value();
    else if (a.size() > 1 && a[0] == '-') throw UserError("unknown option " + a + " (--help lists them)");
    else positional.push_back(a);
  }
  if (positional.empty()) throw UserError("give a bundle folder and images (--help)");
  o.bundle = positional[0];
  o.inputs.assign(positional.begin() + 1, positional.end());
  if (o.input_npy.empty() != o.logits_npy.empty()) throw UserError("--input-npy and --logits-npy go together");
  if (!o.input_npy.empty() && !o.inputs.empty()) throw UserError("--input-npy replaces the images: give one or the other");
  if (o.input_npy.empty() && o.inputs.empty()) throw UserError("no images given");
  if (o.bench && o.results.empty()) throw UserError("--bench writes its latency into the results file: add --results FILE");
  if (!o.emulator.empty() && o.results.empty()) throw UserError("--emulator is recorded in the results file: add --results FILE");
  if (o.emulator.size() > 200 || std::any_of(o.emulator.begin(), o.emulator.end(), [](unsigned char c) { return c < 32 || c == 127; }))
    throw UserError("--emulator: at most 200 printable characters");
  return o;
}

bool is_image_name(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

// Files as given; folders walked recursively for PNG/JPEG files in sorted order (path components
// compared one by one, as Python sorts Paths).
std::vector<fs::path> list_images(const std::vector<fs::path>& inputs) {
  std::vector<fs::path> images;
  for (const fs::path& input : inputs) {
    std::error_code ec;
    if (fs::is_directory(input, ec)) {
      std::vector<fs::path> found;
      for (auto it = fs::recursive_directory_iterator(input, ec); !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (it->path().filename().string()[0] == '.') {  // hidden files and folders are skipped
          if (it->is_directory(ec)) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file(ec) && is_image_name(it->path())) found.push_back(it->path());
      }
      if (ec) throw UserError(input.string() + ": cannot list (" + ec.message() + ")");
      if (found.empty()) throw UserError(input.string() + ": no PNG or JPEG images in this folder");
      std::sort(found.begin(), found.end());
      images.insert(images.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(input, ec)) {
      images.push_back(input);
    } else {
      throw UserError(input.string() + ": no such image file or folder");
    }
  }
  return images;
}

// An image's key in the results file: its path relative to the data root, '/'-separated (the
// harness's own key), refused when it lies outside the root.
std::string relative_key(const fs::path& image, const fs::path& root) {
  const fs::path rel = fs::weakly_canonical(image).lexically_relative(fs::weakly_canonical(root));
  if (rel.empty() || *rel.begin() == "..") throw UserError(image.string() + ": not inside --data-root " + root.string());
  return rel.generic_string();
}

// ---- Bounded work. A delegate's blob is opaque to ExecuTorch's verification: one changed byte can
// make XNNPACK abort, crash, or allocate and compute without bound. The same bounds as the Python
// tools' first load in a child (crossvit_edge/isolation.py, docs/security.md): the data segment may
// grow by 1 GiB + 4 x the program's bytes + 32 x one batch of input (RLIMIT_DATA), CPU time is
// 60 s + 60 s per GiB of program, per hardware thread (RLIMIT_CPU). Past them, and on an abort or a
// crash in the runtime, one line and exit code 2.
constexpr unsigned long long kMemoryBase = 1ULL << 30;
constexpr unsigned long long kMemoryPerProgramByte = 4;
constexpr unsigned long long kMemoryPerInputByte = 32;

unsigned long long data_segment_bytes() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  unsigned long long kib = 0;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmData:", 7) == 0) kib = std::strtoull(line + 7, nullptr, 10);
  std::fclose(f);
  return kib * 1024;
}

extern "C" void die_in_runtime(int sig) {  // async-signal-safe: write and _exit only
  const char* what = sig == SIGXCPU ? "crossvit_classify: error: the program used more CPU time than this bundle's bound "
                                      "(corrupt or hostile)\n"
                                    : "crossvit_classify: error: the runtime crashed (abort or fault) on this program: corrupt "
                                      "or hostile, or beyond this bundle's memory bound\n";
  ssize_t ignored = ::write(2, what, std::strlen(what));
  (void)ignored;
  ::_exit(2);
}

void bound_runtime_work(const crossvit::Bundle& bundle) {
  const unsigned long long s = bundle.preprocessing.input_size;
  const unsigned long long input = (unsigned long long)bundle.batch_size * 3 * s * s * 4;
  const unsigned long long memory = kMemoryBase + kMemoryPerProgramByte * bundle.program.size() + kMemoryPerInputByte * input;
  struct rlimit limit {};
  if (::getrlimit(RLIMIT_DATA, &limit) == 0) {
    rlim_t cap = rlim_t(data_segment_bytes() + memory);
    if (limit.rlim_max == RLIM_INFINITY || cap < limit.rlim_max) {
      limit.rlim_cur = cap;
      ::setrlimit(RLIMIT_DATA, &limit);
    }
  }
  const double gib = double(bundle.program.size()) / double(1ULL << 30);
  const long threads = std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
  struct rusage used {};
  ::getrusage(RUSAGE_SELF, &used);
  const rlim_t cpu = rlim_t(used.ru_utime.tv_sec + used.ru_stime.tv_sec + (60 + 60 * gib) * threads) + 1;
  if (::getrlimit(RLIMIT_CPU, &limit) == 0 && (limit.rlim_max == RLIM_INFINITY || cpu + 5 <= limit.rlim_max)) {
    limit.rlim_cur = cpu;
    if (limit.rlim_max == RLIM_INFINITY) limit.rlim_max = cpu + 5;
    ::setrlimit(RLIMIT_CPU, &limit);
  }
  for (int sig : {SIGABRT, SIGXCPU, SIGSEGV, SIGBUS, SIGILL, SIGFPE}) std::signal(sig, die_in_runtime);
}

// The program, loaded from the verified bytes and checked against the manifest's input and output.
class Classifier {
 public:
  explicit Classifier(const crossvit::Bundle& bundle)
      : bundle_((bound_runtime_work(bundle), bundle)), module_(std::make_unique<BufferDataLoader>(bundle.program.data(), bundle.program.size())) {
    const std::string where = "bundle " + bundle.name + ": " + bundle.artifact_file;
    if (module_.load(Program::Verification::InternalConsistency) != Error::Ok)
      throw UserError(where + ": not a loadable ExecuTorch program (corrupt, or made for another runtime version)" + runtime_said());
    auto meta = module_.method_meta("forward");
    if (!meta.ok()) throw UserError(where + ": has no 'forward' method");
    const int s = bundle.preprocessing.input_size;
    const std::vector<long> want_in = {bundle.batch_size, 3, s, s}, want_out = {bundle.batch_size, bundle.num_classes};
    auto in = meta->num_inputs() == 1 ? meta->input_tensor_meta(0) : decltype(meta->input_tensor_meta(0))(Error::InvalidProgram);
    auto out = meta->num_outputs() >= 1 ? meta->output_tensor_meta(0) : decltype(meta->output_tensor_meta(0))(Error::InvalidProgram);
    if (!in.ok() || !out.ok() || in->scalar_type() != executorch::aten::ScalarType::Float ||
        out->scalar_type() != executorch::aten::ScalarType::Float ||
        std::vector<long>(in->sizes().begin(), in->sizes().end()) != want_in ||
        std::vector<long>(out->sizes().begin(), out->sizes().end()) != want_out)
      throw UserError(where + ": its forward() is not float32 (batch, 3, size, size) -> (batch, num_classes) as the manifest says");
    if (module_.load_forward() != Error::Ok) throw UserError(where + ": the runtime could not prepare forward()" + runtime_said());
  }

  // One batch of exactly batch_size preprocessed images -> batch_size * num_classes logits.
  std::vector<float> run(std::vector<float>& batch) {
    const int s = bundle_.preprocessing.input_size;
    auto tensor = executorch::extension::from_blob(batch.data(), {bundle_.batch_size, 3, s, s}, executorch::aten::ScalarType::Float);
    auto result = module_.forward(tensor);
    if (!result.ok()) throw std::runtime_error("forward() failed with ExecuTorch error " + std::to_string(int(result.error())) + runtime_said());
    const auto& logits = result->at(0).toTensor();
    const float* data = logits.const_data_ptr<float>();
    return std::vector<float>(data, data + size_t(bundle_.batch_size) * bundle_.num_classes);
  }

 private:
  const crossvit::Bundle& bundle_;
  Module module_;
};

// Every row of `input` (n images) through the static batch: the last batch padded by repeating its
// last image, as the Python runtime does; padded rows are dropped from the result.
std::vector<float> run_all(Classifier& classifier, const crossvit::Bundle& b, size_t n, size_t image_floats,
                           const std::function<void(size_t, float*)>& fill) {
  std::vector<float> logits;
  std::vector<float> batch(size_t(b.batch_size) * image_floats);
  for (size_t start = 0; start < n; start += b.batch_size) {
    const size_t count = std::min(n - start, size_t(b.batch_size));
    for (size_t i = 0; i < count; ++i) fill(start + i, &batch[i * image_floats]);
    for (size_t i = count; i < size_t(b.batch_size); ++i)
      std::copy_n(&batch[(count - 1) * image_floats], image_floats, &batch[i * image_floats]);
    const std::vector<float> out = classifier.run(batch);
    logits.insert(logits.end(), out.begin(), out.begin() + count * b.num_classes);
  }
  return logits;
}

int run(const Options& o) {
  const crossvit::Bundle bundle = crossvit::open_bundle(o.bundle);
  const int s = bundle.preprocessing.input_size;
  const size_t image_floats = size_t(3) * s * s;

  if (!o.input_npy.empty()) {
    std::vector<size_t> shape;
    std::vector<float> x = crossvit::read_npy(o.input_npy, shape);
    if (shape.size() != 4 || shape[1] != 3 || shape[2] != size_t(s) || shape[3] != size_t(s) || shape[0] == 0)
      throw UserError(o.input_npy.string() + ": expected shape (n, 3, " + std::to_string(s) + ", " + std::to_string(s) + ")");
    Classifier classifier(bundle);
    const std::vector<float> logits = run_all(classifier, bundle, shape[0], image_floats,
                                              [&](size_t i, float* dst) { std::copy_n(&x[i * image_floats], image_floats, dst); });
    crossvit::write_npy(o.logits_npy, logits, {shape[0], size_t(bundle.num_classes)});
    return 0;
  }

  const std::vector<fs::path> images = list_images(o.inputs);
  fs::path root = o.data_root;
  if (!o.results.empty() && root.empty()) {
    if (o.inputs.size() != 1 || !fs::is_directory(o.inputs[0]))
      throw UserError("--results: give --data-root (image paths in the results file are relative to it) or exactly one folder");
    root = o.inputs[0];
  }
  std::vector<std::string> keys;
  if (!o.results.empty())
    for (const fs::path& p : images) keys.push_back(relative_key(p, root));

  // Decode and preprocess everything before the runtime starts, so that bad input fails first.
  std::vector<float> x(images.size() * image_floats);
  for (size_t i = 0; i < images.size(); ++i) crossvit::preprocess(crossvit::decode_image(images[i]), bundle.preprocessing, &x[i * image_floats]);
  if (!o.dump_input.empty()) crossvit::write_npy(o.dump_input, x, {images.size(), 3, size_t(s), size_t(s)});

  Classifier classifier(bundle);
  const std::vector<float> logits = run_all(classifier, bundle, images.size(), image_floats,
                                            [&](size_t i, float* dst) { std::copy_n(&x[i * image_floats], image_floats, dst); });

  const size_t k = std::min<size_t>(o.top_k, bundle.num_classes);
  for (size_t i = 0; i < images.size(); ++i) {
    const float* row = &logits[i * bundle.num_classes];
    // softmax in double, as crossvit_edge.metrics.softmax
    const double top = *std::max_element(row, row + bundle.num_classes);
    std::vector<double> p(bundle.num_classes);
    double total = 0;
    for (int c = 0; c < bundle.num_classes; ++c) total += p[c] = std::exp(double(row[c]) - top);
    std::vector<int> order(bundle.num_classes);
    for (int c = 0; c < bundle.num_classes; ++c) order[c] = c;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return row[a] > row[b]; });
    // every field escaped (tsv.h, the rule of crossvit_edge/tsv.py): a file name cannot forge lines or reach the terminal
    std::string line = crossvit::tsv_field(images[i].string());
    char probability[32];
    for (size_t j = 0; j < k; ++j) {
      std::snprintf(probability, sizeof probability, "%.6f", p[order[j]] / total);
      line += "\t" + crossvit::tsv_field(bundle.labels[order[j]]) + "\t" + probability;
    }
    std::cout << line << "\n";
  }
  std::cout.flush();

  if (!o.results.empty()) {
    nlohmann::json latency = nullptr;
    std::string timing = "not timed (no --bench)";
    if (o.bench) {
      std::vector<float> batch(x.begin(), x.begin() + std::min(images.size(), size_t(bundle.batch_size)) * image_floats);
      batch.resize(size_t(bundle.batch_size) * image_floats);
      for (size_t i = images.size(); i < size_t(bundle.batch_size); ++i)  // fewer images than a batch: repeat the first
        std::copy_n(x.begin(), image_floats, batch.begin() + i * image_floats);
      for (int i = 0; i < o.warmup; ++i) classifier.run(batch);
      std::vector<double> seconds;
      for (int i = 0; i < o.bench; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        classifier.run(batch);
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
      latency = crossvit::latency_summary(seconds, bundle.batch_size);
      timing = std::to_string(o.bench) + " timed runs of one batch of " + std::to_string(bundle.batch_size) + " after " +
               std::to_string(o.warmup) + " warm-up runs; steady_clock around Module::forward (includes reading the logits out)";
    }
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < images.size(); ++i)
      rows.push_back(std::vector<float>(logits.begin() + i * bundle.num_classes, logits.begin() + (i + 1) * bundle.num_classes));
    const nlohmann::json results = {
        {"bundle", bundle.name},
        {"target", "executorch"},
        {"precision", bundle.precision},
        {"runner", std::string("crossvit_classify, ExecuTorch ") + CROSSVIT_EXECUTORCH_VERSION + " C++ runtime, XNNPACK delegate, CPU"},
        {"device", crossvit::device_description()},
        {"architecture", crossvit::architecture()},
        {"emulator", o.emulator.empty() ? nlohmann::json(nullptr) : nlohmann::json(o.emulator)},
        {"images", keys},
        {"logits", rows},
        {"latency", latency},
        {"timing", timing},
        {"engine_bytes", bundle.program.size()},  // the size column: the program's bytes
        {"device_memory_bytes", nullptr},
        {"peak_rss_bytes", crossvit::peak_rss_bytes()},
    };
    crossvit::write_text_atomic(o.results, results.dump(1) + "\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
  try {
    return run(parse_args(argc, argv));
  } catch (const UserError& e) {
    std::cerr << kProg << ": error: " << e.what() << std::endl;
    return 2;
  } catch (const std::bad_alloc&) {  // the memory bound above (or a runtime asked for more than exists)
    std::cerr << kProg << ": error: out of memory: the program asked for more than this bundle's bound (corrupt or hostile)" << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << kProg << ": failed: " << e.what() << std::endl;
    return 1;
  }
}
