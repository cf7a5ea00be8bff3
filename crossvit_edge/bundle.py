"""Bundles: the folder an app embeds, holding the artifact and ``manifest.json``.

A bundle is built in a temporary folder beside its destination and renamed into place only when
complete, so a failed conversion never leaves a half-written bundle. The manifest records the
inputs, preprocessing, labels, precision, calibration, quantization plan, versions and the sha256
of every file. Torch-free: device-side tools read manifests too.

A bundle is untrusted input (downloaded, copied between machines): ``open_bundle`` is the one way
in. It reads the manifest with size and depth bounds, validates it against the one schema
(``validate_manifest``: types, required keys, ranges; one-line errors naming the key), checks every
path it names (``resolve_in_bundle``: a plain relative name that stays inside the bundle, symlinks
included) and verifies the size and sha256 of every listed file before anything is loaded; then
each artifact is read as data (``check_artifacts``: the files it refers to, its signature). Nothing
in a manifest chooses code: the artifact ``kind`` is a key of the fixed table ``crossvit_edge.converters.RUNNERS``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, List, Optional

from . import safe_io
from .convert_flags import PRECISIONS, TARGETS  # what a manifest may name: the flag table's, one list
from .device_profiles import ONNX_INT8_FORMS
from .errors import UserError, brief
from .tsv import unsafe_label_char

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2  # 1 was "manifest_version" with a "module:Class" runner: no longer read
FORMAT = "crossvit_edge bundle"

# Bounds on untrusted input (documented in docs/security.md).
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 64
MAX_FILES = 100_000
MAX_BATCH = 4096
MAX_INPUT_SIZE = 4096  # pixels, side of the square model input
MAX_RESIZE = 8192  # preprocessing's short-side resize, floor(input_size / crop_pct)
MAX_CLASSES = 1_000_000
MAX_NAME = 4096  # characters in a path or name from a manifest
# One static batch of float32 input: what every call pads to (classify pads a single image to the
# whole batch). 256 MiB holds batch 256 at 240 x 240 or batch 64 at 512 x 512; a manifest within
# the bounds above could otherwise ask for 4096 x 3 x 4096 x 4096 x 4 bytes = 768 GiB a call.
MAX_BATCH_INPUT_BYTES = 256 << 20
# The sum of the sizes a manifest lists: every byte of it is read and hashed before anything loads.
MAX_BUNDLE_BYTES = 8 << 30


def batch_input_bytes(batch: int, size: int) -> int:
    """Bytes of one static batch of float32 (batch, 3, size, size) input."""
    return batch * 3 * size * size * 4


def check_batch_input(batch: int, size: int, where: str) -> None:
    """Refuse a batch whose float32 input is larger than ``MAX_BATCH_INPUT_BYTES`` (one line)."""
    if batch_input_bytes(batch, size) > MAX_BATCH_INPUT_BYTES:
        raise UserError(f"{where}: batch {batch} of 3 x {size} x {size} float32 is {batch_input_bytes(batch, size) >> 20} MiB "
                        f"of input a call, more than the {MAX_BATCH_INPUT_BYTES >> 20} MiB allowed; use a smaller batch")


def sha256_file(path: Path, max_bytes: Optional[int] = None) -> str:
    """sha256 of a regular file, streamed; with ``max_bytes``, a larger file is refused (one line)
    and no more than ``max_bytes`` are read."""
    return safe_io.sha256(path, max_bytes=(1 << 62) if max_bytes is None else max_bytes)


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


def write_json(path: Path, data: Any, root: Optional[Path] = None) -> None:
    """Atomic JSON write (a new temporary file renamed into place: ``safe_io.atomic_writer``, which
    replaces a symlink already at ``path`` rather than writing through it; ``root``: ``path`` must
    lie inside it). A full disk or any write error: one-line UserError, ``path`` untouched."""
    path = Path(path)
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and a NaN in a report means something broke
        text = json.dumps(data, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"
    except ValueError as e:
        raise UserError(f"{path.name}: refusing to write a non-finite number (NaN or infinity): {brief(str(e))}") from None
    safe_io.write_bytes(path, text, root=root)


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


# --------------------------------------------------------------------------------------------------
# Whole outputs: built in a staging folder, swapped into place in one rename
#
# Kill-safety (docs/security.md): a command killed at any moment, SIGKILL included, leaves at
# ``--output`` either what was there before or the complete new output, never a mix: everything is
# written into ``.<name>.staging-<pid>-<random>`` beside it, and the finished folder takes the
# output's place by one rename (Linux: renameat2 RENAME_EXCHANGE, an atomic swap with what was
# there; elsewhere two renames, the old output first moved aside). What a killed process leaves
# behind is only such a hidden staging folder of a dead process id, which the next command writing
# the same output removes before it starts.

STAGING_MARK = ".staging-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _renameat2_exchange():
    """libc's renameat2 when this is Linux with glibc >= 2.28, else None."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def swap_into_place(stage: Path, output: Path) -> None:
    """Put the folder ``stage`` at ``output`` in one step; what was at ``output`` (a folder, a
    file, a symlink: the link itself, never what it points to) ends up at ``stage``, for the caller
    to remove. With nothing at ``output``, a plain rename."""
    import ctypes

    if not os.path.lexists(output):
        os.replace(stage, output)
        return
    fn = _renameat2_exchange()
    if fn is not None:
        AT_FDCWD = -100
        if fn(AT_FDCWD, os.fsencode(stage), AT_FDCWD, os.fsencode(output), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: a file system without it; fall back
            raise OSError(err, os.strerror(err), str(output))
    aside = Path(tempfile.mkdtemp(dir=stage.parent, prefix=f".{output.name[:100]}{STAGING_MARK}{os.getpid()}-"))
    os.replace(output, aside / "previous")
    os.replace(stage, output)
    os.replace(aside, stage)


def remove_stale_staging(output: Path) -> None:
    """Remove what a killed command left beside ``output``: its hidden staging folders whose
    process is gone (the process id is in the name; a live process's folder is left alone)."""
    output = Path(output)
    prefix = f".{output.name[:100]}{STAGING_MARK}"
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own folders from an earlier call are not in use (one output per call)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


def _remove(path: Path) -> None:
    """Remove what is at ``path`` (a folder tree, a file, a symlink: the link, not its target)."""
    try:
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        elif os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def _new_stage(output: Path) -> Path:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output)
        stage = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name[:100]}{STAGING_MARK}{os.getpid()}-"))
    except OSError as e:
        raise UserError(f"cannot write the output {brief(str(output), 200)}: {e.strerror or type(e).__name__}") from None
    os.chmod(stage, 0o755)
    return stage


