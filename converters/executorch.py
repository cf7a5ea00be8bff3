"""ExecuTorch target: ``.pte`` programs lowered to the XNNPACK delegate, fp32 and int8 (PT2E).

Export is a sequence of named stages, as ExecuTorch's own flow is:

    adapt (XNNPACK-friendly forms) -> capture (torch.export, strict) -> quantize (PT2E, int8 only)
        -> lower (edge + XNNPACK) -> serialize (.pte, optional BundledProgram)

``adapt`` exists because ExecuTorch 1.5's XNNPACK partitioner has no LayerNorm, no ``select`` and
no ``expand``: exported as written, CrossViT leaves 50 ``native_layer_norm``, 88 ``expand_copy``
(4-D ``matmul`` decomposes to expand + bmm), 47 ``select_copy`` and one ``mm`` on portable kernels
between ~80 delegate calls. ``adapt`` swaps the classes of those modules (same parameters, same
names, same function) for forms that XNNPACK takes whole: LayerNorm through two GEMVs for mean and
variance, attention with sliced q/k/v and 3-D ``bmm``, the resize as two ``linear`` ops, the CLS
token read with a slice. ``tests/test_executorch.py`` checks the adapted model against the original.

int8 follows the quantization plan (``plan_quantizer``): only the ``linear`` / ``conv`` op of each
plan int8 layer is annotated (per-channel symmetric int8 weights, static per-tensor int8 inputs,
XNNPACK's scheme); every other annotation the stock quantizer makes is removed, so residual adds,
concatenations, LayerNorm, softmax, GELU, the single-token paths and the heads stay float. Each
plan layer's input takes the plan's own range as fixed parameters (``fixed_input_qspec``: scale
amax / 127, zero point 0, the grid every other target uses, chosen by ``--calib-method``); on the
demo model that beat XNNPACK's asymmetric histogram observers at the inputs by 0.6-0.9 dB of logit
SNR with minmax, entropy and auto (the default); percentile and mse fell 0.3-0.5 dB below them
(docs/measurements.md). XNNPACK's static int8 GEMM also writes an int8
output, so each plan layer's output is quantized too, with a scale the PT2E observer
(HistogramObserver: the L2-optimal range of a histogram) calibrates on the same images, and read
back through a dequantize by its float consumer: the plan has no range for it. The report lists the layers the program really holds in int8.
When the plan carries int8 attention operands (build option ``int8_attention``), the two ``bmm`` of
each ViT block's self-attention are annotated too and lowered to XNNPACK's QS8 batch matmul
(``partitioner``); on the demo model this breaks the accuracy bounds (docs/executorch_int8.md).

Costs worth knowing: ExecuTorch 1.5's lowering runs in Python over the whole graph (about 100 s
for crossvit_tiny at fp32 on this project's 2-core machines, more at int8: the Q/DQ nodes triple the
graph); most of it is torch.export's decompositions and XNNPACK's graph passes, not ours.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from crossvit_edge.convert_flags import TARGET_PRECISIONS
from crossvit_edge.errors import UserError, brief

from .base import Artifact, Converter, Runner

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# adapt: XNNPACK-friendly module forms (class swaps; parameters and names untouched)


def _xnn_classes():
    """The adapted classes, built lazily so that importing this module does not import torch."""
    import torch
    import torch.nn.functional as F

    from crossvit_edge import crossvit as cv

    # Constants are buffers registered by ``add_constants`` (non-persistent: the state dict is
    # unchanged), not Python floats: a buffer follows the model's dtype, while a float becomes an fp32
    # tensor at lowering and, in an fp16 program, a cast on portable kernels in front of the delegate.
    def constant(module, name, value):
        module.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).clone(), persistent=False)

    class XnnLayerNorm(cv.LayerNorm):
        """LayerNorm from ops XNNPACK delegates: mean and variance as GEMVs with a 1/C row."""

        @staticmethod
        def add_constants(module):
            c = module.normalized_shape[-1]
            constant(module, "mean_row", torch.full((1, c), 1.0 / c))  # a buffer: XNNPACK needs a static GEMM weight
            constant(module, "eps_value", module.eps)

        def forward(self, x):
            row = self.mean_row
            centred = x - F.linear(x, row)
            var = F.linear(centred * centred, row)
            return centred * torch.rsqrt(var + self.eps_value) * self.weight + self.bias

    class XnnFp16LayerNorm(cv.LayerNorm):
        """LayerNorm for fp16 programs, rescaled before squaring so that the variance stays in fp16's
        normal range. On ARMv8.2+ XNNPACK computes fp16 programs in fp16 and flushes subnormals
        (below 6.1e-5) to zero; XnnLayerNorm's ``mean((x - mean)^2)`` then underflows on rows of small
        spread (the demo model's CLS token enters the first block with variance 3e-4: squares near 1e-5,
        a variance of 0 and eps = 1e-6, itself subnormal, gone) and gives inf, then NaN. Measured
        under qemu, -cpu neoverse-n1 (docs/arm.md). Here the centred row is first divided by
        ``s = 16 (mean|c| + sqrt(eps))``: ``u = c / s`` has |u| <= C / 16 (no overflow of u^2 below
        C = 4096) and, unless eps dominates, mean(u^2) near 1/256; ``eps`` enters as
        ``(sqrt(eps) / s)^2`` (normal). ``u / sqrt(mean(u^2) + eps / s^2)`` is exactly LayerNorm; it
        costs an abs, a third GEMV, a division and a few elementwise ops per LayerNorm, all in the
        same XNNPACK delegate call."""

        @staticmethod
        def add_constants(module):
            c = module.normalized_shape[-1]
            constant(module, "mean_row", torch.full((1, c), 1.0 / c))
            constant(module, "root_eps", math.sqrt(module.eps))
            constant(module, "spread_factor", 16.0)

        def forward(self, x):
            row = self.mean_row
            centred = x - F.linear(x, row)
            spread = (F.linear(centred.abs(), row) + self.root_eps) * self.spread_factor
            unit = centred / spread
            eps = self.root_eps / spread
            var = F.linear(unit * unit, row)
            return unit * torch.rsqrt(var + eps * eps) * self.weight + self.bias

    class XnnFp16GELU(torch.nn.GELU):
        """GELU for fp16 programs, in ops XNNPACK runs in fp16: ExecuTorch 1.5.1's partitioner keeps
        fp16 ``gelu`` off XNNPACK (its pinned XNNPACK's fp16 GELU is not trusted, pytorch/executorch
        #16680), which would leave every GELU on portable kernels between delegate calls. The tanh
        form, x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)), differs from the exact erf GELU by at
        most 4.8e-4 (tests/test_executorch.py; largest near |x| = 2.7, where fp16's spacing is 2e-3)."""

        @staticmethod
        def add_constants(module):
            a = 2.0 * math.sqrt(2.0 / math.pi)
            constant(module, "linear_coeff", a)
            constant(module, "cubic_coeff", a * 0.044715)

        def forward(self, x):
            return x * torch.sigmoid(x * (self.linear_coeff + self.cubic_coeff * (x * x)))

    def heads(t, b, n, h, d):
        # (b, n, h*d) -> (b*h, n, d): 3-D operands, so matmul lowers to bmm with no expand
        return t.reshape(b, n, h, d).permute(0, 2, 1, 3).reshape(b * h, n, d)

    def attend(q, k, v, scale, b, n_q, h, d):  # scale: a 0-d buffer
        attn = torch.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
        return torch.bmm(attn, v).reshape(b, h, n_q, d).permute(0, 2, 1, 3).reshape(b, n_q, h * d)

    def add_scale(module):
        constant(module, "scale_value", module.scale)

    class XnnAttention(cv.Attention):
        add_constants = staticmethod(add_scale)

        def forward(self, x):
            b, n, c = x.shape
            h, d = self.num_heads, self.head_dim
            qkv = self.qkv(x)  # output features are ordered (3, heads, head_dim): slice, don't select
            q, k, v = (heads(qkv[:, :, i * c : (i + 1) * c], b, n, h, d) for i in range(3))
            return self.proj(attend(q, k, v, self.scale_value, b, n, h, d))

    class XnnCrossAttention(cv.CrossAttention):
        add_constants = staticmethod(add_scale)

        def forward(self, x):
            b, n, c = x.shape
            h, d = self.num_heads, self.head_dim
            q = heads(self.wq(x[:, 0:1]), b, 1, h, d)
            k = heads(self.wk(x), b, n, h, d)
            v = heads(self.wv(x), b, n, h, d)
            return self.proj(attend(q, k, v, self.scale_value, b, 1, h, d))

    class XnnCrossViT(cv.CrossViT):
        @staticmethod
        def add_constants(module):
            constant(module, "head_weight", 0.5)  # the mean of the two heads

        def resize_branch1(self, x):
            a = self.resize_matrix  # A x A^T as linear(x, A), then linear over the other axis
            return F.linear(F.linear(x, a).transpose(2, 3), a).transpose(2, 3)

        def _embed(self, x, i):
            cls_token = self.cls_token_0 if i == 0 else self.cls_token_1
            pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1
            tokens = self.patch_embed[i](x)
            b = x.shape[0]  # static at export: batch 1 needs no expand (a portable op)
            cls = cls_token if b == 1 else cls_token.expand(b, -1, -1)
            return torch.cat((cls, tokens), dim=1) + pos_embed

        def forward(self, x):
            x0, x1 = self.forward_features(x)
            b = x.shape[0]
            return (self.head[0](x0[:, 0:1].reshape(b, -1)) + self.head[1](x1[:, 0:1].reshape(b, -1))) * self.head_weight

    swaps = {cv.LayerNorm: XnnLayerNorm, cv.Attention: XnnAttention, cv.CrossAttention: XnnCrossAttention, cv.CrossViT: XnnCrossViT}
    return swaps, {**swaps, cv.LayerNorm: XnnFp16LayerNorm, torch.nn.GELU: XnnFp16GELU}


def stage_adapt(model, fp16: bool = False):
    """A copy of ``model`` whose modules compute the same function in ops XNNPACK delegates.

    ``fp16``: the copy in float16 behind float32 input and output (``crossvit.fp16_inside``: the
    manifest's float32 I/O, which apps and the C++ example feed), with GELU in its tanh form (the
    only change of function). Everything between the two casts is fp16, LayerNorm and softmax
    included: ExecuTorch 1.5.1 lowers no dtype conversion to XNNPACK (its partitioner refuses
    ``_to_copy`` between dtypes, and its ``RemoveRedundantCopyPass`` would drop one as a no-op), so
    an fp32 island inside the program would be portable kernels between delegate calls. The two
    boundary casts run on portable kernels in front of and behind the one delegate call."""
    from crossvit_edge.crossvit import for_export, fp16_inside

    swaps = _xnn_classes()[1 if fp16 else 0]
    adapted = for_export(model)  # a copy; the attention classes are swapped below anyway
    for module in adapted.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
            module.add_constants(module)
    return fp16_inside(adapted) if fp16 else adapted


# --------------------------------------------------------------------------------------------------
# Stages


def stage_capture(model, example):
    import torch

    return torch.export.export(model.eval(), (example,), strict=True)


def _module_path(node) -> str:
    """The module a node was traced from (``blocks.0.blocks.1.2.mlp.fc1``), "" at the top."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len("L['self'].") :] if path.startswith("L['self'].") else path


def fixed_input_qspec(amax: float):
    """The input spec of a plan layer: fixed parameters, the plan's symmetric grid (scale amax / 127,
    zero point 0) on XNNPACK's int8, no observer that could choose another range."""
    import torch
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec

    return FixedQParamsQuantizationSpec(dtype=torch.int8, scale=float(amax) / 127.0, zero_point=0, quant_min=-128, quant_max=127,
                                        qscheme=torch.per_tensor_affine)


