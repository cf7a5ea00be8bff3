"""Which layer broke it: a bundle's artifact and the fp32 model compared point by point.

The fp32 PyTorch model (the checkpoint the bundle records) runs with forward hooks at the plan's
points (``reference_points``: every weighted layer's output, every int8 layer's input, each ViT
block's residual stream, the CLS token each head reads) and the artifact runs through its Runner's
``probe`` (``crossvit_edge.converters.probe``), which finds the same points in the artifact and
returns their values from the most faithful source the target has. Per point, over all images:
cosine (mean per image, as the profile computes it for logits), SNR in dB (signal: the fp32
values; noise: the difference), max and mean absolute error, the quantization grid the artifact
uses there and the share of fp32 values outside that grid's range (what it clips). The last point
is the logits, from the bundle's own runner: its numbers are the profile's output-level ones.

Each point's SNR drop is measured against the point before it on the same stream (branch 0,
branch 1, or a branch's CLS path through the cross-attention fusion), so the first point where
error jumps is the layer to look at; the layers are ranked by the SNR they lose, and the int8
layers that lose the most are written as a ``--float-layers`` file the converter accepts.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from crossvit_edge.converters.probe import CLS, INT8_INPUT, LOGITS, OUTPUT, RESIDUAL, Located, Point, Quant
from crossvit_edge.metrics import compare_logits

log = logging.getLogger(__name__)

JUMP_DB = 10.0  # an SNR drop larger than this at one point is "where it broke"
# A point with an int8 grid of its own is a jump only when that grid does not explain its SNR:
# measured more than GRID_MARGIN_DB below what the grid allows the fp32 values there (uniform
# rounding noise scale^2/12 over the values inside its range plus the clipped values' error), or
# more than CLIP_SHARE_MAX of the values clipped (a range that narrow is broken however the error
# adds up). 6 dB is a factor of 4 in noise power: upstream error alone rarely reaches that at the
# first point after a good grid, a broken range (scale / 30) misses it by tens of dB.
GRID_MARGIN_DB = 6.0
CLIP_SHARE_MAX = 0.01
INT8_FLOOR_DB = 40.0  # about what one int8 grid leaves a well-ranged activation
SNR_CAP_DB = 200.0  # identical values (no error at all) are reported at this SNR
SUGGEST_MAX = 5
FLOAT_LAYERS_FILE = "float_layers.txt"
_HEAD = re.compile(r"^head\.\d+$")


# --------------------------------------------------------------------------------------------------
# The reference side: points and hooks on the fp32 model


def reference_points(model, plan=None) -> Tuple[List[Point], Dict[str, Tuple[int, ...]]]:
    """The comparison points of ``model`` in execution order (one forward pass on zeros records
    the order the hooks fire in), and every weighted layer's weight shape in that order."""
    import torch

    from crossvit_edge.calibration.plan import weighted_layers
    from crossvit_edge.crossvit import Block

    int8 = {l.name for l in plan.int8_layers()} if plan is not None else set()
    points: List[Point] = []
    layers: Dict[str, Tuple[int, ...]] = {}
    handles = []
    for name, module in weighted_layers(model):
        def pre(_m, _args, name=name, module=module):
            layers.setdefault(name, tuple(module.weight.shape))
            if name in int8:
                points.append(Point(name, "input", INT8_INPUT, name))
            elif _HEAD.match(name):
                points.append(Point(name, "input", CLS, name))

        def post(_m, _args, _out, name=name):
            points.append(Point(name, "output", OUTPUT, name))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    for name, module in model.named_modules():
        if isinstance(module, Block):
            handles.append(module.register_forward_hook(lambda _m, _a, _o, name=name: points.append(Point(name, "output", RESIDUAL, f"{name}.mlp.fc2"))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *model.input_shape))
    finally:
        for h in handles:
            h.remove()
    seen, ordered = set(), []
    for p in points:
        if p.key not in seen:
            seen.add(p.key)
            ordered.append(p)
    return ordered, layers


