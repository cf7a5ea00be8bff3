"""Evaluation preprocessing, one implementation for calibration, evaluation and every manifest.

Torch-free (PIL + numpy) so the device-side runners on a Jetson can share it. It reproduces timm's
eval transform for CrossViT: resize the short side to ``floor(size / crop_pct)`` with bicubic
(PIL's, as torchvision does for PIL images), centre-crop ``size``, scale to [0, 1], normalise with
ImageNet mean/std, channels first.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import safe_io
from .errors import UserError, brief

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images are untrusted input: their size is read from the header and checked before any pixel is
# decoded. A 24 KB PNG can declare 14000 x 14000 pixels; a 1 x 2000 strip resized to the model's
# short side would be 274 x 548000. Documented in docs/security.md.
MAX_IMAGE_PIXELS = 64_000_000  # width x height (an 8000 x 8000 image)
MAX_ASPECT_RATIO = 50  # long side / short side
MAX_IMAGE_BYTES = 256 << 20  # an image file (64 megapixels of 16-bit RGBA in an uncompressed TIFF is 512 MB: not needed here)

# The decoders used, chosen by content among these only (Pillow's format names). Each is Pillow's
# own C code or a library linked into it (libpng/zlib, libjpeg, libtiff, libwebp): none calls out
# of the process. Animated GIF, WebP, APNG and multi-page TIFF: the first frame. PPM covers the
# Netpbm family (PBM, PGM, PPM). Everything else (EPS, PDF, PSD, ICO, TGA, ...) is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
FORMAT_NAMES = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WebP", "PBM/PGM/PPM")


@dataclass(frozen=True)
class Preprocessing:
    """Everything an app needs to feed the model; written verbatim into every manifest."""

    input_size: int = 240
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    layout: str = "NCHW"

    @property
    def resize_size(self) -> int:
        # timm: scale_size = math.floor(img_size / crop_pct)
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["resize_short_side"] = self.resize_size
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "preprocessing") -> "Preprocessing":
        """From a manifest's ``preprocessing`` block, validated (sizes, crop in (0, 1], finite
        non-zero std, ...); UserError naming the key otherwise."""
        from .bundle import validate_preprocessing

        validate_preprocessing(d, source)
        fields = {k: d[k] for k in ("input_size", "crop_pct", "interpolation", "channel_order", "layout") if k in d}
        return cls(mean=tuple(d.get("mean", IMAGENET_MEAN)), std=tuple(d.get("std", IMAGENET_STD)), **fields)

    # -- the transform -----------------------------------------------------------------------

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """RGB image, short side resized to ``resize_size`` and centre-cropped to ``input_size``."""
        image = to_rgb(image)
        w, h = image.size
        short = self.resize_size
        # torchvision.transforms.Resize(int): the long side is int(short * long / short_side).
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        size = self.input_size
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        return image.crop((left, top, left + size, top + size))

    def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW float32 normalised."""
        x = rgb_uint8.astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, image: Union[Image.Image, str, Path]) -> np.ndarray:
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return self.normalize(np.asarray(self.resize_and_crop(image), dtype=np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and RGBA become RGB; transparency is composited on black as
    PIL's plain convert does, which is what torchvision's ``.convert("RGB")`` loaders do too."""
    if image.mode == "RGB":
        return image
    try:
        # Pillow converts every mode to RGB directly except premultiplied "La", which it converts
        # to "LA" first (un-premultiplying, as it does for "RGBa"); a mode it cannot convert is one line.
        return (image.convert("LA") if image.mode == "La" else image).convert("RGB")
    except (ValueError, OSError) as e:
        raise UserError(f"image in PIL mode {brief(str(image.mode), 20)}: cannot convert it to RGB ({brief(str(e), 120)})") from None


def check_image_size(size: Tuple[int, int], name: str) -> None:
    """Refuse (UserError) an image whose header declares too many pixels or an extreme shape."""
    w, h = size
    if w < 1 or h < 1:
        raise UserError(f"image {name}: empty ({w} x {h} pixels)")
    if w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"image {name}: {w} x {h} pixels is more than the {MAX_IMAGE_PIXELS} this tool decodes (a decompression bomb?)")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise UserError(f"image {name}: {w} x {h} pixels, an aspect ratio beyond {MAX_ASPECT_RATIO}:1 that resizing would blow up")


@contextmanager
def open_image(source: Union[str, Path, bytes], name: Optional[str] = None) -> Iterator[Image.Image]:
    """The image in ``source`` (a path, or an encoded file's bytes), header only, with the limits
    applied: a regular file of at most ``MAX_IMAGE_BYTES`` (no FIFO or device: ``safe_io``), in one
    of ``IMAGE_FORMATS`` identified by its content (Pillow's other decoders are never tried: its EPS
    plugin runs Ghostscript, whatever the file is called), at most ``MAX_IMAGE_PIXELS``. The caller
    loads the pixels inside the ``with``; the file is closed at its end."""
    name = name or (brief(Path(source).name, 120) if not isinstance(source, (bytes, bytearray, memoryview)) else "bytes")
    with contextlib.ExitStack() as stack:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) > MAX_IMAGE_BYTES:
                raise UserError(f"image {name}: {len(source)} bytes, more than the {MAX_IMAGE_BYTES} this tool reads")
            f = io.BytesIO(bytes(source))
        else:
            f = stack.enter_context(safe_io.open_regular(source, f"image {name}", max_bytes=MAX_IMAGE_BYTES))
        head = f.read(32)
        f.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower, limit applies
            try:
                im = Image.open(f, formats=IMAGE_FORMATS)
            except Image.DecompressionBombError:
                raise UserError(f"image {name}: more pixels than PIL allows (a decompression bomb); this tool decodes at most {MAX_IMAGE_PIXELS}") from None
            except UnidentifiedImageError:
                other = other_format(head)
                if other is not None:
                    raise UnsupportedImageFormat(f"image {name}: its content is {other}, which this tool does not decode "
                                                 f"(it decodes {', '.join(FORMAT_NAMES)}, whatever the file name says)") from None
                raise
        stack.callback(im.close)
        check_image_size(im.size, name)
        yield im


def load_image(source: Union[str, Path, bytes], name: Optional[str] = None) -> Image.Image:
    """The decoded image (its first frame), under ``open_image``'s limits, in its stored pixel
    order: EXIF orientation is never applied, by any decoder (docs/embedding.md)."""
    with open_image(source, name) as im:
        return decode_as_stored(im, copy=True)


def decode_as_stored(im: Image.Image, copy: bool = False) -> Image.Image:
    """Decode an opened image's pixels in their stored order (a copy with ``copy``, else ``im``
    itself where nothing was transposed). Pillow's TIFF plugin, alone among the decoders (JPEG,
    PNG eXIf and WebP are left as stored), transposes by the Orientation tag when it loads and
    drops the tag: undone here, so a TIFF gives the tensor its pixels give in every other format
    and in the C++ app."""
    orientation = im.tag_v2.get(ORIENTATION_TAG) if im.format == "TIFF" and getattr(im, "tile", None) else None
    im.load()
    image = im.copy() if copy else im
    if orientation in STORED_ORDER and ORIENTATION_TAG not in im.tag_v2:
        image = image.transpose(STORED_ORDER[orientation])
    return image


ORIENTATION_TAG = 0x0112  # EXIF/TIFF Orientation
# Orientation -> the transpose that takes Pillow's oriented TIFF back to the stored pixels (the
# inverse of ImageOps.exif_transpose's: 6 and 8 are rotations the other way, the rest self-inverse)
STORED_ORDER = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_270}


class UnsupportedImageFormat(UserError):
    """An image whose content is a format outside ``IMAGE_FORMATS``: refused, never skipped."""


def other_format(head: bytes) -> Optional[str]:
    """The Pillow format whose signature ``head`` (a file's first bytes) matches, among the formats
    this tool does not decode; None when none does (not an image at all, or a corrupt one). Only
    the plugins' signature tests run (byte comparisons), never their decoders."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return fmt
        except Exception:  # a plugin's signature test on a short prefix
            continue
    return None