def plan_input_ranges(plan) -> Dict[str, float]:
    """layer -> input |x| range of every int8 layer of the plan: the calibrated ones (``--calib-method``)
    and those whose range is the preprocessing's bounds."""
    return {l.name: float(l.input_amax) for l in plan.int8_layers()}


def plan_quantizer(input_amax: Dict[str, float], attention_modules=()):
    """XNNPACK's quantizer restricted to the plan: per-channel symmetric int8 weights and static
    per-tensor int8 inputs at the plan's ranges (``input_amax``: layer -> |x|, ``plan_input_ranges``)
    on the ``linear`` / ``conv`` op of each plan layer, nothing else; and the two ``bmm`` of each
    attention module named in ``attention_modules`` (the plan's int8 attention option,
    ``attention_bmm_qspecs``).

    The stock ``XNNPACKQuantizer.set_module_name`` does not give that: after annotating, it
    propagates the quantized outputs of those layers through reshape / permute / slice, and
    ``prepare_pt2e`` then also observes the concatenations those feed (the CLS + patch tokens, the
    fusion outputs: the residual stream); it skips the patch-embedding convs (their weights are graph
    inputs); and it is slow (for every module name and every pattern it traces the pattern again:
    176 ``torch.export`` calls and ~110 s for a one-block CrossViT). So this quantizer annotates the
    plan's ops itself, the way XNNPACK's linear / conv annotators do, and keeps XNNPACK's graph
    preparation (scalars to tensors). The layer's output stays quantized (XNNPACK's static int8 GEMM
    writes int8; its consumers read it through a dequantize), so adds, concatenations, LayerNorm,
    softmax, GELU and the single-token paths run in float."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY, QuantizationAnnotation

    ranges, attention = dict(input_amax), set(attention_modules)
    weighted = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)

    class PlanQuantizer(XNNPACKQuantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in weighted and _module_path(node) in ranges:
                    qspecs = {node.args[0]: fixed_input_qspec(ranges[_module_path(node)]), node.args[1]: config.weight}
                    if len(node.args) > 2 and node.args[2] is not None and config.bias is not None:
                        qspecs[node.args[2]] = config.bias
                    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                        input_qspec_map=qspecs, output_qspec=config.output_activation, _annotated=True
                    )
                elif node.op == "call_function" and node.target == torch.ops.aten.bmm.default and _module_path(node) in attention:
                    a_spec, b_spec, out_spec = attention_bmm_qspecs(node, config)
                    node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: a_spec, node.args[1]: b_spec}, output_qspec=out_spec, _annotated=True
                    )
            return model

    return PlanQuantizer()


def int8_attention_modules(plan, model) -> List[str]:
    """The attention modules whose matmuls run int8: the owners of the plan's ``attention`` entries
    (operand points ``<module>.points.q`` ...; the plan's own pattern admits only the ViT blocks'
    self-attention, the one-query cross-attention stays float), else none. Read defensively: a plan
    from before the option has no such field."""
    from crossvit_edge.calibration.plan import ATTENTION_POINT, attention_owner

    entries = getattr(plan, "attention", None) or []
    names = (str(getattr(t, "name", "")) for t in entries)
    modules = {attention_owner(name) for name in names if ATTENTION_POINT.match(name)}
    return sorted(n for n, _ in model.named_modules() if n in modules)


def attention_bmm_qspecs(node, config):
    """(first input, second input, output) specs of one attention ``bmm``, in the only form
    XNNPACK's integer batch matmul takes: all three int8 per-tensor (QS8 x QS8 -> QS8), the second
    operand (K^T in the scores, V in the output) symmetric, as XNNPACK refuses a non-zero zero point
    there. The first operand is Q (asymmetric, calibrated) in the scores and the softmax output in the
    values: that one gets fixed parameters for [0, 1] (scale 1/255, every level used, no calibration
    that could clip a peaked attention row). The output is int8 too (the kernel writes int8),
    calibrated; its float consumers (softmax, the head merge) read it through a dequantize."""
    import torch
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec, QuantizationSpec

    act = config.input_activation  # XNNPACK's: asymmetric per-tensor int8, histogram observer
    symmetric = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric,
                                 observer_or_fake_quant_ctr=act.observer_or_fake_quant_ctr)
    first = node.args[0]
    if first.op == "call_function" and first.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default):
        a_spec = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=1.0 / 255.0, zero_point=-128, quant_min=-128, quant_max=127,
                                              qscheme=torch.per_tensor_affine)
    else:
        a_spec = act
    return a_spec, symmetric, act


def partitioner(int8_attention: bool = False):
    """XNNPACK's partitioner; with ``int8_attention`` its batch-matmul config also takes the static
    int8 pattern (dequantize -> bmm -> quantize). ExecuTorch 1.5's ``BMMConfig`` lists fp32 only, but
    the runtime's XNNPACK has the QS8 batch matmul (``xnn_create_batch_matrix_multiply_nc_qs8``) and the
    serializer writes quantized tensors for any node whose inputs are tagged Q/DQ: only the config
    stands in the way. Without this, the dequantized operands of an annotated bmm are lowered as
    conversions in front of a float batch matmul: extra work, no integer arithmetic."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import BMMConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if not int8_attention:
        return XnnpackPartitioner()

    class QuantizedBMMConfig(BMMConfig):
        def supported_precision_types(self):
            return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]

    return XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c is not BMMConfig] + [QuantizedBMMConfig])


