"""Bundles: the folder an app embeds, holding the artifact and ``manifest.json``.

A bundle is built in a temporary folder beside its destination and renamed into place only when
complete, so a failed conversion never leaves a half-written bundle. The manifest records the
inputs, preprocessing, labels, precision, calibration, quantization plan, versions and the sha256
of every file. Torch-free: device-side tools read manifests too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from .errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: Path) -> Dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, by relative POSIX path."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def size_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temporary file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; bundles are meant to be shared
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def staged_bundle(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``output`` atomically, on any error it is
    deleted and ``output`` is left as it was."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.staging-"))
    os.chmod(stage, 0o755)
    try:
        yield stage
        if output.exists():
            if not overwrite and (output.is_file() or any(output.iterdir())):
                raise UserError(f"output {output} exists and is not empty; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
            os.replace(output, old / "previous")
            os.replace(stage, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, output)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def write_manifest(bundle_dir: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Add file hashes and sizes, then write ``manifest.json``."""
    bundle_dir = Path(bundle_dir)
    manifest = dict(manifest)
    manifest["manifest_version"] = MANIFEST_VERSION
    manifest["files"] = {
        rel: {"sha256": digest, "bytes": (bundle_dir / rel).stat().st_size} for rel, digest in file_hashes(bundle_dir).items()
    }
    write_json(bundle_dir / MANIFEST, manifest)
    return manifest


def read_manifest(bundle_dir: Path, verify: bool = True) -> Dict[str, Any]:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"not a bundle (no {MANIFEST}): {bundle_dir}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if verify:
        verify_bundle(bundle_dir, manifest)
    return manifest


def verify_bundle(bundle_dir: Path, manifest: Optional[Dict[str, Any]] = None) -> None:
    """Every file the manifest lists exists with its recorded sha256."""
    manifest = manifest if manifest is not None else read_manifest(bundle_dir, verify=False)
    for rel, entry in manifest.get("files", {}).items():
        p = Path(bundle_dir) / rel
        if not p.is_file():
            raise UserError(f"bundle {bundle_dir}: file {rel} listed in the manifest is missing")
        if sha256_file(p) != entry["sha256"]:
            raise UserError(f"bundle {bundle_dir}: {rel} does not match its sha256 in the manifest (modified or corrupt)")
