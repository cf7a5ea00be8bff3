"""One streaming pass over the calibration images that records, for the input of every layer the
plan may quantize, an |x| histogram, its exact max and the per-channel max (for LayerNorm folding).

Statistics are saved beside the artifact (``calibration_stats.npz``) and can be reused with
``--calib-stats`` to re-plan (another method, another percentile) without running images again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crossvit_edge import safe_io
from crossvit_edge.errors import UserError
from crossvit_edge.npz import CheckedNpz

from .estimators import MAX_BINS, AbsHistogram, compute_amax

log = logging.getLogger(__name__)

STATS_FILE = "calibration_stats.npz"
STATS_FORMAT = 1
# Bounds on a statistics file (docs/security.md)
MAX_STATS_BYTES = 256 << 20  # the file, and what its arrays inflate to in all
MAX_STATS_MEMBERS = 20_000  # arrays in it (three per layer and the metadata)
MAX_META_BYTES = 4 << 20  # the metadata JSON
MAX_CHANNELS = 1 << 20  # values in one per-channel max array


@dataclass
class CalibrationStatistics:
    model: str  # variant name
    weights_sha256: str  # of the (smoothed) fp32 weights the statistics were taken on
    layers: Dict[str, AbsHistogram]
    channel_amax: Dict[str, np.ndarray]
    settings: Dict[str, Any] = field(default_factory=dict)  # images, batch size, seed, set hash...
    # --calib-method auto's Fisher weights on each histogram's bins (calibration.auto.fisher_histograms)
    # and how many images gave them: present where the statistics were taken for auto, so that a
    # later --calib-stats build can choose ranges without the images
    fisher: Dict[str, np.ndarray] = field(default_factory=dict)
    fisher_images: int = 0

    def amax(self, method: str, percentile: float = 99.99) -> Dict[str, float]:
        return {name: compute_amax(h, method, percentile) for name, h in self.layers.items()}

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        arrays = {}
        meta = {"format": STATS_FORMAT, "model": self.model, "weights_sha256": self.weights_sha256, "settings": self.settings, "layers": {}}
        for i, (name, h) in enumerate(self.layers.items()):
            arrays[f"hist_{i}"] = h.counts
            meta["layers"][name] = {"index": i, "width": h.width, "amax": h.amax}
        for i, (name, v) in enumerate(self.channel_amax.items()):
            arrays[f"chan_{i}"] = v
            meta.setdefault("channels", {})[name] = i
        index = {name: i for i, name in enumerate(self.layers)}
        for name, w in self.fisher.items():
            arrays[f"fisher_{index[name]}"] = w
            meta.setdefault("fisher", {})[name] = index[name]
        if self.fisher:
            meta["fisher_images"] = int(self.fisher_images)
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        with safe_io.atomic_writer(path) as f:  # a new file renamed into place, 0644 like the rest of the bundle
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> "CalibrationStatistics":
        """Read a statistics file (untrusted: it may come from another machine). No pickles; a
        regular file of at most MAX_STATS_BYTES (no FIFO or device); every member is checked in the
        zip directory (uncompressed size, count) and by its .npy header (dtype: a number of at most
        8 bytes; 1-D; size) before a byte of it is inflated, and is then read to exactly that size;
        the metadata is bounded JSON checked key by key; every array is finite and non-negative.
        UserError naming what is wrong otherwise."""
        from crossvit_edge.bundle import SchemaCheck, parse_json
        from crossvit_edge.errors import brief

        source = f"{brief(str(path), 200)}"
        c = SchemaCheck(f"{source}: calibration statistics")

        def array(z: CheckedNpz, key: str, where: str, max_size: int) -> np.ndarray:
            a = z.array(key, where, max_values=max_size).astype(np.float64)
            if not np.isfinite(a).all() or (a < 0).any():
                c.fail(where, "values must be finite and non-negative")
            return a

        with CheckedNpz(path, source, max_file_bytes=MAX_STATS_BYTES, max_inflated_bytes=MAX_STATS_BYTES,
                        max_members=MAX_STATS_MEMBERS) as z:
            z.source = f"{source}: calibration statistics"
            if "meta" not in z.names():
                raise UserError(f"{source}: not a calibration statistics file (no metadata)")
            raw = z.array("meta", "meta", kinds="u", max_values=MAX_META_BYTES)
            if raw.dtype != np.uint8:
                c.fail("meta", "expected UTF-8 JSON bytes")
            meta = parse_json(raw.tobytes(), f"{source}: calibration statistics metadata")
            if not isinstance(meta, dict):
                c.fail("meta", f"expected an object, got {brief(meta)}")
            if meta.get("format") != STATS_FORMAT:
                raise UserError(f"{source}: unsupported calibration statistics format {brief(meta.get('format'))}")
            model = c.value(meta, "model", "model", str)
            digest = c.value(meta, "weights_sha256", "weights_sha256", str)
            settings = c.obj(meta, "settings", "settings", required=False) or {}
            layers, layer_index = {}, {}
            for name, m in c.obj(meta, "layers", "layers").items():
                where = f"layers[{brief(name, 80)}]"
                m = c.obj({"m": m}, "m", where)
                index = c.integer(m, "index", f"{where}.index", 0, 1 << 30)
                width = c.number(m.get("width"), f"{where}.width")
                amax = c.number(m.get("amax"), f"{where}.amax")
                if width <= 0 or amax < 0:
                    c.fail(where, f"width must be positive and amax non-negative, got {width!r}, {amax!r}")
                layers[name] = AbsHistogram(counts=array(z, f"hist_{index}", f"{where}.counts", MAX_BINS), width=width, amax=amax)
                layer_index[name] = index
            channels = {}
            for name, i in (c.obj(meta, "channels", "channels", required=False) or {}).items():
                index = c.integer({"i": i}, "i", f"channels[{brief(name, 80)}]", 0, 1 << 30)
                channels[name] = array(z, f"chan_{index}", f"channels[{brief(name, 80)}]", MAX_CHANNELS).astype(np.float32)
            fisher = {}
            for name, i in (c.obj(meta, "fisher", "fisher", required=False) or {}).items():
                where = f"fisher[{brief(name, 80)}]"
                index = c.integer({"i": i}, "i", where, 0, 1 << 30)
                if layer_index.get(name) != index:
                    c.fail(where, "names no layer of the file at that index")
                w = array(z, f"fisher_{index}", where, MAX_BINS)
                if len(w) != len(layers[name].counts):
                    c.fail(where, f"expected {len(layers[name].counts)} bins (the layer's histogram), got {len(w)}")
                fisher[name] = w
            fisher_images = c.integer(meta, "fisher_images", "fisher_images", 1, 1 << 30) if fisher else 0
        return cls(model, digest, layers, channels, settings, fisher, fisher_images)

    def check_matches(self, model_name: str, weights_sha256: str, layer_names: List[str], source: str) -> None:
        if self.model != model_name:
            raise UserError(f"{source}: statistics were taken on {self.model}, not {model_name}")
        if self.weights_sha256 != weights_sha256:
            raise UserError(f"{source}: statistics were taken on other weights (checkpoint or smoothing differ)")
        missing = [n for n in layer_names if n not in self.layers]
        if missing:
            raise UserError(f"{source}: no statistics for layer(s) {', '.join(missing[:5])}")


def weights_digest(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): ties statistics to weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    model_name: str,
    layer_names: List[str],
    batches: Iterable[np.ndarray],
    total_batches: Optional[int] = None,
    histograms: bool = True,
    settings: Optional[Dict[str, Any]] = None,
    desc: str = "calibrating",
) -> CalibrationStatistics:
    """Run ``batches`` through ``model`` and record input statistics of ``layer_names``."""
    modules = dict(model.named_modules())
    hists = {n: AbsHistogram() for n in layer_names}
    chans: Dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(_module, inputs):
            x = inputs[0]
            if histograms:
                hists[name].update(x)
            if x.dim() >= 2 and not isinstance(modules[name], nn.Conv2d):
                c = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
                chans[name] = c if name not in chans else torch.maximum(chans[name], c)
        return hook

    for n in layer_names:
        handles.append(modules[n].register_forward_pre_hook(hook_for(n)))
    model.eval()
    try:
        for x in tqdm(batches, total=total_batches, desc=desc, unit="batch", leave=False):
            model(torch.from_numpy(np.ascontiguousarray(x)))
    finally:
        for h in handles:
            h.remove()
    return CalibrationStatistics(
        model=model_name,
        weights_sha256=weights_digest(model),
        layers=hists if histograms else {},
        channel_amax={k: v.numpy().astype(np.float64) for k, v in chans.items()},
        settings=dict(settings or {}),
    )
