"""Device profiles: YAML files in ``profiles/``, one per device, checked against a schema on load.

A profile names its target and carries that target's options; the CLI's flags override them::

    name: jetson-orin-nano-jp6
    target: tensorrt
    description: Jetson Orin Nano, JetPack 6.x
    batch_size: 1
    precision: int8
    tensorrt: {version: "10.3", jetpack: "6.x", dla: false, workspace_mib: 1024}

Torch-free (the Jetson-side tools read profiles too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from .errors import UserError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"

# key -> (type(s), allowed values or None); every section key is optional.
_SECTION_SCHEMA: Dict[str, Dict[str, tuple]] = {
    "onnx": {"opset": (int, None)},
    "tensorrt": {
        "version": (str, None),
        "jetpack": (str, None),
        "device": (str, None),
        "dla_core": ((int, type(None)), None),
        "gpu_fallback": (bool, None),
        "workspace_mib": (int, None),
        "mode": (str, ("implicit", "explicit", "strongly-typed")),
        "opset": (int, None),
        "sm": (str, None),
    },
    "coreml": {
        "minimum_deployment_target": (str, None),
        "compute_units": (str, ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")),
        "image_input": (bool, None),
        "device": (str, None),
    },
    "executorch": {"backend": (str, ("xnnpack",)), "device": (str, None), "etdump": (bool, None), "bundled_inputs": (int, None)},
}
_TOP_SCHEMA = {
    "name": str,
    "target": str,
    "description": str,
    "batch_size": int,
    "precision": str,
    "threads": int,
}
TARGETS = ("onnx", "tensorrt", "coreml", "executorch")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    target: str
    description: str = ""
    batch_size: int = 1
    precision: Optional[str] = None
    threads: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)  # the target's section
    path: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "description": self.description,
            "batch_size": self.batch_size,
            "precision": self.precision,
            "threads": self.threads,
            self.target: dict(self.options),
        }


def list_profiles() -> List[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _check_type(where: str, value: Any, types) -> None:
    if isinstance(value, bool) and types in (int, (int, type(None))):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if not isinstance(value, types):
        names = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise UserError(f"{where}: expected {names}, got {value!r}")


def parse_profile(data: Any, source: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise UserError(f"profile {source}: expected a mapping at the top level")
    for key in ("name", "target"):
        if key not in data:
            raise UserError(f"profile {source}: missing required key {key!r}")
    target = data["target"]
    if target not in TARGETS:
        raise UserError(f"profile {source}: unknown target {target!r}; one of {', '.join(TARGETS)}")
    for key, value in data.items():
        if key in _TOP_SCHEMA:
            _check_type(f"profile {source}: {key}", value, _TOP_SCHEMA[key])
        elif key in _SECTION_SCHEMA:
            if key != target:
                raise UserError(f"profile {source}: section {key!r} does not belong in a {target} profile")
            if not isinstance(value, dict):
                raise UserError(f"profile {source}: {key} must be a mapping")
            schema = _SECTION_SCHEMA[key]
            for k, v in value.items():
                if k not in schema:
                    raise UserError(f"profile {source}: unknown key {key}.{k}; known: {', '.join(sorted(schema))}")
                types, allowed = schema[k]
                _check_type(f"profile {source}: {key}.{k}", v, types)
                if allowed and v not in allowed:
                    raise UserError(f"profile {source}: {key}.{k} must be one of {', '.join(allowed)}, got {v!r}")
        else:
            raise UserError(f"profile {source}: unknown key {key!r}")
    if data.get("batch_size", 1) < 1:
        raise UserError(f"profile {source}: batch_size must be at least 1")
    return DeviceProfile(
        name=data["name"],
        target=target,
        description=data.get("description", ""),
        batch_size=data.get("batch_size", 1),
        precision=data.get("precision"),
        threads=data.get("threads"),
        options=dict(data.get(target, {}) or {}),
        path=source,
    )


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name (``profiles/<name>.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown profile {name_or_path!r}; known: {', '.join(list_profiles())} (or a path to a .yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"profile {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_profile(data, str(path))