def quantization_summary(exported) -> Dict[str, Any]:
    """What the quantized program actually holds, read from its graph: the layers whose weight is
    int8 (dequantize_per_channel feeding the linear / conv) and the ops whose output is quantized."""
    import torch

    weighted = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
    int8_layers, quantized_outputs, int8_bmm = [], Counter(), 0
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in weighted and "dequantize_per_channel" in str(getattr(node.args[1], "target", "")):
            int8_layers.append(_module_path(node))
        if node.target == torch.ops.aten.bmm.default and all("dequantize_per_tensor" in str(getattr(a, "target", "")) for a in node.args[:2]):
            int8_bmm += 1
        if any("quantize_per_tensor" in str(u.target) and "dequantize" not in str(u.target) for u in node.users):
            quantized_outputs[str(node.target).replace("aten.", "")] += 1
    return {"int8_layers": sorted(set(int8_layers)), "int8_attention_matmuls": int8_bmm,
            "quantized_outputs_by_op": dict(sorted(quantized_outputs.items()))}


def stage_quantize(model, example, plan, calibration_batches):
    """PT2E: annotate the plan's int8 layers only (and its int8 attention matmuls, when the plan
    has them), calibrate, convert; returns an exported program."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = plan_quantizer(plan_input_ranges(plan), int8_attention_modules(plan, model))
    graph = torch.export.export(model.eval(), (example,), strict=True).module()
    prepared = prepare_pt2e(graph, quantizer)
    images = 0
    with torch.no_grad():
        for batch in calibration_batches:
            # the program has a static batch size: feed calibration images one batch at a time
            for start in range(0, len(batch), example.shape[0]):
                chunk = batch[start : start + example.shape[0]]
                if len(chunk) == example.shape[0]:
                    prepared(torch.from_numpy(np.ascontiguousarray(chunk)))
                    images += len(chunk)
    if not images:
        raise UserError("executorch int8: no calibration images reached the PT2E observers")
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, (example,), strict=True)


def stage_lower(exported, etrecord: bool = False, int8_attention: bool = False):
    from executorch.exir import to_edge_transform_and_lower

    # generate_etrecord keeps the graphs the Inspector needs to name the ETDump's events
    return to_edge_transform_and_lower(exported, partitioner=[partitioner(int8_attention)], generate_etrecord=etrecord)


def delegation_report(edge) -> Dict[str, Any]:
    """How much of the program XNNPACK took, and which ops stayed on portable kernels."""
    graph = edge.exported_program().graph
    delegated = 0
    portable: Counter = Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "executorch_call_delegate" in name:
            delegated += 1
        elif name != "<built-in function getitem>":
            op = getattr(node.target, "_op", node.target)  # EdgeOpOverload wraps the aten op
            portable[getattr(op, "__name__", name).replace("aten.", "")] += 1
    return {"delegate_calls": delegated, "portable_ops": dict(sorted(portable.items())), "portable_op_count": int(sum(portable.values()))}


def fp16_summary(edge) -> Dict[str, Any]:
    """What an fp16 program holds, read from its lowered graph: the dtypes of the program's input and
    output and of the delegate's, and the casts left outside the delegate (input -> fp16, fp16 ->
    output: ExecuTorch 1.5.1 lowers no dtype conversion to XNNPACK)."""
    program = edge.exported_program()
    graph = program.graph
    nodes = {n.name: n for n in graph.nodes}

    def dtype(node):
        return str(getattr(node.meta.get("val"), "dtype", "")).replace("torch.", "")

    inputs = [dtype(nodes[name]) for name in program.graph_signature.user_inputs]
    outputs = [dtype(n) for n in graph.output_node().args[0]]
    delegates = [n for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target)]
    casts = [f"{dtype(n.args[0])} -> {dtype(n)}" for n in graph.nodes
             if n.op == "call_function" and "_to_dim_order_copy" in str(n.target) and dtype(n.args[0]) != dtype(n)]
    return {"program_inputs": inputs, "program_outputs": outputs,
            "delegate_input_dtypes": sorted({dtype(a) for d in delegates for a in d.args[1:] if hasattr(a, "meta")}),
            "casts_outside_delegate": casts, "gelu": "tanh form (x * sigmoid(1.5958 (x + 0.044715 x^3)))"}


def stage_serialize(edge, path: Path) -> Any:
    program = edge.to_executorch()
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(program.buffer)
    tmp.replace(path)
    return program


def stage_profile(program, pte: Path, inputs: List[np.ndarray], etdump: Path, etrecord: Path, runs: int = 5) -> Dict[str, Any]:
    """ETDump of ``runs`` executions of ``pte`` (after one warm-up), read back with the Inspector:
    per-operator times inside the XNNPACK delegate and the method's own time, in milliseconds."""
    import torch
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    program.get_etrecord().save(str(etrecord))
    loaded = Runtime.get().load_program(str(pte), enable_etdump=True, debug_buffer_size=0)
    method = loaded.load_method("forward")
    x = torch.from_numpy(np.ascontiguousarray(inputs[0], dtype=np.float32))
    for _ in range(runs + 1):
        method.execute([x])
    loaded.write_etdump_result_to_file(str(etdump), str(etdump) + ".debug")
    Path(str(etdump) + ".debug").unlink(missing_ok=True)  # empty: no intermediate outputs recorded
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = Inspector(etdump_path=str(etdump), etrecord=str(etrecord)).to_dataframe()
    frame = frame[frame["event_block_name"] == "Execute"]
    ops: Dict[str, Dict[str, float]] = {}
    method_ms = None
    for name, raw, delegated in zip(frame["event_name"], frame["raw"], frame["is_delegated_op"]):
        steady = list(raw)[1:] or list(raw)  # drop the warm-up run
        median = float(np.median(steady))
        if name == "Method::execute":
            method_ms = median
            continue
        if name in ("DELEGATE_CALL", "OPERATOR_CALL"):
            continue
        kind = re.sub(r" #\d+$", "", str(name))
        entry = ops.setdefault(kind, {"count": 0, "median_ms": 0.0, "delegated": bool(delegated)})
        entry["count"] += 1
        entry["median_ms"] += median
    ranked = dict(sorted(ops.items(), key=lambda kv: -kv[1]["median_ms"]))
    for entry in ranked.values():
        entry["median_ms"] = round(entry["median_ms"], 4)
    return {
        "runs": runs,
        "method_execute_median_ms": method_ms,
        "ops_by_kind": ranked,
        "note": "times from ExecuTorch's event tracer on the build host's CPU, not the target device",
    }


