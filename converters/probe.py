"""Intermediate values of an artifact at the quantization plan's points, for the layer-wise
comparison with the fp32 model (``crossvit_edge.layerwise``, ``python -m crossvit_edge.debug``).

A point is a place in the PyTorch model, named by module as the plan names layers: a weighted
layer's output, an int8 layer's (quantized) input, a ViT block's residual stream, the CLS token a
head reads. Every target finds its points the same way, from a list of ``GraphOp`` records its
``Runner.probe`` reads off its own artifact (ONNX nodes, MIL operations, the ExecuTorch program's
FX nodes):

* weighted ops are matched to the plan's layers in execution order by weight shape (PyTorch
  layout), skipping ops that are no layer (the resize matrices). Names are not relied on, because
  exporters rename and deduplicate constants; where an artifact does keep a layer's name on its
  weight (``GraphOp.hint``), an op named for another layer is never taken;
* a layer's output follows its epilogue (bias add, output quantize / dequantize) to the value its
  consumers read; its input is the activation operand, with the grid of the dequantize that
  produced it (scale, zero point, integer range) when it is quantized;
* a block's residual stream is the add that consumes the block's fc2 output.

A point the artifact does not have (a layer fused away, an unmatched op) is reported with the
reason, never guessed. Torch-free: the TensorRT device side shares it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# what a point shows
INT8_INPUT = "int8 input"  # the quantized input of an int8 layer (after its Q/DQ)
CLS = "cls token"  # the CLS token a classifier head reads
OUTPUT = "layer output"
RESIDUAL = "residual"  # a ViT block's output: the residual stream
LOGITS = "logits"


@dataclass(frozen=True)
class Point:
    module: str  # PyTorch module name
    side: str  # "input" | "output"
    kind: str  # INT8_INPUT | CLS | OUTPUT | RESIDUAL | LOGITS
    layer: str = ""  # the plan layer the point is found through (a residual: its block's fc2)

    @property
    def key(self) -> str:
        return f"{self.module}:{self.side}"

    def to_dict(self) -> Dict[str, str]:
        return {"key": self.key, "module": self.module, "side": self.side, "kind": self.kind, "layer": self.layer}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Point":
        return cls(str(d["module"]), str(d["side"]), str(d["kind"]), str(d.get("layer", "")))


@dataclass(frozen=True)
class Quant:
    """An activation's integer grid: value = (q - zero_point) * scale, q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def range(self) -> Tuple[float, float]:
        return ((self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale)

    def to_dict(self) -> Dict[str, Any]:
        lo, hi = self.range
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax, "range": [lo, hi]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Quant":
        return cls(float(d["scale"]), int(d["zero_point"]), int(d["qmin"]), int(d["qmax"]))


INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


@dataclass
class GraphOp:
    """One op of an artifact's graph as the matcher sees it."""

    kind: str  # "layer" (weighted), "epilogue" (passes one value on: bias add, Q, DQ), "add", "other"
    inputs: Tuple[str, ...]  # activation inputs (constants left out)
    output: str
    name: str = ""
    weight_shape: Optional[Tuple[int, ...]] = None  # layers: the weight in PyTorch layout
    quant: Optional[Quant] = None  # a dequantize: the grid of the value it writes
    hint: Optional[str] = None  # the layer name the artifact kept on the weight, if any


@dataclass
class Located:
    """Where a point is in the artifact: a tensor name, or why there is none."""

    tensor: Optional[str]
    quant: Optional[Quant] = None
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"tensor": self.tensor, "quant": self.quant.to_dict() if self.quant else None, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Located":
        q = d.get("quant")
        return cls(d.get("tensor"), Quant.from_dict(q) if q else None, str(d.get("note", "")))


def match_layers(layers: Mapping[str, Sequence[int]], ops: Sequence[GraphOp]) -> Dict[str, GraphOp]:
    """Plan layer name -> its weighted op: in order, by weight shape (``layers`` in execution order)."""
    weighted = [op for op in ops if op.kind == "layer"]
    found: Dict[str, GraphOp] = {}
    cursor = 0
    for name, shape in layers.items():
        for j in range(cursor, len(weighted)):
            op = weighted[j]
            if op.hint and op.hint in layers and op.hint != name:
                continue  # the artifact says this weight is another layer's
            if op.weight_shape is not None and tuple(op.weight_shape) == tuple(shape):
                found[name] = op
                cursor = j + 1
                break
    return found


def locate(points: Sequence[Point], layers: Mapping[str, Sequence[int]], ops: Sequence[GraphOp]) -> Dict[str, Located]:
    """Every point's tensor in the artifact whose graph is ``ops`` (see the module docstring)."""
    matched = match_layers(layers, ops)
    producer = {op.output: op for op in ops}
    consumers: Dict[str, List[GraphOp]] = {}
    for op in ops:
        for name in op.inputs:
            consumers.setdefault(name, []).append(op)

    def output_of(op: GraphOp) -> Tuple[str, Optional[Quant]]:
        tensor, quant = op.output, None
        for _ in range(4):  # bias add, output quantize, dequantize
            users = consumers.get(tensor, [])
            if len(users) != 1 or users[0].kind != "epilogue":
                break
            tensor = users[0].output
            quant = users[0].quant or quant
        return tensor, quant

    out: Dict[str, Located] = {}
    for p in points:
        op = matched.get(p.layer)
        if op is None:
            out[p.key] = Located(None, note=f"no weighted op of this artifact matches layer {p.layer} (fused away or folded)")
            continue
        if p.kind == RESIDUAL:
            tensor, _ = output_of(op)
            adds = [u for u in consumers.get(tensor, []) if u.kind == "add"]
            out[p.key] = Located(adds[0].output) if len(adds) == 1 else Located(None, note="no residual add after the block's fc2 in this artifact")
        elif p.side == "output":
            tensor, quant = output_of(op)
            out[p.key] = Located(tensor, quant, "int8 output (the layer writes int8)" if quant else "")
        elif not op.inputs:
            out[p.key] = Located(None, note=f"{op.name or 'the op'} has no activation input")
        else:
            tensor = op.inputs[0]
            source = producer.get(tensor)
            quant = source.quant if source is not None else None
            note = "" if quant or p.kind != INT8_INPUT else f"not quantized in this artifact ({op.name or 'op'} reads it as it is)"
            out[p.key] = Located(tensor, quant, note)
    return out


@dataclass
class ProbeContext:
    """What a probe may need besides its artifact: the fp32 model (torch), the bundle's plan and the
    calibration images (a callable returning numpy batches, or None when not given)."""

    model: Any = None
    plan: Any = None
    calibration_batches: Any = None
    extras: Dict[str, Any] = field(default_factory=dict)


class Probe:
    """Intermediate values of one artifact at located points. ``run`` returns (values by point key,
    logits or None): logits when they come from the same execution as the runner's own ``run``
    (then the report needs no second run), None otherwise."""

    source: str = ""  # where the values come from, for the report
    located: Dict[str, Located]

    def run(self, images: np.ndarray) -> Tuple[Dict[str, np.ndarray], Optional[np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def wanted_tensors(located: Mapping[str, Located]) -> List[str]:
    """The distinct tensor names of the located points, in point order."""
    names: List[str] = []
    for loc in located.values():
        if loc.tensor is not None and loc.tensor not in names:
            names.append(loc.tensor)
    return names
