"""The one Converter shape and the one Runner shape that every target implements.

A target is one module in this package that defines a ``Converter`` subclass and a ``Runner``
subclass and is listed in ``converters/__init__.py``. The pipeline (``crossvit_edge.pipeline``)
drives every converter the same way:

    converter.validate(spec)                 # before any work: bad flags / missing extras fail here
    artifact = converter.convert(ctx, dir)   # writes the artifact file(s) into a temporary folder
    runner = runner_class(artifact.kind)(bundle_dir, manifest)  # loads what was written, as an app would
    logits = runner.run(images)              # (B, 3, H, W) float32 -> (B, classes) float32

and ``open_bundle`` calls ``runner_class(kind).check_artifact(root, manifest, file, source)`` on a
bundle from elsewhere before any runner exists (what the artifact refers to, its signature).

and the profiling harness only ever sees ``Runner``: it never branches on the target.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple

import numpy as np

from crossvit_edge.errors import UserError, brief

if TYPE_CHECKING:  # torch-free at import time: device-side runners share this module
    from crossvit_edge.pipeline import ConversionContext
    from crossvit_edge.spec import BuildSpec


@dataclass
class Artifact:
    """What a converter wrote into the bundle folder."""

    primary: str  # file (or package folder) name of the artifact, relative to the bundle
    kind: str  # artifact kind, a key of converters.RUNNERS ("onnx", "pte", "mlpackage", "engine")
    files: List[str] = field(default_factory=list)  # other files it wrote (relative)
    manifest: Dict[str, Any] = field(default_factory=dict)  # target-specific manifest entries
    report: Dict[str, Any] = field(default_factory=dict)  # written as <target>_report.json
    # False when the artifact cannot be executed on this host (a TensorRT engine that was not
    # built, an .mlpackage off macOS without the checker): the pipeline then checks ``check_with``.
    runnable_here: bool = True
    check_with: Optional[str] = None  # a runnable stand-in file (e.g. the ONNX an engine is built from)


class Converter(ABC):
    """Turns (fp32 model, quantization plan, calibration data, options) into an artifact."""

    target: ClassVar[str]
    precisions: ClassVar[Tuple[str, ...]]
    requires: ClassVar[Tuple[str, ...]] = ()  # importable modules the converter needs
    extra: ClassVar[str] = ""  # pip extra that provides them

    def validate(self, spec: "BuildSpec") -> None:
        """Reject what cannot be built, before any work is done."""
        if spec.precision not in self.precisions:
            raise UserError(
                f"--target {self.target} does not support --precision {spec.precision}; "
                f"choose one of: {', '.join(self.precisions)}"
            )
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError:
                hint = f" (pip install 'crossvit-edge[{self.extra}]')" if self.extra else ""
                raise UserError(f"--target {self.target} needs the Python package {module!r}, which is not installed{hint}") from None

    def check_bool_option(self, spec: "BuildSpec", key: str) -> None:
        """A true/false option of this target's profile section, checked for specs built in Python
        (which bypass the profile schema)."""
        value = spec.option(key, False)
        if not isinstance(value, bool):
            raise UserError(f"{self.target}.{key} must be true or false, got {brief(value, 40)}")

    def needs_calibration(self, spec: "BuildSpec") -> bool:
        """True when the precision quantizes activations (and so needs a calibration plan)."""
        return spec.precision == "int8"

    @abstractmethod
    def convert(self, ctx: "ConversionContext", out_dir: Path) -> Artifact:
        """Write the artifact into ``out_dir`` (a temporary folder the pipeline renames)."""


class Runner(ABC):
    """Executes one bundle's artifact on a batch of preprocessed images."""

    target: ClassVar[str]
    # native code parses the artifact: the CLIs load it in a child process first (crossvit_edge.isolation)
    isolate_first_load: ClassVar[bool] = True

    def __init__(self, bundle_dir: Path, manifest: Dict[str, Any], artifact: Optional[str] = None, threads: Optional[int] = None):
        from crossvit_edge.bundle import resolve_in_bundle

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        # the same check as Bundle.path: a plain relative name that stays inside the bundle
        primary = manifest["artifact"]["file"]
        chosen = artifact or primary
        self.artifact_path = resolve_in_bundle(self.bundle_dir, chosen,
                                               "artifact.file" if chosen == primary else "artifact.stand_in.file")
        self.threads = threads
        self.batch_size: int = int(manifest["input"]["shape"][0])

    @classmethod
    @abstractmethod
    def check_artifact(cls, root: Path, manifest: Dict[str, Any], rel: str, source: str) -> None:
        """Read the artifact ``rel`` of a verified bundle as data, never through its runtime, before
        any runner is built (``crossvit_edge.bundle.open_bundle`` calls it): every file it makes its
        runtime open is listed in the manifest and inside the bundle, and its own input and output
        are the manifest's (``crossvit_edge.artifact_check``). UserError (one line) otherwise."""

    @property
    def description(self) -> str:
        """Backend and device, for reports (e.g. "onnxruntime 1.32 CPUExecutionProvider")."""
        return self.target

    @abstractmethod
    def run(self, images: np.ndarray) -> np.ndarray:
        """(batch_size, 3, H, W) float32 -> (batch_size, num_classes) float32 logits."""

    def memory_bytes(self) -> Optional[int]:
        """Memory the runtime holds for this artifact, where the backend can tell; else None."""
        return None

    def probe(self, points, layers, context=None):
        """A ``crossvit_edge.converters.probe.Probe`` showing this artifact's values at ``points``
        (``layers``: plan layer name -> weight shape, in execution order), from the most faithful
        source the target has. Targets that cannot show intermediate values say so."""
        raise UserError(f"{self.description} cannot show intermediate values (no layer-wise comparison for this runner)")

    def close(self) -> None:
        pass


def runner_class(kind: str) -> type:
    """The Runner class for an artifact kind, from the fixed table ``crossvit_edge.converters.RUNNERS``: a
    manifest can only pick one of its keys, never name a module."""
    from crossvit_edge.converters import RUNNERS

    if not isinstance(kind, str) or kind not in RUNNERS:
        from crossvit_edge.errors import brief

        raise UserError(f"unknown artifact kind {brief(kind)}; known: {', '.join(RUNNERS)}")
    module, _, name = RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)