class ReferenceTaps:
    """The fp32 model with hooks that keep the values at ``points`` for one batch."""

    def __init__(self, model, points: Sequence[Point]):
        self.model = model
        self.values: Dict[str, Any] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for p in points:
            m = modules[p.module]
            if p.side == "input":
                self._handles.append(m.register_forward_pre_hook(lambda _m, args, key=p.key: self.values.__setitem__(key, args[0])))
            else:
                self._handles.append(m.register_forward_hook(lambda _m, _a, out, key=p.key: self.values.__setitem__(key, out)))

    def run(self, images: np.ndarray) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
        import torch

        self.values = {}
        with torch.no_grad():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return {k: v.detach().float().numpy() for k, v in self.values.items()}, logits.float().numpy()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# --------------------------------------------------------------------------------------------------
# Statistics, streamed over batches


@dataclass
class PointStats:
    count: int = 0
    signal: float = 0.0  # sum of fp32 values squared
    noise: float = 0.0  # sum of squared differences
    abs_error: float = 0.0
    max_abs_error: float = 0.0
    cosines: List[float] = field(default_factory=list)
    clipped: int = 0
    grid_noise: float = 0.0  # what the point's own grid should cost the fp32 values (see expected_grid_noise)

    def update(self, reference: np.ndarray, artifact: np.ndarray, quant: Optional[Quant]) -> None:
        r = reference.reshape(len(reference), -1).astype(np.float64)
        a = artifact.reshape(len(reference), -1).astype(np.float64)
        d = a - r
        self.count += r.size
        self.signal += float(np.einsum("ij,ij->", r, r))
        self.noise += float(np.einsum("ij,ij->", d, d))
        ad = np.abs(d)
        self.abs_error += float(ad.sum())
        self.max_abs_error = max(self.max_abs_error, float(ad.max()) if ad.size else 0.0)
        num = np.einsum("ij,ij->i", a, r)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1) + 1e-12  # as metrics.compare_logits
        self.cosines += list(num / den)
        if quant is not None:
            lo, hi = quant.range
            outside = (r < lo) | (r > hi)
            self.clipped += int(outside.sum())
            self.grid_noise += expected_grid_noise(r, quant, outside)

    def summary(self, quant: Optional[Quant]) -> Dict[str, Any]:
        snr = _snr(self.signal, self.noise)
        return {
            "cosine": float(np.mean(self.cosines)) if self.cosines else None,
            "snr_db": snr,
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.abs_error / self.count if self.count else None,
            "clipped_share": self.clipped / self.count if quant is not None and self.count else None,
            "grid_snr_db": _snr(self.signal, self.grid_noise) if quant is not None and self.count else None,
        }


def expected_grid_noise(reference: np.ndarray, quant: Quant, outside: Optional[np.ndarray] = None) -> float:
    """The squared error ``quant``'s grid should add to the fp32 values ``reference``, summed: the
    rounding of a value inside the range is taken as uniform over one step (scale^2 / 12 each), a
    value outside it loses its distance to the range's edge."""
    r = np.asarray(reference, np.float64)
    lo, hi = quant.range
    if outside is None:
        outside = (r < lo) | (r > hi)
    clipped = r[outside]
    clip_error = float(np.sum((clipped - np.clip(clipped, lo, hi)) ** 2))
    return (r.size - clipped.size) * quant.scale ** 2 / 12.0 + clip_error


def _snr(signal: float, noise: float) -> float:
    if noise == 0.0:
        return SNR_CAP_DB
    if signal == 0.0:
        return -SNR_CAP_DB
    return min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))


def stream_of(module: str) -> Tuple[str, Optional[str]]:
    """(stream, parent stream) of a point: branch 0 / 1, or branch k's CLS path through the fusion
    (whose parent is branch k)."""
    m = re.match(r"^blocks\.\d+\.(?:projs|fusion|revert_projs)\.(\d+)", module)
    if m:
        return f"cls {m.group(1)}", f"branch {m.group(1)}"
    m = re.match(r"^(?:patch_embed|head)\.(\d+)", module) or re.match(r"^blocks\.\d+\.blocks\.(\d+)", module)
    return (f"branch {m.group(1)}", None) if m else ("other", None)


