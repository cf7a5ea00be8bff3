// Tab-separated output that a file name or a label cannot forge: the rule of crossvit_edge/tsv.py,
// byte for byte, so that this program and `python -m crossvit_edge.classify` print the same lines.
//
//   '\' -> "\\", TAB -> "\t", LF -> "\n", CR -> "\r"; other C0 controls and DEL -> "\xHH"; a byte
//   that is not part of valid UTF-8 -> "\xHH" (the byte); C1 controls (U+0080-U+009F: NEL, CSI...),
//   U+2028, U+2029 and the bidirectional controls (U+200E, U+200F, U+202A-U+202E, U+2066-U+2069)
//   -> "\uHHHH". Everything else is copied as it is.
#pragma once

#include <cstdint>
#include <string>

namespace crossvit {

// A code point a label may not contain (a control, a line separator, a bidi control, a surrogate).
bool unsafe_in_label(uint32_t code_point);

// The first code point of `text` a label may not contain, or -1 when there is none; -2 when
// `text` is not valid UTF-8.
long first_unsafe_in_label(const std::string& text);

// `text` as one tab-separated field on one line.
std::string tsv_field(const std::string& text);

}  // namespace crossvit
