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
concatenations, LayerNorm, softmax, GELU, the single-token paths and the heads stay float. The PT2E
observers (HistogramObserver: the L2-optimal range of a histogram) are calibrated on the same
images as every other target (the plan's own clipping ranges are not imported). XNNPACK's static int8 GEMM also writes an int8 output, so
each plan layer's output is quantized too, with its own calibrated scale, and read back through a
dequantize by its float consumer. The report lists the layers the program really holds in int8.
When the plan carries int8 attention operands (build option ``int8_attention``), the two ``bmm`` of
each ViT block's self-attention are annotated too and lowered to XNNPACK's QS8 batch matmul
(``partitioner``); on the demo model this breaks the accuracy bounds (docs/executorch_int8.md).

Costs worth knowing: ExecuTorch 1.5's lowering runs in Python over the whole graph (about 100 s
for crossvit_tiny at fp32 on this project's 2-core machines, more at int8: the Q/DQ nodes triple the
graph); most of it is torch.export's decompositions and XNNPACK's graph passes, not ours.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from crossvit_edge.errors import UserError

from .base import Artifact, Converter, Runner

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# adapt: XNNPACK-friendly module forms (class swaps; parameters and names untouched)


def _xnn_classes():
    """The adapted classes, built lazily so that importing this module does not import torch."""
    import torch
    import torch.nn.functional as F

    from crossvit_edge import crossvit as cv

    class XnnLayerNorm(cv.LayerNorm):
        """LayerNorm from ops XNNPACK delegates: mean and variance as GEMVs with a 1/C row."""

        def forward(self, x):
            row = self.mean_row  # a buffer, not torch.full: XNNPACK needs a static GEMM weight
            centred = x - F.linear(x, row)
            var = F.linear(centred * centred, row)
            return centred * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def heads(t, b, n, h, d):
        # (b, n, h*d) -> (b*h, n, d): 3-D operands, so matmul lowers to bmm with no expand
        return t.reshape(b, n, h, d).permute(0, 2, 1, 3).reshape(b * h, n, d)

    def attend(q, k, v, scale, b, n_q, h, d):
        attn = torch.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
        return torch.bmm(attn, v).reshape(b, h, n_q, d).permute(0, 2, 1, 3).reshape(b, n_q, h * d)

    class XnnAttention(cv.Attention):
        def forward(self, x):
            b, n, c = x.shape
            h, d = self.num_heads, self.head_dim
            qkv = self.qkv(x)  # output features are ordered (3, heads, head_dim): slice, don't select
            q, k, v = (heads(qkv[:, :, i * c : (i + 1) * c], b, n, h, d) for i in range(3))
            return self.proj(attend(q, k, v, self.scale, b, n, h, d))

    class XnnCrossAttention(cv.CrossAttention):
        def forward(self, x):
            b, n, c = x.shape
            h, d = self.num_heads, self.head_dim
            q = heads(self.wq(x[:, 0:1]), b, 1, h, d)
            k = heads(self.wk(x), b, n, h, d)
            v = heads(self.wv(x), b, n, h, d)
            return self.proj(attend(q, k, v, self.scale, b, 1, h, d))

    class XnnCrossViT(cv.CrossViT):
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
            return (self.head[0](x0[:, 0:1].reshape(b, -1)) + self.head[1](x1[:, 0:1].reshape(b, -1))) * 0.5

    return {cv.LayerNorm: XnnLayerNorm, cv.Attention: XnnAttention, cv.CrossAttention: XnnCrossAttention, cv.CrossViT: XnnCrossViT}


def stage_adapt(model):
    """A copy of ``model`` whose modules compute the same function in ops XNNPACK delegates."""
    import torch

    from crossvit_edge.crossvit import for_export

    swaps = _xnn_classes()
    adapted = for_export(model)  # a copy; the attention classes are swapped below anyway
    for module in adapted.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
            if isinstance(module, torch.nn.LayerNorm):
                c = module.normalized_shape[-1]
                module.register_buffer("mean_row", torch.full((1, c), 1.0 / c), persistent=False)
    return adapted


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


def plan_quantizer(layer_names, attention_modules=()):
    """XNNPACK's quantizer restricted to the plan: per-channel symmetric int8 weights and static
    per-tensor int8 activations on the ``linear`` / ``conv`` op of each plan layer, nothing else;
    and the two ``bmm`` of each attention module named in ``attention_modules`` (the plan's int8
    attention option, ``attention_bmm_qspecs``).

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

    names, attention = set(layer_names), set(attention_modules)
    weighted = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)

    class PlanQuantizer(XNNPACKQuantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in weighted and _module_path(node) in names:
                    qspecs = {node.args[0]: config.input_activation, node.args[1]: config.weight}
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

    quantizer = plan_quantizer([layer.name for layer in plan.int8_layers()], int8_attention_modules(plan, model))
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
    precisions = ("fp32", "int8")
    requires = ("executorch", "torchao")
    extra = "executorch"

    def validate(self, spec) -> None:
        super().validate(spec)
        # a spec built in Python bypasses the profile schema: the same checks here
        from crossvit_edge.cli_common import check_int

        check_int("executorch.etdump_runs", spec.option("etdump_runs"), 1, 1000)
        self.check_bool_option(spec, "int8_attention")

    def convert(self, ctx, out_dir: Path) -> Artifact:
        example = ctx.example_input()
        want_etdump = bool(ctx.spec.option("etdump", False))
        int8_attention = False
        if ctx.spec.precision == "int8":
            exported = stage_quantize(stage_adapt(ctx.calibration.model), example, ctx.plan, ctx.calibration_batches())
            report_quant = quantization_summary(exported)
            int8_attention = report_quant["int8_attention_matmuls"] > 0
        else:
            exported = stage_capture(stage_adapt(ctx.fp32_model), example)
        edge = stage_lower(exported, etrecord=want_etdump, int8_attention=int8_attention)
        report = delegation_report(edge)
        if ctx.spec.precision == "int8":
            report["quantization"] = report_quant
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


class ExecuTorchRunner(Runner):
    """ExecuTorch's Python runtime (the same C++ runtime an app links) on this host's CPU."""

    target = "executorch"

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise UserError("running .pte files needs the executorch package (pip install 'crossvit-edge[executorch]')") from None
        self._torch = torch
        if threads:
            # The runtime's thread pool (XNNPACK's workers) is process-wide and sized to the cores at
            # start; torch.set_num_threads does not reach it. Resetting is "unsafe" only while a
            # method runs, and nothing runs while a runner is being built.
            from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

            if _threadpool_get_thread_count() != threads:
                _unsafe_reset_threadpool(threads)
        self._program = Runtime.get().load_program(str(self.artifact_path))
        self._method = self._program.load_method("forward")

    @property
    def description(self) -> str:
        from importlib.metadata import version

        return f"executorch {version('executorch')} runtime, XNNPACK delegate, CPU"

    def run(self, images: np.ndarray) -> np.ndarray:
        out = self._method.execute([self._torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))])
        return out[0].detach().numpy().astype(np.float32)

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