def add_drops(rows: List[Dict[str, Any]]) -> None:
    """Each compared row's ``drop_db``: the SNR lost since the previous compared point of its
    stream (or of the parent stream for a stream's first point). The SNR before is counted at most
    ``INT8_FLOOR_DB``: a near-exact value passing through its first int8 grid (40-50 dB down to
    30-40 dB) is the grid's resolution, not a break; a stream's first point starts from there.
    Residual points are compared with the previous residual only, and the others never with a
    residual: the residual stream's SNR is dominated by its skip path and the LayerNorm between it
    and the next layer rescales every token, so the two kinds of SNR are not comparable."""
    last: Dict[Tuple[str, bool], float] = {}
    for row in rows:
        if row.get("snr_db") is None:
            row["drop_db"] = None
            continue
        stream, parent = stream_of(row["module"])
        residual = row["kind"] == RESIDUAL
        before = last.get((stream, residual), last.get((parent, residual)) if parent else None)
        if before is None and not residual:
            before = INT8_FLOOR_DB  # a stream's first point: from the exact input
        row["drop_db"] = None if before is None else min(before, INT8_FLOOR_DB) - row["snr_db"]
        row["stream"] = stream
        last[(stream, residual)] = row["snr_db"]


def rank_layers(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Plan layers by the SNR lost across them (the drops at their input and output points)."""
    lost: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if row["kind"] not in (INT8_INPUT, OUTPUT) or row.get("drop_db") is None:
            continue
        entry = lost.setdefault(row["layer"], {"layer": row["layer"], "precision": row["precision"], "lost_db": 0.0, "snr_db": None})
        entry["lost_db"] += row["drop_db"]
        if row["side"] == "output":
            entry["snr_db"] = row["snr_db"]
    return sorted(lost.values(), key=lambda e: -e["lost_db"])


def beyond_grid(row: Dict[str, Any]) -> Optional[str]:
    """Why ``row``'s SNR is more than its own int8 grid explains (None when the grid explains it). A
    point without a grid of its own (a float layer's output, the residual, the CLS token, the
    logits) adds no quantization there: nothing excuses a drop."""
    if row.get("grid_snr_db") is None:
        return "no int8 grid of its own"
    if row["clipped_share"] is not None and row["clipped_share"] > CLIP_SHARE_MAX:
        return f"its grid clips {100 * row['clipped_share']:.2f}% of the fp32 values (more than {100 * CLIP_SHARE_MAX:g}%)"
    if row["snr_db"] < row["grid_snr_db"] - GRID_MARGIN_DB:
        return f"{row['grid_snr_db'] - row['snr_db']:.1f} dB below what its grid allows (more than {GRID_MARGIN_DB:g} dB)"
    return None


def headline(rows: List[Dict[str, Any]]) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """(the first jump, the headline entry). The first jump is the first point that loses more than
    JUMP_DB since the point before it (``add_drops``) and whose SNR its own grid does not explain
    (``beyond_grid``). Without one, the headline names the worst point (the largest drop) and what
    its grid allows."""
    keys = ("key", "layer", "kind", "snr_db", "drop_db", "grid_snr_db", "clipped_share")
    for row in rows:
        if row.get("drop_db") is None or row["drop_db"] <= JUMP_DB:
            continue
        why = beyond_grid(row)
        if why is not None:
            jump = {k: row.get(k) for k in keys}
            jump["why"] = why
            text = (f"first jump: {row['key']} ({row['kind']}) loses {row['drop_db']:.1f} dB (SNR {row['snr_db']:.1f} dB): {why}")
            return jump, {**jump, "jump": True, "text": text}
    scored = [r for r in rows if r.get("drop_db") is not None]
    if not scored:
        return None, {"jump": False, "key": None, "text": "no jump: no point was compared"}
    worst = max(scored, key=lambda r: r["drop_db"])
    entry = {**{k: worst.get(k) for k in keys}, "jump": False}
    if worst.get("grid_snr_db") is not None:
        entry["text"] = (f"no jump: worst point {worst['key']}, within what its int8 grid allows (measured {worst['snr_db']:.1f} dB, "
                         f"grid allows {worst['grid_snr_db']:.1f} dB)")
    else:
        entry["text"] = (f"no jump: worst point {worst['key']} loses {worst['drop_db']:.1f} dB (SNR {worst['snr_db']:.1f} dB), "
                         f"no more than {JUMP_DB:g} dB at one point")
    return None, entry


def estimator_of(layer) -> Optional[str]:
    """The estimator that chose ``layer``'s input range, when the plan records it (a plan written
    before per-tensor selection does not: None)."""
    for name in ("estimator", "calib_method", "method", "winner"):
        value = getattr(layer, name, None)
        if isinstance(value, dict):
            value = value.get("estimator") or value.get("method")
        if isinstance(value, str) and value:
            return value
    return None


def suggest_float_layers(ranked: List[Dict[str, Any]]) -> List[str]:
    """The int8 layers worth returning to float: those where SNR jumps (> JUMP_DB), else the int8
    layers that lose the most (at least 1 dB), at most SUGGEST_MAX."""
    int8 = [e for e in ranked if e["precision"] == "int8"]
    jumps = [e["layer"] for e in int8 if e["lost_db"] > JUMP_DB]
    return (jumps or [e["layer"] for e in int8 if e["lost_db"] >= 1.0])[:SUGGEST_MAX]


# --------------------------------------------------------------------------------------------------
# The comparison


def compare_bundle(runner, reference_model, images: np.ndarray, plan=None, context=None,
                   device_values: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Compare ``runner``'s artifact with ``reference_model`` on ``images`` (preprocessed, N x 3 x H x W)
    at every point; returns the report (``markdown_report`` and ``plot_report`` render it).

    ``device_values`` replaces the probe with values measured elsewhere (the TensorRT device
    runner's results: ``{"located": {key: Located}, "values": {key: array (N, ...)}, "logits": (N, C),
    "source": str}``)."""
    points, layers = reference_points(reference_model, plan)
    precision = {l.name: l.precision for l in plan.layers} if plan is not None else {}
    plan_scale = {l.name: l.input_scale for l in plan.layers} if plan is not None else {}
    estimator = {l.name: estimator_of(l) for l in plan.layers} if plan is not None else {}
    if device_values is None:
        probe = runner.probe(points, layers, context)
        located, source = probe.located, probe.source
    else:
        probe, located, source = None, device_values["located"], device_values["source"]
    taps = ReferenceTaps(reference_model, points)
    stats = {p.key: PointStats() for p in points}
    shape_notes: Dict[str, str] = {}
    ref_logits, art_logits, probe_logits = [], [], []
    b = runner.batch_size if runner is not None else 1
    try:
        for start in tqdm(range(0, len(images), b), desc="layer-wise comparison", unit="batch", leave=False):
            chunk = images[start : start + b]
            n = len(chunk)
            if n < b:  # the artifact's static batch: pad by repeating the last image, score the real ones
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            ref, logits = taps.run(chunk[:n])
            if probe is not None:
                values, own = probe.run(chunk)
                out = own if own is not None else runner.run(chunk)
                values = {k: v[:n] for k, v in values.items()}
            else:
                values = {k: v[start : start + n] for k, v in device_values["values"].items()}
                out = device_values["logits"][start : start + n]
            ref_logits.append(logits)
            art_logits.append(np.asarray(out, np.float32)[:n])
            if "logits" in values:
                probe_logits.append(values["logits"])
            for p in points:
                loc = located.get(p.key)
                if loc is None or loc.tensor is None or p.key not in values or p.key in shape_notes:
                    continue
                art, r = values[p.key], ref[p.key]
                if art.size != r.size:
                    shape_notes[p.key] = f"the artifact's tensor is shaped {list(art.shape)}, the fp32 value {list(r.shape)}"
                    continue
                stats[p.key].update(r, art.reshape(r.shape), loc.quant)
    finally:
        taps.close()
        if probe is not None:
            probe.close()

    rows = []
    for depth, p in enumerate(points):
        loc = located.get(p.key) or Located(None, note="not located")
        row: Dict[str, Any] = {**p.to_dict(), "depth": depth, "precision": precision.get(p.layer, "float"), "tensor": loc.tensor,
                               "quant": loc.quant.to_dict() if loc.quant else None, "note": loc.note}
        if p.kind == INT8_INPUT:
            row["plan_scale"] = plan_scale.get(p.layer)
            row["estimator"] = estimator.get(p.layer)
        if loc.tensor is None or p.key in shape_notes:
            row["status"] = "missing"
            row["note"] = shape_notes.get(p.key, loc.note)
            row.update(cosine=None, snr_db=None, max_abs_error=None, mean_abs_error=None, clipped_share=None, grid_snr_db=None)
        else:
            row["status"] = "compared"
            row.update(stats[p.key].summary(loc.quant))
        rows.append(row)
    ref_all, art_all = np.concatenate(ref_logits), np.concatenate(art_logits)
    final_stats = PointStats()
    final_stats.update(ref_all, art_all, None)
    final = {"key": "logits", "module": "", "side": "output", "kind": LOGITS, "layer": "", "depth": len(rows), "precision": "float",
             "status": "compared", "tensor": "logits", "quant": None, "note": "the bundle's own runner (what the profile runs)",
             **final_stats.summary(None), **compare_logits(art_all, ref_all)}
    rows.append(final)
    add_drops(rows)
    ranked = rank_layers(rows)
    jump, head = headline(rows)
    report: Dict[str, Any] = {
        "runner": runner.description if runner is not None else source,
        "source": source,
        "images": int(len(images)),
        "jump_db": JUMP_DB,
        "grid_margin_db": GRID_MARGIN_DB,
        "clip_share_max": CLIP_SHARE_MAX,
        "headline": head,
        "points": rows,
        "final": {k: final[k] for k in ("images", "top1_agreement", "cosine", "kl", "max_abs_diff", "snr_db")},
        "first_jump": jump,
        "layers_by_snr_lost": ranked[:10],
        "float_layers": suggest_float_layers(ranked),
        "missing_points": sum(1 for r in rows if r["status"] == "missing"),
    }
    if probe_logits:
        check = compare_logits(np.concatenate(probe_logits)[: len(art_all)], art_all)
        report["probe_vs_artifact"] = {"cosine": check["cosine"], "top1_agreement": check["top1_agreement"], "max_abs_diff": check["max_abs_diff"],
                                       "what": "the intermediate values' source's own logits against the bundle's runner"}
    return report


