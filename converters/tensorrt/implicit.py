"""Implicit INT8 (an option for TensorRT 8.5-10.x; every shipped profile uses explicit Q/DQ): the
ranges that let TensorRT run a layer in INT8 without Q/DQ nodes, and an honest account of which
layers get them.

TensorRT runs a layer in INT8 only when every tensor it consumes *and* produces has a dynamic range;
otherwise it falls back to a float kernel for that layer, with a warning and no error. So:

* ``activation_amax`` (conversion time) runs the fp32 build graph in ONNX Runtime with every float
  tensor of the graph exposed as an output, and records max |x| of each over the calibration
  images. The inputs of the plan's int8 layers keep the plan's calibrated range (auto, entropy,
  percentile, ...). The calibration cache then names every activation tensor of the ONNX graph.
* ``dynamic_ranges`` (on the device, torch- and onnx-free) extends those ranges to the tensors
  TensorRT itself creates while parsing, which no cache can name: a constant layer's output (a
  MatMul weight, a bias) gets the max |value| of its weights, a Shuffle's output (the 8.5 parser
  reshapes a 2-D MatMul weight for broadcasting) gets its input's range. The device builder sets
  them all with ``ITensor.set_dynamic_range`` and reports what is still unranged.
* ``onnx_int8_report`` (conversion time) says, per ONNX node, whether it can run INT8 with the
  Python builder and with trtexec (which only reads the cache, so every node fed by a constant
  tensor stays float there), and which are pinned to fp32.

``docs/tensorrt_int8.md`` explains the choice between the modes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from crossvit_edge.errors import UserError

# A range must be positive for TensorRT and for the cache; an all-zero tensor gets this one.
MIN_AMAX = 1e-8
_FLOAT_TYPES = (1, 10)  # ONNX FLOAT, FLOAT16
# ONNX ops whose constant inputs are layer weights in TensorRT (kernels, not tensors): no range needed.
_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2)}


# --------------------------------------------------------------------------------------------------
# Device side: ranges for the parsed network (plain data in, plain data out)


@dataclass
class NetLayer:
    """One layer of a parsed TensorRT network, as plain data (``device.describe_network``)."""

    name: str
    kind: str  # TensorRT LayerType name: "CONSTANT", "SHUFFLE", "MATRIX_MULTIPLY", ...
    inputs: List[str]  # the float tensors it reads
    outputs: List[str]  # the float tensors it writes
    weights_amax: Optional[float] = None  # constants: max |value| of the weights


@dataclass
class RangePlan:
    ranges: Dict[str, Tuple[float, str]] = field(default_factory=dict)  # tensor -> (amax, where from)
    int8_layers: List[str] = field(default_factory=list)  # every float tensor ranged
    float_layers: Dict[str, str] = field(default_factory=dict)  # layer -> why it cannot run INT8

    def summary(self) -> Dict[str, Any]:
        sources: Dict[str, int] = {}
        for _, source in self.ranges.values():
            sources[source] = sources.get(source, 0) + 1
        unranged = sorted({why for why in self.float_layers.values() if why.startswith("no range")})
        return {
            "tensors_ranged": len(self.ranges),
            "ranges_from": sources,
            "layers_int8_possible": len(self.int8_layers),
            "layers_float": len(self.float_layers),
            "float_layers": dict(list(self.float_layers.items())[:50]),
            "unranged_examples": unranged[:10],
        }

    def warnings(self) -> List[str]:
        missing = {k: v for k, v in self.float_layers.items() if v.startswith("no range")}
        if not missing:
            return []
        first = next(iter(missing.items()))
        return [f"{len(missing)} layers have a tensor without a dynamic range and will run in float (first: {first[0]}: {first[1]})"]


def dynamic_ranges(layers: Sequence[NetLayer], network_inputs: Sequence[str], amax: Mapping[str, float],
                   fp32_prefix: Optional[str] = None) -> RangePlan:
    """The dynamic range (amax, symmetric) of every float tensor of the network that can get one:
    from ``amax`` (the cache: ONNX tensor names, which the parser keeps for node outputs and graph
    inputs), from a constant's weights, or from a Shuffle's input. Layers are visited in network
    order (the parser adds them in topological order). Then each non-constant layer is classified:
    INT8 possible (all its float tensors ranged), pinned to fp32, or float for lack of a range."""
    plan = RangePlan()
    for name in network_inputs:
        if name in amax:
            plan.ranges[name] = (max(float(amax[name]), MIN_AMAX), "cache")
    for layer in layers:
        for t in layer.outputs:
            if t in plan.ranges:
                continue
            if t in amax:
                plan.ranges[t] = (max(float(amax[t]), MIN_AMAX), "cache")
            elif layer.kind == "CONSTANT" and layer.weights_amax is not None:
                plan.ranges[t] = (max(float(layer.weights_amax), MIN_AMAX), "constant weights")
            elif layer.kind == "SHUFFLE" and layer.inputs and layer.inputs[0] in plan.ranges:
                plan.ranges[t] = (plan.ranges[layer.inputs[0]][0], "shuffle input")
    for layer in layers:
        if layer.kind == "CONSTANT":
            continue  # data, not computation
        if fp32_prefix and layer.name.startswith(fp32_prefix):
            plan.float_layers[layer.name] = "pinned to fp32"
            continue
        missing = [t for t in list(layer.inputs) + list(layer.outputs) if t not in plan.ranges]
        if missing:
            plan.float_layers[layer.name] = f"no range for {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        else:
            plan.int8_layers.append(layer.name)
    return plan


# --------------------------------------------------------------------------------------------------
# Conversion side: ranges of every activation tensor, and the per-node report


def float_activations(model) -> List[str]:
    """Every float tensor of the graph that is not a constant: the graph inputs and every node
    output (in graph order), from ONNX shape inference's types."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    consts = {i.name for i in g.initializer}
    names: List[str] = []
    for vi in g.input:
        if vi.name not in consts and types.get(vi.name) in _FLOAT_TYPES:
            names.append(vi.name)
    for node in g.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if out and types.get(out) in _FLOAT_TYPES and out not in names:
                names.append(out)
    return names


