"""Static check: would this ONNX import into the profile's TensorRT? Operators and opset from the
parser's table, build-time-constant inputs per the table's restrictions, static shapes, data types,
and TensorRT's explicit-quantization rules for Q/DQ nodes. Raises one line naming the first node.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from crossvit_edge.errors import UserError

from .versions import _ONNX_DTYPE, TrtTarget, accepted_dtypes


class TensorRTCheckError(UserError):
    """The ONNX would not import into the profile's TensorRT (names the node)."""


# Inputs the parser needs as build-time constants: the "Restrictions" column of onnx-tensorrt
# docs/operators.md ("`axes` must be an initializer", "must be a constant tensor", "must be a
# build-time constant", "must be resolvable to a constant"). The importers read such an input as
# weights (``inputs.at(i).is_weights()`` / ``ShapeTensor::allValuesKnown``), which an initializer
# and a Constant node's output both are, so both count as constant here.
# op -> {input index: the table's words}
_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare")
# @8.5-GA and @8.6-GA (identical rows): Slice needs only `axes` constant (starts/ends/steps may be
# tensors: the 8.5 Slice importer reads them as ShapeTensors and asserts only on axes).
_CONST_INPUTS_8 = {
    "CumSum": {1: "`axis` must be an initializer"},
    "Slice": {3: "`axes` must be an initializer"},
    "Squeeze": {1: "`axes` must be an initializer"},
    "TopK": {1: "`K` input must be an initializer"},
    "Unsqueeze": {1: "`axes` must be a constant tensor"},
}
# @10.0-GA: TopK's row loses its restriction; Pad (opset 18 axes), OneHot and every Reduce gain one.
_CONST_INPUTS_10_0 = {
    **{k: v for k, v in _CONST_INPUTS_8.items() if k != "TopK"},
    "OneHot": {1: "`depth` must be a build-time constant"},
    "Pad": {3: "`axes` must be an initializer"},
    **{op: {1: "`axes` must be an initializer"} for op in _REDUCE_OPS},
}
# @10.1-GA: 10.0 + Dropout. Also used for 10.2-10.14, which have no table of their own: the
# CHANGELOG announces tensor axes for Slice (10.3) and Pad (10.4) and dynamic axes for
# Squeeze/Unsqueeze (10.7), but no operators.md of those versions says so, and the 10.15 table still
# requires constant Squeeze/Unsqueeze axes; the check keeps the last documented rule.
_CONST_INPUTS_10_1 = {**_CONST_INPUTS_10_0, "Dropout": {2: "`is_training` must be an initializer"}}
# The table headed "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"
# (also used for 10.16 and 11.x): Slice and Pad rows have no restriction any more.
_CONST_INPUTS_10_15 = {
    **{k: v for k, v in _CONST_INPUTS_10_1.items() if k not in ("Slice", "Pad")},
    "Squeeze": {1: "`axes` must be resolvable to a constant"},
    "Unsqueeze": {1: "`axes` must be resolvable to a constant"},
}


def const_input_rules(version) -> Tuple[str, Dict[str, Dict[int, str]]]:
    """(table, {op: {input index: restriction}}) of the ONNX parser of TensorRT ``version``."""
    major, minor = int(version[0]), int(version[1])
    if major < 10:
        return f"onnx-tensorrt docs/operators.md @{major}.{minor}-GA", _CONST_INPUTS_8
    if major == 10 and minor == 0:
        return "onnx-tensorrt docs/operators.md @10.0-GA", _CONST_INPUTS_10_0
    if major == 10 and minor < 15:
        return "onnx-tensorrt docs/operators.md @10.1-GA", _CONST_INPUTS_10_1
    return "onnx-tensorrt docs/operators.md (TensorRT 10.15)", _CONST_INPUTS_10_15


