"""One streaming pass over the calibration images that records, for the input of every layer the
plan may quantize, an |x| histogram, its exact max and the per-channel max (for LayerNorm folding).

Statistics are saved beside the artifact (``calibration_stats.npz``) and can be reused with
``--calib-stats`` to re-plan (another method, another percentile) without running images again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crossvit_edge.errors import UserError

from .estimators import AbsHistogram, compute_amax

log = logging.getLogger(__name__)

STATS_FILE = "calibration_stats.npz"
STATS_FORMAT = 1


@dataclass
class CalibrationStatistics:
    model: str  # variant name
    weights_sha256: str  # of the (smoothed) fp32 weights the statistics were taken on
    layers: Dict[str, AbsHistogram]
    channel_amax: Dict[str, np.ndarray]
    settings: Dict[str, Any] = field(default_factory=dict)  # images, batch size, seed, set hash...

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
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> "CalibrationStatistics":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != STATS_FORMAT:
                    raise UserError(f"{path}: unsupported calibration statistics format {meta.get('format')}")
                layers = {}
                for name, m in meta["layers"].items():
                    layers[name] = AbsHistogram(counts=z[f"hist_{m['index']}"].astype(np.float64), width=m["width"], amax=m["amax"])
                channels = {name: z[f"chan_{i}"] for name, i in meta.get("channels", {}).items()}
        except UserError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: not a calibration statistics file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return cls(meta["model"], meta["weights_sha256"], layers, channels, meta.get("settings", {}))

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
