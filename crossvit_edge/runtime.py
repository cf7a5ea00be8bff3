"""The app-facing runtime: open a bundle, classify images. No torch for ONNX and TensorRT bundles.

    from crossvit_edge.runtime import load
    model = load("runs/demo/onnx-int8")                      # verifies the bundle, picks its runtime
    model.classify(["a.png", png_bytes, pil_image, uint8_hwc], top_k=3)  # [[("7", 0.981), ...], ...]
    model.preprocess(images)                                 # exactly the manifest's preprocessing
    model.logits(batch)                                      # (n, 3, H, W) float32 -> (n, classes)

A bundle is opened through ``crossvit_edge.bundle.open_bundle`` (the checks every command applies:
schema, paths inside the bundle, size and sha256 of every file) and run by the Runner of its
artifact kind from the fixed registry (``crossvit_edge.converters.base.runner_class``): ONNX Runtime for
``.onnx``, the ExecuTorch runtime for ``.pte``, TensorRT for engines (on the device), Core ML for
``.mlpackage`` on macOS. Any number of images is split into the bundle's static batch, the last
batch padded by repeating its last image and the padding dropped, so results keep the input order.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .bundle import Bundle, check_artifacts, open_bundle
from .cli_common import check_int
from .errors import UserError, brief
from .metrics import softmax

ImageLike = Union[str, "os.PathLike[str]", Image.Image, np.ndarray, bytes]
Prediction = List[Tuple[str, float]]  # (label, probability), most probable first

# numpy arrays an app may pass, by shape: (H, W) grey, (H, W, 3) RGB, (H, W, 4) RGBA
_ARRAY_MODES = {2: "L", 3: "RGB", 4: "RGBA"}


class Model:
    """One opened bundle and its runtime. Use ``load``; close it (or use ``with``) to free the runtime."""

    def __init__(self, bundle: Bundle, runner: Any):
        self.bundle = bundle
        self.runner = runner
        self.preprocessing = bundle.preprocessing
        self.batch_size: int = int(runner.batch_size)
        self.num_classes: int = bundle.num_classes
        # the manifest's labels, or the class indices as strings when it has none
        self.labels: List[str] = list(bundle.labels) if bundle.labels else [str(i) for i in range(self.num_classes)]

    @property
    def description(self) -> str:
        """The runtime and device (e.g. "onnxruntime 1.32.0 CPUExecutionProvider ..."); "closed" once closed."""
        return "closed" if self.runner is None else self.runner.description

    @property
    def closed(self) -> bool:
        return self.runner is None

    def _open_runner(self) -> Any:
        runner = self.runner
        if runner is None:
            raise UserError(f"model {self.bundle.name} is closed: load the bundle again to classify with it")
        return runner

    def preprocess(self, images: Union[ImageLike, Iterable[ImageLike]]) -> np.ndarray:
        """Images (paths, encoded bytes, PIL images, uint8 HWC arrays) -> (n, 3, H, W) float32, exactly as the
        manifest says (``crossvit_edge.preprocess.Preprocessing``, the one implementation)."""
        items = _as_list(images)
        size = self.preprocessing.input_size
        if not items:
            return np.zeros((0, 3, size, size), np.float32)
        return np.stack([self.preprocessing(_as_pil(image)) for image in items]).astype(np.float32, copy=False)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(n, 3, H, W) float32 preprocessed images -> (n, classes) float32, any n."""
        self._open_runner()  # a closed model refuses work before any
        size = self.preprocessing.input_size
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size):
            raise UserError(f"logits: expected preprocessed images of shape (n, 3, {size}, {size}), got {batch.shape}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not len(batch):
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate([self._run_padded(chunk) for chunk in _chunks(batch, self.batch_size)])

    def classify(self, images: Union[ImageLike, Iterable[ImageLike]], top_k: int = 1) -> List[Prediction]:
        """The ``top_k`` most probable (label, probability) of every image, in input order. Images
        are preprocessed one static batch at a time, so a long list never sits in memory at once."""
        self._open_runner()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise UserError(f"top_k {brief(top_k)}: expected a positive whole number")
        k = min(top_k, self.num_classes)
        results: List[Prediction] = []
        for chunk in _chunks(_as_list(images), self.batch_size):
            probabilities = softmax(self.logits(self.preprocess(chunk)))
            # stable: equal probabilities keep the lower class index first
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            results += [[(self.labels[c], float(p[c])) for c in row] for p, row in zip(probabilities, order)]
        return results

    def _run_padded(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        if n < self.batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
        return np.asarray(self._open_runner().run(chunk), np.float32)[:n]

    def close(self) -> None:
        """Release the runtime: the runner's session or program and its buffers (dropped here, so
        they go even while the app keeps this object), then hand the freed heap back to the system
        (``malloc_trim``, glibc only: measured to return what the runtimes' allocations leave in the
        arenas). Afterwards ``classify`` and ``logits`` raise UserError. Closing twice is a no-op."""
        runner, self.runner = self.runner, None
        if runner is None:
            return
        runner.close()
        del runner
        _release_heap()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.bundle.name!r}, {self.description})"