def write_bundled_program(program, model, inputs: List[np.ndarray], path: Path) -> int:
    """A BundledProgram carrying ``inputs`` and the fp32 model's outputs for them."""
    import torch
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    cases = []
    with torch.no_grad():
        for x in inputs:
            t = torch.from_numpy(np.ascontiguousarray(x))
            cases.append(MethodTestCase(inputs=[t], expected_outputs=[model(t)]))
    bundled = BundledProgram(program, [MethodTestSuite(method_name="forward", test_cases=cases)])
    path.write_bytes(serialize_from_bundled_program_to_flatbuffer(bundled))
    return len(cases)


# --------------------------------------------------------------------------------------------------
# Converter and Runner


class ExecuTorchConverter(Converter):
    target = "executorch"
    precisions = TARGET_PRECISIONS["executorch"]  # crossvit_edge.convert_flags: the one table
    requires = ("executorch", "torchao")
    extra = "executorch"

    def validate(self, spec) -> None:
        super().validate(spec)
        # a spec built in Python bypasses the profile schema: the same checks here
        from crossvit_edge.cli_common import check_int

        check_int("executorch.etdump_runs", spec.option("etdump_runs"), 1, 1000)
        self.check_bool_option(spec, "int8_attention")
        self.check_bool_option(spec, "fp16_arithmetic")
        if spec.precision == "int8" and spec.calibration.data is None:
            # checked before any work: the plan's ranges cover the layers' inputs only
            raise UserError("executorch int8 needs calibration images (--calib-data DIR; --calib-stats alone is not enough: "
                            "XNNPACK's int8 layers also write int8 outputs, whose ranges PT2E's observers take from the images)")
        if spec.precision == "fp16" and spec.option("fp16_arithmetic") is False:
            log.warning("WARNING: --precision fp16 for a device without fp16 arithmetic (executorch.fp16_arithmetic: false): "
                        "XNNPACK converts fp16 to fp32 around its GEMMs there (measured slower than fp32 on x86 without "
                        "AVX512-FP16); build fp32 or int8 for it (docs/executorch_fp16.md)")

    def convert(self, ctx, out_dir: Path) -> Artifact:
        example = ctx.example_input()
        want_etdump = bool(ctx.spec.option("etdump", False))
        int8_attention = False
        if ctx.spec.precision == "int8":
            exported = stage_quantize(stage_adapt(ctx.calibration.model), example, ctx.plan, ctx.calibration_batches())
            report_quant = quantization_summary(exported)
            int8_attention = report_quant["int8_attention_matmuls"] > 0
        else:
            exported = stage_capture(stage_adapt(ctx.fp32_model, fp16=ctx.spec.precision == "fp16"), example)
        edge = stage_lower(exported, etrecord=want_etdump, int8_attention=int8_attention)
        report = delegation_report(edge)
        if ctx.spec.precision == "int8":
            report["quantization"] = report_quant
        if ctx.spec.precision == "fp16":
            report["fp16"] = fp16_summary(edge)
        stem = f"{ctx.model_name}_{ctx.spec.precision}"
        name = f"{stem}.pte"
        program = stage_serialize(edge, out_dir / name)
        files = []
        n_bundled = int(ctx.spec.option("bundled_inputs", 0) or 0)
        if n_bundled:
            bp = f"{stem}.bpte"
            report["bundled_test_cases"] = write_bundled_program(program, ctx.fp32_model, _test_inputs(ctx, n_bundled), out_dir / bp)
            files.append(bp)
        if want_etdump:
            log.info("profiling one input with ETDump")
            report["etdump"] = stage_profile(program, out_dir / name, _test_inputs(ctx, 1), out_dir / f"{stem}.etdp", out_dir / f"{stem}.etrecord",
                                             runs=int(ctx.spec.option("etdump_runs", 5)))
            files += [f"{stem}.etdp", f"{stem}.etrecord"]
        if report["portable_op_count"]:
            log.info("ops left on portable kernels: %s", report["portable_ops"])
        return Artifact(
            primary=name,
            kind="pte",
            files=files,
            manifest={
                "executorch": {
                    "backend": "xnnpack",
                    # what the delegate computes in; the program's input and output stay float32
                    "compute_dtype": "float16" if ctx.spec.precision == "fp16" else "float32",
                    "int8_attention_matmuls": int8_attention,
                    "delegate_calls": report["delegate_calls"],
                    "portable_ops": report["portable_ops"],
                    "bundled_program": f"{stem}.bpte" if n_bundled else None,
                    "etdump": f"{stem}.etdp" if want_etdump else None,
                }
            },
            report=report,
        )


