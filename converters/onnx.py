"""ONNX target: fp32, fp16 and int8 (explicit Q/DQ, TensorRT's rules) graphs, run by ONNX Runtime.

Export goes through ``torch.onnx.export(dynamo=True)`` at a fixed batch size, one input ``image``
(float32, NCHW) and one output ``logits`` (float32). fp16 graphs keep float32 I/O and run LayerNorm
and Softmax in fp32 (the model casts around them). int8 graphs are the plan applied in PyTorch
(``crossvit_edge.calibration.qdq``) and exported with the two Q/DQ custom ops translated to QuantizeLinear /
DequantizeLinear, so every Q/DQ node sits exactly where the plan says, keyed by module name.

The module also holds the checks that the TensorRT target reuses: ``onnx.checker`` and
``check_qdq_rules`` (int8, zero point 0, positive finite scales, per-channel only on weights along
the right axis).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from crossvit_edge.convert_flags import TARGET_PRECISIONS
from crossvit_edge.errors import UserError, brief
# the int8 forms' closed lists live with the profile schema that offers them: one source
from crossvit_edge.device_profiles import ONNX_ACTIVATION_DTYPES as ACTIVATION_DTYPES
from crossvit_edge.device_profiles import ONNX_INT8_FORMS as INT8_FORMS

from .base import Artifact, Converter, Runner

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17


# --------------------------------------------------------------------------------------------------
# Export


def _translation_table():
    """ONNX translations of the Q/DQ custom ops of ``crossvit_edge.calibration.qdq``."""
    import torch
    from onnxscript import opset18 as op

    import crossvit_edge.calibration.qdq  # noqa: F401  (registers the custom ops)

    def quantize_dequantize(x, scale, zero_point):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point), scale, zero_point)

    def dequantize(w, scale, zero_point, axis: int):
        return op.DequantizeLinear(w, scale, zero_point, axis=axis)

    return {
        torch.ops.crossvit_edge.quantize_dequantize.default: quantize_dequantize,
        torch.ops.crossvit_edge.dequantize.default: dequantize,
    }


def export_onnx(model, path: Path, batch_size: int, opset: int = DEFAULT_OPSET, fp16: bool = False, metadata: Optional[Dict[str, str]] = None):
    """Export ``model`` (fp32, or already Q/DQ) to ``path``; returns the loaded ONNX model."""
    import copy

    import onnx
    import torch

    model = copy.deepcopy(model).eval()
    size = model.config.img_size if hasattr(model, "config") else model.inner.config.img_size
    if fp16:
        from crossvit_edge.crossvit import fp16_inside

        model = fp16_inside(model)  # float32 in and out (LayerNorm / softmax stay fp32 inside the model)
    example = (torch.zeros(batch_size, 3, size, size),)
    # The exporter writes progress and version-conversion chatter through print and warnings.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            example,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
            custom_translation_table=_translation_table(),
        )
    proto = program.model_proto
    opset_found = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset_found != opset:
        proto = onnx.version_converter.convert_version(proto, opset)
    _strip_leftovers(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "crossvit_edge"
    onnx.checker.check_model(proto, full_check=True)
    tmp = Path(str(path) + ".tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return proto


def _strip_leftovers(proto) -> None:
    """Remove Identity nodes (rewiring their consumers); dropout is never exported in eval mode."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity"]:
        src, dst = node.input[0], node.output[0]
        if dst in outputs:
            continue
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == dst:
                    other.input[i] = src
        graph.node.remove(node)


# --------------------------------------------------------------------------------------------------
# Checks


class QDQRuleError(UserError):
    pass


