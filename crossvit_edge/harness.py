"""The profiling harness: run every bundle and its fp32 reference on the same images and report
accuracy (top-1/top-5, agreement, cosine, KL) and latency (p50/p90/p99, throughput, memory, size).

The harness only sees ``Runner``s (``crossvit_edge.converters.base``); it never branches on the target. A bundle
whose artifact cannot run on this host (a TensorRT engine off the Jetson) is scored through its
runnable stand-in when the bundle names one, and its latency can be merged from the results file
the device-side runner writes (``--merge``).
"""
from __future__ import annotations

import html
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from . import safe_io
from .bundle import TARGETS, Bundle, SchemaCheck, check_relative_name, open_bundle, parse_json
from .cli_common import check_int
from .data import ImageSet
from .errors import UserError, brief
from .metrics import INT8_MAX_AGREEMENT_LOSS, INT8_PAYS_RATIO, compare_logits, int8_verdict, latency_summary

log = logging.getLogger(__name__)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class TorchReferenceRunner:
    """The fp32 PyTorch model as a Runner (CPU, or CUDA when asked and available)."""

    target = "pytorch"
    timing_meaningful = True

    def __init__(self, model, batch_size: int, device: str = "cpu", threads: Optional[int] = None):
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--reference-device cuda: no CUDA device is available here")
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.model = model.to(device).eval()
        self.batch_size = batch_size

    @property
    def description(self) -> str:
        name = self.torch.cuda.get_device_name(0) if self.device.startswith("cuda") else f"CPU, {self.torch.get_num_threads()} threads"
        return f"PyTorch {self.torch.__version__} fp32 eager ({name})"

    def run(self, images: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(images).to(self.device))
            if self.device.startswith("cuda"):
                self.torch.cuda.synchronize()
            return out.float().cpu().numpy()

    def memory_bytes(self) -> Optional[int]:
        return None

    def close(self) -> None:
        pass


@dataclass
class ProfileSettings:
    warmup: int = 5
    runs: int = 30
    threads: Optional[int] = 2
    reference_device: str = "cpu"
    # Runners that are numerical checkers, not the device runtime (the numpy Core ML checker at
    # ~1.5 s an image on 2 cores), are scored on a class-balanced sample of this many of the images
    # when set; agreement, cosine and KL are then against the fp32 logits of the same images.
    checker_samples: Optional[int] = None

    def __post_init__(self):
        # Checked here so that every front end (profile, demo) refuses the same way, before any work.
        check_int("runs", self.runs, 1, MAX_RUNS)
        check_int("warmup", self.warmup, 0, MAX_RUNS)
        if self.threads is not None:
            check_int("threads", self.threads, 1, MAX_THREADS)
        if not isinstance(self.reference_device, str) or not re.fullmatch(r"cpu|cuda(:[0-9]{1,2})?", self.reference_device):
            raise UserError(f"reference device {brief(self.reference_device)}: use cpu, cuda or cuda:N")
        # 0 / None: every image.
        if self.checker_samples is not None and (isinstance(self.checker_samples, bool) or not isinstance(self.checker_samples, int)
                                                 or self.checker_samples < 0):
            raise UserError(f"checker samples {brief(self.checker_samples)}: give a positive number of images (0: all)")


MAX_RUNS = 1_000_000
MAX_THREADS = 1024


@dataclass
class Row:
    name: str
    target: str
    precision: str
    runner: str
    size_bytes: Optional[int]
    accuracy: Dict[str, Any]
    latency: Optional[Dict[str, Any]]
    memory_bytes: Optional[int]
    notes: List[str] = field(default_factory=list)
    # where the row's artifact ran: the instruction set (platform.machine() for this host's runners,
    # the results file's own word for merged rows; None when it says nothing) and the emulator, if
    # any, as the device side recorded it (qemu-user for aarch64 checks without ARM hardware)
    architecture: Optional[str] = None
    emulator: Optional[str] = None
    # the INT8 row this row is the FP16 baseline of (a TensorRT results file's fp16_baseline)
    fp16_baseline_of: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return self.__dict__.copy()