def _test_inputs(ctx, n: int) -> List[np.ndarray]:
    """``n`` input batches for bundled test cases and profiling: calibration images when there are
    any (real inputs exercise real ranges), else seeded noise."""
    batch = ctx.example_input().shape[0]
    size = ctx.fp32_model.config.img_size
    if ctx.calibration is not None and ctx.calibration.images is not None:
        images = ctx.calibration.images
        flat = images.sample(min(n * batch, len(images)), seed=2).load(ctx.preprocessing).astype(np.float32)
    else:
        flat = np.random.default_rng(0).standard_normal((n * batch, 3, size, size)).astype(np.float32)
    return [flat[i : i + batch] for i in range(0, len(flat) - batch + 1, batch)][:n]


class ThreadPoolGate:
    """ExecuTorch's thread pool (XNNPACK's workers) is one per process, sized to the cores at start;
    ``torch.set_num_threads`` does not reach it. Resizing it (``_unsafe_reset_threadpool``)
    replaces the pool, and every XNNPACK method loaded before keeps the old one: a model serving
    on other threads then crashes (measured: SIGABRT, glibc's mutex assertion, one attempt in
    three with 8 threads serving; SIGSEGV once the calls in flight were waited for). The rule: a
    load with ``threads=N`` resizes the pool only while no ExecuTorch model is loaded in the
    process; while one is, a load asking for another size is refused in one line, and a load with
    the pool's size or ``threads=None`` shares it. Loads are serialised with each other. A forked
    child (``crossvit_edge.isolation``) starts with no model loaded: ExecuTorch recreates its pool
    after a fork, and the parent's models are not the child's."""

    def __init__(self):
        self._reset_state()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset_state)

    def _reset_state(self) -> None:
        self.lock = threading.RLock()
        self.loaded: "weakref.WeakSet" = weakref.WeakSet()  # runners whose methods hold the pool

    def set_size(self, threads: Optional[int], what: str) -> None:
        """Call with ``lock`` held, before loading a method."""
        if not threads:
            return
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

        size = _threadpool_get_thread_count()
        if size == threads:
            return
        if len(self.loaded):
            raise UserError(f"{what}: threads={threads}, but ExecuTorch's thread pool is process-wide and {len(self.loaded)} "
                            f"loaded model(s) in this process use it with {size} threads: load with threads={size} or "
                            "threads=None, or close those models first")
        _unsafe_reset_threadpool(threads)


