#include "tsv.h"

#include <cstdio>

namespace crossvit {

namespace {

// One UTF-8 sequence at text[i]: its code point and length, or length 0 when the bytes there are
// not valid UTF-8 (overlong forms, surrogates and values past U+10FFFF included), as Python's
// decoder (with surrogateescape, which turns each such byte into one "\xHH").
size_t decode_utf8(const std::string& text, size_t i, uint32_t& cp) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char b0 = byte(i);
  size_t length;
  uint32_t min;
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  } else if ((b0 & 0xE0) == 0xC0) {
    length = 2, cp = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    length = 3, cp = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    length = 4, cp = b0 & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (i + length > text.size()) return 0;
  for (size_t k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return length;
}

std::string hex(const char* format, unsigned value) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, format, value);
  return buffer;
}

}  // namespace

bool unsafe_in_label(uint32_t cp) {
  return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F) || cp == 0x2028 || cp == 0x2029 || cp == 0x200E || cp == 0x200F ||
         (cp >= 0x202A && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069) || (cp >= 0xD800 && cp <= 0xDFFF);
}

long first_unsafe_in_label(const std::string& text) {
  for (size_t i = 0; i < text.size();) {
    uint32_t cp = 0;
    const size_t length = decode_utf8(text, i, cp);
    if (length == 0) return -2;
    if (unsafe_in_label(cp)) return long(cp);
    i += length;
  }
  return -1;
}

std::string tsv_field(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    uint32_t cp = 0;
    const size_t length = decode_utf8(text, i, cp);
    if (length == 0) {  // not UTF-8: the byte itself
      out += hex("\\x%02x", static_cast<unsigned char>(text[i]));
      i += 1;
      continue;
    }
    if (cp == '\\') out += "\\\\";
    else if (cp == '\t') out += "\\t";
    else if (cp == '\n') out += "\\n";
    else if (cp == '\r') out += "\\r";
    else if (unsafe_in_label(cp)) out += cp < 0x80 ? hex("\\x%02x", cp) : hex("\\u%04x", cp);
    else out.append(text, i, length);
    i += length;
  }
  return out;
}

}  // namespace crossvit