def _output_path(output: Path) -> Path:
    # the parent resolved, not the output itself: a symlink at the output is replaced, never followed
    return Path(output).absolute().parent.resolve() / Path(output).absolute().name


@contextmanager
def staged_bundle(output: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``output`` atomically, on any error it is
    deleted and ``output`` is left as it was (killed, even by SIGKILL: see above)."""
    output = _output_path(output)
    stage = _new_stage(output)
    try:
        yield stage
        if os.path.lexists(output) and not overwrite and (output.is_symlink() or output.is_file() or any(output.iterdir())):
            raise UserError(f"output {output} exists and is not empty; pass --overwrite to replace it")
        swap_into_place(stage, output)
    finally:
        _remove(stage)


def check_output_folder(output: Path, owned, command: str) -> None:
    """Before any work: ``output`` can be created, and what is there now is a folder holding only
    the files ``command`` writes (``owned``: names), so that replacing it as a whole (``staged_output``)
    loses nothing of anyone else's. One-line UserError otherwise."""
    label = f"--output {brief(str(output), 200)}"
    path = Path(output).absolute()
    if os.path.lexists(path) and not path.is_symlink():
        if not path.is_dir():
            raise UserError(f"{label} exists and is not a folder")
        try:
            names = sorted(p.name for p in path.iterdir())
        except OSError as e:
            raise UserError(f"{label}: cannot read it ({e.strerror or type(e).__name__})") from None
        foreign = [n for n in names if n not in owned]
        if foreign:
            raise UserError(f"{label} holds {brief(foreign[0], 80)}, which {command} did not write: it writes its output folder as "
                            f"a whole (replacing a previous {command} output); choose an empty or new folder")
        return
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{label}: cannot create it ({brief(str(ancestor), 200)} is not a folder)")
    try:
        shutil.rmtree(tempfile.mkdtemp(dir=ancestor, prefix=".crossvit_edge-probe-"), ignore_errors=True)
    except OSError as e:
        raise UserError(f"{label}: cannot create it ({e.strerror or type(e).__name__})") from None


@contextmanager
def staged_output(output: Path, owned, command: str) -> Iterator[Path]:
    """A report folder (``profile``, ``debug``) written like a bundle: into a staging folder that
    replaces ``output`` as a whole when complete, so that no file of a previous run survives beside
    the new report, and a run that fails or is killed leaves the previous output (or nothing)."""
    check_output_folder(output, owned, command)
    output = _output_path(output)
    stage = _new_stage(output)
    try:
        yield stage
        check_output_folder(output, owned, command)  # nothing foreign appeared meanwhile
        swap_into_place(stage, output)
    finally:
        _remove(stage)


def write_manifest(bundle_dir: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Add the schema version and every file's sha256 and size, then write ``manifest.json``."""
    bundle_dir = Path(bundle_dir)
    manifest = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in manifest.items() if k != "schema_version"}}
    manifest["files"] = {
        rel: {"sha256": digest, "bytes": (bundle_dir / rel).stat().st_size} for rel, digest in file_hashes(bundle_dir).items()
    }
    write_json(bundle_dir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading untrusted JSON


def load_json_file(path: Path, what: str, max_bytes: int = MAX_MANIFEST_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file that came from elsewhere: a regular file of at most ``max_bytes``, UTF-8,
    standard JSON (no NaN/Infinity), nested at most ``max_depth`` deep. UserError otherwise."""
    return parse_json(safe_io.read_bytes(path, what, max_bytes=max_bytes), what, max_depth)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, what: str, max_depth: int = MAX_JSON_DEPTH, parse_constant=_reject_constant) -> Any:
    """Standard JSON from UTF-8 bytes, nested at most ``max_depth`` deep. ``parse_constant``: what
    NaN and Infinity become (refused by default)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what}: not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=parse_constant)
    except RecursionError:  # CPython's decoder guards its recursion; deeper than the interpreter allows
        raise UserError(f"{what}: JSON nested too deeply (more than {max_depth} levels)") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers past Python's digit limit
        raise UserError(f"{what}: not valid JSON ({brief(str(e), 120)})") from None
    if json_depth(data) > max_depth:
        raise UserError(f"{what}: JSON nested too deeply (more than {max_depth} levels)")
    return data