def time_runner(runner, batch: np.ndarray, settings: ProfileSettings) -> Dict[str, Any]:
    for _ in range(settings.warmup):
        runner.run(batch)
    times = []
    for _ in tqdm(range(settings.runs), desc="timing", unit="run", leave=False):
        t = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - t)
    return latency_summary(times, len(batch))


def _open_runner(bundle: Bundle, threads: Optional[int]):
    """The bundle's own runner, or its runnable stand-in with a note saying so. The runner class
    comes from the fixed registry by the artifact's kind (``Bundle.runner``), never from the data."""
    from .isolation import isolated_runner  # the first load in a child: a runtime's abort ends in one line

    try:
        return isolated_runner(bundle, threads=threads), []
    except UserError as e:
        stand_in = bundle.stand_in
        if not stand_in:
            raise
        runner = isolated_runner(bundle, stand_in=True, threads=threads)
        return runner, [f"{bundle.manifest['artifact']['file']} cannot run here ({e}); accuracy measured on {stand_in['file']} with "
                        f"{runner.description}; latency only from the device (--merge)"]


def profile_bundles(
    bundles: Sequence[Union[Path, Bundle]],
    images: ImageSet,
    preprocessing,
    reference_model,
    settings: ProfileSettings,
    merged: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    from .pipeline import run_batched  # torch: imported only when profiling starts

    bundles = [b if isinstance(b, Bundle) else open_bundle(b) for b in bundles]
    merged = [validate_results(r, f"results file {i + 1}") for i, r in enumerate(merged or [])]
    for r in merged:
        check_results_images(r, images, f"results of {brief(r.get('bundle') or 'device', 80)}")
    x = images.load(preprocessing).astype(np.float32)
    labels = np.asarray(images.labels) if images.has_labels else None
    batch_size = max(b.batch_size for b in bundles) if bundles else 1

    reference = TorchReferenceRunner(reference_model, batch_size, settings.reference_device, settings.threads)
    ref_logits = run_batched(reference, x)
    if not np.isfinite(ref_logits).all():
        raise UserError("the fp32 reference produced NaN or infinite logits: the checkpoint is broken")
    rows = [
        Row(
            name="fp32 reference",
            target="pytorch",
            precision="fp32",
            runner=reference.description,
            size_bytes=None,
            accuracy=compare_logits(ref_logits, ref_logits, labels),
            latency=time_runner(reference, x[:batch_size] if len(x) >= batch_size else np.repeat(x[:1], batch_size, 0), settings),
            memory_bytes=None,
            architecture=platform.machine(),
        )
    ]
    every = np.arange(len(x))
    sampled = every
    if settings.checker_samples and settings.checker_samples < len(x):
        sampled = _sample_indices(images, settings.checker_samples)
    for bundle in bundles:
        manifest = bundle.manifest
        before = rss_bytes()
        runner, notes = _open_runner(bundle, settings.threads)
        stand_in = bool(notes)  # the bundle's own artifact cannot run here: no latency from this host
        checker = not getattr(runner, "timing_meaningful", True)
        try:
            idx = sampled if checker else every
            if len(idx) < len(x):
                notes.append(f"accuracy on a class-balanced sample of {len(idx)} of the {len(x)} images (checker_samples)")
            logits = run_batched(runner, x[idx])
            bad = int((~np.isfinite(logits).all(axis=1)).sum()) if logits.size else 0
            if bad:  # a broken artifact: NaN would read as "100% agreement" in the metrics
                accuracy = {}
                notes.append(f"the artifact produced NaN or infinite logits on {bad} of {len(idx)} images: accuracy not scored")
            else:
                accuracy = compare_logits(logits, ref_logits[idx], labels[idx] if labels is not None else None)
            latency = None
            if not checker and not stand_in:
                b = runner.batch_size
                batch = x[:b] if len(x) >= b else np.repeat(x[:1], b, 0)
                latency = time_runner(runner, batch, settings)
            elif not stand_in:
                notes.append(f"latency not measured: {runner.description} is a numerical checker, not the device runtime")
            memory = runner.memory_bytes() or max(rss_bytes() - before, 0)
            rows.append(
                Row(
                    name=bundle.name,
                    target=manifest["target"],
                    precision=manifest["precision"],
                    runner=runner.description,
                    size_bytes=manifest["artifact"]["bytes"],
                    accuracy=accuracy,
                    latency=latency,
                    memory_bytes=memory,
                    notes=notes,
                    architecture=platform.machine(),
                )
            )
        finally:
            runner.close()
    for result in merged or []:
        row = _merged_row(result, images, ref_logits, labels)
        rows.append(row)
        if result.get("fp16_baseline") is not None:
            baseline = _merged_row(result["fp16_baseline"], images, ref_logits, labels)
            baseline.name = f"{row.name} (FP16 baseline)"
            baseline.fp16_baseline_of = row.name
            rows.append(baseline)
    row_dicts = [r.to_dict() for r in rows]
    return {
        "images": {"root": str(images.root), "count": len(images), "labelled": labels is not None, "sha256": images.sha256()},
        "settings": settings.__dict__,
        "rows": row_dicts,
        "int8_vs_fp16": int8_vs_fp16(row_dicts),
    }


def int8_vs_fp16(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each INT8 row beside the FP16 row of the same model on the same device, with
    ``metrics.int8_verdict``: a TensorRT INT8 row with its results file's FP16 baseline, else an
    INT8 row and the one FP16 row of the same target that ran on the same machine (the ExecuTorch
    int8 and fp16 ``.pte`` the C++ app or this host ran). A pair that is ambiguous (two FP16 rows)
    is not guessed."""
    out = []
    for r in rows:
        if r["precision"] != "int8":
            continue
        linked = [f for f in rows if f.get("fp16_baseline_of") == r["name"] and f["precision"] == "fp16"]
        same = [f for f in rows if f["precision"] == "fp16" and not f.get("fp16_baseline_of")
                and f["target"] == r["target"] and ran_on(f) == ran_on(r)]
        pair = linked or same
        if len(pair) != 1:
            continue
        f = pair[0]
        v = int8_verdict(r["latency"], f["latency"], r["accuracy"].get("top1_agreement"), f["accuracy"].get("top1_agreement"))
        out.append({"int8": r["name"], "fp16": f["name"], "target": r["target"], "ran_on": ran_on(r),
                    "int8_p50_ms": (r["latency"] or {}).get("p50_ms"), "fp16_p50_ms": (f["latency"] or {}).get("p50_ms"),
                    "int8_top1_agreement": r["accuracy"].get("top1_agreement"), "fp16_top1_agreement": f["accuracy"].get("top1_agreement"),
                    **v})
    return out


def _sample_indices(images: ImageSet, n: int) -> np.ndarray:
    """Positions in ``images`` of its deterministic class-balanced sample of ``n``."""
    position = {p: i for i, p in enumerate(images.paths)}
    return np.array([position[p] for p in images.sample(n, seed=0).paths])


def _merged_row(result: Dict[str, Any], images: ImageSet, ref_logits: np.ndarray, labels) -> Row:
    """A row from a validated device-side results file (TensorRT on a Jetson): its logits are
    matched to the harness's images by relative path, so accuracy is against the same fp32
    reference on the same images."""
    index = {p: i for i, p in enumerate(result["images"])}
    rows = [index[_image_key(p, images)] for p in images.paths]
    logits = result["logits"][rows]
    notes = [f"merged from device results ({brief(result.get('device') or 'unknown device', 200)})"]
    if len(result["images"]) > len(images):
        notes.append(f"scored on the {len(images)} images profiled here, of the {len(result['images'])} in the results file")
    if result.get("emulator"):
        notes.append(f"ran under an emulator ({brief(result['emulator'], 200)}): its latency is the emulator's, not a device's")
    return Row(
        name=result.get("bundle") or "device",
        target=result.get("target") or "tensorrt",
        precision=result.get("precision") or "?",
        runner=result.get("runner") or "device",
        size_bytes=result.get("engine_bytes"),
        accuracy=compare_logits(logits, ref_logits, labels),
        latency=result.get("latency"),
        memory_bytes=result.get("device_memory_bytes"),
        notes=notes,
        architecture=result.get("architecture"),
        emulator=result.get("emulator"),
    )


# --------------------------------------------------------------------------------------------------
# Results files (--merge): untrusted, validated before any profiling work

# Bounds (docs/security.md): parsed as JSON, a file of numbers becomes ~16 times its size in
# Python lists; here the logits rows go straight into one float32 buffer instead, so the peak is
# about the file's size plus 4 bytes a logit, and the rest of the document is bounded in tokens.
MAX_RESULTS_BYTES = 1 << 30
MAX_RESULTS_VALUES = 64 << 20  # logits in all (256 MiB as float32; ImageNet-val x 1000 classes is 50M)
MAX_RESULTS_ROWS = 1_000_000  # number rows (images)
MAX_RESULTS_TOKENS = 4_000_000  # strings, brackets and commas outside the number rows
MAX_RESULTS_OTHER_BYTES = 256 << 20  # the document once its number rows are cut out (image names...)
MAX_TEXT = 1000  # characters in a results file's descriptive strings
LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "throughput_ips")

# One pass over the raw bytes: a JSON string (skipped whole, so nothing inside it is mistaken for
# structure), a candidate row of numbers, a NaN/Infinity token (not JSON: refused), or a bracket
# or comma (counted). Linear time: a string always matches (an unterminated one runs to the end,
# and JSON then refuses it), and a row's first digit splits it without backtracking.
_RESULTS_TOKEN = re.compile(rb'"(?:[^"\\]|\\[\s\S]?)*"?|\[[ \t\n\r,.eE+\-]*[0-9][0-9eE.+\- \t\n\r,]*\]|NaN|Infinity|[\[{,]')


class NumberRow:
    """A row of numbers of a results file, parsed into ``RowBuffer`` (its place in the JSON tree)."""

    __slots__ = ("buffer", "offset", "count")

    def __init__(self, buffer: "RowBuffer", offset: int, count: int):
        self.buffer, self.offset, self.count = buffer, offset, count


class RowBuffer:
    """The float32 values of every number row, back to back."""

    def __init__(self):
        self.data = bytearray()
        self.values = 0

    def add(self, row: List[float]) -> NumberRow:
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused by validate_results
            self.data += np.asarray(row, dtype=np.float64).astype(np.float32).tobytes()
        r = NumberRow(self, self.values, len(row))
        self.values += len(row)
        return r

    @staticmethod
    def stack(rows: List[NumberRow]) -> Optional[np.ndarray]:
        """(len(rows), n) float32 from rows of equal length n (a view when they lie in order), or
        None when the lengths differ."""
        n = rows[0].count
        if any(r.count != n for r in rows):
            return None
        flat = np.frombuffer(rows[0].buffer.data, dtype=np.float32)
        if all(r.offset == rows[0].offset + i * n for i, r in enumerate(rows)):
            return flat[rows[0].offset : rows[0].offset + len(rows) * n].reshape(len(rows), n)
        return np.stack([flat[r.offset : r.offset + n] for r in rows])


def parse_results_json(raw: bytes, source: str) -> Any:
    """A results file's JSON within a memory bound: every row of numbers (``[1.5, -2, ...]``) is
    parsed on its own into a ``RowBuffer`` and left in the tree as a ``NumberRow``; the rest is
    parsed as JSON once the rows are cut out, after its tokens are counted. UserError (one line)
    past any bound of MAX_RESULTS_*."""
    import json

    buffer, rows, pieces, tokens, last = RowBuffer(), [], [], 0, 0
    for m in _RESULTS_TOKEN.finditer(raw):
        token = m.group()
        first = token[:1]
        if first == b"[" and len(token) > 1 and token[-1:] == b"]":
            count = token.count(b",") + 1
            if buffer.values + count > MAX_RESULTS_VALUES or len(rows) >= MAX_RESULTS_ROWS:
                raise UserError(f"{source}: more than {MAX_RESULTS_VALUES} logits or {MAX_RESULTS_ROWS} rows")
            try:
                values = json.loads(token)  # strict JSON numbers, or an error
                rows.append(buffer.add(values))
            except (ValueError, TypeError, OverflowError):
                raise UserError(f"{source}: not valid JSON (a row of numbers at byte {m.start()})") from None
            pieces += [raw[last : m.start()], b"NaN"]  # a placeholder only this parser writes
            last = m.end()
            continue
        if first in (b"N", b"I"):
            raise UserError(f"{source}: not valid JSON ({token.decode()} is not a JSON number)")
        tokens += 1
        if tokens > MAX_RESULTS_TOKENS:
            raise UserError(f"{source}: more than {MAX_RESULTS_TOKENS} JSON values besides the logits")
    pieces.append(raw[last:])
    other = sum(len(p) for p in pieces)
    if other > MAX_RESULTS_OTHER_BYTES:
        raise UserError(f"{source}: {other} bytes besides the logits, more than {MAX_RESULTS_OTHER_BYTES}")
    skeleton = b"".join(pieces)
    del pieces
    placeholders = iter(rows)

    def row(_name: str) -> NumberRow:  # every NaN left is a placeholder: real ones were refused above
        return next(placeholders)

    return parse_json(skeleton, source, parse_constant=row)


def load_results(path: Path, num_classes: Optional[int] = None) -> Dict[str, Any]:
    """Read and validate a device results file (``--merge``): a regular file (no FIFO or device)
    of at most ``MAX_RESULTS_BYTES``, parsed within a memory bound (``parse_results_json``)."""
    source = f"--merge {brief(str(path), 200)}"
    raw = safe_io.read_bytes(path, source, max_bytes=MAX_RESULTS_BYTES)
    return validate_results(parse_results_json(raw, source), source, num_classes)


def validate_results(data: Any, source: str, num_classes: Optional[int] = None) -> Dict[str, Any]:
    """The schema of the results file ``crossvit_edge.converters.tensorrt.device`` writes: ``images`` (unique
    relative paths), ``logits`` of shape (len(images), classes), finite; optional latency, sizes
    and descriptive strings. Returns a copy with ``logits`` as a float32 array. UserError naming
    the key otherwise."""
    c = SchemaCheck(source)
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object at the top level, got {brief(data)}")
    images = c.value(data, "images", "images", list)
    if not images:
        c.fail("images", "empty")
    for i, name in enumerate(images):
        if not isinstance(name, str):
            c.fail(f"images[{i}]", f"expected a relative path, got {brief(name)}")
        try:
            check_relative_name(name, f"images[{i}]")
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    if len(set(images)) != len(images):
        c.fail("images", "lists an image more than once")
    raw = data.get("logits")
    if isinstance(raw, np.ndarray):  # already validated once
        logits = raw
    elif isinstance(raw, list) and raw and all(isinstance(r, NumberRow) for r in raw):  # parse_results_json's rows
        logits = RowBuffer.stack(raw)
        if logits is None:
            c.fail("logits", "expected a list of equal-length lists of numbers")
    else:
        raw = c.value(data, "logits", "logits", list)
        try:
            logits = np.asarray(raw)
        except (ValueError, TypeError, OverflowError):
            c.fail("logits", "expected a list of equal-length lists of numbers")
        if logits.dtype.kind not in "iuf" or logits.ndim != 2:
            c.fail("logits", "expected a list of equal-length lists of numbers")
    if logits.shape[0] != len(images) or logits.shape[1] < 1:
        c.fail("logits", f"shape {tuple(logits.shape)}, expected ({len(images)}, classes): one row per image")
    if num_classes is not None and logits.shape[1] != num_classes:
        c.fail("logits", f"{logits.shape[1]} classes, the fp32 reference has {num_classes}")
    with np.errstate(over="ignore"):
        logits = logits.astype(np.float32, copy=False)
    if not np.isfinite(logits).all():
        c.fail("logits", f"{int((~np.isfinite(logits)).sum())} values are NaN or infinite (or beyond float32)")
    for key in ("bundle", "precision", "runner", "device", "timing", "architecture", "emulator"):
        value = c.value(data, key, key, str, required=False)
        if value is not None and len(value) > MAX_TEXT:
            c.fail(key, f"string of {len(value)} characters is too long")
    c.choice(data, "target", "target", TARGETS, required=False)
    for key in ("engine_bytes", "device_memory_bytes"):
        c.integer(data, key, key, 0, 1 << 50, required=False)
    latency = c.obj(data, "latency", "latency", required=False)
    if latency is not None:
        if latency.get("p50_ms") is None:
            c.fail("latency.p50_ms", "missing")
        for key in LATENCY_KEYS:
            if latency.get(key) is not None and c.number(latency[key], f"latency.{key}") < 0:
                c.fail(f"latency.{key}", f"negative: {brief(latency[key])}")
        c.integer(latency, "runs", "latency.runs", 1, 1 << 40, required=False)
        c.integer(latency, "batch_size", "latency.batch_size", 1, 1 << 20, required=False)
        latency = {k: latency[k] for k in (*LATENCY_KEYS, "runs", "batch_size") if latency.get(k) is not None}
    baseline = data.get("fp16_baseline")
    if baseline is not None:
        if not isinstance(baseline, dict) or baseline.get("fp16_baseline") is not None:
            c.fail("fp16_baseline", "expected one results record (the FP16 engine's), without a baseline of its own")
        baseline = validate_results(baseline, f"{source}: fp16_baseline", num_classes=logits.shape[1])
        if baseline["images"] != images:
            c.fail("fp16_baseline.images", "must be the same images in the same order as the INT8 engine's")
        if baseline.get("precision") != "fp16":
            c.fail("fp16_baseline.precision", f"expected fp16, got {brief(baseline.get('precision'))}")
    c.integer(data, "format", "format", 1, 2, required=False)
    return {**data, "logits": logits, "latency": latency, "fp16_baseline": baseline}


def _image_key(path: Path, images: ImageSet) -> str:
    return path.relative_to(images.root).as_posix()


def check_results_images(result: Dict[str, Any], images: ImageSet, source: str) -> None:
    """Every image the harness scores must be in the results file (it is scored on exactly the same
    images as the other rows), and the results must name only images of this folder."""
    names = set(result["images"])
    missing = [p for p in images.paths if _image_key(p, images) not in names]
    if missing:
        raise UserError(f"{source}: {len(missing)} of the {len(images)} images profiled here are not in it "
                        f"(first: {brief(_image_key(missing[0], images), 120)}); run the device runner on the same --data folder")
    if len(names) > len(images):
        on_disk = {_image_key(p, images) for p in images.population}
        stray = [n for n in result["images"] if n not in on_disk]
        if stray:
            raise UserError(f"{source}: it names {len(stray)} image(s) that are not in --data (first: {brief(stray[0], 120)}): a different folder?")


# --------------------------------------------------------------------------------------------------
# Reports


def _fmt(v, spec="{:.2f}", scale=1.0, none="-"):
    return none if v is None else spec.format(v * scale)


def md_text(value: Any, limit: int = 200) -> str:
    """Text from bundles and results files made safe for a Markdown table cell or list item: one
    line (control characters become spaces), HTML-special characters escaped, Markdown punctuation
    backslash-escaped (``|`` would split the cell), cut to ``limit`` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = html.escape(text, quote=False)
    for ch in "\\`*_[]|":
        text = text.replace(ch, "\\" + ch)
    return text


def ran_on(row: Dict[str, Any]) -> str:
    """A row's architecture and emulator in a few words: ``x86_64``, ``aarch64 under qemu-aarch64
    10.0.2, -cpu neoverse-n1``, ``?`` where a results file did not say (reports from before the key)."""
    arch = row.get("architecture") or "?"
    return f"{arch} under {row['emulator']}" if row.get("emulator") else arch


def markdown_report(report: Dict[str, Any]) -> str:
    lines = [
        f"# crossvit_edge profile: {report['images']['count']} images from {md_text(report['images']['root'])}",
        "",
        "Every artifact and the fp32 reference ran on the same images; agreement, cosine, logit SNR (dB) and KL are against the fp32 reference.",
        "",
        "| artifact | target | precision | ran on | top-1 | top-5 | top-1 agreement | cosine | SNR dB | KL | p50 ms | p90 ms | p99 ms | img/s | size MB | memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        a, l = r["accuracy"], r["latency"] or {}
        # a row scored on fewer images than the report (a checker's sample) says how many
        subset = f" (n={a['images']})" if a.get("images") not in (None, report["images"]["count"]) else ""
        lines.append(
            "| " + " | ".join([
                md_text(r["name"]), md_text(r["target"]), md_text(r["precision"]), md_text(ran_on(r)),
                _fmt(a.get("top1"), "{:.2f}%", 100) + subset, _fmt(a.get("top5"), "{:.2f}%", 100),
                _fmt(a.get("top1_agreement"), "{:.2f}%", 100), _fmt(a.get("cosine"), "{:.5f}"), _fmt(a.get("snr_db"), "{:.1f}"), _fmt(a.get("kl"), "{:.2e}"),
                _fmt(l.get("p50_ms")), _fmt(l.get("p90_ms")), _fmt(l.get("p99_ms")), _fmt(l.get("throughput_ips"), "{:.1f}"),
                _fmt(r["size_bytes"], "{:.1f}", 1e-6), _fmt(r["memory_bytes"], "{:.0f}", 1e-6),
            ]) + " |"
        )
    pairs = report.get("int8_vs_fp16") or []
    if pairs:
        lines += ["", "## Does INT8 pay? (INT8 against FP16 on the same device)", "",
                  f"INT8 pays when its p50 is at most {INT8_PAYS_RATIO:.2f}x FP16's and its top-1 agreement with fp32 is at most "
                  f"{100 * INT8_MAX_AGREEMENT_LOSS:.0f} point below FP16's.", "",
                  "| INT8 | FP16 | ran on | INT8 p50 ms | FP16 p50 ms | INT8/FP16 | INT8 top-1 agreement | FP16 top-1 agreement | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append("| " + " | ".join([
                md_text(p["int8"]), md_text(p["fp16"]), md_text(p["ran_on"]), _fmt(p["int8_p50_ms"]), _fmt(p["fp16_p50_ms"]),
                _fmt(p["ratio"], "{:.2f}x"), _fmt(p["int8_top1_agreement"], "{:.2f}%", 100), _fmt(p["fp16_top1_agreement"], "{:.2f}%", 100),
                md_text(p["verdict"]),
            ]) + " |")
    lines.append("")
    lines.append("Where an artifact disagrees with fp32, `python -m crossvit_edge.debug BUNDLE --data DIR --output DIR` "
                 "compares it layer by layer and names the layers that lose the most.")
    lines.append("")
    lines.append("Runners:")
    for r in report["rows"]:
        lines.append(f"- {md_text(r['name'])}: {md_text(r['runner'], 500)}")
        for n in r["notes"]:
            lines.append(f"  - {md_text(n, 1000)}")
    return "\n".join(lines) + "\n"


def write_report(report: Dict[str, Any], output: Path) -> str:
    """report.json, report.md and report.png in ``output``, each a new file renamed into place
    inside it (``safe_io``: a symlink or a file already there is replaced, never written through; a
    full disk leaves each as it was). Returns the Markdown."""
    import io

    from .bundle import write_json

    output = Path(output)
    write_json(output / "report.json", report, root=output)
    md = markdown_report(report)
    safe_io.write_bytes(output / "report.md", md, root=output)
    png = io.BytesIO()
    plot_report(report, png)
    safe_io.write_bytes(output / "report.png", png.getvalue(), root=output)
    return md


def plot_report(report: Dict[str, Any], path) -> None:
    """The accuracy-latency plot as PNG, to ``path`` (a file name or a binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["latency"] and r["accuracy"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        y = r["accuracy"].get("top1", r["accuracy"].get("top1_agreement"))
        ax.scatter(r["latency"]["p50_ms"], 100 * y, s=40)
        # plain text: a '$' in a bundle name would otherwise start matplotlib mathtext (and can fail to parse)
        label = "".join(ch if ch.isprintable() else " " for ch in str(r["name"])[:60]).replace("$", r"\$")
        ax.annotate(label, (r["latency"]["p50_ms"], 100 * y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    labelled = report["images"]["labelled"]
    ax.set_xlabel("p50 latency per batch (ms)")
    ax.set_ylabel("top-1 (%)" if labelled else "top-1 agreement with fp32 (%)")
    ax.set_title(f"accuracy vs latency, {report['images']['count']} images")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
