"""The CrossViT-aware quantization plan: which weighted layers run int8, with which scales, and why
the others stay float. It is plain data (written into every manifest) keyed by the PyTorch module
name, the one name that ONNX Q/DQ insertion, PT2E annotation and coremltools' op configs all map
back to.

Placement (argued in docs/int8_placement.md): int8 on the inputs of the weighted layers of
the ViT blocks (qkv, proj, fc1, fc2), the cross-attention key/value projections and the patch
embedding convs; float for everything that acts on one token (projs, revert_projs, the
cross-attention query and output projection, the heads) and for LayerNorm, GELU, Softmax, the
attention matmuls, residual adds, the resize matrices and the concatenations (which join different
ranges and must never share one int8 range).

One option, off by default (``build_plan(..., attention=True)``, chosen by a device profile's
``int8_attention``): the ViT blocks' self-attention matmuls (q k^T and probs v) take int8 operands,
per-tensor ranges for q * scale, k^T and v from the same statistics pass and estimator as the
layers, and the softmax output on its known range [0, 1]. The one-query cross-attention stays float.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from torch import nn

WEIGHT_SCHEME = {"dtype": "int8", "symmetric": True, "granularity": "per-channel", "axis": "output channel", "range": [-127, 127]}
ACTIVATION_SCHEME = {"dtype": "int8", "symmetric": True, "zero_point": 0, "granularity": "per-tensor", "range": [-128, 127]}
FLOAT_OPS = [
    "LayerNorm",
    "GELU",
    "Softmax",
    "attention score and value matmuls",
    "residual adds",
    "concatenations (CLS + patch tokens; projected CLS + other branch)",
    "bicubic resize matrices",
    "position-embedding add",
]

FLOAT_OPS_INT8_ATTENTION = [op for op in FLOAT_OPS if op != "attention score and value matmuls"] + [
    "cross-attention score and value matmuls (one query)"]

# The operands of the ViT blocks' self-attention matmuls (crossvit.AttentionPoints, export form only):
# point -> what it sees. The softmax output is not calibrated: its range is [0, 1] by definition.
ATTENTION_POINT = re.compile(r"^blocks\.\d+\.blocks\.\d+\.\d+\.attn\.points\.(q|k|v|probs)$")
ATTENTION_TENSORS = {
    "q": "q * scale: left operand of q k^T",
    "k": "k^T: right operand of q k^T",
    "probs": "softmax output: left operand of probs v, known range [0, 1]",
    "v": "v: right operand of probs v",
}
SOFTMAX_AMAX = 1.0
ATTENTION_REASON = "ViT block self-attention matmul operand (per-tensor, int8 attention option)"

# (pattern, quantize?, reason) in order; the first match decides.
_RULES = [
    (r"^patch_embed\.\d+\.proj(\.\d+)?$", True, "patch embedding conv"),
    (r"^blocks\.\d+\.blocks\.\d+\.\d+\.attn\.qkv$", True, "ViT block qkv projection"),
    (r"^blocks\.\d+\.blocks\.\d+\.\d+\.attn\.proj$", True, "ViT block attention output projection"),
    (r"^blocks\.\d+\.blocks\.\d+\.\d+\.mlp\.fc1$", True, "ViT block MLP fc1"),
    (r"^blocks\.\d+\.blocks\.\d+\.\d+\.mlp\.fc2$", True, "ViT block MLP fc2"),
    (r"^blocks\.\d+\.fusion\.\d+\.attn\.w[kv]$", True, "cross-attention key/value projection"),
    (r"^blocks\.\d+\.fusion\.\d+\.attn\.wq$", False, "cross-attention query: one token (GEMV), negligible FLOPs"),
    (r"^blocks\.\d+\.fusion\.\d+\.attn\.proj$", False, "cross-attention output projection: one token"),
    (r"^blocks\.\d+\.projs\.\d+\.\d+$", False, "CLS projection to the other branch: one token"),
    (r"^blocks\.\d+\.revert_projs\.\d+\.\d+$", False, "CLS projection back: one token"),
    (r"^head\.\d+$", False, "classifier head: one token"),
]


def classify_layer(name: str) -> tuple:
    """(quantize by default?, reason) for a Linear/Conv2d module name of a CrossViT."""
    for pattern, quantize, reason in _RULES:
        if re.match(pattern, name):
            return quantize, reason
    return False, "not a layer this plan knows: kept float"


def weighted_layers(model: nn.Module) -> List[tuple]:
    """(name, module) of every Linear and Conv2d, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def quantizable_layer_names(model: nn.Module) -> List[str]:
    return [n for n, _ in weighted_layers(model) if classify_layer(n)[0]]