def json_depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    if not isinstance(data, (list, dict)):
        return 0
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children if isinstance(v, (list, dict)))
    return deepest


# --------------------------------------------------------------------------------------------------
# Paths a manifest names


def check_relative_name(rel: Any, key: str) -> str:
    """A manifest-named path must be a plain relative POSIX name: no absolute path, no ``..``, no
    backslash or NUL, bounded length. (Where it points after symlinks is ``resolve_in_bundle``'s.)"""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{key}: expected a file name relative to the bundle, got {brief(rel)}")
    if len(rel) > MAX_NAME:
        raise UserError(f"{key}: path of {len(rel)} characters is too long")
    if "\0" in rel or "\\" in rel or any(ord(c) < 32 for c in rel):
        raise UserError(f"{key}: {brief(rel)} contains a control character or backslash")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", rel):
        raise UserError(f"{key}: {brief(rel)} is an absolute path; a bundle names only files inside itself")
    if any(part in ("..", ".") for part in rel.split("/")) or "" in rel.split("/"):
        raise UserError(f"{key}: {brief(rel)} is not a plain relative name (no '..', '.' or empty parts)")
    return rel


def resolve_in_bundle(root: Path, rel: Any, key: str) -> Path:
    """``root / rel`` after the checks of ``check_relative_name``, resolved through any symlinks and
    required to stay inside ``root``. It need not exist yet (a file the device runner will write)."""
    check_relative_name(rel, key)
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise UserError(f"{key}: {brief(rel)} cannot be resolved ({brief(str(e), 80)})") from None
    if target != base and base not in target.parents:
        raise UserError(f"{key}: {brief(rel)} leads outside the bundle (through a symlink)")
    return target


# --------------------------------------------------------------------------------------------------
# The manifest schema


