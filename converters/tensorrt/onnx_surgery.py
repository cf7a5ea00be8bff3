"""ONNX surgery for TensorRT: the LayerNorm decomposition TensorRT 8.5 needs (its parser has no
LayerNormalization importer), and the Q/DQ graph turned back into the plain float graph that
implicit INT8 builds from.

Why each transform looks the way it does: ``docs/tensorrt_int8.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from crossvit_edge.errors import UserError

from .versions import FP32_PREFIX

def _const_array(graph, name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def decompose_layernorm(model, prefix: str = FP32_PREFIX) -> List[str]:
    """Replace every LayerNormalization (in place) with an fp32 subgraph whose node names start with
    ``prefix``; returns the new node names (the TensorRT layer names to pin to fp32).

    mean = ReduceMean(x); d = x - mean; var = ReduceMean(d * d); y = d / Sqrt(var + eps) * g + b.
    Scale, bias and epsilon become initializers of the input's rank, so no broadcast Shuffle layer is
    inserted between them and the pinned layers. ReduceMean takes ``axes`` as an attribute (opset
    <= 17, the range TensorRT 8.5 parses)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 18:
        raise UserError(f"LayerNorm decomposition is written for opset <= 17 (ReduceMean axes attribute), got {opset}")
    lns = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "LayerNormalization"]
    if not lns:
        return []
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             if vi.type.tensor_type.HasField("shape")}
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    pinned: List[str] = []
    new_inits = []
    replacements: Dict[int, List[Any]] = {}
    for k, (position, ln) in enumerate(lns):
        where = f"LayerNormalization node {ln.name or ln.output[0]!r}"
        if any(o and o in used for o in list(ln.output)[1:]):
            raise UserError(f"{where}: its Mean/InvStdDev outputs are used; TensorRT only supports the first output")
        x = ln.input[0]
        rank = ranks.get(x)
        if rank is None:
            raise UserError(f"{where}: the rank of its input is unknown (shape inference failed)")
        attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
        axis = int(attrs.get("axis", -1)) % rank
        eps = float(attrs.get("epsilon", 1e-5))
        axes = list(range(axis, rank))
        p = f"{prefix}{k}_"

        def const(suffix: str, value: np.ndarray) -> str:
            name = p + suffix
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
            return name

        def affine(src: Optional[str], suffix: str) -> Optional[str]:
            if not src:
                return None
            arr = _const_array(graph, src)
            if arr is None:
                raise UserError(f"{where}: its {suffix} is not an initializer")
            shape = [1] * axis + list(arr.shape) if arr.ndim == rank - axis else list(arr.shape)
            return const(suffix, arr.reshape(shape))

        gamma = affine(ln.input[1] if len(ln.input) > 1 else None, "gamma")
        beta = affine(ln.input[2] if len(ln.input) > 2 else None, "beta")
        eps_name = const("eps", np.full([1] * rank, eps, dtype=np.float32))
        y = ln.output[0]
        t = {s: p + s + "_out" for s in ("mean", "d", "sq", "var", "ve", "std", "norm", "scaled")}
        nodes = [
            helper.make_node("ReduceMean", [x], [t["mean"]], name=p + "mean", axes=axes, keepdims=1),
            helper.make_node("Sub", [x, t["mean"]], [t["d"]], name=p + "sub"),
            helper.make_node("Mul", [t["d"], t["d"]], [t["sq"]], name=p + "square"),
            helper.make_node("ReduceMean", [t["sq"]], [t["var"]], name=p + "var", axes=axes, keepdims=1),
            helper.make_node("Add", [t["var"], eps_name], [t["ve"]], name=p + "add_eps"),
            helper.make_node("Sqrt", [t["ve"]], [t["std"]], name=p + "sqrt"),
        ]
        last_in = t["norm"]
        nodes.append(helper.make_node("Div", [t["d"], t["std"]], [t["norm"] if (gamma or beta) else y], name=p + "div"))
        if gamma and beta:
            nodes.append(helper.make_node("Mul", [last_in, gamma], [t["scaled"]], name=p + "mul_gamma"))
            nodes.append(helper.make_node("Add", [t["scaled"], beta], [y], name=p + "add_beta"))
        elif gamma:
            nodes.append(helper.make_node("Mul", [last_in, gamma], [y], name=p + "mul_gamma"))
        elif beta:
            nodes.append(helper.make_node("Add", [last_in, beta], [y], name=p + "add_beta"))
        replacements[position] = nodes
        pinned.extend(n.name for n in nodes)
    rebuilt = []
    for i, node in enumerate(graph.node):
        rebuilt.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    return pinned


