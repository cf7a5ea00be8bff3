"""ONNX target: fp32, fp16 and int8 (explicit Q/DQ, TensorRT's rules) graphs, run by ONNX Runtime.

Export goes through ``torch.onnx.export(dynamo=True)`` at a fixed batch size, one input ``image``
(float32, NCHW) and one output ``logits`` (float32). fp16 graphs keep float32 I/O and run LayerNorm
and Softmax in fp32 (the model casts around them). int8 graphs are the plan applied in PyTorch
(``calibration.qdq``) and exported with the two Q/DQ custom ops translated to QuantizeLinear /
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

from crossvit_edge.errors import UserError

from .base import Artifact, Converter, Runner

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17


# --------------------------------------------------------------------------------------------------
# Export


class _Fp16Wrapper:
    """float32 in, float32 out, fp16 inside (LayerNorm/Softmax stay fp32 inside the model)."""

    @staticmethod
    def wrap(model):
        import torch

        class Fp16IO(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x.half()).float()

        return Fp16IO(model.half())


def _translation_table():
    """ONNX translations of the Q/DQ custom ops of ``calibration.qdq``."""
    import torch
    from onnxscript import opset18 as op

    import calibration.qdq  # noqa: F401  (registers the custom ops)

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
        model = _Fp16Wrapper.wrap(model)
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
    import onnx

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
        if not exact and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            # ONNX Runtime fuses int8-activation Q/DQ into integer kernels only on ARM
            # (QDQIsInt8Allowed() is false elsewhere). On x86 the Q/DQ graph runs as float GEMMs, and
            # the weight DequantizeLinear nodes would be recomputed on every run (ORT keeps them
            # unfolded for the fusion that never comes): let constant folding turn them into float
            # weights instead. Results are the same; only the wasted work goes.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self._providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.artifact_path), opts, providers=self._providers)
        self.input_name = self.session.get_inputs()[0].name
        self.batch_size = int(self.session.get_inputs()[0].shape[0])
        self._version = ort.__version__
        self.exact = exact

    @property
    def description(self) -> str:
        mode = "no graph optimisation" if self.exact else "all graph optimisations"
        return f"onnxruntime {self._version} {self._providers[0]} ({mode})"

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0].astype(np.float32)


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
    precisions = ("fp32", "fp16", "int8")
    requires = ("onnx", "onnxruntime", "onnxscript")

    def convert(self, ctx, out_dir: Path) -> Artifact:
        opset = int(ctx.spec.option("opset", DEFAULT_OPSET))
        name = f"{ctx.model_name}_{ctx.spec.precision}.onnx"
        proto = export_for_precision(ctx, out_dir / name, opset, ctx.spec.precision)
        report: Dict[str, Any] = {"opset": opset, "op_counts": op_counts(proto)}
        if ctx.spec.precision == "int8":
            report["qdq_nodes"] = check_qdq_rules(proto)
        return Artifact(
            primary=name,
            runner="converters.onnx:OnnxRuntimeRunner",
            manifest={"opset": opset, "onnx": {"qdq_nodes": report.get("qdq_nodes", 0)}},
            report=report,
        )