class SchemaCheck:
    """Typed access to one manifest with errors that name the key (``input.shape[0]``)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str):
        raise UserError(f"{self.source}: {key}: {message}")

    def obj(self, parent: Dict[str, Any], key: str, where: str, required: bool = True, allowed=None) -> Optional[Dict[str, Any]]:
        value = parent.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            self.fail(where, "missing" if key not in parent else f"expected an object, got {brief(value)}")
        if allowed is not None:
            unknown = [k for k in value if k not in allowed]
            if unknown:
                self.fail(f"{where}.{brief(unknown[0], 40).strip(chr(39))}", f"unknown key; known: {', '.join(allowed)}")
        return value

    def value(self, parent: Dict[str, Any], key: str, where: str, types, required: bool = True):
        if key not in parent or parent[key] is None:
            if required:
                self.fail(where, "missing")
            return None
        value = parent[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            self.fail(where, f"expected {_type_names(types)}, got {brief(value)}")
        if not isinstance(value, types):
            self.fail(where, f"expected {_type_names(types)}, got {brief(value)}")
        if isinstance(value, str) and len(value) > MAX_NAME:
            self.fail(where, f"string of {len(value)} characters is too long")
        return value

    def choice(self, parent, key, where, choices, required=True):
        value = self.value(parent, key, where, str, required)
        if value is not None and value not in choices:
            self.fail(where, f"expected one of {', '.join(choices)}, got {brief(value)}")
        return value

    def integer(self, parent, key, where, lo, hi, required=True):
        value = self.value(parent, key, where, int, required)
        if value is not None and not lo <= value <= hi:
            self.fail(where, f"expected an integer in [{lo}, {hi}], got {brief(value)}")
        return value

    def number(self, value, where) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"expected a number, got {brief(value)}")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            self.fail(where, f"expected a finite number, got {brief(value)}")
        return x

    def path(self, parent, key, where, required=True):
        value = parent.get(key)
        if value is None and not required:
            return None
        try:
            return check_relative_name(value, where)
        except UserError as e:
            raise UserError(f"{self.source}: {e}") from None


def _show(values: list) -> str:
    """A short list of small numbers as it is, anything else by ``brief``."""
    small = len(values) <= 6 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e12 for v in values)
    return str(values) if small else brief(values)


def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "an object"}
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names.get(t, t.__name__) for t in types)


def validate_preprocessing(data: Any, source: str, where: str = "preprocessing", input_size: Optional[int] = None) -> Dict[str, Any]:
    """The preprocessing block of a manifest (also what ``Preprocessing.from_dict`` accepts)."""
    c = SchemaCheck(source)
    keys = ("input_size", "crop_pct", "interpolation", "mean", "std", "channel_order", "layout", "resize_short_side")
    pre = c.obj({"p": data}, "p", where, allowed=keys)
    size = c.integer(pre, "input_size", f"{where}.input_size", 1, MAX_INPUT_SIZE)
    if input_size is not None and size != input_size:
        c.fail(f"{where}.input_size", f"{size} differs from the model input's {input_size}")
    crop = c.number(pre.get("crop_pct"), f"{where}.crop_pct") if "crop_pct" in pre else c.fail(f"{where}.crop_pct", "missing")
    if not 0.0 < crop <= 1.0:
        c.fail(f"{where}.crop_pct", f"expected a number in (0, 1], got {brief(pre['crop_pct'])}")
    if size / crop > MAX_RESIZE:  # in float first: a tiny crop makes size / crop inf, and floor(inf) raises
        c.fail(f"{where}.crop_pct", f"{brief(crop)} resizes beyond {MAX_RESIZE} pixels")
    c.choice(pre, "interpolation", f"{where}.interpolation", ("bicubic",), required=False)
    c.choice(pre, "channel_order", f"{where}.channel_order", ("RGB",), required=False)
    c.choice(pre, "layout", f"{where}.layout", ("NCHW",), required=False)
    for key in ("mean", "std"):
        values = c.value(pre, key, f"{where}.{key}", list)
        if len(values) != 3:
            c.fail(f"{where}.{key}", f"expected 3 numbers (R, G, B), got {brief(values)}")
        numbers = [c.number(v, f"{where}.{key}[{i}]") for i, v in enumerate(values)]
        if key == "std" and any(v <= 0 for v in numbers):
            c.fail(f"{where}.std", f"every channel's std must be positive (dividing by it), got {numbers}")
        if key == "mean" and any(abs(v) > 1e6 for v in numbers):
            c.fail(f"{where}.mean", f"out of range: {numbers}")
    if pre.get("resize_short_side") is not None:
        resize = c.integer(pre, "resize_short_side", f"{where}.resize_short_side", 1, MAX_RESIZE)
        if resize != math.floor(size / crop):
            c.fail(f"{where}.resize_short_side", f"{resize} is not floor(input_size / crop_pct) = {math.floor(size / crop)}")
    return pre


def validate_manifest(data: Any, source: str = MANIFEST) -> Dict[str, Any]:
    """Check a parsed manifest against the schema; return it unchanged. One-line UserError naming
    the key otherwise. Keys outside the schema (build record, calibration, plan, versions, checks)
    are informational and never used to find code or files."""
    from crossvit_edge.converters import ARTIFACT_KINDS, RUNNERS

    c = SchemaCheck(source)
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object at the top level, got {brief(data)}")
    if "schema_version" not in data and "manifest_version" in data:
        c.fail("schema_version", "missing: this bundle was written by an older crossvit_edge (manifest_version); rebuild it")
    version = c.value(data, "schema_version", "schema_version", int)
    if version != SCHEMA_VERSION:
        c.fail("schema_version", f"{brief(version)} is not supported; this crossvit_edge reads schema_version {SCHEMA_VERSION}")
    if data.get("format") != FORMAT:
        c.fail("format", f"expected {FORMAT!r}, got {brief(data.get('format'))}")
    target = c.choice(data, "target", "target", TARGETS)
    c.choice(data, "precision", "precision", PRECISIONS)
    c.value(data, "model", "model", str)
    num_classes = c.integer(data, "num_classes", "num_classes", 1, MAX_CLASSES)
    labels = c.value(data, "labels", "labels", list, required=False)
    if labels is not None:
        if len(labels) != num_classes:
            c.fail("labels", f"{len(labels)} labels for num_classes {num_classes}")
        for i, label in enumerate(labels):
            if not isinstance(label, str) or len(label) > MAX_NAME:
                c.fail(f"labels[{i}]", f"expected a string, got {brief(label)}")
            bad = unsafe_label_char(label)
            if bad:  # a label is printed as a field of classify's lines and of reports (crossvit_edge.tsv)
                c.fail(f"labels[{i}]", f"contains U+{ord(bad.group()):04X}, a control, line separator or bidi character")

    inp = c.obj(data, "input", "input", allowed=("name", "shape", "dtype", "layout"))
    c.value(inp, "name", "input.name", str)
    shape = c.value(inp, "shape", "input.shape", list)
    if len(shape) != 4:
        c.fail("input.shape", f"expected [batch, 3, size, size], got {_show(shape)}")
    batch = c.integer({"v": shape[0]}, "v", "input.shape[0]", 1, MAX_BATCH)
    c.integer({"v": shape[1]}, "v", "input.shape[1]", 3, 3)
    size = c.integer({"v": shape[2]}, "v", "input.shape[2]", 1, MAX_INPUT_SIZE)
    c.integer({"v": shape[3]}, "v", "input.shape[3]", size, size)
    try:
        check_batch_input(batch, size, "input.shape")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    c.choice(inp, "dtype", "input.dtype", ("float32",))
    c.choice(inp, "layout", "input.layout", ("NCHW",), required=False)
    out = c.obj(data, "output", "output", allowed=("name", "shape", "dtype"))
    c.value(out, "name", "output.name", str)
    out_shape = c.value(out, "shape", "output.shape", list)
    if out_shape != [batch, num_classes]:
        c.fail("output.shape", f"expected [{batch}, {num_classes}] (batch, num_classes), got {_show(out_shape)}")
    c.choice(out, "dtype", "output.dtype", ("float32",))
    validate_preprocessing(data.get("preprocessing"), source, input_size=size)

    art = c.obj(data, "artifact", "artifact", allowed=("file", "kind", "bytes", "stand_in"))
    c.path(art, "file", "artifact.file")
    kind = c.choice(art, "kind", "artifact.kind", tuple(RUNNERS))
    if kind != ARTIFACT_KINDS[target]:
        c.fail("artifact.kind", f"a {target} bundle's artifact is of kind {ARTIFACT_KINDS[target]!r}, got {kind!r}")
    c.integer(art, "bytes", "artifact.bytes", 0, 1 << 50)
    stand_in = c.obj(art, "stand_in", "artifact.stand_in", required=False, allowed=("file", "kind"))
    if stand_in is not None:
        c.path(stand_in, "file", "artifact.stand_in.file")
        c.choice(stand_in, "kind", "artifact.stand_in.kind", tuple(RUNNERS))

    files = c.obj(data, "files", "files")
    if len(files) > MAX_FILES:
        c.fail("files", f"{len(files)} entries, more than {MAX_FILES}")
    listed = 0
    for rel, entry in files.items():
        where = f"files[{brief(rel, 80)}]"
        c.path({"f": rel}, "f", where)
        entry = c.obj({"e": entry}, "e", where, allowed=("sha256", "bytes"))
        digest = c.value(entry, "sha256", f"{where}.sha256", str)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            c.fail(f"{where}.sha256", f"expected 64 lowercase hex digits, got {brief(digest)}")
        listed += c.integer(entry, "bytes", f"{where}.bytes", 0, 1 << 50)
        if listed > MAX_BUNDLE_BYTES:  # every listed byte is hashed at open: bounded work
            c.fail("files", f"lists more than {MAX_BUNDLE_BYTES >> 30} GiB in all")
    for key, rel in [("artifact.file", art["file"])] + ([("artifact.stand_in.file", stand_in["file"])] if stand_in else []):
        if rel not in files and not any(f.startswith(rel.rstrip("/") + "/") for f in files):
            c.fail(key, f"{brief(rel)} is not listed in 'files' (with its sha256 and size), so it cannot be verified")

    checkpoint = c.obj(data, "checkpoint", "checkpoint")
    c.value(checkpoint, "source", "checkpoint.source", str)
    notes = c.value(data, "notes", "notes", list, required=False)
    for i, note in enumerate(notes or []):
        c.value({"n": note}, "n", f"notes[{i}]", str)

    # the sections debug reads (its plan and calibration sample): typed at open, like the rest
    if data.get("calibration") is not None:
        validate_calibration(data["calibration"], source)
    if data.get("quantization_plan") is not None:
        validate_quantization_plan(data["quantization_plan"], source)
        if data["quantization_plan"]["model"] != data["model"]:
            c.fail("quantization_plan.model", f"{brief(data['quantization_plan']['model'])} is not the bundle's model {brief(data['model'])}")

    # target sections: every path-valued key is a plain relative name, every choice from a closed list
    trt = c.obj(data, "tensorrt", "tensorrt", required=False)
    if trt is not None:
        for key in ("onnx", "engine", "layer_info", "timing_cache", "calibration_cache", "build_script", "reference_onnx"):
            c.path(trt, key, f"tensorrt.{key}", required=False)
        named = c.obj(trt, "files", "tensorrt.files", required=False)
        for key in named or {}:
            c.path(named, key, f"tensorrt.files.{brief(key, 40)}", required=False)
        dla = c.obj(trt, "dla", "tensorrt.dla", required=False, allowed=("core", "gpu_fallback"))
        if dla is not None:
            c.integer(dla, "core", "tensorrt.dla.core", 0, 15)
            c.value(dla, "gpu_fallback", "tensorrt.dla.gpu_fallback", bool, required=False)
        c.integer(trt, "workspace_mib", "tensorrt.workspace_mib", 1, 1 << 20, required=False)
        c.choice(trt, "mode", "tensorrt.mode", ("implicit", "explicit", "strongly-typed"), required=False)
    coreml = c.obj(data, "coreml", "coreml", required=False)
    if coreml is not None:
        c.choice(coreml, "compute_units", "coreml.compute_units", ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"), required=False)
        c.value(coreml, "image_input", "coreml.image_input", bool, required=False)
    coreai = c.obj(data, "coreai", "coreai", required=False)
    if coreai is not None:
        c.choice(coreai, "minimum_os", "coreai.minimum_os", ("iOS27", "macOS27"), required=False)
        c.choice(coreai, "compute_dtype", "coreai.compute_dtype", ("float16",), required=False)
        c.choice(coreai, "function", "coreai.function", ("main",), required=False)
    onnx = c.obj(data, "onnx", "onnx", required=False)
    if onnx is not None:
        # which int8 graph the file holds decides how the runner configures ONNX Runtime
        c.choice(onnx, "int8_form", "onnx.int8_form", ONNX_INT8_FORMS, required=False)
    et = c.obj(data, "executorch", "executorch", required=False)
    if et is not None:
        c.choice(et, "backend", "executorch.backend", ("xnnpack",), required=False)
        c.choice(et, "compute_dtype", "executorch.compute_dtype", ("float32", "float16"), required=False)
        for key in ("bundled_program", "etdump"):
            c.path(et, key, f"executorch.{key}", required=False)
    return data


# --------------------------------------------------------------------------------------------------
# The sections debug and the device runner read: quantization plan, calibration, points

MAX_PLAN_ENTRIES = 100_000  # layers, attention tensors, smoothing pairs in a plan; points in a points file
MAX_SAMPLES = 10_000_000  # calibration images (as spec.MAX_SAMPLES)
PLAN_LAYER_KINDS = ("linear", "conv")
PLAN_PRECISIONS = ("int8", "float")
# a plan layer's input_range: absent = calibrated; calibration.plan.IMAGE_BOUNDS = exact image range
PLAN_INPUT_RANGES = ("preprocessing bounds",)
ATTENTION_TENSOR_KINDS = ("q", "k", "v", "probs")


def _scalar_extras(c: SchemaCheck, entry: Dict[str, Any], known, where: str) -> None:
    """Keys outside ``known`` are informational (a later build may record more per layer, e.g. its
    estimator): accepted when they are strings, numbers, true/false or null, never objects or lists."""
    for key, value in entry.items():
        if key in known:
            continue
        if isinstance(value, (list, dict)):
            c.fail(f"{where}.{brief(key, 40).strip(chr(39))}", f"expected a string, number, true/false or null, got {brief(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            c.fail(f"{where}.{brief(key, 40).strip(chr(39))}", "expected a finite number")
        if isinstance(value, str) and len(value) > MAX_NAME:
            c.fail(f"{where}.{brief(key, 40).strip(chr(39))}", f"string of {len(value)} characters is too long")


def _optional_number(c: SchemaCheck, parent: Dict[str, Any], key: str, where: str, lo: float = -math.inf) -> Optional[float]:
    if parent.get(key) is None:
        return None
    x = c.number(parent[key], where)
    if x < lo:
        c.fail(where, f"expected a number of at least {lo:g}, got {brief(parent[key])}")
    return x


def validate_calibration(data: Any, source: str, where: str = "calibration") -> Dict[str, Any]:
    """A manifest's ``calibration`` record (or the plan's copy of it): an object whose keys that are
    used (``debug --calib-data`` redraws the sample from them) have their types and ranges; other
    keys are informational (the statistics' own settings travel in it)."""
    c = SchemaCheck(source)
    cal = c.obj({"c": data}, "c", where)
    c.integer(cal, "samples", f"{where}.samples", 1, MAX_SAMPLES, required=False)
    c.integer(cal, "batch_size", f"{where}.batch_size", 1, MAX_BATCH, required=False)
    c.integer(cal, "seed", f"{where}.seed", 0, 2**32 - 1, required=False)
    c.integer(cal, "images", f"{where}.images", 0, MAX_SAMPLES, required=False)
    for key in ("method", "data", "stats"):
        c.value(cal, key, f"{where}.{key}", str, required=False)
    _optional_number(c, cal, "percentile", f"{where}.percentile")
    digest = c.value(cal, "image_set_sha256", f"{where}.image_set_sha256", str, required=False)
    if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        c.fail(f"{where}.image_set_sha256", f"expected 64 lowercase hex digits, got {brief(digest)}")
    return cal


def validate_quantization_plan(data: Any, source: str, where: str = "quantization_plan") -> Dict[str, Any]:
    """A manifest's ``quantization_plan`` (``QuantPlan.to_dict``): what ``QuantPlan.from_dict`` and
    the layer-wise comparison read, typed and ranged. Per layer and per attention tensor, keys beyond
    those are accepted when they are scalars (``_scalar_extras``)."""
    c = SchemaCheck(source)
    plan = c.obj({"p": data}, "p", where)
    c.value(plan, "model", f"{where}.model", str)
    layers = c.value(plan, "layers", f"{where}.layers", list)
    if len(layers) > MAX_PLAN_ENTRIES:
        c.fail(f"{where}.layers", f"{len(layers)} entries, more than {MAX_PLAN_ENTRIES}")
    names = set()
    for i, layer in enumerate(layers):
        lw = f"{where}.layers[{i}]"
        layer = c.obj({"l": layer}, "l", lw)
        name = c.value(layer, "name", f"{lw}.name", str)
        if name in names:
            c.fail(f"{lw}.name", f"{brief(name)} is planned twice")
        names.add(name)
        c.choice(layer, "kind", f"{lw}.kind", PLAN_LAYER_KINDS)
        precision = c.choice(layer, "precision", f"{lw}.precision", PLAN_PRECISIONS)
        c.value(layer, "reason", f"{lw}.reason", str)
        amax = _optional_number(c, layer, "input_amax", f"{lw}.input_amax", 0.0)
        if precision == "int8" and amax is None:
            c.fail(f"{lw}.input_amax", "an int8 layer needs its calibrated input range")
        _optional_number(c, layer, "input_scale", f"{lw}.input_scale", 0.0)
        _optional_number(c, layer, "sensitivity", f"{lw}.sensitivity")
        c.choice(layer, "input_range", f"{lw}.input_range", PLAN_INPUT_RANGES, required=False)
        _scalar_extras(c, layer, ("name", "kind", "precision", "reason", "input_amax", "input_scale", "sensitivity", "input_range"), lw)
    if plan.get("calibration") is not None:
        validate_calibration(plan["calibration"], source, f"{where}.calibration")
    smoothing = c.obj(plan, "smoothing", f"{where}.smoothing", required=False)
    if smoothing is not None:
        alpha = c.number(smoothing.get("alpha"), f"{where}.smoothing.alpha")
        if not 0.0 <= alpha <= 1.0:
            c.fail(f"{where}.smoothing.alpha", f"expected a number in [0, 1], got {brief(smoothing['alpha'])}")
        pairs = c.value(smoothing, "pairs", f"{where}.smoothing.pairs", list, required=False) or []
        if len(pairs) > MAX_PLAN_ENTRIES:
            c.fail(f"{where}.smoothing.pairs", f"{len(pairs)} entries, more than {MAX_PLAN_ENTRIES}")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) and len(n) <= MAX_NAME for n in pair)):
                c.fail(f"{where}.smoothing.pairs[{i}]", f"expected [LayerNorm name, Linear name], got {brief(pair)}")
    c.obj(plan, "mixed_precision", f"{where}.mixed_precision", required=False)
    attention = c.obj(plan, "attention_matmuls", f"{where}.attention_matmuls", required=False)
    if attention is not None:
        tensors = c.value(attention, "tensors", f"{where}.attention_matmuls.tensors", list)
        if len(tensors) > MAX_PLAN_ENTRIES:
            c.fail(f"{where}.attention_matmuls.tensors", f"{len(tensors)} entries, more than {MAX_PLAN_ENTRIES}")
        for i, t in enumerate(tensors):
            tw = f"{where}.attention_matmuls.tensors[{i}]"
            t = c.obj({"t": t}, "t", tw)
            c.value(t, "name", f"{tw}.name", str)
            c.choice(t, "tensor", f"{tw}.tensor", ATTENTION_TENSOR_KINDS)
            amax = c.number(t.get("amax"), f"{tw}.amax")
            if amax < 0:
                c.fail(f"{tw}.amax", f"expected a non-negative number, got {brief(t['amax'])}")
            c.value(t, "calibrated", f"{tw}.calibrated", bool)
            _optional_number(c, t, "scale", f"{tw}.scale", 0.0)
            _scalar_extras(c, t, ("name", "tensor", "amax", "calibrated", "scale"), tw)
    return plan


