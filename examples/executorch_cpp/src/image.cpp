#include "image.h"

#include <jpeglib.h>
#include <jerror.h>  // JWRN_JPEG_EOF
#include <png.h>

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>

namespace crossvit {
namespace fs = std::filesystem;

namespace {

constexpr std::uintmax_t kMaxImageFileBytes = std::uintmax_t(256) << 20;
// The limits of crossvit_edge/preprocess.py, checked on the header before any pixel is decoded: an
// image header cannot make this program allocate without bound, nor resizing blow up a thin strip.
constexpr long long kMaxPixels = 64000000;
constexpr long long kMaxAspectRatio = 50;

// A progressive JPEG decodes its scans one after another; a few kilobytes can hold thousands of
// them (each a full pass over the image). libjpeg-turbo's own djpeg bounds them (-maxscans): so here.
constexpr int kMaxJpegScans = 1000;

bool acceptable_size(long long width, long long height) {
  return width >= 1 && height >= 1 && width * height <= kMaxPixels &&
         std::max(width, height) <= kMaxAspectRatio * std::min(width, height);
}

[[noreturn]] void refuse_size(const fs::path& path, long long width, long long height) {
  throw UserError(path.string() + ": " + std::to_string(width) + " x " + std::to_string(height) +
                  " pixels: empty, more than 64000000 pixels, or an aspect ratio beyond 50:1");
}

// ---- PNG (libpng). Errors longjmp back to the setjmp below; only C frames lie in between. -------

struct PngSource {
  const std::vector<uint8_t>* bytes;
  size_t offset;
};

void png_read_from_memory(png_structp png, png_bytep out, png_size_t length) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (src->offset + length > src->bytes->size()) png_error(png, "truncated file");
  std::memcpy(out, src->bytes->data() + src->offset, length);
  src->offset += length;
}

// libpng reports through these: the message is kept for our one error line, never printed by libpng.
void png_error_to_message(png_structp png, png_const_charp message) {
  auto* buffer = static_cast<char*>(png_get_error_ptr(png));
  std::snprintf(buffer, 128, "%s", message);
  png_longjmp(png, 1);
}
void png_warning_silent(png_structp, png_const_charp) {}

RgbImage decode_png(const fs::path& path, const std::vector<uint8_t>& bytes) {
  char message[128] = "unknown error";
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, message, png_error_to_message, png_warning_silent);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw std::bad_alloc();
  }
  PngSource source{&bytes, 0};
  RgbImage image;
  std::vector<uint8_t> raw;  // rows as libpng delivers them
  std::vector<png_bytep> rows;
  bool gray16 = false;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw UserError(path.string() + ": not a readable PNG (" + message + ")");
  }
  png_set_read_fn(png, &source, png_read_from_memory);
  png_set_user_limits(png, 1000000, 1000000);
  png_read_info(png, info);
  const png_uint_32 width = png_get_image_width(png, info);
  const png_uint_32 height = png_get_image_height(png, info);
  const int color_type = png_get_color_type(png, info);
  const int bit_depth = png_get_bit_depth(png, info);
  if (!acceptable_size(width, height)) {
    png_destroy_read_struct(&png, &info, nullptr);
    refuse_size(path, width, height);
  }
  // Pillow's modes, then its convert("RGB"): palette -> its colours, 1/2/4-bit grey scaled to
  // 0..255, alpha and tRNS dropped (not composited), 16-bit colour keeps the high byte, and 16-bit
  // grey ("I;16") is clipped to 255.
  gray16 = color_type == PNG_COLOR_TYPE_GRAY && bit_depth == 16;
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (bit_depth == 16 && !gray16) png_set_strip_16(png);
  if (color_type & PNG_COLOR_MASK_ALPHA) png_set_strip_alpha(png);
  if (gray16) png_set_swap(png);  // little-endian uint16 in memory on this host
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  const int channels = png_get_channels(png, info);
  raw.resize(rowbytes * height);
  rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) rows[y] = raw.data() + y * rowbytes;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);

  image.width = int(width);
  image.height = int(height);
  image.pixels.resize(size_t(width) * height * 3);
  for (size_t y = 0; y < height; ++y) {
    for (size_t x = 0; x < width; ++x) {
      uint8_t* out = &image.pixels[(y * width + x) * 3];
      if (gray16) {
        uint16_t v;
        std::memcpy(&v, &raw[y * rowbytes + x * 2], 2);
        out[0] = out[1] = out[2] = uint8_t(std::min<uint16_t>(v, 255));
      } else if (channels <= 2) {  // grey (and grey + an alpha that libpng made from tRNS): replicated
        out[0] = out[1] = out[2] = raw[y * rowbytes + x * channels];
      } else {  // RGB, or RGBA: libpng's palette expansion turns a tRNS chunk into alpha, dropped here
        std::memcpy(out, &raw[y * rowbytes + x * channels], 3);
      }
    }
  }
  return image;
}