def attention_owner(point_name: str) -> str:
    """The attention module that owns an operand point (``<module>.points.q`` -> ``<module>``)."""
    return point_name.rsplit(".points.", 1)[0]


def attention_point_names(model: nn.Module, calibrated_only: bool = False) -> List[str]:
    """The self-attention matmul operand points of ``model``'s ViT blocks, in module order;
    ``calibrated_only``: without the softmax outputs (their range is known)."""
    names = [n for n, _ in model.named_modules() if ATTENTION_POINT.match(n)]
    return [n for n in names if not (calibrated_only and n.endswith(".probs"))]


AUTO_KEYS = ("estimator", "estimator_snr_db", "estimator_margin_db")


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    import math

    return None if x is None or not math.isfinite(x) else round(float(x), 3)


@dataclass
class LayerPlan:
    name: str
    kind: str  # "linear" | "conv"
    precision: str  # "int8" | "float"
    reason: str
    input_amax: Optional[float] = None  # calibrated |x| clipping value (int8 layers)
    sensitivity: Optional[float] = None  # measured cost of quantizing this layer alone
    # where input_amax comes from: None = calibrated; IMAGE_BOUNDS = the exact range of the
    # normalised image (image_input_amax), never calibrated
    input_range: Optional[str] = None
    # --calib-method auto (calibration.auto): the estimator whose range won, the layer's output SNR
    # with it on the evaluation images, and its lead over the best other candidate (dB)
    estimator: Optional[str] = None
    estimator_snr_db: Optional[float] = None
    estimator_margin_db: Optional[float] = None

    @property
    def input_scale(self) -> Optional[float]:
        return None if self.input_amax is None else self.input_amax / 127.0

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["input_scale"] = self.input_scale
        for key in ("input_range",) + AUTO_KEYS:  # absent when unset: earlier plans stay as they were
            if d[key] is None:
                del d[key]
        return d


@dataclass
class TensorPlan:
    """An int8 activation that is not a layer input: an attention matmul operand."""

    name: str  # module name of the point (crossvit.TensorPoint)
    tensor: str  # q | k | v | probs
    amax: float  # |x| clipping value: calibrated, or the known range (softmax output)
    calibrated: bool
    estimator: Optional[str] = None  # as LayerPlan's (--calib-method auto)
    estimator_snr_db: Optional[float] = None
    estimator_margin_db: Optional[float] = None

    @property
    def scale(self) -> float:
        return self.amax / 127.0

    def to_dict(self) -> Dict[str, Any]:
        d = {**asdict(self), "scale": self.scale, "describes": ATTENTION_TENSORS[self.tensor]}
        return {k: v for k, v in d.items() if not (k in AUTO_KEYS and v is None)}