def activation_amax(model, batches: Iterable[np.ndarray]) -> Tuple[Dict[str, float], int]:
    """(max |x| of every float activation tensor, number of images) over ``batches`` (float32, any
    batch size; re-chunked to the model's fixed batch size, the last chunk padded by repeating its
    last image). ONNX Runtime runs with graph optimisation off, so every tensor of the graph exists
    as written and is exposed as an extra graph output."""
    import onnx
    import onnxruntime as ort

    names = float_activations(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    b = int(inp.shape[0]) if isinstance(inp.shape[0], int) else 1
    amax = {name: 0.0 for name in names}
    seen = 0
    pending: List[np.ndarray] = []

    def run(chunk: np.ndarray) -> None:
        values = session.run(names, {inp.name: chunk})
        for name, v in zip(names, values):
            v = np.asarray(v)
            if v.size:
                amax[name] = max(amax[name], float(np.max(np.abs(v.astype(np.float32)))))

    for x in batches:
        x = np.asarray(x, np.float32)
        seen += len(x)
        pending.extend(list(x))
        while len(pending) >= b:
            chunk, pending = np.stack(pending[:b]), pending[b:]
            run(chunk)
    if pending:
        run(np.stack(pending + [pending[-1]] * (b - len(pending))))
    if seen == 0:
        raise UserError("implicit INT8 needs calibration images (--calib-data DIR): the range of every tensor comes from running the fp32 graph on them")
    return amax, seen


def onnx_int8_report(model, activations: Sequence[str], ranged: Iterable[str], fp32_prefix: Optional[str]) -> Dict[str, Any]:
    """Which ONNX nodes of the build graph can run INT8 under each builder:

    * Python builder (``python -m crossvit_edge.converters.tensorrt.device --build``): every activation tensor
      has a range from the cache and every constant tensor one from its values, so every node can,
      except the pinned fp32 ones;
    * trtexec (``build_engine.sh``): ranges only what the cache names; a node that reads a
      constant tensor (a MatMul weight, a bias, a LayerNorm scale) cannot, because TensorRT's tensor
      for that constant has no name the cache could use.
    Whether TensorRT then picks an INT8 kernel for a node that can is its own choice, per layer; the
    engine's layer information (``<model>.layers.json``) shows what it did."""
    ranged = set(ranged)
    floats = set(activations)
    graph = model.graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    float_consts = {i.name for i in graph.initializer if i.data_type in _FLOAT_TYPES} | {
        o for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value" and a.t.data_type in _FLOAT_TYPES for o in n.output}
    pinned: List[str] = []
    python_ok: List[str] = []
    trtexec_float: Dict[str, str] = {}
    unranged: List[str] = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        name = node.name or node.output[0]
        if fp32_prefix and name.startswith(fp32_prefix):
            pinned.append(name)
            continue
        weight_inputs = _WEIGHT_INPUTS.get(node.op_type, ())
        acts = [t for t in list(node.input) + list(node.output) if t in floats]
        if not acts:
            continue  # shape arithmetic (int64), not float computation
        missing = [t for t in acts if t not in ranged]
        if missing:
            unranged.append(f"{name}: {missing[0]}")
            continue
        python_ok.append(name)
        const_tensors = [t for i, t in enumerate(node.input) if t in consts and i not in weight_inputs and t in float_consts]
        if const_tensors:
            trtexec_float[name] = f"constant input {const_tensors[0]} has no range under trtexec"
    return {
        "nodes": len(pinned) + len(python_ok) + len(unranged),
        "python_builder": {"int8_possible": len(python_ok), "pinned_fp32": len(pinned), "unranged": unranged[:20]},
        "trtexec": {"int8_possible": len(python_ok) - len(trtexec_float), "pinned_fp32": len(pinned),
                    "float_for_lack_of_range": len(trtexec_float), "examples": dict(list(trtexec_float.items())[:10])},
        "note": "nodes whose every tensor has a range may run INT8; TensorRT picks per layer (see the engine's layer information)",
    }