def _const_values(graph) -> Dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def check_qdq_rules(model) -> int:
    """Enforce TensorRT's explicit-quantization rules on every Q/DQ node; returns how many there
    are. A violation raises ``QDQRuleError`` naming the node:

    * zero point present, int8, exactly 0; scale a constant, positive and finite;
    * per-tensor (scalar) scales on activations; per-channel scales only on weights (a DQ whose
      input is an int8 constant), along axis 0 for Conv weights and the output axis (1) for MatMul
      weights, with one scale per channel;
    * activation Q/DQ pairs carry the same scale on both sides.
    """
    graph = model.graph
    consts = _const_values(graph)
    consumers: Dict[str, List[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    count = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if len(node.input) < 3 or not node.input[2]:
            raise QDQRuleError(f"{where}: no zero point (TensorRT needs an explicit int8 zero point of 0)")
        scale_name, zp_name = node.input[1], node.input[2]
        if scale_name not in consts:
            raise QDQRuleError(f"{where}: scale {scale_name!r} is not a constant")
        if zp_name not in consts:
            raise QDQRuleError(f"{where}: zero point {zp_name!r} is not a constant")
        scale, zp = consts[scale_name], consts[zp_name]
        if zp.dtype != np.int8:
            raise QDQRuleError(f"{where}: zero point is {zp.dtype}, TensorRT needs int8")
        if np.any(zp != 0):
            raise QDQRuleError(f"{where}: non-zero zero point (TensorRT quantization is symmetric)")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise QDQRuleError(f"{where}: scales must be positive and finite")
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in consts
        if is_weight:
            w = consts[node.input[0]]
            if w.dtype != np.int8:
                raise QDQRuleError(f"{where}: weight is {w.dtype}, TensorRT needs int8")
            if w.size and (w.max() > 127 or w.min() < -127):
                raise QDQRuleError(f"{where}: int8 weights must lie in [-127, 127]")
            if scale.ndim == 1 and scale.size > 1:
                ax = axis % w.ndim
                if w.shape[ax] != scale.size:
                    raise QDQRuleError(f"{where}: {scale.size} scales for axis {axis} of a weight shaped {list(w.shape)}")
                users = consumers.get(node.output[0], [])
                for user in users:
                    wanted = {"Conv": 0, "ConvTranspose": 1, "MatMul": w.ndim - 1, "Gemm": None}.get(user.op_type)
                    if user.op_type == "Gemm":
                        trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
                        wanted = 0 if trans_b else 1
                    if wanted is None:
                        raise QDQRuleError(f"{where}: per-channel weight feeds a {user.op_type}, not a Conv/MatMul/Gemm")
                    if ax != wanted:
                        raise QDQRuleError(
                            f"{where}: per-channel axis {axis} for a {user.op_type} weight; the output-channel axis is {wanted}"
                        )
        else:
            if scale.size != 1:
                raise QDQRuleError(f"{where}: per-channel scales on an activation (TensorRT allows per-tensor only)")
            if node.op_type == "QuantizeLinear":
                for user in consumers.get(node.output[0], []):
                    if user.op_type == "DequantizeLinear" and user.input[1] in consts:
                        if not np.array_equal(consts[user.input[1]], scale):
                            raise QDQRuleError(f"{where}: its DequantizeLinear {user.name!r} uses another scale")
        if node.op_type == "QuantizeLinear" and len(node.output) and zp.dtype == np.int8:
            pass
    return count


def op_counts(model) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------------
# ONNX Runtime's CPU int8 form (docs/cpu_int8.md)

# int8_form: which int8 graph an ONNX bundle carries (profile key ``onnx.int8_form``).
#   tensorrt         TensorRT's explicit quantization (int8 symmetric activations, float bias):
#                    the graph the TensorRT target builds from; ORT's x86 CPU EP runs it as float GEMMs.
#   ort-cpu          the same plan and ranges in the layout ORT's CPU EP fuses into integer GEMMs:
#                    activation Q/DQ in ``activation_dtype`` (uint8 with zero point 128 is the same
#                    grid as int8 with zero point 0), each int8 GEMM's bias as an int32 DQ.
#   ort-cpu-dynamic  the plan's layers as DynamicQuantizeMatMul: activation ranges taken per run.


def check_choice(key: str, value: Any, choices) -> Any:
    """``value`` is one of ``choices`` (a closed list from a profile, a spec or a manifest)."""
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {brief(value, 40)}")
    return value
# ops that compute a GEMM on integers, as ORT's optimized graph names them
INTEGER_GEMM_OPS = ("QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearConv", "ConvInteger")
_FLOAT_GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul")
# float convolutions as ORT's optimized graph names them: where MLAS has an NHWC kernel (aarch64
# with SME, measured under qemu -cpu max) its NHWC transformer rewrites Conv to com.microsoft
# NhwcFusedConv, still fed by the input's DequantizeLinear
_FLOAT_CONV_OPS = ("Conv", "FusedConv", "NhwcConv", "NhwcFusedConv")


def _producers(graph) -> Dict[str, Any]:
    """Tensor name -> the node that writes it."""
    return {o: n for n in graph.node for o in n.output}


def _int8_gemms(graph, consts, producer=None):
    """(MatMul node, activation Q, activation DQ, weight DQ, bias Add or None) of every int8 layer
    of a TensorRT form graph: MatMul(DQ(Q(x)), DQ(int8 weight)), optionally followed by
    Add(constant bias)."""
    producer = producer if producer is not None else _producers(graph)
    consumers: Dict[str, List[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        act, weight = producer.get(node.input[0]), producer.get(node.input[1])
        if not (act is not None and weight is not None and act.op_type == weight.op_type == "DequantizeLinear"):
            continue
        quantize = producer.get(act.input[0])
        if weight.input[0] not in consts or quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        users = consumers.get(node.output[0], [])
        add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        if add is not None:
            bias_name = next((i for i in add.input if i != node.output[0]), None)
            n_out = consts[weight.input[0]].shape[-1]
            if bias_name not in consts or consts[bias_name].shape != (n_out,):
                add = None
        found.append((node, quantize, act, weight, add))
    return found


def _attention_matmuls(graph, consts, producer=None):
    """(MatMul, (Q, DQ) of input 0, (Q, DQ) of input 1) of every matmul of two quantized
    activations: the self-attention q k^T and probs v under the plan's int8 attention option."""
    producer = producer if producer is not None else _producers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        pairs = []
        for name in node.input[:2]:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is None or q.op_type != "QuantizeLinear" or dq.input[0] in consts:
                break
            pairs.append((q, dq))
        else:
            found.append((node, pairs[0], pairs[1]))
    return found


def _drop_unused(graph) -> None:
    """Remove Q/DQ nodes nobody reads and initializers nobody uses."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def to_ort_cpu_form(model, form: str = "ort-cpu", activation_dtype: str = "uint8"):
    """Rewrite a TensorRT-form int8 graph (``export_for_precision(..., "int8")``) in place into
    ``form``; the same layers stay int8 with the same weights and (for ``ort-cpu``) the same
    activation ranges. Returns (int8 GEMMs rewritten, int8 attention matmuls).

    Why each change (ORT's QDQ selectors, onnxruntime/core/optimizer/qdq_transformer):
    * activations: ``uint8`` (the default) with zero point 128 and the same scale is the TensorRT
      grid shifted by 128, the form ORT's x86 kernels take; ``int8`` keeps the TensorRT grid as it
      is, which ARM fuses directly (``QDQIsInt8Allowed()``, S8S8 dot-product kernels). x86 fuses
      that form too: ORT first rewrites each int8 activation Q/DQ pair to uint8 (its QDQ S8-to-U8
      transformer; measured with ORT 1.32: the same QGemm count as the uint8 form, no DQ left on a
      GEMM path), at the cost of the extra rewrite.
    * ORT first folds MatMul + Add into Gemm; the Gemm selector fuses into QGemm only when every
      input is a DQ, so the bias becomes DQ(int32 round(b / (s_x * s_w)), s_x * s_w), the bias
      form of ORT's own quantizer (error below half a unit of s_x * s_w).
    * a Conv fuses only with a quantized output (QLinearConv), which the plan does not have: the
      patch-embedding weights are stored dequantized (the same float values the DQ computes, and
      ORT does not recompute a DQ on every run); the input Q/DQ stays, so the semantics hold.
    * attention matmuls (the plan's int8 attention option: MatMul(DQ(Q(a)), DQ(Q(b)))) become
      MatMulIntegerToFloat when their left operand is uint8; the right operand (k^T, v) may stay
      int8 on x86 (only the left one must be uint8), and keeping it int8 with zero point 0 keeps the
      TensorRT grid and MLAS's u8s8 kernels (VNNI). The softmax output, range [0, 1], takes the
      uint8 grid of step 1/255 with zero point 0 instead of int8's 1/127.
    """
    from onnx import TensorProto, helper, numpy_helper

    if form not in INT8_FORMS[1:]:
        raise ValueError(f"not an ORT CPU int8 form: {form!r}")
    check_choice("onnx.activation_dtype", activation_dtype, ACTIVATION_DTYPES)
    graph = model.graph
    consts = _const_values(graph)
    # read once, before the rewrite: every lookup below is of a node the rewrite keeps (Q/DQ,
    # Softmax, the conv weights' DQ), never of the MatMul / Add nodes it removes
    producer = _producers(graph)
    gemms = _int8_gemms(graph, consts, producer)
    attention = _attention_matmuls(graph, consts, producer)
    new_inits = []
    prologue = []  # nodes reading only initializers: placed first, which keeps the graph sorted
    for node, quantize, act, weight, add in gemms:
        w_scale = consts[weight.input[1]].astype(np.float64)
        if form == "ort-cpu-dynamic":
            bias = next((i for i in add.input if i != node.output[0]), "") if add is not None else ""
            out = add.output[0] if add is not None else node.output[0]
            dyn = helper.make_node(
                "DynamicQuantizeMatMul", [quantize.input[0], weight.input[0], weight.input[1], weight.input[2], bias], [out],
                domain="com.microsoft", name=f"{node.name}_dynamic")
            graph.node.insert(list(graph.node).index(node), dyn)
            graph.node.remove(node)
            if add is not None:
                graph.node.remove(add)
            continue
        if add is not None:
            bias_name = next(i for i in add.input if i != node.output[0])
            x_scale = float(consts[act.input[1]])
            scale = (x_scale * w_scale).astype(np.float32)
            q = np.clip(np.round(consts[bias_name].astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
            base = f"{node.name}_bias"
            new_inits += [numpy_helper.from_array(q, f"{base}_int32"), numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(np.zeros_like(q), f"{base}_zero_point")]
            prologue.append(helper.make_node("DequantizeLinear", [f"{base}_int32", f"{base}_scale", f"{base}_zero_point"],
                                             [f"{base}_dq"], axis=0, name=f"{base}_dq"))
            add.input[list(add.input).index(bias_name)] = f"{base}_dq"
    # Conv weights: dequantized once, here
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        dq = producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in consts:
            continue
        w, s = consts[dq.input[0]], consts[dq.input[1]].astype(np.float32)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % w.ndim
        shape = [1] * w.ndim
        shape[axis] = -1
        name = f"{conv.name}_weight_dequantized"
        new_inits.append(numpy_helper.from_array((w.astype(np.float32) * s.reshape(shape)).astype(np.float32), name))
        conv.input[1] = name
    if activation_dtype == "uint8":
        zp = "activation_zero_point_uint8_128"
        new_inits.append(helper.make_tensor(zp, TensorProto.UINT8, [], [128]))
        for node in graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in consts:
                node.input[2] = zp
        if attention:
            zp_s8 = "activation_zero_point_int8_0"
            new_inits.append(helper.make_tensor(zp_s8, TensorProto.INT8, [], [0]))
            for _matmul, _a, (q_b, dq_b) in attention:
                q_b.input[2] = dq_b.input[2] = zp_s8  # right operand: the TensorRT grid as it is
    if attention:  # the softmax output: uint8, step 1/255 (a uint8 left operand fuses on every platform)
        zp_u8, probs_scale = "activation_zero_point_uint8_0", "softmax_output_scale_uint8"
        new_inits += [helper.make_tensor(zp_u8, TensorProto.UINT8, [], [0]), numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), probs_scale)]
        for _matmul, (q_a, dq_a), _b in attention:
            source = producer.get(q_a.input[0])
            if source is not None and source.op_type == "Softmax":
                q_a.input[1] = dq_a.input[1] = probs_scale
                q_a.input[2] = dq_a.input[2] = zp_u8
    graph.initializer.extend(new_inits)
    for n in reversed(prologue):
        graph.node.insert(0, n)
    if form == "ort-cpu-dynamic" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del graph.value_info[:]  # recorded int8 types of the activation Q outputs no longer hold
    _drop_unused(graph)
    return len(gemms), len(attention)


def fuse_gelu_for_ort(model) -> int:
    """ONNX Runtime's transformer optimizer's GELU fusion, in place: the exported
    x * 0.5 * (1 + erf(x / sqrt 2)) (Div, Erf, Add, Mul, Mul) becomes one com.microsoft Gelu
    (ORT's own session fusions do not match this exporter's form). Its other fusions were measured
    and left out (docs/cpu_int8.md): SkipLayerNormalization ran slower here, and the attention
    fusion does not match CrossViT's packed-qkv attention. Returns the number of Gelu nodes."""
    from onnx import helper
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)  # wraps ``model``; edits it in place
    FusionGelu(wrapped).apply()
    wrapped.prune_graph()
    wrapped.topological_sort()
    fused = sum(1 for n in model.graph.node if n.op_type == "Gelu" and n.domain == "com.microsoft")
    if fused and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def ort_optimized_graph(path: Path, threads: int = 1):
    """The graph ONNX Runtime's CPU EP actually runs (all optimisations on, as the runner sets
    them for this form), saved with ``optimized_model_filepath`` and loaded back."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def integer_kernel_report(optimized) -> Dict[str, Any]:
    """What ORT made of an int8 graph: integer GEMM ops by type, the DequantizeLinear nodes still
    feeding a float GEMM (each one a layer that runs in float, plus the DQ's cost), and the
    convolutions that run in float on a fake-quantized input (no float-output integer Conv)."""
    graph = optimized.graph
    consumers: Dict[str, List[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    integer_ops: Dict[str, int] = {}
    for node in graph.node:
        if node.op_type in INTEGER_GEMM_OPS:
            integer_ops[node.op_type] = integer_ops.get(node.op_type, 0) + 1
    fed = {f"{user.op_type}:{user.name}" for node in graph.node if node.op_type == "DequantizeLinear"
           for user in consumers.get(node.output[0], [])}
    return {
        "integer_ops": integer_ops,
        "integer_op_count": sum(integer_ops.values()),
        "float_gemms_fed_by_dequantize": sorted(f for f in fed if f.split(":")[0] in _FLOAT_GEMM_OPS),
        "float_convs_fed_by_dequantize": sorted(f for f in fed if f.split(":")[0] in _FLOAT_CONV_OPS),
    }


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def int8_form_of(manifest: Dict[str, Any]) -> str:
    """The int8 form a bundle's manifest records (bundles without one carry the TensorRT form)."""
    section = manifest.get("onnx") if isinstance(manifest.get("onnx"), dict) else {}
    return check_choice("manifest onnx.int8_form", section.get("int8_form", "tensorrt"), INT8_FORMS)


# --------------------------------------------------------------------------------------------------
# Runner


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime, CPU provider by default. ``exact=True`` turns graph optimisations off, which
    makes ORT compute the Q/DQ semantics exactly (fake quantization) instead of fusing integer
    kernels: the reference for what a Q/DQ graph means."""

    target = "onnx"

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None, exact: bool = False, providers=None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if exact else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.int8_form = int8_form_of(manifest)
        if not exact and self.int8_form == "tensorrt" and manifest.get("precision") == "int8" and _is_x86():
            # The TensorRT form's GEMMs never fuse into integer kernels on x86 (their float bias
            # fails the Gemm selector: docs/cpu_int8.md; measured with ORT 1.32: 0 integer ops, every
            # Gemm fed by DequantizeLinear). That graph runs as float GEMMs, and the weight
            # DequantizeLinear nodes would be recomputed on every run (ORT keeps them unfolded for
            # the fusion that never comes): let constant folding turn them into float weights
            # instead. Results are the same; only the wasted work goes. The ort-cpu forms are built
            # for the fusion and keep it.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self._providers = providers or ["CPUExecutionProvider"]
        self._options = opts  # the probe's instrumented copy runs with the same settings
        try:
            self.session = ort.InferenceSession(str(self.artifact_path), opts, providers=self._providers)
        except Exception as e:  # ORT's own exception types: a verified file can still be a bad model
            raise UserError(f"{self.artifact_path.name}: ONNX Runtime cannot load it ({brief(str(e), 200)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].shape[0] != self.batch_size:
            # the manifest's static batch (validated) is what callers split images by
            raise UserError(f"{self.artifact_path.name}: expected one input of batch {self.batch_size}, "
                            f"the model has {brief([tuple(i.shape) for i in inputs])}")
        self.input_name = inputs[0].name
        self._version = ort.__version__
        self.exact = exact

    @classmethod
    def check_artifact(cls, root, manifest, rel, source) -> None:
        from crossvit_edge.artifact_check import check_onnx

        check_onnx(root, manifest, rel, source)

    @property
    def description(self) -> str:
        mode = "no graph optimisation" if self.exact else "all graph optimisations"
        form = f", int8 form {self.int8_form}" if self.manifest.get("precision") == "int8" else ""
        return f"onnxruntime {self._version} {self._providers[0]} ({mode}{form})"

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0].astype(np.float32)

    def close(self) -> None:
        # the InferenceSession owns the model, its initialisers and its arena: dropping it frees them
        self.session = None

    def probe(self, points, layers, context=None):
        """The points as extra graph outputs of an in-memory copy of the artifact (the bundle is
        never modified), run by ONNX Runtime with this runner's settings: the real kernels."""
        import onnx

        from .probe import locate

        model = onnx.load(str(self.artifact_path))
        located = locate(points, layers, onnx_graph_ops(model.graph))
        return OnnxProbe(model, located, self._options, self._providers, self.input_name, self.description)


# --------------------------------------------------------------------------------------------------
# Layer-wise comparison (crossvit_edge.layerwise): the graph as the point matcher sees it

_WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "DynamicQuantizeMatMul")


def onnx_graph_ops(graph) -> List[Any]:
    """``probe.GraphOp`` records of an ONNX graph, in node order: weighted ops (MatMul / Gemm / Conv
    / DynamicQuantizeMatMul whose second input is a constant, through DequantizeLinear, Cast or
    Transpose) with their weight in PyTorch layout, bias adds and activation DequantizeLinear as
    epilogues (the latter with their grid), two-activation adds, the rest as other ops."""
    from .probe import INTEGER_RANGES, GraphOp, Quant

    consts = _const_values(graph)
    producer = _producers(graph)
    const_like = set(consts)
    for node in graph.node:  # nodes whose every input is constant compute constants (weight DQ, Transpose, Cast)
        if node.input and all(not i or i in const_like for i in node.input):
            const_like.update(node.output)

    def weight(name: str):
        """(shape, hint) of the constant behind a weight input."""
        perm = None
        while name not in consts:
            node = producer.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Cast", "Transpose"):
                return None, None
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            name = node.input[0]
        shape = tuple(consts[name].shape)
        if perm is not None:
            shape = tuple(shape[i] for i in perm) if len(perm) == len(shape) else tuple(reversed(shape))
        for suffix in (".weight_int8", ".weight"):
            if name.endswith(suffix):
                return shape, name[: -len(suffix)]
        return shape, None

    ops = []
    for node in graph.node:
        if node.op_type == "Constant" or not node.output or node.output[0] in const_like:
            continue
        acts = tuple(i for i in node.input if i and i not in const_like)
        op = GraphOp("other", acts, node.output[0], node.name or node.output[0])
        if node.op_type in _WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in const_like and len(acts) == 1 and node.input[0] == acts[0]:
            shape, hint = weight(node.input[1])
            if shape is not None and len(shape) >= 2:
                if node.op_type == "Gemm":
                    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                    shape = shape if trans_b else tuple(reversed(shape))
                elif node.op_type != "Conv":
                    shape = tuple(reversed(shape))  # MatMul weights are (in, out)
                op.kind, op.weight_shape, op.hint = "layer", shape, hint
        elif node.op_type == "Add":
            op.kind = "add" if len(acts) == 2 else "epilogue"
        elif node.op_type == "DequantizeLinear" and len(acts) == 1:
            zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            scale = consts.get(node.input[1])
            if scale is not None and scale.size == 1:
                dtype = "uint8" if zp is not None and zp.dtype == np.uint8 else "int8"
                op.kind = "epilogue"
                op.quant = Quant(float(scale.reshape(())), int(zp.reshape(())) if zp is not None else 0, *INTEGER_RANGES[dtype])
        elif node.op_type == "QuantizeLinear" and len(acts) == 1:
            op.kind = "epilogue"
        ops.append(op)
    return ops


class OnnxProbe:
    """An in-memory copy of the artifact with the located tensors as extra graph outputs."""

    def __init__(self, model, located, options, providers, input_name: str, description: str):
        import onnx
        import onnxruntime as ort

        from .probe import wanted_tensors

        self.located = located
        self.input_name = input_name
        graph = model.graph
        present = {o.name for o in graph.output}
        self.outputs = [o.name for o in graph.output]
        self.tensors = [t for t in wanted_tensors(located) if t not in present] + [t for t in wanted_tensors(located) if t in present]
        try:
            inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        except Exception:  # contrib ops or a graph onnx cannot infer: ORT infers the outputs' types itself
            inferred = {}
        for name in self.tensors:
            if name not in present:
                graph.output.append(inferred[name] if name in inferred else onnx.helper.make_empty_tensor_value_info(name))
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        except Exception as e:
            raise UserError(f"ONNX Runtime cannot run the artifact with its intermediate tensors as outputs ({brief(str(e), 200)})") from None
        extra = sum(1 for t in self.tensors if t not in present)
        self.source = (f"{description}: {extra} intermediate tensors added as graph outputs of an in-memory copy "
                       "(ONNX Runtime keeps a graph output unfused, which can stop a fusion at that tensor)")

    def run(self, images: np.ndarray):
        names = self.tensors + [o for o in self.outputs if o not in self.tensors]
        values = self.session.run(names, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        by_name = dict(zip(names, values))
        out = {key: np.asarray(by_name[loc.tensor], np.float32) for key, loc in self.located.items() if loc.tensor is not None}
        out["logits"] = np.asarray(by_name[self.outputs[0]], np.float32)  # the copy's own logits: how much instrumenting changed
        return out, None

    def close(self) -> None:
        self.session = None


# --------------------------------------------------------------------------------------------------
# Converter


def onnx_metadata(ctx) -> Dict[str, str]:
    import json

    return {
        "model": ctx.model_name,
        "precision": ctx.spec.precision,
        "preprocessing": json.dumps(ctx.preprocessing.to_dict()),
        "labels": json.dumps(ctx.labels) if ctx.labels else "",
    }


def export_for_precision(ctx, path: Path, opset: int, precision: str, fp16_with_int8: bool = False):
    """Export the context's model at ``precision`` (fp32 / fp16 / int8); int8 applies the plan."""
    model = ctx.model_for_export()
    fp16 = precision == "fp16" or (precision == "int8" and fp16_with_int8)
    return export_onnx(model, path, ctx.spec.batch_size, opset=opset, fp16=fp16, metadata=onnx_metadata(ctx))


class OnnxConverter(Converter):
    target = "onnx"
    precisions = TARGET_PRECISIONS["onnx"]  # crossvit_edge.convert_flags: the one table
    requires = ("onnx", "onnxruntime", "onnxscript")

    def validate(self, spec) -> None:
        super().validate(spec)
        # a spec built in Python bypasses the profile schema: the same closed lists here
        check_choice("onnx.int8_form", spec.option("int8_form", "tensorrt"), INT8_FORMS)
        check_choice("onnx.activation_dtype", spec.option("activation_dtype", "uint8"), ACTIVATION_DTYPES)
        self.check_bool_option(spec, "int8_attention")

    def convert(self, ctx, out_dir: Path) -> Artifact:
        opset = int(ctx.spec.option("opset", DEFAULT_OPSET))
        name = f"{ctx.model_name}_{ctx.spec.precision}.onnx"
        path = out_dir / name
        proto = export_for_precision(ctx, path, opset, ctx.spec.precision)
        report: Dict[str, Any] = {"opset": opset, "op_counts": op_counts(proto)}
        section: Dict[str, Any] = {"qdq_nodes": 0}
        rewritten = False
        if ctx.spec.precision == "int8":
            # every form starts as the TensorRT form, checked against TensorRT's rules: one plan
            report["qdq_nodes"] = section["qdq_nodes"] = check_qdq_rules(proto)
            form = section["int8_form"] = ctx.spec.option("int8_form", "tensorrt")
            if ctx.plan is not None and ctx.plan.attention is not None:
                section["int8_attention"] = True  # the plan's attention_matmuls entry has the ranges
            if form != "tensorrt":
                section.update(self._rewrite_for_ort_cpu(proto, form, ctx.spec.option("activation_dtype", "uint8"), report))
                rewritten = True
        if ctx.spec.option("ort_fusions", False) and ctx.spec.precision != "fp16":
            section["ort_fusions"] = {"Gelu": fuse_gelu_for_ort(proto)}
            rewritten = True
        if rewritten:
            import onnx

            # contrib ops (com.microsoft) are ORT's: onnx's full check cannot infer their shapes
            onnx.checker.check_model(proto, full_check=not any(o.domain == "com.microsoft" for o in proto.opset_import))
            tmp = Path(str(path) + ".tmp")
            onnx.save(proto, str(tmp))
            os.replace(tmp, path)
            report["op_counts"] = op_counts(proto)
            if "ort_cpu" in report and report["ort_cpu"]["optimized_graph"].get("skipped") is None:
                entry = report["ort_cpu"]
                entry["optimized_graph"] = self._fusion_check(path, entry["int8_gemms"] + entry.get("int8_attention_matmuls", 0))
        return Artifact(
            primary=name,
            kind="onnx",
            manifest={"opset": opset, "onnx": section},
            report=report,
        )

    @staticmethod
    def _rewrite_for_ort_cpu(proto, form: str, activation_dtype: str, report: Dict[str, Any]) -> Dict[str, Any]:
        n_gemms, n_attention = to_ort_cpu_form(proto, form, activation_dtype)
        dtype = "uint8 (per run)" if form == "ort-cpu-dynamic" else activation_dtype
        entry: Dict[str, Any] = {"form": form, "activation_dtype": dtype, "int8_gemms": n_gemms, "optimized_graph": {}}
        if n_attention:
            entry["int8_attention_matmuls"] = n_attention
        report["ort_cpu"] = entry
        section = {"activation_dtype": dtype, "int8_gemms": n_gemms}
        if n_attention:
            section["int8_attention_matmuls"] = n_attention
        return section

    @staticmethod
    def _fusion_check(path: Path, n_int8_ops: int) -> Dict[str, Any]:
        """What ORT on this host makes of the saved graph; warns when an int8 GEMM stays float."""
        fused = integer_kernel_report(ort_optimized_graph(path))
        if fused["integer_op_count"] < n_int8_ops or fused["float_gemms_fed_by_dequantize"]:
            log.warning("ONNX Runtime fused %d of %d int8 GEMMs and attention matmuls into integer kernels on this host",
                        fused["integer_op_count"], n_int8_ops)
        return {"host": platform.machine(), **fused}
