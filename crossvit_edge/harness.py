"""The profiling harness: run every bundle and its fp32 reference on the same images and report
accuracy (top-1/top-5, agreement, cosine, KL) and latency (p50/p90/p99, throughput, memory, size).

The harness only sees ``Runner``s (``converters.base``); it never branches on the target. A bundle
whose artifact cannot run on this host (a TensorRT engine off the Jetson) is scored through its
runnable stand-in when the bundle names one, and its latency can be merged from the results file
the device-side runner writes (``--merge``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from tqdm import tqdm

from .bundle import read_manifest
from .data import ImageSet
from .errors import UserError
from .metrics import compare_logits, latency_summary
from .pipeline import run_batched

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
        # 0 / None: every image. Checked here so that every front end (profile, demo) refuses the same way.
        if self.checker_samples is not None and self.checker_samples < 0:
            raise UserError(f"checker samples {self.checker_samples}: give a positive number of images (0: all)")


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


def _open_runner(bundle: Path, manifest: Dict[str, Any], threads: Optional[int]):
    """The bundle's own runner, or its runnable stand-in with a note saying so."""
    from converters.base import load_runner_class

    artifact = manifest["artifact"]
    try:
        return load_runner_class(artifact["runner"])(bundle, manifest, threads=threads), []
    except UserError as e:
        stand_in = artifact.get("stand_in")
        if not stand_in:
            raise
        runner = load_runner_class(stand_in["runner"])(bundle, manifest, artifact=stand_in["file"], threads=threads)
        return runner, [f"{artifact['file']} cannot run here ({e}); accuracy measured on {stand_in['file']} with {runner.description}; latency only from the device (--merge)"]


def profile_bundles(
    bundles: List[Path],
    images: ImageSet,
    preprocessing,
    reference_model,
    settings: ProfileSettings,
    merged: Optional[List[Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    x = images.load(preprocessing).astype(np.float32)
    labels = np.asarray(images.labels) if images.has_labels else None
    batch_size = max(read_manifest(b, verify=False)["input"]["shape"][0] for b in bundles) if bundles else 1

    reference = TorchReferenceRunner(reference_model, batch_size, settings.reference_device, settings.threads)
    ref_logits = run_batched(reference, x)
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
        )
    ]
    every = np.arange(len(x))
    sampled = every
    if settings.checker_samples and settings.checker_samples < len(x):
        sampled = _sample_indices(images, settings.checker_samples)
    for bundle in bundles:
        manifest = read_manifest(bundle)
        before = rss_bytes()
        runner, notes = _open_runner(bundle, manifest, settings.threads)
        stand_in = bool(notes)  # the bundle's own artifact cannot run here: no latency from this host
        checker = not getattr(runner, "timing_meaningful", True)
        try:
            idx = sampled if checker else every
            if len(idx) < len(x):
                notes.append(f"accuracy on a class-balanced sample of {len(idx)} of the {len(x)} images (checker_samples)")
            logits = run_batched(runner, x[idx])
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
                    name=Path(bundle).name,
                    target=manifest["target"],
                    precision=manifest["precision"],
                    runner=runner.description,
                    size_bytes=manifest["artifact"]["bytes"],
                    accuracy=accuracy,
                    latency=latency,
                    memory_bytes=memory,
                    notes=notes,
                )
            )
        finally:
            runner.close()
    for result in merged or []:
        rows.append(_merged_row(result, images, ref_logits, labels))
    return {
        "images": {"root": str(images.root), "count": len(images), "labelled": labels is not None, "sha256": images.sha256()},
        "settings": settings.__dict__,
        "rows": [r.to_dict() for r in rows],
    }


def _sample_indices(images: ImageSet, n: int) -> np.ndarray:
    """Positions in ``images`` of its deterministic class-balanced sample of ``n``."""
    position = {p: i for i, p in enumerate(images.paths)}
    return np.array([position[p] for p in images.sample(n, seed=0).paths])


def _merged_row(result: Dict[str, Any], images: ImageSet, ref_logits: np.ndarray, labels) -> Row:
    """A row from a device-side results file (TensorRT on a Jetson): its logits are matched to the
    harness's images by relative path, so accuracy is against the same fp32 reference."""
    index = {str(p.relative_to(images.root)): i for i, p in enumerate(images.paths)}
    paths = result.get("images", [])
    idx = [index[p] for p in paths if p in index]
    notes = [f"merged from device results ({result.get('device', 'unknown device')})"]
    accuracy: Dict[str, Any] = {}
    if idx and len(idx) == len(paths):
        logits = np.asarray(result["logits"], np.float32)
        accuracy = compare_logits(logits, ref_logits[idx], labels[idx] if labels is not None else None)
    else:
        notes.append("its images are not (all) in this image set: accuracy not compared")
    return Row(
        name=result.get("bundle", "device"),
        target=result.get("target", "tensorrt"),
        precision=result.get("precision", "?"),
        runner=result.get("runner", "device"),
        size_bytes=result.get("engine_bytes"),
        accuracy=accuracy,
        latency=result.get("latency"),
        memory_bytes=result.get("device_memory_bytes"),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# Reports


def _fmt(v, spec="{:.2f}", scale=1.0, none="-"):
    return none if v is None else spec.format(v * scale)


def markdown_report(report: Dict[str, Any]) -> str:
    lines = [
        f"# crossvit_edge profile: {report['images']['count']} images from {report['images']['root']}",
        "",
        "Every artifact and the fp32 reference ran on the same images; agreement, cosine and KL are against the fp32 reference.",
        "",
        "| artifact | target | precision | top-1 | top-5 | top-1 agreement | cosine | KL | p50 ms | p90 ms | p99 ms | img/s | size MB | memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        a, l = r["accuracy"], r["latency"] or {}
        # a row scored on fewer images than the report (a checker's sample) says how many
        subset = f" (n={a['images']})" if a.get("images") not in (None, report["images"]["count"]) else ""
        lines.append(
            "| " + " | ".join([
                r["name"], r["target"], r["precision"],
                _fmt(a.get("top1"), "{:.2f}%", 100) + subset, _fmt(a.get("top5"), "{:.2f}%", 100),
                _fmt(a.get("top1_agreement"), "{:.2f}%", 100), _fmt(a.get("cosine"), "{:.5f}"), _fmt(a.get("kl"), "{:.2e}"),
                _fmt(l.get("p50_ms")), _fmt(l.get("p90_ms")), _fmt(l.get("p99_ms")), _fmt(l.get("throughput_ips"), "{:.1f}"),
                _fmt(r["size_bytes"], "{:.1f}", 1e-6), _fmt(r["memory_bytes"], "{:.0f}", 1e-6),
            ]) + " |"
        )
    lines.append("")
    lines.append("Runners:")
    for r in report["rows"]:
        lines.append(f"- {r['name']}: {r['runner']}")
        for n in r["notes"]:
            lines.append(f"  - {n}")
    return "\n".join(lines) + "\n"


def plot_report(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["latency"] and r["accuracy"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        y = r["accuracy"].get("top1", r["accuracy"].get("top1_agreement"))
        ax.scatter(r["latency"]["p50_ms"], 100 * y, s=40)
        ax.annotate(f"{r['name']}", (r["latency"]["p50_ms"], 100 * y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    labelled = report["images"]["labelled"]
    ax.set_xlabel("p50 latency per batch (ms)")
    ax.set_ylabel("top-1 (%)" if labelled else "top-1 agreement with fp32 (%)")
    ax.set_title(f"accuracy vs latency, {report['images']['count']} images")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