POOL = ThreadPoolGate()


class ExecuTorchRunner(Runner):
    """ExecuTorch's Python runtime (the same C++ runtime an app links) on this host's CPU.

    The program is loaded from the bytes this runner read and hashed itself (the file cannot change
    between the check and the load), with ``Verification.InternalConsistency`` (the flatbuffer's
    offsets and indices checked before use); its ``forward`` signature (method metadata, read
    before the method and its delegates are initialised) must be the manifest's. A delegate's blob
    is opaque to that verification: ``crossvit_edge.isolation`` loads it in a child process first."""

    target = "executorch"

    @classmethod
    def check_artifact(cls, root, manifest, rel, source) -> None:
        # A .pte names no other file (this runner passes no .ptd data file); what can be read
        # without the runtime is its flatbuffer file identifier. The rest is the runtime's
        # verification and the signature check at load.
        from crossvit_edge.artifact_check import check_file_identifier

        check_file_identifier(Path(root) / rel, 4, PTE_IDENTIFIER, f"{source}: {rel}", "an ExecuTorch program (.pte)")

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        try:
            import torch
            import executorch.runtime  # noqa: F401
        except ImportError:
            raise UserError("running .pte files needs the executorch package (pip install 'crossvit-edge[executorch]')") from None

        self._torch = torch
        self._call_lock = threading.Lock()  # one Method's planned buffers serve one call at a time
        with POOL.lock:
            POOL.set_size(threads, f"bundle {self.bundle_dir.name}")
            self._load(manifest)
            POOL.loaded.add(self)

    def _load(self, manifest) -> None:
        from executorch.runtime import Runtime, Verification

        from crossvit_edge.artifact_check import read_listed_file

        where = f"bundle {self.bundle_dir.name}: {self.artifact_path.name}"
        # a bundle's manifest lists the file: the bytes loaded are the bytes verified; the pipeline's
        # check of the program it has just written runs before the manifest (and its files) exists
        data = read_listed_file(self.bundle_dir, manifest, self.artifact_path, where) if "files" in manifest else self.artifact_path.read_bytes()
        try:
            self._program = Runtime.get().load_program(data, verification=Verification.InternalConsistency)
        except (RuntimeError, ValueError) as e:  # the runtime's error for a program that fails verification
            raise UserError(f"{where}: ExecuTorch cannot load it: not a valid program ({brief(str(e), 120)})") from None
        if "forward" not in self._program.method_names:
            raise UserError(f"{where}: the program has no 'forward' method (it has {brief(sorted(self._program.method_names))})")
        check_method_signature(self._program.metadata("forward"), manifest, where)
        try:
            self._method = self._program.load_method("forward")
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{where}: ExecuTorch cannot load its forward method ({brief(str(e), 120)})") from None

    @property
    def description(self) -> str:
        from importlib.metadata import version

        # the manifest's compute dtype was checked against a closed list when the bundle was opened
        inside = " (fp16 inside)" if (self.manifest.get("executorch") or {}).get("compute_dtype") == "float16" else ""
        return f"executorch {version('executorch')} runtime, XNNPACK delegate{inside}, CPU"

    def run(self, images: np.ndarray) -> np.ndarray:
        x = self._torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with self._call_lock:
            out = self._method.execute([x])
            return out[0].detach().numpy().astype(np.float32)

    def close(self) -> None:
        """Drop the method and program (and their hold on the process-wide thread pool)."""
        # the Method holds the delegate (XNNPACK's packed weights and workspace) and its planned
        # memory, the Program the program bytes: dropped, the runtime frees them. The Runtime is
        # process-wide (Runtime.get()) and stays.
        with POOL.lock, self._call_lock:
            self._method = self._program = None
            POOL.loaded.discard(self)

    def probe(self, points, layers, context=None):
        """ETDump intermediate outputs where the runtime records them; the XNNPACK delegate records
        none inside its subgraphs (checked on this very program: ``delegate_intermediate_outputs``),
        so the values come from the program before lowering, rebuilt with the build's own stages
        (``stage_adapt`` -> ``stage_quantize`` on the calibrated model and the same calibration
        images, or ``stage_capture`` at fp32) and run op by op."""
        from .probe import locate

        size = int(self.manifest["input"]["shape"][2])
        example = self._torch.zeros(self.batch_size, 3, size, size)
        recorded = delegate_intermediate_outputs(self.artifact_path, example)
        if recorded:
            raise UserError(f"{self.artifact_path.name}: ETDump records {recorded} delegate intermediate outputs, which this "
                            "version cannot map to the plan's points without the build's ETRecord")
        if context is None or context.model is None:
            raise UserError("the ExecuTorch layer-wise comparison rebuilds the program before lowering: it needs the fp32 model")
        if self.manifest.get("precision") == "int8":
            if context.plan is None or context.calibration_batches is None:
                raise UserError("an int8 ExecuTorch bundle's program before lowering is rebuilt from its calibration images: "
                                "pass --calib-data with the folder the bundle was calibrated on")
            program = stage_quantize(stage_adapt(context.model), example, context.plan, context.calibration_batches())
            how = "quantized program before lowering (PT2E, rebuilt from the build's calibration images)"
        else:
            program = stage_capture(stage_adapt(context.model), example)
            how = "program before lowering (torch.export of the adapted model)"
        module = program.module()
        ops = fx_graph_ops(module, example)
        source = (f"{self.description}: ETDump records no intermediate outputs inside the XNNPACK delegate, so the values "
                  f"come from the {how}, run op by op in PyTorch")
        return FxProbe(module, locate(points, layers, ops), source)