def validate_located(data: Any, source: str, where: str) -> Dict[str, Any]:
    """Where a comparison point is in an artifact (``probe.Located.to_dict``): a tensor name or
    null, an integer grid or null, a note."""
    c = SchemaCheck(source)
    entry = c.obj({"e": data}, "e", where)
    c.value(entry, "tensor", f"{where}.tensor", str, required=False)
    c.value(entry, "note", f"{where}.note", str, required=False)
    quant = c.obj(entry, "quant", f"{where}.quant", required=False)
    if quant is not None:
        scale = c.number(quant.get("scale"), f"{where}.quant.scale")
        if scale <= 0:
            c.fail(f"{where}.quant.scale", f"expected a positive number, got {brief(quant['scale'])}")
        lo = c.integer(quant, "qmin", f"{where}.quant.qmin", -(1 << 31), (1 << 32) - 1)
        hi = c.integer(quant, "qmax", f"{where}.quant.qmax", lo, (1 << 32) - 1)
        c.integer(quant, "zero_point", f"{where}.quant.zero_point", lo, hi)
    return entry


POINTS_FORMAT = "crossvit_edge tensorrt points"


def validate_points_file(data: Any, source: str) -> Dict[str, Dict[str, Any]]:
    """The points file ``debug`` writes for a TensorRT bundle (``--points`` of the device runner):
    its ``located`` map, every entry checked (``validate_located``)."""
    if not isinstance(data, dict) or data.get("format") != POINTS_FORMAT:
        raise UserError(f"{source}: not a points file of python -m crossvit_edge.debug (expected a JSON object with "
                        f"format {POINTS_FORMAT!r}, got {brief(data if not isinstance(data, dict) else data.get('format'))})")
    c = SchemaCheck(source)
    located = c.obj(data, "located", "located")
    if len(located) > MAX_PLAN_ENTRIES:
        c.fail("located", f"{len(located)} points, more than {MAX_PLAN_ENTRIES}")
    for key, entry in located.items():
        validate_located(entry, source, f"located[{brief(key, 80)}]")
    return located