def static_check(model, target: TrtTarget) -> Dict[str, Any]:
    """Check ``model`` against the ONNX parser of ``target``'s TensorRT; raises TensorRTCheckError
    naming the first offending node (and how many more there are), else returns a report."""
    import onnx

    from crossvit_edge.converters.onnx import QDQRuleError, check_qdq_rules, op_counts

    v = target.version
    label = f"TensorRT {target.version_text}"
    parser = target.parser
    violations: List[str] = []
    warnings: List[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if not parser.opset_min <= opset <= parser.opset_max:
        violations.append(f"model opset {opset} is outside {parser.opset_min}-{parser.opset_max}, the range the ONNX parser of {label} supports ({parser.source})")
    graph = model.graph
    const_table, const_rules = const_input_rules(v)
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        where = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            violations.append(f"{where}: op of domain {node.domain!r} needs a TensorRT plugin; {label}'s ONNX parser has no importer for it")
            continue
        if node.op_type not in parser.ops:
            violations.append(f"{where}: {node.op_type} is not supported by the ONNX parser of {label} ({parser.source})")
            continue
        for idx, restriction in const_rules.get(node.op_type, {}).items():
            if idx < len(node.input) and node.input[idx] and node.input[idx] not in consts:
                violations.append(f"{where}: input {idx} ({node.input[idx]!r}) is not a constant; {label}'s parser requires it ({restriction}, {const_table})")
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode not in ("nearest", "linear"):
                warnings.append(f"{where}: Resize mode {mode!r} is not documented for {label} (imported, but check accuracy)")
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            violations.append(f"{where}: only the first output of LayerNormalization is supported")
    try:
        qdq_nodes = check_qdq_rules(model)
    except QDQRuleError as e:
        violations.append(f"{e} ({label} explicit quantization rules)")
        qdq_nodes = None
    # Shapes: static everywhere (no optimisation profiles are built for this fixed-batch model).
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception as e:  # e.g. a custom-domain op without a schema: check what the graph declares
        g = model.graph
        warnings.append(f"ONNX shape inference failed ({str(e).splitlines()[0][:120]}); only declared shapes and types were checked")
    accepted = accepted_dtypes(*v[:2])
    io_names = {t.name for t in list(g.input) + list(g.output)}
    tensors = [("input", vi) for vi in g.input] + [("output", vi) for vi in g.output] + [("tensor", vi) for vi in g.value_info]
    for kind, vi in tensors:
        tt = vi.type.tensor_type
        if kind != "tensor" and not tt.HasField("shape"):
            violations.append(f"graph {kind} {vi.name!r}: no shape (TensorRT needs static shapes here)")
            continue
        if tt.HasField("shape"):
            dims = list(tt.shape.dim)
            if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
                shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                violations.append(f"{kind} {vi.name!r}: dynamic shape {shown} (the bundle is built for fixed shapes)")
        et = tt.elem_type
        if et and et not in accepted:
            violations.append(f"{kind} {vi.name!r}: data type {_ONNX_DTYPE.get(et, et)} is rejected by {label}'s ONNX parser ('Unsupported ONNX data type')")
        elif et == 2 and v[0] >= 10 and vi.name not in io_names:
            violations.append(f"tensor {vi.name!r}: UINT8 is only supported as a network input or output in {label}")
        elif et == 11:
            warnings.append(f"{kind} {vi.name!r}: DOUBLE is cast down to FLOAT by {label}")
        elif et == 7 and v[0] < 10:
            warnings.append(f"{kind} {vi.name!r}: INT64 is cast down to INT32 by {label}")
    for init in graph.initializer:
        if init.data_type not in accepted:
            violations.append(f"initializer {init.name!r}: data type {_ONNX_DTYPE.get(init.data_type, init.data_type)} is rejected by {label}'s ONNX parser")
        elif init.data_type == 11:
            warnings.append(f"initializer {init.name!r}: DOUBLE is cast down to FLOAT by {label}")
        elif init.data_type == 7 and v[0] < 10:
            from onnx import numpy_helper

            values = numpy_helper.to_array(init)
            if values.size and (values.max() > np.iinfo(np.int32).max or values.min() < np.iinfo(np.int32).min):
                warnings.append(f"initializer {init.name!r}: INT64 values outside int32 are clamped by {label} (fine for Slice ends)")
            else:
                warnings.append(f"initializer {init.name!r}: INT64 is cast down to INT32 by {label}")
    for node in graph.node:
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            if t is not None and t.data_type not in accepted:
                violations.append(f"node {node.name!r} (Constant): data type {_ONNX_DTYPE.get(t.data_type, t.data_type)} is rejected by {label}'s ONNX parser")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and to not in accepted:
                violations.append(f"node {node.name!r} (Cast): casts to {_ONNX_DTYPE.get(to, to)}, which {label} rejects")
    if violations:
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        raise TensorRTCheckError(f"{label} static check failed: {violations[0]}{more}")
    plain = [w for w in warnings if w.endswith(f"INT64 is cast down to INT32 by {label}") or w.endswith(f"INT64 is cast down to INT32 (clamped) by {label}")]
    warnings = [w for w in warnings if w not in plain] + ([f"{len(plain)} INT64 tensors/initializers are cast down to INT32 by {label}"] if plain else [])
    return {
        "passed": True,
        "tensorrt_version": target.version_text,
        "parser": parser.source,
        "parser_table_derived": parser.derived,
        "constant_input_rules": const_table,
        "opset": opset,
        "opset_range": [parser.opset_min, parser.opset_max],
        "nodes": len(graph.node),
        "op_counts": op_counts(model),
        "qdq_nodes": qdq_nodes,
        "warnings": warnings,
    }