# --------------------------------------------------------------------------------------------------
# Rendering


def _num(v, spec="{:.2f}") -> str:
    return "-" if v is None else spec.format(v)


def _plan_scale(row: Dict[str, Any]) -> str:
    """The plan's scale, with the estimator that chose it where the plan records one."""
    from .harness import md_text

    text = _num(row.get("plan_scale"), "{:.4g}")
    return f"{text} ({md_text(row['estimator'], 40)})" if row.get("estimator") and row.get("plan_scale") is not None else text


def markdown_report(report: Dict[str, Any], header: Dict[str, Any], command: str) -> str:
    from .harness import md_text

    lines = [
        f"# crossvit_edge layer-wise comparison: {md_text(header['bundle'])} ({md_text(header['target'])}, {md_text(header['precision'])})",
        "",
        f"{report['images']} images from {md_text(header['data'])}; every point against the fp32 model {md_text(header['checkpoint'])}.",
        "",
        f"- artifact: {md_text(report['runner'], 500)}",
        f"- intermediate values: {md_text(report['source'], 500)}",
        f"- final point (logits): top-1 agreement {100 * report['final']['top1_agreement']:.2f}%, cosine {report['final']['cosine']:.5f}, "
        f"SNR {report['final']['snr_db']:.1f} dB",
    ]
    if "probe_vs_artifact" in report:
        lines.append(f"- the intermediate values' own logits against the artifact's: cosine {report['probe_vs_artifact']['cosine']:.6f}")
    lines.append(f"- **{md_text(report['headline']['text'], 600)}**")
    lines.append(f"  (a jump: more than {report['jump_db']:g} dB lost at one point, and more than {report['grid_margin_db']:g} dB below what "
                 f"the point's own int8 grid allows or more than {100 * report['clip_share_max']:g}% clipped; docs/debugging.md)")
    if report["missing_points"]:
        lines.append(f"- {report['missing_points']} points could not be found in the artifact (see their notes)")
    lines += ["", "Layers that lose the most SNR (dB lost across the layer):", ""]
    for e in report["layers_by_snr_lost"][:SUGGEST_MAX]:
        lines.append(f"- {md_text(e['layer'])} ({e['precision']}): {e['lost_db']:.1f} dB, output SNR {_num(e['snr_db'], '{:.1f}')} dB")
    if report["float_layers"]:
        lines += ["", f"To return them to float, rebuild with `{md_text(command, 1000)}` (the file lists "
                  f"{', '.join(md_text(n) for n in report['float_layers'])}), or let `--max-drop POINTS --eval-data DIR` choose."]
    lines += [
        "",
        "| # | point | kind | precision | SNR dB | grid allows dB | drop dB | cosine | max abs err | mean abs err | scale | plan scale | clipped | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["points"]:
        q = r.get("quant") or {}
        lines.append("| " + " | ".join([
            str(r["depth"]), md_text(r["key"]), md_text(r["kind"]), md_text(r["precision"]), _num(r["snr_db"], "{:.1f}"),
            _num(r.get("grid_snr_db"), "{:.1f}"), _num(r.get("drop_db"), "{:.1f}"), _num(r["cosine"], "{:.5f}"), _num(r["max_abs_error"], "{:.3g}"),
            _num(r["mean_abs_error"], "{:.3g}"), _num(q.get("scale"), "{:.4g}"), _plan_scale(r), _num(r["clipped_share"], "{:.2%}"),
            md_text(r.get("note") or "", 200),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: Dict[str, Any], path, title: str) -> None:
    """SNR and cosine against depth, int8 inputs marked, the first jump drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["points"] if r["snr_db"] is not None]
    x = [r["depth"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(x, [r["snr_db"] for r in rows], "-", color="0.6", lw=0.8)
    bottom.plot(x, [1.0 - r["cosine"] for r in rows], "-", color="0.6", lw=0.8)
    for kind, style in ((INT8_INPUT, dict(color="tab:red", marker="o", s=14, label="int8 layer input")),
                        (OUTPUT, dict(color="tab:blue", marker=".", s=10, label="layer output")),
                        (RESIDUAL, dict(color="tab:green", marker="s", s=14, label="block residual")),
                        (CLS, dict(color="tab:purple", marker="^", s=18, label="CLS before head")),
                        (LOGITS, dict(color="black", marker="*", s=40, label="logits"))):
        sel = [r for r in rows if r["kind"] == kind]
        top.scatter([r["depth"] for r in sel], [r["snr_db"] for r in sel], **style)
        bottom.scatter([r["depth"] for r in sel], [max(1.0 - r["cosine"], 1e-12) for r in sel], **{k: v for k, v in style.items() if k != "label"})
    if report["first_jump"]:
        depth = next(r["depth"] for r in rows if r["key"] == report["first_jump"]["key"])
        for ax in (top, bottom):
            ax.axvline(depth, color="tab:red", ls="--", lw=0.8)
        label = "".join(ch if ch.isprintable() else " " for ch in report["first_jump"]["key"][:80]).replace("$", r"\$")
        top.annotate(f"first jump: {label}", (depth, top.get_ylim()[1]), fontsize=7, va="top", xytext=(4, -4), textcoords="offset points")
    top.set_ylabel("SNR vs fp32 (dB)")
    bottom.set_ylabel("1 - cosine")
    bottom.set_yscale("log")
    bottom.set_xlabel("point (execution order)")
    top.legend(fontsize=7, loc="lower left")
    top.set_title("".join(ch if ch.isprintable() else " " for ch in title[:120]).replace("$", r"\$"), fontsize=9)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
