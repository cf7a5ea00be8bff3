"""BuildSpec: the one object that carries "what to build" from the CLI (or Python) to a converter."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .device_profiles import DeviceProfile
from .errors import UserError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "crossvit_tiny_240_digits.safetensors"


@dataclass
class CalibrationSettings:
    data: Optional[Path] = None  # folder of images (ImageFolder or plain)
    samples: int = 256
    method: str = "entropy"
    percentile: float = 99.99
    batch_size: int = 8  # fixed and recorded: entropy calibration depends on it
    seed: int = 0
    stats: Optional[Path] = None  # reuse saved statistics instead of running images

    def validate(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration method {self.method!r}; choose one of: {', '.join(CALIBRATION_METHODS)}")
        if not 0 < self.percentile < 100:
            raise UserError(f"--calib-percentile must be in (0, 100), got {self.percentile}")
        if self.samples < 1:
            raise UserError(f"--calib-samples must be at least 1, got {self.samples}")
        if self.batch_size < 1:
            raise UserError(f"--calib-batch-size must be at least 1, got {self.batch_size}")
        if self.stats is not None and not Path(self.stats).is_file():
            raise UserError(f"calibration statistics not found: {self.stats}")

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
    eval_data: Optional[Path] = None  # held-out images for the accuracy check and sensitivity
    eval_samples: int = 200
    options: Dict[str, Any] = field(default_factory=dict)  # target options (from the profile and CLI)
    overwrite: bool = False

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.profile is not None and self.profile.target != self.target:
            raise UserError(f"profile {self.profile.name!r} is for --target {self.profile.target}, not {self.target}")
        if self.smoothing_alpha is not None and not 0.0 <= self.smoothing_alpha <= 1.0:
            raise UserError(f"--smooth-alpha must be in [0, 1], got {self.smoothing_alpha}")
        if self.max_drop is not None and self.max_drop < 0:
            raise UserError(f"--max-drop must be >= 0, got {self.max_drop}")
        if self.eval_data is not None and not Path(self.eval_data).is_dir():
            raise UserError(f"evaluation folder not found: {self.eval_data}")
        self.calibration.validate()
        out = Path(self.output)
        if out.exists() and not self.overwrite and any(out.iterdir()) if out.is_dir() else out.exists():
            raise UserError(f"output {out} exists and is not empty; pass --overwrite to replace it")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "target": self.target,
            "precision": self.precision,
            "checkpoint": str(self.checkpoint),
            "model": self.model,
            "batch_size": self.batch_size,
            "profile": self.profile.name if self.profile else None,
            "calibration": self.calibration.to_dict(),
            "smoothing_alpha": self.smoothing_alpha,
            "max_drop": self.max_drop,
            "eval_data": str(self.eval_data) if self.eval_data else None,
            "options": self.options,
        }