// ---- JPEG (libjpeg-turbo, default settings as Pillow: ISLOW DCT, fancy upsampling). ------------

struct JpegError {
  jpeg_error_mgr manager;  // first: libjpeg sees only this part
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated;
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* error = reinterpret_cast<JpegError*>(cinfo->err);
  error->manager.format_message(cinfo, error->message);
  std::longjmp(error->jump, 1);
}
// Warnings are not printed; a file that ends early is an error, as in Pillow ("image file is truncated").
void jpeg_emit_message(j_common_ptr cinfo, int level) {
  auto* error = reinterpret_cast<JpegError*>(cinfo->err);
  if (level < 0 && error->manager.msg_code == JWRN_JPEG_EOF) error->truncated = true;
}

void jpeg_bound_scans(j_common_ptr cinfo) {
  auto* decompress = reinterpret_cast<j_decompress_ptr>(cinfo);
  if (decompress->input_scan_number > kMaxJpegScans) {
    auto* error = reinterpret_cast<JpegError*>(cinfo->err);
    std::snprintf(error->message, sizeof error->message, "more than %d progressive scans", kMaxJpegScans);
    std::longjmp(error->jump, 1);
  }
}

RgbImage decode_jpeg(const fs::path& path, const std::vector<uint8_t>& bytes) {
  jpeg_decompress_struct cinfo;
  jpeg_progress_mgr progress{};
  JpegError error;
  cinfo.err = jpeg_std_error(&error.manager);
  error.manager.error_exit = jpeg_error_exit;
  error.manager.emit_message = jpeg_emit_message;
  std::snprintf(error.message, sizeof error.message, "%s", "CMYK/YCCK JPEG is not supported by this example");
  error.truncated = false;
  RgbImage image;
  if (setjmp(error.jump)) {
    jpeg_destroy_decompress(&cinfo);
    throw UserError(path.string() + ": not a readable JPEG (" + error.message + ")");
  }
  jpeg_create_decompress(&cinfo);
  progress.progress_monitor = jpeg_bound_scans;
  cinfo.progress = &progress;
  jpeg_mem_src(&cinfo, bytes.data(), (unsigned long)bytes.size());
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) std::longjmp(error.jump, 1);
  if (!acceptable_size(cinfo.image_width, cinfo.image_height)) {
    jpeg_destroy_decompress(&cinfo);
    refuse_size(path, cinfo.image_width, cinfo.image_height);
  }
  // Greyscale is decoded straight to RGB (replicated), which is Pillow's "L" then convert("RGB").
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  image.width = int(cinfo.output_width);
  image.height = int(cinfo.output_height);
  image.pixels.resize(size_t(image.width) * image.height * 3);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = &image.pixels[size_t(cinfo.output_scanline) * image.width * 3];
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  if (error.truncated) throw UserError(path.string() + ": not a readable JPEG (truncated)");
  return image;
}

// ---- Pillow's resampling (Resample.c), re-implemented from its documented algorithm -----------

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {  // Keys' cubic with a = -0.5, support 2
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;  // per output pixel: first input pixel, count
  std::vector<int32_t> k;   // per output pixel: ksize fixed-point weights
};

