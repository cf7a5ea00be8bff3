// The manifest's preprocessing, pixel for pixel as crossvit_edge/preprocess.py computes it with
// Pillow and numpy: decode (libpng / libjpeg, the decoders Pillow itself wraps), convert to RGB,
// resize the short side to floor(input_size / crop_pct) with Pillow's bicubic resampling (its
// fixed-point two-pass filter, horizontal pass first), centre-crop input_size, then
// (x / 255 - mean) / std in float32, channels first.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "bundle.h"

namespace crossvit {

struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;  // HWC, RGB, 8 bits per channel
};

// PNG or JPEG (by content, not by name); UserError for anything else or a corrupt file.
RgbImage decode_image(const std::filesystem::path& path);

// Pillow's Image.resize(size, Image.BICUBIC) of an RGB image.
RgbImage resize_bicubic(const RgbImage& in, int width, int height);

// preprocess.py's Preprocessing.__call__: writes 3 * input_size * input_size floats (CHW) to out.
void preprocess(const RgbImage& image, const Preprocessing& p, float* out);

}  // namespace crossvit