@dataclass
class QuantPlan:
    model: str
    layers: List[LayerPlan]
    calibration: Dict[str, Any] = field(default_factory=dict)
    smoothing: Optional[Dict[str, Any]] = None
    mixed_precision: Optional[Dict[str, Any]] = None
    attention: Optional[List[TensorPlan]] = None  # None: attention matmuls in float (the default)

    def get(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def int8_layers(self) -> List[LayerPlan]:
        return [l for l in self.layers if l.precision == "int8"]

    def with_float(self, names: Iterable[str], reason: str) -> "QuantPlan":
        names = set(names)
        layers = [
            LayerPlan(**{**asdict(l), "precision": "float", "reason": reason, **dict.fromkeys(AUTO_KEYS)}) if l.name in names else LayerPlan(**asdict(l))
            for l in self.layers
        ]
        attention = None if self.attention is None else [TensorPlan(**asdict(t)) for t in self.attention]
        return QuantPlan(self.model, layers, dict(self.calibration), self.smoothing, self.mixed_precision, attention)

    def attention_modules(self) -> List[str]:
        """The attention modules whose two matmuls the plan runs int8 (the owners of the operand
        points ``<module>.points.q`` ...), in plan order; empty without the option."""
        owners: List[str] = []
        for t in self.attention or []:
            owner = attention_owner(t.name)
            if owner not in owners:
                owners.append(owner)
        return owners

    def with_float_attention(self, modules: Iterable[str]) -> "QuantPlan":
        """A copy whose attention matmuls in ``modules`` run in float: their operand entries are
        dropped, all four at once, so every target sees both matmuls of a module in one precision.
        With the option on, the ``attention_matmuls`` entry stays (possibly with no tensors)."""
        modules = set(modules)
        plan = self.with_float((), "")  # a copy; no layer changes
        if plan.attention is not None:
            plan.attention = [t for t in plan.attention if attention_owner(t.name) not in modules]
        return plan

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "model": self.model,
            "weights": WEIGHT_SCHEME,
            "activations": ACTIVATION_SCHEME,
            "float_ops": FLOAT_OPS if self.attention is None else FLOAT_OPS_INT8_ATTENTION,
            "calibration": self.calibration,
            "smoothing": self.smoothing,
            "mixed_precision": self.mixed_precision,
            "layers": [l.to_dict() for l in self.layers],
            "summary": {
                "int8_layers": len(self.int8_layers()),
                "float_layers": len(self.layers) - len(self.int8_layers()),
            },
        }
        if self.attention is not None:  # absent when off: plans without the option are unchanged
            d["attention_matmuls"] = {"precision": "int8", "reason": ATTENTION_REASON, "tensors": [t.to_dict() for t in self.attention]}
            d["summary"]["int8_attention_tensors"] = len(self.attention)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantPlan":
        layers = [
            LayerPlan(
                name=l["name"], kind=l["kind"], precision=l["precision"], reason=l["reason"],
                input_amax=l.get("input_amax"), sensitivity=l.get("sensitivity"), input_range=l.get("input_range"),
                **{k: l.get(k) for k in AUTO_KEYS},
            )
            for l in d["layers"]
        ]
        attention = d.get("attention_matmuls")
        tensors = None if attention is None else [
            TensorPlan(name=t["name"], tensor=t["tensor"], amax=t["amax"], calibrated=t["calibrated"], **{k: t.get(k) for k in AUTO_KEYS})
            for t in attention["tensors"]]
        return cls(d["model"], layers, d.get("calibration", {}), d.get("smoothing"), d.get("mixed_precision"), tensors)


IMAGE_BOUNDS = "preprocessing bounds"


def image_channel_bounds(mean: Sequence[float], std: Sequence[float]) -> List[tuple]:
    """Per channel (low, high) of the normalised image ``(pixel - mean) / std``, pixels in [0, 1]."""
    return [((0.0 - m) / s, (1.0 - m) / s) for m, s in zip(mean, std)]


def image_input_amax(bounds: Sequence[tuple], resize: Optional[Any] = None) -> float:
    """The |x| that covers every value a layer fed the image can see: max |bound| over channels
    (one per-tensor symmetric range), or, with ``resize`` (the (out, in) matrix A of the separable
    map ``A @ x @ A^T``, the bicubic 240 -> 224 of branch 1), the exact extremes of that map over
    the box: an output is sum_kl A_ik A_jl x_kl, largest with x at ``high`` where the weight is
    positive and at ``low`` where negative. Bicubic overshoots (negative taps), so the resized
    image's range is slightly wider than the image's."""
    if resize is None:
        return float(max(max(abs(lo), abs(hi)) for lo, hi in bounds))
    import numpy as np

    a = np.asarray(resize, dtype=np.float64)
    p, n = np.clip(a, 0, None).sum(1), np.clip(a, None, 0).sum(1)  # per output row: positive / negative tap sums
    pos = np.outer(p, p) + np.outer(n, n)  # sum of the positive products A_ik A_jl
    neg = np.outer(p, n) + np.outer(n, p)  # sum of the negative ones
    amax = 0.0
    for lo, hi in bounds:
        amax = max(amax, float(np.max(np.abs(pos * hi + neg * lo))), float(np.max(np.abs(pos * lo + neg * hi))))
    return amax


