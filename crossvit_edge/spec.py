"""BuildSpec: the one object that carries "what to build" from the CLI (or Python) to a converter."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .cli_common import check_float, check_int, check_output_outside, check_output_writable
from .convert_flags import PRECISIONS
from .device_profiles import MAX_BATCH, OPSETS, TARGETS, DeviceProfile
from .errors import UserError, brief

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")  # auto: calibration.auto
MAX_SAMPLES = 10_000_000
MAX_BUNDLED_INPUTS = 1000
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "crossvit_tiny_240_digits.safetensors"


@dataclass
class CalibrationSettings:
    data: Optional[Path] = None  # folder of images (ImageFolder or plain)
    samples: int = 256
    method: str = "auto"  # each tensor's range by the error it causes (calibration/auto.py); the best on every target measured (docs/measurements.md)
    percentile: float = 99.99
    batch_size: int = 8  # fixed and recorded: entropy calibration depends on it
    seed: int = 0
    stats: Optional[Path] = None  # reuse saved statistics instead of running images

    def validate(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration method {brief(self.method)}; choose one of: {', '.join(CALIBRATION_METHODS)}")
        check_float("--calib-percentile", self.percentile, 0, 100, lo_open=True, hi_open=True)
        check_int("--calib-samples", self.samples, 1, MAX_SAMPLES)
        check_int("--calib-batch-size", self.batch_size, 1, MAX_BATCH)
        check_int("--calib-seed", self.seed, 0, 2**32 - 1)
        if self.stats is not None and not Path(self.stats).is_file():
            raise UserError(f"calibration statistics not found: {brief(str(self.stats), 200)}")
        if self.data is not None and not Path(self.data).is_dir():
            raise UserError(f"--calib-data: image folder not found: {brief(str(self.data), 200)}")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data) if self.data else None
        d["stats"] = str(self.stats) if self.stats else None
        return d


@dataclass
class BuildSpec:
    target: str
    output: Path
    precision: str = "fp32"
    checkpoint: str = str(DEMO_CHECKPOINT)
    model: Optional[str] = None  # variant; read from the checkpoint when None
    batch_size: int = 1
    profile: Optional[DeviceProfile] = None
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    smoothing_alpha: Optional[float] = None  # LayerNorm -> Linear outlier folding; None = off
    max_drop: Optional[float] = None  # accuracy-driven mixed precision (points of top-1 / agreement)
    float_layers: Optional[Path] = None  # a file of plan layer names kept float (python -m crossvit_edge.debug writes one)
    eval_data: Optional[Path] = None  # held-out images for the accuracy check and sensitivity
    eval_samples: int = 200
    ignore_class_names: bool = False  # score --eval-data by sorted folder order, not by class name
    options: Dict[str, Any] = field(default_factory=dict)  # target options (from the profile and CLI)
    overwrite: bool = False

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def target_option(self, key: str, default: Any = None) -> Any:
        """A target option from the command line or Python, else the device profile's, else default."""
        if key in self.options:
            return self.options[key]
        if self.profile is not None and key in self.profile.options:
            return self.profile.options[key]
        return default

    def validate(self) -> None:
        """Every value range-checked (NaN and infinities refused) and the output checked, before
        any heavy import or work; UserError naming the flag otherwise."""
        if self.target not in TARGETS:
            raise UserError(f"unknown target {brief(self.target)}; choose one of: {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {brief(self.precision)}; choose one of: {', '.join(PRECISIONS)}")
        check_int("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_int("--eval-samples", self.eval_samples, 1, MAX_SAMPLES)
        if self.profile is not None and self.profile.target != self.target:
            raise UserError(f"profile {brief(self.profile.name)} is for --target {self.profile.target}, not {self.target}")
        check_float("--smooth-alpha", self.smoothing_alpha, 0.0, 1.0)
        check_float("--max-drop", self.max_drop, 0.0, 100.0)  # points of top-1 (or agreement)
        options = {**(self.profile.options if self.profile else {}), **self.options}
        if options.get("opset") is not None:
            check_int("--opset", options["opset"], OPSETS[0], OPSETS[1])
        check_int("--bundled-inputs", options.get("bundled_inputs"), 0, MAX_BUNDLED_INPUTS)
        if self.float_layers is not None:
            read_float_layers(self.float_layers)
        if self.eval_data is not None and not Path(self.eval_data).is_dir():
            raise UserError(f"evaluation folder not found: {brief(str(self.eval_data), 200)}")
        self.calibration.validate()
        check_output_outside(self.output, {"--calib-data": self.calibration.data, "--eval-data": self.eval_data}, replaces_output=True)
        out = Path(self.output)
        try:
            occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
        except OSError as e:
            raise UserError(f"--output {brief(str(out), 200)}: cannot read it ({e.strerror or type(e).__name__})") from None
        if occupied and not self.overwrite:
            raise UserError(f"output {brief(str(out), 200)} exists and is not empty; pass --overwrite to replace it")
        check_output_writable(out)

    def to_dict(self) -> Dict[str, Any]:
        """The build settings for the manifest: only those that took effect for this target and
        precision (crossvit_edge.convert_flags), so that a reader never sees a setting the build ignored."""
        from .convert_flags import applies

        full = {
            "target": self.target,
            "precision": self.precision,
            "checkpoint": str(self.checkpoint),
            "model": self.model,
            "batch_size": self.batch_size,
            "profile": self.profile.name if self.profile else None,
            "smoothing_alpha": self.smoothing_alpha,
            "max_drop": self.max_drop,
            "float_layers": read_float_layers(self.float_layers) if self.float_layers else None,
            "eval_data": str(self.eval_data) if self.eval_data else None,
            "eval_samples": self.eval_samples,
            "ignore_class_names": self.ignore_class_names,
        }
        out = {k: v for k, v in full.items() if applies(self, k)}
        calibration = {k: v for k, v in self.calibration.to_dict().items() if applies(self, f"calibration.{k}")}
        out["calibration"] = calibration or None
        out["options"] = {k: v for k, v in self.options.items() if applies(self, f"options.{k}")}
        return out


MAX_FLOAT_LAYERS_BYTES = 1 << 20


def read_float_layers(path: Path) -> list:
    """The layer names of a ``--float-layers`` file: one per line, ``#`` starts a comment (the
    file ``python -m crossvit_edge.debug`` writes). Whether they are plan layers is checked once
    the model is known (``pipeline.stage_calibrate``)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > MAX_FLOAT_LAYERS_BYTES:
            raise UserError(f"--float-layers {brief(str(path), 200)}: not a file of at most {MAX_FLOAT_LAYERS_BYTES >> 20} MiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--float-layers {brief(str(path), 200)}: cannot read it ({brief(str(e), 100)})") from None
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"--float-layers {brief(str(path), 200)}: names no layer")
    return names