def verify_files(root: Path, manifest: Dict[str, Any], source: str) -> None:
    """Every file the manifest lists is a regular file inside the bundle with its recorded size and
    sha256. Every size is checked before any file is hashed (cheap first), and each hash streams
    and reads no more than the listed size (``safe_io.sha256``): the work is bounded by the listed
    total (``MAX_BUNDLE_BYTES``), whatever is on disk. A FIFO or device node is refused without
    being opened. A package-folder artifact holds nothing but folders and listed regular files."""
    root = Path(root)
    paths = {}
    for rel, entry in manifest["files"].items():
        where = f"{source}: files[{brief(rel, 80)}]"
        p = resolve_in_bundle(root, rel, where)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UserError(f"{where}: listed in the manifest but missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{where}: listed in the manifest but not a regular file")
        if st.st_size != entry["bytes"]:
            raise UserError(f"{where}: {st.st_size} bytes, the manifest says {entry['bytes']} (modified or corrupt)")
        paths[rel] = p
    for rel, entry in manifest["files"].items():
        where = f"{source}: files[{brief(rel, 80)}]"
        if safe_io.sha256(paths[rel], where, max_bytes=entry["bytes"]) != entry["sha256"]:
            raise UserError(f"{where}: does not match its sha256 in the manifest (modified or corrupt)")
    art = manifest["artifact"]
    for key, rel in [("artifact.file", art["file"])] + ([("artifact.stand_in.file", art["stand_in"]["file"])] if art.get("stand_in") else []):
        p = resolve_in_bundle(root, rel, f"{source}: {key}")
        if p.is_dir():
            for f in p.rglob("*"):
                name = brief(f.relative_to(root.resolve()).as_posix())
                if f.is_symlink() or not (f.is_dir() or f.is_file()):
                    raise UserError(f"{source}: {key}: {name} in the package is a symlink, FIFO or device, not a file")
                if f.is_file() and f.relative_to(root.resolve()).as_posix() not in manifest["files"]:
                    raise UserError(f"{source}: {key}: {name} is in the package but not listed in 'files'")