def _release_heap() -> None:
    """Return the freed heap to the system where the C library can (glibc's ``malloc_trim``)."""
    import gc

    gc.collect()  # the runtime's Python wrappers in reference cycles go now, not at some later collection
    if platform.system() != "Linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def load(bundle: Union[str, "os.PathLike[str]", Bundle], threads: Optional[int] = None, isolate: bool = True) -> Model:
    """Open and verify a bundle folder and start the runtime of its artifact. ``threads``: the
    runtime's CPU threads (ONNX Runtime intra-op threads, ExecuTorch's thread pool); default: the
    runtime's own choice. ``isolate``: load the artifact and run one batch in a child process
    first (Linux; ``crossvit_edge.isolation``), so that a runtime that aborts on a corrupt or
    hostile artifact ends in a UserError instead of taking this process down; once per artifact
    and process. ``isolate=False`` skips it (for bundles you built yourself)."""
    check_int("threads", threads, 1, 1024)
    if not isinstance(isolate, bool):
        raise UserError(f"isolate {brief(isolate)}: expected True or False")
    # a Core ML bundle off macOS is refused before its package is read (that needs coremltools)
    opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, read_artifacts=False)
    if opened.kind == "mlpackage":
        _refuse_coreml_off_macos(opened)
    if not isinstance(bundle, Bundle):  # an opened Bundle had its artifacts read by open_bundle
        check_artifacts(opened.root, opened.manifest, f"bundle {opened.name}")
    if opened.kind == "mlpackage":
        return Model(opened, _coreml_runner(opened, threads))
    if isolate:
        from .isolation import isolated_runner

        return Model(opened, isolated_runner(opened, threads=threads))
    return Model(opened, opened.runner(threads=threads))


def _refuse_coreml_off_macos(bundle: Bundle) -> None:
    """Core ML's own prediction exists on macOS only. Elsewhere the project has a numpy checker of
    the ML Program, which is for accuracy work, not an app runtime: say so."""
    if platform.system() != "Darwin":
        raise UserError(
            f"bundle {bundle.name}: Core ML predicts on macOS only; for accuracy work elsewhere use the numpy "
            "ML Program checker (python -m crossvit_edge.profile BUNDLE --data DIR, or crossvit_edge.converters.coreml.CoreMLRunner(..., backend='checker'))"
        )


def _coreml_runner(bundle: Bundle, threads: Optional[int]):
    from crossvit_edge.converters.base import runner_class

    return runner_class(bundle.kind)(bundle.root, bundle.manifest, threads=threads, backend="coreml")


def _as_list(images: Union[ImageLike, Iterable[ImageLike]]) -> List[ImageLike]:
    """One image or a sequence of them (a 4-d uint8 array is a stack of HWC images)."""
    if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    try:
        return list(images)
    except TypeError:
        raise UserError(f"expected an image or a list of images (paths, PIL images, uint8 arrays), got {type(images).__name__}") from None


def _as_pil(image: ImageLike) -> Image.Image:
    from .preprocess import FORMAT_NAMES, IMAGE_FORMATS, check_image_size

    if isinstance(image, Image.Image):
        # A PIL image opened but not yet decoded (Image.open is lazy) would be decoded here by
        # whatever plugin opened it: only the allowlist's (the EPS plugin runs Ghostscript). Images
        # already decoded, or made in memory, are the app's own pixels.
        if isinstance(image, ImageFile.ImageFile) and image.tile and image.format not in IMAGE_FORMATS:
            raise UserError(f"PIL image in format {brief(image.format)} not yet decoded: this tool decodes only {', '.join(FORMAT_NAMES)} "
                            "(decode it yourself, or pass the file's path or bytes)")
        check_image_size(image.size, "PIL image")
        if isinstance(image, ImageFile.ImageFile) and image.tile:
            from .preprocess import decode_as_stored

            return decode_as_stored(image)  # decoded here: as every decoder here does, orientation not applied
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        from .preprocess import load_image

        try:
            return load_image(image, "bytes")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UserError(f"image bytes: not a readable image ({brief(str(e), 120)})") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise UserError(f"image array of shape {image.shape} and dtype {image.dtype}: expected uint8 (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        check_image_size((image.shape[1], image.shape[0]), "array")
        return Image.fromarray(np.ascontiguousarray(image), _ARRAY_MODES[image.ndim if image.ndim == 2 else image.shape[2]])
    if isinstance(image, (str, os.PathLike)):
        from .preprocess import load_image

        path = Path(image)
        try:
            return load_image(path)
        except FileNotFoundError:
            raise UserError(f"image {brief(str(path), 200)}: no such file") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UserError(f"image {brief(str(path), 200)}: not a readable image ({brief(str(e), 120)})") from None
    raise UserError(f"expected an image (a path, an encoded file's bytes, a PIL image or a uint8 array), got {type(image).__name__}")


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