# float32 preprocessing may land a few ulps beyond the float64 bound: the range covers that much more
IMAGE_BOUND_MARGIN = 1e-6


def covering_amax(amax: float) -> float:
    """``amax`` widened by IMAGE_BOUND_MARGIN and rounded so that the float32 scale every target
    stores (amax / 127) has a grid whose top, 127 * scale, still holds it: the bound, exact to
    float32 rounding, never a level short."""
    import numpy as np

    need = float(amax) * (1 + IMAGE_BOUND_MARGIN)
    scale = np.float32(need / 127.0)
    while float(scale) * 127.0 < need:
        scale = np.nextafter(scale, np.float32(np.inf))
    return float(scale) * 127.0


def image_fed_layers(model: nn.Module) -> Dict[str, int]:
    """layer name -> branch of the weighted layers that read the image directly: the first conv of
    each patch embedding (branch 1 reads it through the bicubic resize)."""
    out: Dict[str, int] = {}
    for name, _ in weighted_layers(model):
        m = re.match(r"^patch_embed\.(\d+)\.", name)
        if m and int(m.group(1)) not in out.values():
            out[name] = int(m.group(1))
    return out


def image_input_ranges(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> Dict[str, float]:
    """layer name -> exact |x| range of its input (``covering_amax``), for the layers fed the image
    (image_fed_layers)."""
    bounds = image_channel_bounds(mean, std)
    resize = getattr(model, "resize_matrix", None)
    out = {}
    for name, branch in image_fed_layers(model).items():
        r = None if branch == 0 or resize is None else resize.detach().cpu().numpy()
        out[name] = covering_amax(image_input_amax(bounds, r))
    return out


def build_plan(model: nn.Module, model_name: str, amax: Dict[str, float], calibration: Dict[str, Any],
               attention: bool = False, fixed_amax: Optional[Dict[str, float]] = None) -> QuantPlan:
    """Every Linear/Conv2d of ``model`` with its precision; int8 layers take their clipping value
    from ``amax`` (layer name -> calibrated |x| range), or from ``fixed_amax`` where it names them
    (the layers fed the image: their exact range, ``image_input_ranges``; never calibrated).
    ``attention``: the self-attention matmul operands too (``amax`` then holds the calibrated
    points, ``attention_point_names``)."""
    fixed_amax = fixed_amax or {}
    layers = []
    for name, module in weighted_layers(model):
        quantize, reason = classify_layer(name)
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        if quantize and name in fixed_amax:
            layers.append(LayerPlan(name, kind, "int8", reason, input_amax=float(fixed_amax[name]), input_range=IMAGE_BOUNDS))
        elif quantize:
            if name not in amax:
                raise KeyError(f"no calibration statistics for layer {name}")
            layers.append(LayerPlan(name, kind, "int8", reason, input_amax=float(amax[name])))
        else:
            layers.append(LayerPlan(name, kind, "float", reason))
    plan = QuantPlan(model_name, layers, calibration)
    if attention:
        plan.attention = []
        for name in attention_point_names(model):
            tensor = ATTENTION_POINT.match(name).group(1)
            if tensor == "probs":
                plan.attention.append(TensorPlan(name, tensor, SOFTMAX_AMAX, calibrated=False))
            elif name not in amax:
                raise KeyError(f"no calibration statistics for attention operand {name}")
            else:
                plan.attention.append(TensorPlan(name, tensor, float(amax[name]), calibrated=True))
        if not plan.attention:
            raise ValueError(f"{model_name}: no self-attention matmul points to quantize")
    return plan


def record_choices(plan: QuantPlan, choices: Dict[str, Dict[str, Any]]) -> None:
    """Write ``calibration.auto.select_ranges``' choice into each planned int8 tensor it judged."""
    entries = {l.name: l for l in plan.layers if l.precision == "int8" and l.input_range is None}
    entries.update({t.name: t for t in plan.attention or [] if t.calibrated})
    for name, choice in choices.items():
        entry = entries.get(name)
        if entry is None:
            continue
        entry.estimator = choice["estimator"]
        entry.estimator_snr_db = _finite_or_none(choice["snr_db"])
        entry.estimator_margin_db = _finite_or_none(choice["margin_db"])
