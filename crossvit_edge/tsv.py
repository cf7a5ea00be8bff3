"""Tab-separated output that a file name or a label cannot forge, and the label rule behind it.

classify prints ``path<TAB>label<TAB>probability`` lines; a path is whatever the file system holds
(a newline and tabs forge result lines, ESC or CSI sequences reach the terminal, U+2028 breaks the
line in editors) and a label comes from an untrusted manifest. Every field is escaped:

* ``\\`` -> ``\\\\``, TAB -> ``\\t``, LF -> ``\\n``, CR -> ``\\r``;
* other C0 controls and DEL -> ``\\xHH``, a byte of a file name that is not UTF-8 -> ``\\xHH`` (the
  byte itself);
* C1 controls (U+0080-U+009F: NEL, CSI, ...), the line and paragraph separators U+2028/U+2029,
  the bidirectional controls (U+200E/U+200F, U+202A-U+202E, U+2066-U+2069, which reorder what a
  terminal shows) and lone surrogates -> ``\\uHHHH``.

The C++ example (examples/executorch_cpp/src/results.cpp ``tsv_field``) applies the same rule, so
both print the same bytes for the same path. Labels containing any of these characters (the
backslash aside) are refused when a manifest is read (``crossvit_edge.bundle.validate_manifest``).
Torch-free.
"""
from __future__ import annotations

import re

_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
# what a label may not contain; a backslash is allowed (printed escaped)
UNSAFE_IN_LABEL = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff]")
_ESCAPED = re.compile(f"[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: "re.Match[str]") -> str:
    ch = match.group()
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape: the raw byte of a non-UTF-8 name
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def tsv_field(text: str) -> str:
    """``text`` as one tab-separated field on one line (see the module docstring for the rule)."""
    return _ESCAPED.sub(_escape, text)


def unsafe_label_char(label: str) -> "re.Match[str] | None":
    """The first character that may not appear in a label (a control, separator or bidi control)."""
    return UNSAFE_IN_LABEL.search(label)