def delegate_intermediate_outputs(pte: Path, example) -> int:
    """How many intermediate outputs ETDump records inside delegates for one run of ``pte`` (a
    debug buffer given): the events with a delegate debug id."""
    import tempfile

    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc
    from executorch.runtime import Runtime

    loaded = Runtime.get().load_program(str(pte), enable_etdump=True, debug_buffer_size=64 << 20)
    loaded.load_method("forward").execute([example])
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        loaded.write_etdump_result_to_file(str(etdump), str(etdump) + ".debug")
        data = deserialize_from_etdump_flatcc(etdump.read_bytes())
    count = 0
    for run in data.run_data or []:
        for event in run.events or []:
            debug = event.debug_event
            if debug is not None and ((debug.delegate_debug_id_int is not None and debug.delegate_debug_id_int >= 0) or debug.delegate_debug_id_str):
                count += 1
    return count


def fx_graph_ops(module, example) -> List[Any]:
    """``probe.GraphOp`` records of an exported program's FX graph (``ExportedProgram.module()``):
    ``linear`` / ``conv2d`` of an activation and a constant weight, ``quantize_per_tensor`` and
    activation ``dequantize_per_tensor`` (with its grid) as epilogues, adds, the rest as other ops.
    Shapes are read off one run on ``example``."""
    import torch

    from .probe import GraphOp, Quant

    shapes: Dict[str, tuple] = {}

    class Shapes(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        Shapes(module).run(example)
    graph = module.graph
    active = set()  # nodes that depend on the input
    weighted = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
    ops = []

    def number(arg):
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            arg = getattr_path(module, arg.target)
        return float(arg.reshape(())) if isinstance(arg, torch.Tensor) else float(arg)

    for node in graph.nodes:
        if node.op == "placeholder":
            active.add(node)
            continue
        if node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if a in active]
        if not inputs:
            continue
        active.add(node)
        g = GraphOp("other", tuple(a.name for a in inputs), node.name, node.name)
        target = str(node.target)
        if node.target in weighted and node.args[0] in active and isinstance(node.args[1], torch.fx.Node) and node.args[1] not in active:
            g.kind, g.weight_shape = "layer", shapes.get(node.args[1].name) or tuple(getattr_path(module, node.args[1].target).shape)
            g.inputs = (node.args[0].name,)
        elif node.target == torch.ops.aten.add.Tensor:
            g.kind = "add" if len(inputs) == 2 else "epilogue"
        elif "dequantize_per_tensor" in target and node.args[0] in active:
            g.kind = "epilogue"
            g.quant = Quant(number(node.args[1]), int(number(node.args[2])), int(node.args[3]), int(node.args[4]))
        elif "quantize_per_tensor" in target:
            g.kind = "epilogue"
        ops.append(g)
    return ops