// Weights of every output pixel over the input pixels under the (stretched, when downscaling)
// filter, normalised to sum 1, then rounded half away from zero to 22-bit fixed point.
Coefficients coefficients(int in_size, int out_size) {
  const double scale = double(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  Coefficients c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.bounds.resize(size_t(out_size) * 2);
  c.k.assign(size_t(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = bicubic((x + xmin - center + 0.5) * ss);
      total += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = total != 0.0 ? w[x] / total : w[x];
      c.k[size_t(xx) * c.ksize + x] = v < 0 ? int32_t(-0.5 + v * (1 << kPrecisionBits)) : int32_t(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[size_t(xx) * 2] = xmin;
    c.bounds[size_t(xx) * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;  // arithmetic shift: floor
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

}  // namespace

RgbImage decode_image(const fs::path& path) {
  // a regular file of bounded size (MAX_IMAGE_BYTES of crossvit_edge/preprocess.py): no FIFO,
  // device node or sparse giant is read
  const std::vector<uint8_t> bytes = read_regular_file(path, kMaxImageFileBytes, path.string());
  static const uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), png_magic, 8) == 0) return decode_png(path, bytes);
  if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) return decode_jpeg(path, bytes);
  throw UserError(path.string() + ": not a PNG or JPEG image");
}

RgbImage resize_bicubic(const RgbImage& in, int width, int height) {
  const bool need_horizontal = width != in.width;
  const bool need_vertical = height != in.height;
  if (!need_horizontal && !need_vertical) return in;
  const Coefficients horizontal = coefficients(in.width, width);
  Coefficients vertical = coefficients(in.height, height);

  // Horizontal pass first, over only the rows the vertical pass will read.
  const int ybox_first = vertical.bounds[0];
  const int ybox_last = vertical.bounds[size_t(height) * 2 - 2] + vertical.bounds[size_t(height) * 2 - 1];
  RgbImage temp;
  const RgbImage* source = &in;
  if (need_horizontal) {
    for (int y = 0; y < height; ++y) vertical.bounds[size_t(y) * 2] -= ybox_first;
    temp.width = width;
    temp.height = ybox_last - ybox_first;
    temp.pixels.resize(size_t(temp.width) * temp.height * 3);
    for (int y = 0; y < temp.height; ++y) {
      const uint8_t* row = &in.pixels[size_t(y + ybox_first) * in.width * 3];
      for (int xx = 0; xx < width; ++xx) {
        const int xmin = horizontal.bounds[size_t(xx) * 2], xmax = horizontal.bounds[size_t(xx) * 2 + 1];
        const int32_t* k = &horizontal.k[size_t(xx) * horizontal.ksize];
        int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < xmax; ++x) {
          const uint8_t* px = &row[size_t(x + xmin) * 3];
          s0 += px[0] * k[x];
          s1 += px[1] * k[x];
          s2 += px[2] * k[x];
        }
        uint8_t* out = &temp.pixels[(size_t(y) * width + xx) * 3];
        out[0] = clip8(s0);
        out[1] = clip8(s1);
        out[2] = clip8(s2);
      }
    }
    source = &temp;
  }
  if (!need_vertical) return temp;
  RgbImage out;
  out.width = source->width;
  out.height = height;
  out.pixels.resize(size_t(out.width) * height * 3);
  for (int yy = 0; yy < height; ++yy) {
    const int ymin = vertical.bounds[size_t(yy) * 2], ymax = vertical.bounds[size_t(yy) * 2 + 1];
    const int32_t* k = &vertical.k[size_t(yy) * vertical.ksize];
    for (int xx = 0; xx < out.width; ++xx) {
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int y = 0; y < ymax; ++y) {
        const uint8_t* px = &source->pixels[(size_t(y + ymin) * source->width + xx) * 3];
        s0 += px[0] * k[y];
        s1 += px[1] * k[y];
        s2 += px[2] * k[y];
      }
      uint8_t* o = &out.pixels[(size_t(yy) * out.width + xx) * 3];
      o[0] = clip8(s0);
      o[1] = clip8(s1);
      o[2] = clip8(s2);
    }
  }
  return out;
}

void preprocess(const RgbImage& image, const Preprocessing& p, float* out) {
  // torchvision's Resize(int): the short side becomes resize_size, the long side
  // int(resize_size * long / short) (Python true division, then truncation).
  const int short_side = p.resize_size;
  const int w = image.width, h = image.height;
  int new_w, new_h;
  if (w <= h) {
    new_w = short_side;
    new_h = int(double((long long)short_side * h) / w);
  } else {
    new_w = int(double((long long)short_side * w) / h);
    new_h = short_side;
  }
  const RgbImage resized = (new_w == w && new_h == h) ? image : resize_bicubic(image, new_w, new_h);
  // Centre crop with Python's round() (half to even: std::nearbyint in the default rounding mode);
  // Pillow fills pixels outside the image with 0.
  const int size = p.input_size;
  const int top = int(std::nearbyint((new_h - size) / 2.0));
  const int left = int(std::nearbyint((new_w - size) / 2.0));
  const size_t plane = size_t(size) * size;
  for (int y = 0; y < size; ++y) {
    for (int x = 0; x < size; ++x) {
      const int sy = y + top, sx = x + left;
      const bool inside = sy >= 0 && sy < resized.height && sx >= 0 && sx < resized.width;
      for (int c = 0; c < 3; ++c) {
        const uint8_t v = inside ? resized.pixels[(size_t(sy) * resized.width + sx) * 3 + c] : 0;
        // numpy: uint8 -> float32, / 255, - mean, / std, every step in float32
        const float scaled = float(v) / 255.0f;
        out[c * plane + size_t(y) * size + x] = (scaled - p.mean[c]) / p.std[c];
      }
    }
  }
}

}  // namespace crossvit
