"""Device profiles: YAML files in ``profiles/``, one per device, checked against a schema on load.

A profile names its target and carries that target's options; the CLI's flags override them::

    name: jetson-orin-nano-jp6
    target: tensorrt
    description: Jetson Orin Nano, JetPack 6.1/6.2
    batch_size: 1
    precision: int8
    tensorrt: {version: "10.3", jetpack: "6.1", dla: false, workspace_mib: 1024}

Torch-free (the Jetson-side tools read profiles too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import safe_io
from .convert_flags import PRECISIONS, TARGETS
from .errors import UserError, brief

# crossvit_edge/profiles links to the top-level profiles/ folder; installed, it is package data
PROFILE_DIR = Path(__file__).parent / "profiles"
MAX_PROFILE_BYTES = 1 << 20
MAX_BATCH = 4096
OPSETS = (13, 23)  # ONNX opsets the converters accept (per-channel Q/DQ needs 13)
_MAX_TEXT = 1000

# the ONNX target's int8 graph forms and activation types (crossvit_edge.converters.onnx; docs/cpu_int8.md)
ONNX_INT8_FORMS = ("tensorrt", "ort-cpu", "ort-cpu-dynamic")
ONNX_ACTIVATION_DTYPES = ("uint8", "int8")

# key -> (type(s), allowed values, or an inclusive (lo, hi) range for numbers, or None); every
# section key is optional.
_SECTION_SCHEMA: Dict[str, Dict[str, tuple]] = {
    "onnx": {
        "opset": (int, OPSETS),
        "int8_form": (str, ONNX_INT8_FORMS),
        "activation_dtype": (str, ONNX_ACTIVATION_DTYPES),
        "ort_fusions": (bool, None),  # ONNX Runtime contrib-op fusions (GELU) for ORT-only graphs
        "int8_attention": (bool, None),  # int8: the self-attention matmuls too (crossvit_edge.calibration.plan; docs/cpu_int8.md)
    },
    "tensorrt": {
        "version": (str, None),
        "jetpack": (str, None),
        "device": (str, None),
        "dla_core": ((int, type(None)), (0, 15)),
        "gpu_fallback": (bool, None),
        "workspace_mib": (int, (1, 1 << 20)),
        "mode": (str, ("implicit", "explicit", "strongly-typed")),
        "opset": (int, OPSETS),
        "sm": (str, None),
    },
    "coreml": {
        "minimum_deployment_target": (str, None),
        "compute_units": (str, ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")),
        "image_input": (bool, None),
        "device": (str, None),
    },
    "coreai": {
        "minimum_os": (str, ("iOS27", "macOS27")),
        "device": (str, None),
        "neural_engine_int8": (bool, None),  # the chip computes int8 x int8 on the Neural Engine (A17 Pro, M4 and later)
    },
    "executorch": {"backend": (str, ("xnnpack",)), "device": (str, None), "etdump": (bool, None), "etdump_runs": (int, (1, 1000)), "bundled_inputs": (int, (0, 1000)),
                   "int8_attention": (bool, None),  # int8: the self-attention matmuls on XNNPACK's QS8 bmm (docs/executorch_int8.md)
                   # the device's cores compute in fp16 (ARMv8.2-A FP16, AVX512-FP16), where XNNPACK's
                   # fp16 kernels pay; elsewhere they convert to fp32 around every GEMM (docs/executorch_fp16.md)
                   "fp16_arithmetic": (bool, None)},
}
_TOP_SCHEMA = {
    "name": (str, None),
    "target": (str, None),
    "description": (str, None),
    "batch_size": (int, (1, MAX_BATCH)),
    "precision": (str, PRECISIONS),
    "threads": (int, (1, 1024)),
}


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
        raise UserError(f"{where}: expected {names}, got {brief(value)}")
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        raise UserError(f"{where}: string of {len(value)} characters is too long")


def _check_allowed(where: str, value: Any, allowed) -> None:
    """``allowed``: None, a tuple of strings (closed list) or an inclusive (lo, hi) number range."""
    if allowed is None or value is None:
        return
    if isinstance(allowed[0], str):
        if value not in allowed:
            raise UserError(f"{where} must be one of {', '.join(allowed)}, got {brief(value)}")
    elif not allowed[0] <= value <= allowed[1]:
        raise UserError(f"{where} must be in [{allowed[0]}, {allowed[1]}], got {brief(value)}")


def parse_profile(data: Any, source: str) -> DeviceProfile:
    """A profile from parsed YAML (untrusted): every key known, typed and range-checked; errors
    name the key and never echo an unbounded value."""
    if not isinstance(data, dict):
        raise UserError(f"profile {source}: expected a mapping at the top level, got {brief(data)}")
    for key in ("name", "target"):
        if key not in data:
            raise UserError(f"profile {source}: missing required key {key!r}")
    target = data["target"]
    if not isinstance(target, str) or target not in TARGETS:
        raise UserError(f"profile {source}: unknown target {brief(target)}; one of {', '.join(TARGETS)}")
    for key, value in data.items():
        if key in _TOP_SCHEMA:
            types, allowed = _TOP_SCHEMA[key]
            _check_type(f"profile {source}: {key}", value, types)
            _check_allowed(f"profile {source}: {key}", value, allowed)
        elif key in _SECTION_SCHEMA:
            if key != target:
                raise UserError(f"profile {source}: section {key!r} does not belong in a {target} profile")
            if not isinstance(value, dict):
                raise UserError(f"profile {source}: {key} must be a mapping, got {brief(value)}")
            schema = _SECTION_SCHEMA[key]
            for k, v in value.items():
                if k not in schema:
                    raise UserError(f"profile {source}: unknown key {key}.{brief(k, 40).strip(chr(39))}; known: {', '.join(sorted(schema))}")
                types, allowed = schema[k]
                _check_type(f"profile {source}: {key}.{k}", v, types)
                _check_allowed(f"profile {source}: {key}.{k}", v, allowed)
        else:
            raise UserError(f"profile {source}: unknown key {brief(key, 40)}")
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
    if not (path.suffix in (".yaml", ".yml") and os.path.lexists(path)):  # a FIFO named x.yaml: refused below, not blocked on
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown profile {brief(name_or_path, 200)}; known: {', '.join(list_profiles())} (or a path to a .yaml)")
    label = f"profile {brief(str(path), 200)}"
    try:  # a regular file of bounded size: a FIFO or device node is refused without blocking
        text = safe_io.read_bytes(path, label, max_bytes=MAX_PROFILE_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{label}: not UTF-8 text") from None
    import yaml  # here, not at the top: the torch-free runtime install has no PyYAML (the 'convert' extra)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{label}: not valid YAML ({brief(str(e).splitlines()[0] if str(e) else type(e).__name__, 200)})") from None
    except RecursionError:
        raise UserError(f"{label}: YAML nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - safe_load builds only plain values; any failure to build one is the file's
        # a value safe_load parses but cannot construct: a 5000-digit integer (Python's digit
        # limit), an impossible date (2023-02-30), a bad explicit tag (!!float x, !!timestamp x)
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(f"{label}: a value cannot be constructed ({type(e).__name__}: {detail})") from None
    return parse_profile(data, str(path))