def getattr_path(module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class FxProbe:
    """An exported program run node by node, keeping the located nodes' outputs."""

    def __init__(self, module, located, source: str):
        from .probe import wanted_tensors

        self.module, self.located, self.source = module, located, source
        self.names = set(wanted_tensors(located))

    def run(self, images: np.ndarray):
        import torch

        kept: Dict[str, np.ndarray] = {}
        names = self.names

        class Keep(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in names:
                    kept[n.name] = out.detach().float().numpy()
                return out

        with torch.no_grad():
            logits = Keep(self.module).run(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        out = {key: kept[loc.tensor] for key, loc in self.located.items() if loc.tensor is not None}
        out["logits"] = logits.detach().float().numpy()
        return out, None

    def close(self) -> None:
        self.module = None


PTE_IDENTIFIER = b"ET"  # bytes 4-6 of a .pte: the flatbuffer file identifier "ET" + schema version digits
_SCALAR_TYPES = {6: "float32", 5: "float16", 7: "float64", 0: "uint8", 1: "int8", 3: "int32", 4: "int64", 15: "bfloat16"}


def check_method_signature(meta, manifest, where: str) -> None:
    """``forward``'s inputs and outputs (ExecuTorch's MethodMeta: sizes and ScalarType, no names)
    against the manifest's ``input`` and ``output``."""
    from crossvit_edge.artifact_check import TensorSignature, check_signature

    def tensors(count, info, want):
        out = []
        for i in range(count):
            t = info(i)
            out.append(TensorSignature(want["name"], tuple(t.sizes()), _SCALAR_TYPES.get(t.dtype(), f"ScalarType {t.dtype()}")))
        return out

    check_signature(tensors(meta.num_inputs(), meta.input_tensor_meta, manifest["input"]),
                    tensors(meta.num_outputs(), meta.output_tensor_meta, manifest["output"]), manifest, where)