@dataclass(frozen=True)
class Bundle:
    """An opened, validated and verified bundle: what every command gets."""

    root: Path  # resolved folder
    manifest: Dict[str, Any]

    def path(self, rel: Any, key: str) -> Path:
        """A manifest-named file (``key`` names it in errors): a plain relative name inside the
        bundle, no absolute path or ``..``, no symlink out. It need not exist yet (the device runner
        writes the engine, layer information and timing cache through this)."""
        return resolve_in_bundle(self.root, rel, f"bundle {self.name}: {key}")

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def kind(self) -> str:
        return self.manifest["artifact"]["kind"]

    @property
    def artifact_path(self) -> Path:
        return self.path(self.manifest["artifact"]["file"], "artifact.file")

    @property
    def stand_in(self) -> Optional[Dict[str, str]]:
        return self.manifest["artifact"].get("stand_in")

    @property
    def stand_in_path(self) -> Optional[Path]:
        return self.path(self.stand_in["file"], "artifact.stand_in.file") if self.stand_in else None

    @property
    def labels(self) -> Optional[List[str]]:
        return self.manifest.get("labels")

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def batch_size(self) -> int:
        return self.manifest["input"]["shape"][0]

    @property
    def preprocessing(self):
        from .preprocess import Preprocessing

        return Preprocessing.from_dict(self.manifest["preprocessing"])

    def runner(self, stand_in: bool = False, threads: Optional[int] = None):
        """The Runner of the artifact (or of its stand-in), from the fixed registry."""
        from crossvit_edge.converters.base import runner_class

        if stand_in:
            return runner_class(self.stand_in["kind"])(self.root, self.manifest, artifact=self.stand_in["file"], threads=threads)
        return runner_class(self.kind)(self.root, self.manifest, threads=threads)


