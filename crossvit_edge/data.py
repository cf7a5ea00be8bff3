"""Image sets on disk: ImageFolder trees (class sub-folders) and plain folders of images.

Torch-free. Files are listed in sorted order, sampled deterministically (class-balanced when there
are labels), decoded and preprocessed lazily; files that are not decodable images are skipped and
reported in one warning; a file over the byte or pixel limits, or whose content is a format outside
the decoder allowlist (``preprocess.IMAGE_FORMATS``), is refused. The hash of an image set (paths
relative to the root + bytes) goes into manifests so a calibration can be tied to the exact images
it saw.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import safe_io
from .errors import UserError, brief
from .preprocess import MAX_IMAGE_BYTES, Preprocessing, load_image, open_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class ImageSet:
    """A list of image files, with labels when the folder is an ImageFolder tree."""

    root: Path
    paths: List[Path]
    labels: Optional[List[int]] = None
    classes: Optional[List[str]] = None
    skipped: List[Path] = field(default_factory=list)
    source_paths: Optional[List[Path]] = None  # every usable image of the folder, when this is a sample

    @property
    def population(self) -> List[Path]:
        """Every usable image of the folder (``paths`` unless this set is a sample of it)."""
        return self.source_paths if self.source_paths is not None else self.paths

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def sha256(self) -> str:
        """Content hash of the set: relative paths, labels and file bytes, in order."""
        h = hashlib.sha256()
        for i, p in enumerate(self.paths):
            h.update(os.fsencode(p.relative_to(self.root)))  # the name's bytes, UTF-8 or not
            h.update(b"\0" + (str(self.labels[i]) if self.labels else "-").encode() + b"\0")
            # streamed and bounded like every image read: a small PNG with a sparse multi-GiB tail is refused by its size
            for chunk in safe_io.read_chunks(p, f"image {brief(p.name, 120)}", max_bytes=MAX_IMAGE_BYTES):
                h.update(chunk)
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(
            root=self.root,
            paths=[self.paths[i] for i in indices],
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            classes=self.classes,
            skipped=self.skipped,
            source_paths=self.population,
        )

    def with_class_names(self, labels: Optional[Sequence[str]], num_classes: int, override_flag: str) -> "ImageSet":
        """Labels re-indexed to a model's class list by folder name: folder ``cat`` gets the index
        of ``"cat"`` in ``labels``, whatever the folder's position in sorted order (a folder of a
        subset of the classes would otherwise shift every label). A folder name that is not one of
        the labels is an error naming ``override_flag``; with ``labels=None`` (the model has no
        names, or the flag was given) the sorted-folder order is kept."""
        if self.classes is None:
            return self
        if labels is None:
            if len(self.classes) > num_classes:
                raise UserError(f"{self.root}: {len(self.classes)} class folders, but the model has {num_classes} classes")
            return self
        position = {name: i for i, name in enumerate(labels)}
        unknown = [c for c in self.classes if c not in position]
        if unknown:
            raise UserError(
                f"{self.root}: class folder {brief(unknown[0], 80)} is not one of the model's {len(labels)} labels "
                f"({len(unknown)} of {len(self.classes)} folders differ); rename the folders to the labels, or pass "
                f"{override_flag} to score by sorted folder order"
            )
        remap = [position[c] for c in self.classes]
        return ImageSet(root=self.root, paths=self.paths, labels=[remap[y] for y in self.labels], classes=list(labels),
                        skipped=self.skipped, source_paths=self.source_paths)

    def sample(self, n: Optional[int], seed: int = 0) -> "ImageSet":
        """``n`` images chosen deterministically from ``seed``; class-balanced (round robin over
        shuffled classes) when labelled. Asking for more images than there are is an error."""
        if n is None or n == len(self):
            return self
        if n > len(self):
            raise UserError(f"{self.root}: asked for {n} images but it holds only {len(self)} usable images")
        rng = random.Random(seed)
        if self.labels is None:
            order = list(range(len(self)))
            rng.shuffle(order)
            return self.subset(sorted(order[:n]))
        by_class: dict = {}
        for i, y in enumerate(self.labels):
            by_class.setdefault(y, []).append(i)
        queues = []
        for y in sorted(by_class):
            idx = by_class[y][:]
            rng.shuffle(idx)
            queues.append(idx)
        chosen: List[int] = []
        while len(chosen) < n:
            for q in queues:
                if q and len(chosen) < n:
                    chosen.append(q.pop())
        return self.subset(sorted(chosen))

    def batches(self, preprocessing: Preprocessing, batch_size: int) -> Iterator[np.ndarray]:
        """Preprocessed images (NCHW float32) in fixed-size batches (the last may be short)."""
        for start in range(0, len(self), batch_size):
            yield np.stack([preprocessing(p) for p in self.paths[start : start + batch_size]])

    def load(self, preprocessing: Preprocessing) -> np.ndarray:
        """All images preprocessed into one array (small sets only)."""
        return np.stack([preprocessing(p) for p in self.paths]) if self.paths else np.zeros((0,))


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _decodable(p: Path) -> bool:
    """True for a decodable image, False for a corrupt one (skipped); UserError (refused, not
    skipped) for one over the size limits (a decompression bomb in a calibration folder is
    something to know about), one that is not a regular file, and one whose content is a format
    this tool does not decode (``preprocess.IMAGE_FORMATS``: an EPS named x.png)."""
    try:
        with open_image(p) as im:
            im.verify()
        load_image(p)  # verify() misses truncated pixel data
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def open_image_set(root, *, require_labels: bool = False, check_decodable: bool = True) -> ImageSet:
    """Read ``root`` as an ImageFolder (images in class sub-folders, labels from sorted folder
    names) or, when it holds images directly, as a plain unlabelled folder."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"image folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"not a folder of images: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    direct = sorted(p for p in root.iterdir() if _is_image_file(p))
    paths: List[Path] = []
    labels: Optional[List[int]] = None
    classes: Optional[List[str]] = None
    if class_dirs and not direct:
        classes = [d.name for d in class_dirs]
        labels = []
        for y, d in enumerate(class_dirs):
            files = sorted(p for p in d.rglob("*") if _is_image_file(p))
            if not files:
                raise UserError(f"{root}: class folder {brief(d.name, 80)} holds no images (an empty class would shift every label after it); remove it or add images")
            paths += files
            labels += [y] * len(files)
    else:
        paths = direct
    if require_labels and labels is None:
        raise UserError(f"{root}: labels are needed, but it is not an ImageFolder tree (one sub-folder per class)")
    skipped: List[Path] = []
    if check_decodable:
        keep = [_decodable(p) for p in paths]
        skipped = [p for p, k in zip(paths, keep) if not k]
        if labels is not None:
            labels = [y for y, k in zip(labels, keep) if k]
        paths = [p for p, k in zip(paths, keep) if k]
    if skipped:
        log.warning("%s: skipped %d file(s) that are not decodable images (first: %s)", root, len(skipped), brief(skipped[0].name, 120))
    if labels is not None and classes is not None:
        present = set(labels)
        emptied = [c for y, c in enumerate(classes) if y not in present]
        if emptied:
            raise UserError(f"{root}: class folder {brief(emptied[0], 80)} holds no decodable images (an empty class would shift every label after it)")
    if not paths:
        raise UserError(f"no decodable images in {root}")
    return ImageSet(root=root, paths=paths, labels=labels, classes=classes, skipped=skipped)


def write_digits_imagefolder(out_dir, *, val_fraction: float = 0.2, seed: int = 0) -> Tuple[Path, Path]:
    """scikit-learn's digits (8x8, 1797 images) as PNG ImageFolders ``train/`` and ``val/``,
    stratified split with a fixed seed. Returns (train_dir, val_dir). Idempotent."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
    train_dir, val_dir = out_dir / "train", out_dir / "val"
    marker = out_dir / ".complete"
    if marker.exists():
        return train_dir, val_dir
    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    for split_dir, split_idx in ((train_dir, train_idx), (val_dir, val_idx)):
        for i in sorted(split_idx):
            d = split_dir / str(int(digits.target[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(d / f"{i:04d}.png")
    marker.write_text("scikit-learn digits\n")
    return train_dir, val_dir
