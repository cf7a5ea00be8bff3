"""TensorRT INT8 calibration cache files, written from our own calibration statistics.

TensorRT's implicit INT8 mode (``IInt8EntropyCalibrator2``, TensorRT <= 10.x; the calibrator API is
deprecated since 10.1 and removed in 11.0) can skip calibration entirely when the calibrator hands it
a cache. The cache is text::

    TRT-<version int>-EntropyCalibration2
    <tensor name>: <hex digits>
    ...

We write 8 lowercase digits; TensorRT itself writes the value unpadded (a zero scale is
``(Unnamed Layer* 64) [Shuffle]_output: 0``), so the reader accepts 1 to 8.

Sources (read, not assumed):

* NVIDIA/TensorRT ``samples/sampleINT8/README.md`` (release/8.4, lines 124-140) shows a cache
  written by TensorRT 7.0 and explains the header ("The TensorRT version followed by the calibration
  algorithm") and the per-tensor values ("floating point activation scales").
* NVIDIA/TensorRT ``samples/common/sampleEngines.cpp`` ``readScalesFromCalibrationCache``
  (release/8.5, 8.6, 10.3): ``colonPos = line.find_last_of(':')``, then
  ``std::stoi(line.substr(colonPos + 2, 8), nullptr, 16)`` reinterpreted as a float32 and used as
  ``setDynamicRange(-127 * scale, 127 * scale)``. So: exactly one space after the last colon, at
  most 8 hex digits, the bits of the float32 *scale* = amax / 127, printed as a big-endian uint32.
* The version integer is ``NV_TENSORRT_VERSION``: ``major*1000 + minor*100 + patch`` for 8.x
  (``NvInferRuntimeCommon.h`` release/8.5, ``NvInferRuntimeBase.h`` release/8.6: 8.5.2 -> 8502,
  8.6.1 -> 8601) and ``major*10000 + minor*100 + patch`` from 10.0 (``NvInferRuntimeBase.h``
  release/10.3: 10.3.0 -> 100300).

TensorRT accepts a cache only when its header names the running TensorRT version and the
calibrator's algorithm (sampleINT8 README: "If the read calibration file is compatible with
calibrator type ... and TensorRT version, builder would skip the calibration step"). A rejected
cache does not fail the build: TensorRT asks the calibrator for batches instead, and trtexec's
calibrator, which allocated no input buffers because the cache file existed, hands it null device
pointers. ``build_engine.sh`` therefore rewrites the header to the trtexec's own version
(``with_header_version`` does the same in Python); the device-side Python builder reads the ranges
from the cache itself and sets them on the network, so the header does not matter there.

Torch-free (struct and numpy only): the device-side builder imports it.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import numpy as np

from crossvit_edge.errors import UserError

ALGORITHM = "EntropyCalibration2"
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{1,8})$")


def parse_version(version: str) -> Tuple[int, int, int]:
    """'8.5.2' / '8.5.2.2' / '10.3' -> (major, minor, patch); only the first three numbers count
    (JetPack wheels report a fourth, build, component)."""
    parts = re.findall(r"\d+", str(version))
    if not parts or not re.match(r"^\s*\d+(\.\d+)*", str(version)):
        raise UserError(f"cannot read TensorRT version {version!r}; expected MAJOR.MINOR[.PATCH]")
    nums = [int(p) for p in parts[:3]] + [0, 0]
    return nums[0], nums[1], nums[2]


def version_int(version: Union[str, Tuple[int, int, int]]) -> int:
    """``NV_TENSORRT_VERSION`` of a version: 8.5.2 -> 8502, 8.6.1 -> 8601, 10.3.0 -> 100300."""
    major, minor, patch = parse_version(version) if isinstance(version, str) else version
    if major < 10:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


def scale_hex(scale: float) -> str:
    """The 8 hex digits of the float32 bits of ``scale``, big-endian (``3c010204`` for 1/127)."""
    return struct.pack(">f", float(scale)).hex()


def hex_scale(digits: str) -> float:
    """The float32 whose bits are the hex number ``digits`` (1 to 8 digits, as TensorRT writes them)."""
    return struct.unpack(">f", struct.pack(">I", int(digits, 16)))[0]


def amax_to_scale(amax: float) -> float:
    """TensorRT's per-tensor scale, amax / 127, computed in float32 as TensorRT does."""
    return float(np.float32(amax) / np.float32(127.0))


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "\r\n") or name != name.strip() or ":" in name:
        # A colon is legal for trtexec (it splits at the last one) but not for every reader (ONNX
        # Runtime's TensorRT provider splits at the first); our ONNX tensor names never have one.
        raise UserError(f"tensor name {name!r} cannot go into a TensorRT calibration cache (no colons, newlines or edge spaces)")


def format_cache(version: Union[str, Tuple[int, int, int]], scales: Mapping[str, float], algorithm: str = ALGORITHM) -> str:
    """The cache text for ``scales`` (tensor name -> scale, i.e. amax / 127), in the given order."""
    lines = [f"TRT-{version_int(version)}-{algorithm}"]
    for name, scale in scales.items():
        _check_name(name)
        if not (scale > 0 and scale < float("inf")):
            raise UserError(f"calibration cache: tensor {name!r} has scale {scale}; scales must be positive and finite")
        lines.append(f"{name}: {scale_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_cache(path: Path, version: Union[str, Tuple[int, int, int]], scales: Mapping[str, float], algorithm: str = ALGORITHM) -> str:
    text = format_cache(version, scales, algorithm)
    Path(path).write_bytes(text.encode("ascii"))
    return text


def cache_from_amax(version: Union[str, Tuple[int, int, int]], amax: Mapping[str, float]) -> str:
    return format_cache(version, {name: amax_to_scale(a) for name, a in amax.items()})


def parse_cache(text: Union[str, bytes]) -> Tuple[int, str, Dict[str, float]]:
    """(version int, algorithm, {tensor name: scale}) of a cache; raises UserError when malformed."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise UserError("not a TensorRT calibration cache: not ASCII text") from None
    lines = text.splitlines()
    if not lines:
        raise UserError("empty TensorRT calibration cache")
    m = _HEADER.match(lines[0])
    if not m:
        raise UserError(f"not a TensorRT calibration cache: first line {lines[0]!r} is not TRT-<version>-<algorithm>")
    scales: Dict[str, float] = {}
    for i, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        lm = _LINE.match(line)
        if not lm:
            raise UserError(f"calibration cache line {i}: {line!r} is not '<tensor>: <1 to 8 hex digits>'")
        scales[lm.group(1)] = hex_scale(lm.group(2))
    return int(m.group(1)), m.group(2), scales


def with_header_version(text: Union[str, bytes], version: Union[str, Tuple[int, int, int]]) -> bytes:
    """The same cache with its header naming ``version`` (the TensorRT actually installed)."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    _, algorithm, _ = parse_cache(text)
    first, _, rest = text.partition("\n")
    return (f"TRT-{version_int(version)}-{algorithm}\n" + rest).encode("ascii")