def open_bundle(path: Any, read_artifacts: bool = True) -> Bundle:
    """Read, validate and verify a bundle folder; nothing in it is loaded or run before this
    returns. UserError (one line) for anything wrong. ``read_artifacts=False`` leaves out
    ``check_artifacts``, for a caller that may refuse the bundle's kind anyway and then runs it."""
    given = Path(path)
    label = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."  # the user's own argument, cut
    try:
        if not given.is_dir():
            raise UserError(f"bundle {label}: not a bundle (no such folder)")
        root = given.resolve()
        manifest_path = root / MANIFEST
        if manifest_path.is_symlink() or not manifest_path.is_file():
            raise UserError(f"bundle {label}: not a bundle (no {MANIFEST} file)")
    except OSError as e:
        raise UserError(f"bundle {label}: cannot read ({e.strerror or type(e).__name__})") from None
    source = f"bundle {label}: {MANIFEST}"
    manifest = validate_manifest(load_json_file(manifest_path, source), source)
    try:
        verify_files(root, manifest, f"bundle {label}")
        if read_artifacts:
            check_artifacts(root, manifest, f"bundle {label}")
    except OSError as e:
        raise UserError(f"bundle {label}: cannot read its files ({e.strerror or type(e).__name__})") from None
    return Bundle(root=root, manifest=manifest)


def check_artifacts(root: Path, manifest: Dict[str, Any], source: str) -> None:
    """The artifact and its stand-in read as data by their Runner's ``check_artifact`` (from the
    fixed registry): what they refer to is listed and inside the bundle, their signature is the
    manifest's. Runs after ``verify_files``, before any runtime is handed a file."""
    from crossvit_edge.converters.base import runner_class

    art = manifest["artifact"]
    for entry in [art] + ([art["stand_in"]] if art.get("stand_in") else []):
        runner_class(entry["kind"]).check_artifact(root, manifest, entry["file"], source)


def read_manifest(bundle_dir: Path) -> Dict[str, Any]:
    """The validated, verified manifest of a bundle (``open_bundle(bundle_dir).manifest``)."""
    return open_bundle(bundle_dir).manifest
