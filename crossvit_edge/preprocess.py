"""Evaluation preprocessing, one implementation for calibration, evaluation and every manifest.

Torch-free (PIL + numpy) so the device-side runners on a Jetson can share it. It reproduces timm's
eval transform for CrossViT: resize the short side to ``floor(size / crop_pct)`` with bicubic
(PIL's, as torchvision does for PIL images), centre-crop ``size``, scale to [0, 1], normalise with
ImageNet mean/std, channels first.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np
from PIL import Image

from .errors import UserError, brief

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images are untrusted input: their size is read from the header and checked before any pixel is
# decoded. A 24 KB PNG can declare 14000 x 14000 pixels; a 1 x 2000 strip resized to the model's
# short side would be 274 x 548000. Documented in docs/security.md.
MAX_IMAGE_PIXELS = 64_000_000  # width x height (an 8000 x 8000 image)
MAX_ASPECT_RATIO = 50  # long side / short side


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
    return image if image.mode == "RGB" else image.convert("RGB")


def check_image_size(size: Tuple[int, int], name: str) -> None:
    """Refuse (UserError) an image whose header declares too many pixels or an extreme shape."""
    w, h = size
    if w < 1 or h < 1:
        raise UserError(f"image {name}: empty ({w} x {h} pixels)")
    if w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"image {name}: {w} x {h} pixels is more than the {MAX_IMAGE_PIXELS} this tool decodes (a decompression bomb?)")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise UserError(f"image {name}: {w} x {h} pixels, an aspect ratio beyond {MAX_ASPECT_RATIO}:1 that resizing would blow up")


def open_image(path: Union[str, Path]) -> Image.Image:
    """``Image.open`` (header only) with the size limits applied; the caller loads the pixels."""
    name = brief(Path(path).name, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower, limit applies
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise UserError(f"image {name}: more pixels than PIL allows (a decompression bomb); this tool decodes at most {MAX_IMAGE_PIXELS}") from None
    try:
        check_image_size(im.size, name)
    except UserError:
        im.close()
        raise
    return im


def load_image(path: Union[str, Path]) -> Image.Image:
    with open_image(path) as im:
        im.load()
        return im.copy()