def _drop_unused_initializers(model) -> None:
    graph = model.graph
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    vis = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vis)


@dataclass
class Int8LayerIO:
    """Where one int8 layer of the plan sits in the exported Q/DQ graph."""

    layer: str
    op_type: str  # MatMul / Conv / Gemm
    node: str  # the weighted node
    activation: str  # the tensor the layer quantizes (input of its QuantizeLinear)
    weight_int8: str  # initializer of the int8 weight
    weight_dq: str  # output of the weight's DequantizeLinear
    act_q: str  # QuantizeLinear node name
    act_dq_out: str  # output of the activation DequantizeLinear


def int8_layer_io(model, plan) -> List[Int8LayerIO]:
    """Map each int8 layer of ``plan`` to its nodes in the Q/DQ export: the int8 weight initializer
    (``<layer>.weight_int8``, a buffer name the exporter keeps) -> its DequantizeLinear -> the
    weighted node -> that node's other input, a DequantizeLinear of a QuantizeLinear whose input is
    the activation tensor. Names (not scales) tie them, so equal scales cannot be confused."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inits = {i.name for i in graph.initializer}
    out: List[Int8LayerIO] = []
    for layer in plan.int8_layers():
        wname = next((i for i in inits if i == f"{layer.name}.weight_int8" or i.endswith(f".{layer.name}.weight_int8")), None)
        if wname is None:
            raise UserError(f"int8 layer {layer.name}: no initializer {layer.name}.weight_int8 in the exported Q/DQ graph")
        wdq = next((n for n in consumers.get(wname, []) if n.op_type == "DequantizeLinear"), None)
        if wdq is None:
            raise UserError(f"int8 layer {layer.name}: its int8 weight has no DequantizeLinear")
        users = [n for n in consumers.get(wdq.output[0], []) if n.op_type in ("MatMul", "Conv", "Gemm")]
        if len(users) != 1:
            raise UserError(f"int8 layer {layer.name}: expected one MatMul/Conv/Gemm after the weight DequantizeLinear, found {len(users)}")
        node = users[0]
        act_in = next(i for i in node.input[:2] if i != wdq.output[0])
        adq = producers.get(act_in)
        aq = producers.get(adq.input[0]) if adq is not None and adq.op_type == "DequantizeLinear" else None
        if aq is None or aq.op_type != "QuantizeLinear":
            raise UserError(f"int8 layer {layer.name}: node {node.name!r} has no QuantizeLinear/DequantizeLinear on its activation input")
        out.append(Int8LayerIO(layer.name, node.op_type, node.name, aq.input[0], wname, wdq.output[0], aq.name, adq.output[0]))
    return out


def strip_qdq(model, ios: Sequence[Int8LayerIO], float_weights: Dict[str, np.ndarray]) -> Dict[str, str]:
    """Turn the Q/DQ graph (in place) into the plain float graph TensorRT's implicit mode wants:
    activation Q->DQ pairs are removed (consumers read the activation again) and each int8 weight
    with its DequantizeLinear becomes the layer's original float weight ``float_weights[layer]``
    (Linear: (in, out); Conv: (out, in, kh, kw)). Tensor names of the activations are unchanged, so
    the calibration cache can name them. Returns layer -> float weight initializer name."""
    from onnx import numpy_helper

    graph = model.graph
    producers = {n.output[0]: n for n in graph.node if n.output}
    rename: Dict[str, str] = {}  # tensor produced by a removed node -> the tensor to read instead
    removed = set()  # first outputs (unique in SSA) of the nodes to remove
    weight_names: Dict[str, str] = {}
    taken = {i.name for i in graph.initializer}
    for io in ios:
        w = np.ascontiguousarray(float_weights[io.layer], dtype=np.float32)
        name = f"{io.layer}.weight"
        while name in taken:
            name += "_fp32"
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(w, name))
        rename[io.weight_dq] = name
        removed.add(io.weight_dq)
        weight_names[io.layer] = name
    # Every activation DequantizeLinear(QuantizeLinear(x)) goes, whichever layers share x.
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = producers.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                rename[n.output[0]] = q.input[0]
                removed.update((n.output[0], q.output[0]))
    keep = [n for n in graph.node if not (n.output and n.output[0] in removed)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(model)
    left = [n.name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if left:
        raise UserError(f"Q/DQ nodes outside the plan's layers remain in the graph: {', '.join(left[:3])}")
    return weight_names


