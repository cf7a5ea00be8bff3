"""Core ML target: ML Program ``.mlpackage`` files at fp32, fp16, weight-only int8 and W8A8.

How each precision is built (coremltools 9.0, all of it on Linux):

* ``fp32`` / ``fp16``: ``torch.export`` of the fp32 model, then ``ct.convert`` to an ``mlprogram``
  at fp32 or fp16 compute precision. Input ``image`` (float32 NCHW, or an image, see below) and
  output ``logits`` (float32) keep float32 I/O; the program casts at its edges. By default every
  op of an fp16 program is fp16 (what the Neural Engine runs; an fp32 op in the middle of a program
  is sent to the CPU/GPU). The option ``fp32_ops`` (list of MIL op types, e.g. ``["layer_norm",
  "softmax"]``) keeps those ops in fp32, as the PyTorch model's casts do.
* ``int8-weights``: the fp16 program, then ``coremltools.optimize.coreml.linear_quantize_weights``
  (symmetric, per output channel) on the weights of every ``linear`` and ``conv`` op:
  ``constexpr_affine_dequantize`` (iOS16/17) or ``constexpr_blockwise_shift_scale`` (iOS18+).
* ``int8`` (W8A8, ``minimum_deployment_target`` iOS17/macOS14 or newer): activations are calibrated
  in PyTorch with ``coremltools.optimize.torch.quantization.LinearQuantizer`` on the calibration
  images, starting from the calibrated (possibly smoothed) model. Only the plan's int8 layers get a
  config (module-name configs; every module type is switched off), so LayerNorm, softmax, GELU,
  residual adds, concatenations and the single-token layers stay float. The quantizer also puts an
  output Q/DQ after each quantized layer; those whose consumer is not another int8 layer (qkv into
  attention, proj / fc2 into the residual, patch embeddings into the concatenation) are removed,
  so that only the *inputs* of the plan's layers are int8, as in ``crossvit_edge.calibration.plan``. The dagger
  stems' ReLUs are kept out of torch.ao's conv + ReLU fusion (``unfuse_relus``): fused, a plan conv
  fails to convert, and each stem conv stays one plan layer with an int8 input. The model is
  then finalized, traced (``torch.jit.trace`` after the FX graph's shape arithmetic is folded to
  constants: coremltools 9.0's TorchScript frontend fails on ``aten::Int`` with numpy >= 2.4,
  apple/coremltools#2633) and converted: ``quantize`` / ``dequantize`` on activations,
  ``constexpr_affine_dequantize`` on weights.

Option ``image_input``: the input is a Core ML image (RGB, ``input_size`` square) instead of a
MultiArray. Core ML's ``ImageType`` applies ``scale * pixel + bias`` with one scale for all
channels, so ``scale = 1/255`` and ``bias = -mean`` and the per-channel ``1/std`` is folded exactly
into the weights of the first convolution of both patch embeddings (branch 1's bicubic resize is
linear per channel, so the factor commutes with it; zero padding stays zero).

The ``.mlpackage`` cannot be executed on Linux by any Apple tool: ``CoreMLRunner`` uses Core ML's
prediction on macOS and ``crossvit_edge.converters.coreml_mil`` (a numpy interpreter of the saved program)
elsewhere; its ``description`` says which.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import platform
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crossvit_edge.convert_flags import TARGET_PRECISIONS
from crossvit_edge.errors import UserError

from .base import Artifact, Converter, Runner
from .coreml_mil import MILCheckerError, MILProgram

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_TARGET = "iOS16"  # fp32 / fp16 / int8-weights
W8A8_TARGET = "iOS17"  # the oldest target with activation quantize / dequantize ops
MLPROGRAM_TARGET = "iOS15"  # ML Programs need iOS15 / macOS12
DEFAULT_COMPUTE_UNITS = "ALL"
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
DEFAULT_FP32_OPS: Tuple[str, ...] = ()
WEIGHT_OP_TYPES = ("linear", "conv")  # whose weights int8-weights quantizes
LICENSE = "crossvit_edge is Apache-2.0; the weights carry the license of their checkpoint"


# --------------------------------------------------------------------------------------------------
# Options


def _coremltools():
    import coremltools as ct

    return ct


def parse_deployment_target(name: str):
    """``"iOS17"`` / ``"macos14"`` -> ``coremltools.target`` member (UserError when unknown)."""
    ct = _coremltools()
    members = ct.target.__members__
    lookup = {k.lower(): v for k, v in members.items()}
    key = str(name).strip().lower().replace(".", "_")
    if key not in lookup:
        raise UserError(f"unknown Core ML minimum_deployment_target {name!r}; choose one of: {', '.join(members)}")
    return lookup[key]


def target_name(spec) -> str:
    default = W8A8_TARGET if spec.precision == "int8" else DEFAULT_TARGET
    return str(spec.target_option("minimum_deployment_target", default))



def _fp32_ops(spec) -> Tuple[str, ...]:
    ops = spec.target_option("fp32_ops", DEFAULT_FP32_OPS)
    if isinstance(ops, str):
        ops = [o for o in ops.split(",") if o]
    return tuple(ops)


# --------------------------------------------------------------------------------------------------
# PyTorch side


def fold_input_std(model, std: Sequence[float]):
    """Divide the input-channel weights of the first conv of each patch embedding by ``std``, so the
    model takes ``pixel / 255 - mean`` instead of ``(pixel / 255 - mean) / std`` (in place)."""
    import torch
    from torch import nn

    factor = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, -1, 1, 1)
    for embed in model.patch_embed:
        conv = embed.proj if isinstance(embed.proj, nn.Conv2d) else embed.proj[0]
        if not isinstance(conv, nn.Conv2d) or conv.in_channels != len(std):
            raise UserError("image_input: the model's first layer is not the expected 3-channel patch-embedding conv")
        with torch.no_grad():
            conv.weight.mul_(factor.to(conv.weight.dtype))
    return model


def _export(model, example):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,))
        return program.run_decompositions({})


def _layer_of(target: str, names: Sequence[str]) -> Optional[str]:
    for n in names:
        if target == n or target.startswith(n + "."):
            return n
    return None


def strip_output_qdq(gm, int8_layers: Sequence[str]) -> int:
    """Remove the quantize -> dequantize pairs that LinearQuantizer puts on the *outputs* of the
    quantized layers, except where they are the input quantization of another int8 layer (fc1 ->
    GELU -> fc2). Returns how many were removed."""
    import torch

    def int8_module(node) -> bool:
        return node.op == "call_module" and _layer_of(str(node.target), int8_layers) is not None

    removed = 0
    for q in list(gm.graph.nodes):
        if not (q.op == "call_function" and q.target is torch.quantize_per_tensor):
            continue
        src = q.args[0]
        if not int8_module(src):
            continue
        for dq in list(q.users):
            if not (dq.op == "call_method" and dq.target == "dequantize"):
                continue
            for user in list(dq.users):
                if not int8_module(user):
                    user.replace_input_with(dq, src)
            if not dq.users:
                gm.graph.erase_node(dq)
        if not q.users:
            gm.graph.erase_node(q)
            removed += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return removed


def fold_static_shapes(gm, example) -> int:
    """Replace the FX graph's shape arithmetic (``x.shape``, ``getitem`` on sizes) by the constants
    it evaluates to at the fixed input size, so ``torch.jit.trace`` records no ``aten::Int``."""
    import torch
    import torch.fx as fx

    values: Dict[Any, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(example)

    def static(v) -> bool:
        if isinstance(v, bool):
            return False
        if isinstance(v, int):
            return True
        return isinstance(v, (tuple, torch.Size)) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)

    folded = 0
    for node in list(gm.graph.nodes):
        v = values.get(node)
        if node.op not in ("call_function", "call_method") or not static(v):
            continue
        const = tuple(v) if isinstance(v, (tuple, torch.Size)) else int(v)
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: const if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: const if a is node else a)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return folded


def _supported_module_types():
    from coremltools.optimize.torch.quantization import LinearQuantizer

    types = getattr(LinearQuantizer, "_supported_modules", None)
    if types is None:  # pragma: no cover - depends on coremltools internals
        from coremltools.optimize.torch.quantization._backend_config import get_supported_modules

        types = get_supported_modules()
    return tuple(types)


def unfuse_relus(model) -> List[str]:
    """Give every ``nn.ReLU`` of ``model`` (the dagger stems' two) a type the quantizer does not fuse
    (in place); returns their names, to be passed as non-traceable (leaf) modules.

    LinearQuantizer's torch.ao fusion turns a conv whose only consumer is a ReLU into a ``ConvReLU2d``
    and then cannot convert it under per-layer configs: the QAT swap reads the qconfig of the inner
    conv, which the module-type configs switch off ("qconfig must be provided for QAT module"), and
    once that is configured too, ``finalize`` re-derives the fused type's qconfig from coremltools'
    default ``FakeQuantize`` entry and rejects it as different from prepare's. Unfused, each stem
    conv is one plan layer like any other: its *input* is int8 (the ReLU output feeding the next
    conv, with the plan's symmetric scheme) and the ReLU runs in float (Core ML fuses it at compile
    time anyway)."""
    from torch import nn

    class UnfusedReLU(nn.Module):
        def forward(self, x):
            return nn.functional.relu(x)

    names = [n for n, m in model.named_modules() if type(m) is nn.ReLU]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, UnfusedReLU())
    return names


def calibrate_w8a8(model, int8_layers: Sequence[str], batches, example, input_transform=None, fixed_input_amax=None):
    """LinearQuantizer (W8A8) on ``model`` with only ``int8_layers`` quantized, calibrated on
    ``batches`` (numpy NCHW); returns (finalized FX model, per-layer input quantization, images).
    ``fixed_input_amax`` (layer -> |x|): layers whose input range is known (the image's, never
    calibrated): their observers are set to it after calibration (``fix_input_observers``)."""
    import torch
    from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig, ModuleLinearQuantizerConfig

    model = copy.deepcopy(model).eval()
    model.check_input = lambda x: None  # a shape check torch.fx cannot trace; shapes are fixed here
    layer_config = ModuleLinearQuantizerConfig(
        quantization_scheme="symmetric",
        weight_dtype="qint8",
        weight_per_channel=True,
        weight_observer="min_max",
        activation_dtype="quint8",
        activation_observer="min_max",
    )
    config = LinearQuantizerConfig(
        module_type_configs={t: None for t in _supported_module_types()},
        module_name_configs={name: layer_config for name in int8_layers},
        non_traceable_module_names=unfuse_relus(model),
    )
    quantizer = LinearQuantizer(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantizer.prepare(example_inputs=(example,))
        prepared.eval()
        images = 0
        with torch.no_grad():
            for batch in batches:
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                if input_transform is not None:
                    x = input_transform(x)
                prepared(x)
                images += len(x)
        if images == 0:
            raise UserError("coreml int8: no calibration images")
        fix_input_observers(prepared, int8_layers, fixed_input_amax or {})
        finalized = quantizer.finalize(inplace=False)
    quantized = _input_quantization(finalized, int8_layers)
    missing = sorted(set(int8_layers) - set(quantized))
    if missing:
        raise UserError(f"coreml int8: LinearQuantizer did not quantize the inputs of {len(missing)} plan layers (first: {missing[0]})")
    return finalized, quantized, images


def fix_input_observers(prepared, int8_layers: Sequence[str], fixed_input_amax: Dict[str, float]) -> None:
    """Set the min/max observer feeding each layer of ``fixed_input_amax`` to its known range, so
    that finalize gives the plan's grid: symmetric quint8 has scale max|x| / 127.5 and zero point
    128, levels [-128, 127] * scale around 0, which would cut the top half step off; observing
    +-amax * 127.5 / 127 gives scale amax / 127 (the plan's), whose grid holds [-amax, amax]."""
    import torch

    from crossvit_edge.calibration.qdq import fp16_scale_holding

    fixed = dict(fixed_input_amax)
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        layer = _layer_of(str(node.target), int8_layers)
        if layer not in fixed or not node.args or getattr(node.args[0], "op", None) != "call_module":
            continue
        fake_quant = prepared.get_submodule(node.args[0].target)
        observer = getattr(fake_quant, "activation_post_process", None)
        if observer is None or not hasattr(observer, "min_val"):
            continue
        amax = fixed.pop(layer)
        # the program stores the scale in fp16: start from the smallest fp16 scale whose grid holds
        # amax, so the rounding can only widen it
        bound = torch.tensor(fp16_scale_holding(amax) * 127.5, dtype=torch.float32)
        while True:  # float32 division may land a level short: widen by ulps until 127 * scale >= amax
            observer.min_val.copy_(-bound)
            observer.max_val.copy_(bound)
            scale, zero_point = observer.calculate_qparams()
            value = float(scale.reshape(-1)[0])
            if value * 127.0 >= amax and float(np.float16(value)) * 127.0 >= amax:
                break
            bound = torch.nextafter(bound, torch.tensor(float("inf")))
        fake_quant.scale.copy_(scale)
        fake_quant.zero_point.copy_(zero_point)
    if fixed:
        raise UserError(f"coreml int8: no input observer found for {sorted(fixed)[0]} (its range is fixed by the preprocessing)")


def _input_quantization(gm, int8_layers: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """layer -> {scale, zero_point} of the activation quantization feeding it."""
    import torch

    out: Dict[str, Dict[str, float]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        layer = _layer_of(str(node.target), int8_layers)
        if layer is None or not node.args:
            continue
        dq = node.args[0]
        if getattr(dq, "op", None) == "call_method" and dq.target == "dequantize":
            q = dq.args[0]
            if q.op == "call_function" and q.target is torch.quantize_per_tensor:
                scale = getattr(gm, q.args[1].target)
                zp = getattr(gm, q.args[2].target)
                out[layer] = {"scale": float(scale), "zero_point": int(zp)}
    return out


# --------------------------------------------------------------------------------------------------
# Conversion


@contextlib.contextmanager
def _quiet():
    """ct.convert draws progress bars on stderr and warns about untested torch versions."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _convert(source, ct, input_type, precision: str, fp32_ops: Sequence[str], target, compute_units: str):
    if precision == "fp32":
        compute_precision = ct.precision.FLOAT32
    elif fp32_ops:
        keep = set(fp32_ops)
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type not in keep)
    else:
        compute_precision = ct.precision.FLOAT16
    with _quiet():
        return ct.convert(
            source,
            inputs=[input_type],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
            convert_to="mlprogram",
            compute_precision=compute_precision,
            minimum_deployment_target=target,
            compute_units=getattr(ct.ComputeUnit, compute_units),
            skip_model_load=True,
        )


def weight_const_names(mlmodel) -> List[str]:
    """Names of the const ops that feed the ``weight`` input of the program's linear / conv ops."""
    fn = mlmodel.get_spec().mlProgram.functions["main"]
    names = []
    for op in fn.block_specializations[fn.opset].operations:
        if op.type in WEIGHT_OP_TYPES and "weight" in op.inputs:
            names += [b.name for b in op.inputs["weight"].arguments if b.WhichOneof("binding") == "name"]
    return sorted(set(names))


def quantize_weights(mlmodel):
    """Weight-only int8 (symmetric, per output channel) of every linear / conv weight. The weights
    are named one by one: an op-type config would conflict wherever the converter deduplicated a
    constant between a weighted op and another one (e.g. two all-zero biases)."""
    import coremltools.optimize.coreml as cto

    op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    config = cto.OptimizationConfig(op_name_configs={name: op_config for name in weight_const_names(mlmodel)})
    with _quiet():
        return cto.linear_quantize_weights(mlmodel, config=config)


def package_bytes(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _set_metadata(mlmodel, ctx, info: Dict[str, Any]) -> None:
    import crossvit_edge

    spec = ctx.spec
    labels = ctx.labels
    pre = ctx.preprocessing
    mlmodel.author = "crossvit_edge"
    mlmodel.license = ctx.checkpoint.metadata.get("license") or LICENSE
    mlmodel.version = str(ctx.checkpoint.metadata.get("version") or crossvit_edge.__version__)
    mlmodel.short_description = (
        f"{ctx.model_name} (CrossViT) image classifier, {ctx.checkpoint.num_classes} classes, "
        f"{spec.precision} build by crossvit_edge"
    )
    meta = {
        "model": ctx.model_name,
        "precision": spec.precision,
        "preprocessing": json.dumps(pre.to_dict()),
        "labels": json.dumps(labels) if labels else "",
        "num_classes": str(ctx.checkpoint.num_classes),
        "minimum_deployment_target": info["minimum_deployment_target"],
        "compute_units": info["compute_units"],
        "image_input": json.dumps(info["image_input"]),
        "crossvit_edge.version": crossvit_edge.__version__,
    }
    for key, value in meta.items():
        mlmodel.user_defined_metadata[key] = value
    size = pre.input_size
    if info["image_input"]:
        mlmodel.input_description[INPUT_NAME] = (
            f"RGB image, {size}x{size}, resized (short side {pre.resize_size}, bicubic) and centre-cropped; "
            f"normalisation is inside the model"
        )
    else:
        mlmodel.input_description[INPUT_NAME] = (
            f"float32 (batch, 3, {size}, {size}) RGB, resized (short side {pre.resize_size}, bicubic), centre-cropped, "
            f"scaled to [0, 1] and normalised with mean {list(pre.mean)} and std {list(pre.std)}"
        )
    classes = f"; class order in metadata 'labels': {', '.join(labels[:10])}{' ...' if labels and len(labels) > 10 else ''}" if labels else ""
    mlmodel.output_description[OUTPUT_NAME] = f"float32 (batch, {ctx.checkpoint.num_classes}) class logits (apply softmax for probabilities){classes}"


class CoreMLConverter(Converter):
    target = "coreml"
    precisions = TARGET_PRECISIONS["coreml"]  # crossvit_edge.convert_flags: the one table
    requires = ("coremltools",)
    extra = "coreml"

    def needs_calibration(self, spec) -> bool:
        return spec.precision == "int8"

    def validate(self, spec) -> None:
        super().validate(spec)
        ct = _coremltools()
        name = target_name(spec)
        target = parse_deployment_target(name)
        if target < ct.target.iOS15:
            raise UserError(f"Core ML ML Programs need minimum_deployment_target iOS15 / macOS12 or newer, the build asks for {name}")
        if spec.precision == "int8" and target < parse_deployment_target(W8A8_TARGET):
            raise UserError(
                f"--precision int8 (W8A8) on Core ML needs minimum_deployment_target iOS17 / macOS14 or newer, "
                f"the build asks for {name}; use --precision int8-weights or fp16 for {name}"
            )
        units = str(spec.target_option("compute_units", DEFAULT_COMPUTE_UNITS))
        if units not in COMPUTE_UNITS:
            raise UserError(f"unknown Core ML compute_units {units!r}; choose one of: {', '.join(COMPUTE_UNITS)}")
        if bool(spec.target_option("image_input", False)) and spec.batch_size != 1:
            raise UserError(f"--image-input takes one image per prediction: use --batch-size 1 (got {spec.batch_size})")
        if spec.precision == "int8" and spec.calibration.data is None:
            raise UserError(
                "--target coreml --precision int8 calibrates activations in PyTorch (LinearQuantizer) and needs "
                "calibration images: pass --calib-data DIR"
            )
        ops = _fp32_ops(spec)
        if spec.precision == "fp32" and ops:
            log.info("fp32_ops has no effect on an fp32 build")

    def convert(self, ctx, out_dir: Path) -> Artifact:
        import torch

        ct = _coremltools()
        spec = ctx.spec
        precision = spec.precision
        tname = target_name(spec)
        target = parse_deployment_target(tname)
        units = str(spec.target_option("compute_units", DEFAULT_COMPUTE_UNITS))
        image_input = bool(spec.target_option("image_input", False))
        fp32_ops = _fp32_ops(spec) if precision != "fp32" else ()
        pre = ctx.preprocessing
        size = ctx.fp32_model.config.img_size
        example = torch.zeros(spec.batch_size, 3, size, size)
        shape = (spec.batch_size, 3, size, size)
        if image_input:
            input_type = ct.ImageType(
                name=INPUT_NAME, shape=shape, scale=1.0 / 255.0, bias=[-m for m in pre.mean], color_layout=ct.colorlayout.RGB
            )
        else:
            input_type = ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)
        report: Dict[str, Any] = {}

        from crossvit_edge.crossvit import for_export

        source_model = ctx.calibration.model if precision == "int8" and ctx.calibration is not None else ctx.fp32_model
        model = for_export(source_model)  # a copy with the explicit attention graph
        transform = None
        if image_input:
            fold_input_std(model, pre.std)
            std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
            transform = lambda x: x * std  # noqa: E731  (normalised -> pixel/255 - mean)

        if precision == "int8":
            if ctx.plan is None:
                raise UserError("--precision int8 needs a quantization plan (calibration did not run)")
            layers = [l.name for l in ctx.plan.int8_layers()]
            if not layers:
                raise UserError("the quantization plan has no int8 layers: nothing to quantize for --precision int8")
            log.info("W8A8: calibrating %d plan layers with LinearQuantizer", len(layers))
            # the layers fed the image take its exact range (the plan's), in this program's input units:
            # with the image input the std is folded into the first convs, so they see pixel - mean
            fixed = {l.name: l.input_amax for l in ctx.plan.int8_layers() if getattr(l, "input_range", None) is not None}
            if fixed and image_input:
                from crossvit_edge.calibration.plan import image_input_ranges

                exact = image_input_ranges(model, pre.mean, (1.0, 1.0, 1.0))
                fixed = {name: exact[name] for name in fixed}
            finalized, quantized, images = calibrate_w8a8(model, layers, ctx.calibration_batches(), example, transform, fixed)
            removed = strip_output_qdq(finalized, layers)
            folded = fold_static_shapes(finalized, example)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(finalized, example, check_trace=False)
            mlmodel = _convert(traced, ct, input_type, precision, fp32_ops, target, units)
            for layer, q in quantized.items():
                plan_scale = ctx.plan.get(layer).input_scale
                q["plan_scale"] = plan_scale  # the project's own calibrated clipping, for comparison
            report["w8a8"] = {
                "quantizer": "coremltools.optimize.torch.quantization.LinearQuantizer",
                "calibration_images": images,
                "observers": "min_max (activations per tensor, weights per output channel)",
                "activation_dtype": "quint8 symmetric (int8 in the program)",
                "int8_layers": len(layers),
                "output_qdq_removed": removed,
                "shape_values_folded": folded,
                "input_quantization": quantized,  # LinearQuantizer's (quint8, zero point 128 = int8 0)
            }
            path_desc = "LinearQuantizer (torch.fx) -> finalize -> torch.jit.trace -> ct.convert"
        else:
            exported = _export(model, example)
            mlmodel = _convert(exported, ct, input_type, "fp32" if precision == "fp32" else "fp16", fp32_ops, target, units)
            path_desc = "torch.export -> ct.convert"
            if precision == "int8-weights":
                mlmodel = quantize_weights(mlmodel)
                path_desc += " -> coremltools.optimize.coreml.linear_quantize_weights"

        info = {
            "minimum_deployment_target": tname,
            "compute_units": units,
            "image_input": image_input,
            "compute_precision": "fp32" if precision == "fp32" else "fp16",
            "fp32_ops": list(fp32_ops),
            "device": spec.target_option("device"),
        }
        _set_metadata(mlmodel, ctx, info)
        name = f"{ctx.model_name}_{precision}.mlpackage"
        path = Path(out_dir) / name
        mlmodel.save(str(path))
        # coremltools' torch.export frontend leaves an ExecuTorch debug-handle map in the package.
        debug_map = path / "executorch_debug_handle_mapping.json"
        if debug_map.is_file():
            debug_map.unlink()

        program = MILProgram.load(path)
        runnable, checker_note = True, None
        try:
            program.check_supported()
        except MILCheckerError as e:
            checker_note = str(e)
            runnable = platform.system() == "Darwin"
            log.warning("%s", e)
        weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        report.update(
            {
                "conversion": path_desc,
                **info,
                "opset": program.opset,
                "specification_version": mlmodel.get_spec().specificationVersion,
                "op_counts": program.op_counts(),
                "op_output_dtypes": program.output_dtype_counts(),
                "int8_ops": program.int8_ops(),
                "package_bytes": package_bytes(path),
                "weights_bytes": weights.stat().st_size if weights.is_file() else 0,
                "checker": checker_note or "the numpy MIL checker implements every op of this program",
            }
        )
        model_input: Dict[str, Any]
        if image_input:
            model_input = {"type": "image", "color_layout": "RGB", "size": [size, size], "scale": 1.0 / 255.0,
                           "bias": [-m for m in pre.mean], "std": "folded into the first conv of each patch embedding"}
        else:
            model_input = {"type": "multiarray", "dtype": "float32", "shape": list(shape), "normalised": True}
        manifest = {
            "coreml": {
                **info,
                "opset": program.opset,
                "model_input": model_input,
                "package_bytes": report["package_bytes"],
                "int8_ops": report["int8_ops"],
            }
        }
        log.info("wrote %s (%.1f MiB, opset %s)", name, report["package_bytes"] / 2**20, program.opset)
        return Artifact(primary=name, kind="mlpackage", manifest=manifest, report=report, runnable_here=runnable)


# --------------------------------------------------------------------------------------------------
# Runner


class CoreMLRunner(Runner):
    """Core ML's own prediction (``MLModel.predict``) on macOS; elsewhere the numpy ML Program
    checker of ``crossvit_edge.converters.coreml_mil``, which executes the saved program op by op (fp16 tensors
    rounded to fp16 after every op). ``backend`` forces one ("coreml" or "checker")."""

    target = "coreml"
    # off macOS the numpy checker runs no native code on the package; Core ML itself runs on macOS,
    # where a fork without exec is unsafe (crossvit_edge.isolation is Linux only)
    isolate_first_load = False

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None, backend: Optional[str] = None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        from crossvit_edge.preprocess import Preprocessing

        info = manifest.get("coreml", {})
        self.image_input = bool(info.get("image_input", False))
        self.compute_units = info.get("compute_units", DEFAULT_COMPUTE_UNITS)
        self.preprocessing = Preprocessing.from_dict(manifest.get("preprocessing", {}))
        self.backend = backend or ("coreml" if platform.system() == "Darwin" else "checker")
        if self.backend == "coreml":
            ct = _coremltools()
            self._version = ct.__version__
            self.model = ct.models.MLModel(str(self.artifact_path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        elif self.backend == "checker":
            self.program = MILProgram.load(self.artifact_path)
            self.program.check_supported()
        else:
            raise UserError(f"unknown Core ML runner backend {backend!r}; use 'coreml' (macOS) or 'checker'")

    @classmethod
    def check_artifact(cls, root, manifest, rel, source) -> None:
        from .coreml_mil import check_package

        check_package(root, manifest, rel, source)

    @property
    def timing_meaningful(self) -> bool:
        """The numpy checker's times say nothing about Core ML on an Apple device: the harness
        reports its accuracy but leaves its latency out."""
        return self.backend == "coreml"

    @property
    def description(self) -> str:
        if self.backend == "coreml":
            return f"Core ML (coremltools {self._version}) MLModel.predict, compute units {self.compute_units}"
        return (
            f"crossvit_edge numpy ML Program checker (not Core ML: Core ML runs on Apple platforms only), "
            f"opset {self.program.opset}, fp16 tensors rounded per op"
        )

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        """Normalised NCHW -> the 0..255 RGB pixels an app would pass as the image."""
        mean = np.asarray(self.preprocessing.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.preprocessing.std, np.float32).reshape(1, 3, 1, 1)
        return np.clip(np.round((images * std + mean) * 255.0), 0, 255).astype(np.float32)

    def run(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape[0] != self.batch_size:
            raise UserError(f"this Core ML model takes batches of {self.batch_size}, got {images.shape[0]}")
        if self.backend == "checker":
            x = self._pixels(images) if self.image_input else images
            return np.asarray(self.program.run({INPUT_NAME: x}, threads=self.threads or 1)[OUTPUT_NAME], dtype=np.float32)
        if self.image_input:
            from PIL import Image

            outs = []
            for px in self._pixels(images).astype(np.uint8):
                image = Image.fromarray(np.ascontiguousarray(px.transpose(1, 2, 0)), mode="RGB")
                outs.append(np.asarray(self.model.predict({INPUT_NAME: image})[OUTPUT_NAME], dtype=np.float32))
            return np.concatenate(outs)
        return np.asarray(self.model.predict({INPUT_NAME: images})[OUTPUT_NAME], dtype=np.float32)

    def probe(self, points, layers, context=None):
        """The numpy ML Program checker's values of the saved program, op by op (Core ML itself
        exposes no intermediate values); on the checker backend its logits are this runner's own."""
        from .probe import locate

        program = self.program if self.backend == "checker" else MILProgram.load(self.artifact_path)
        program.check_supported()
        located = locate(points, layers, mil_graph_ops(program))
        return MILProbe(program, located, self, same_as_runner=self.backend == "checker")


def mil_graph_ops(program: MILProgram) -> List[Any]:
    """``probe.GraphOp`` records of an ML Program: ``linear`` / ``conv`` with a constant weight
    (their weights are in PyTorch layout already), activation ``dequantize`` as an epilogue with its
    grid, adds of a constant as epilogues, adds of two activations, the rest as other ops."""
    from .probe import INTEGER_RANGES, GraphOp, Quant

    const_types = {n: t for op in program.ops if op.type == "const" or op.type.startswith("constexpr_") for n, t in op.outputs}
    program._prepare_consts()
    values = program._consts

    def names(op, key):
        return [ref for kind, ref in op.inputs.get(key, []) if kind == "name"]

    def const_value(op, key):
        bound = op.inputs.get(key, [])
        if not bound:
            return None
        kind, ref = bound[0]
        return values.get(ref) if kind == "name" else None

    ops = []
    for op in program.ops:
        if op.type == "const" or op.type.startswith("constexpr_") or not op.outputs:
            continue
        acts = tuple(ref for bindings in op.inputs.values() for kind, ref in bindings if kind == "name" and ref not in const_types)
        g = GraphOp("other", acts, op.outputs[0][0], op.name)
        weight = names(op, "weight")
        if op.type in ("linear", "conv") and weight and weight[0] in const_types and names(op, "x"):
            g.kind, g.weight_shape = "layer", const_types[weight[0]].shape
            g.inputs = tuple(names(op, "x")) + tuple(a for a in acts if a not in names(op, "x"))
        elif op.type == "add":
            g.kind = "add" if len(acts) == 2 else "epilogue"
        elif op.type == "dequantize" and len(acts) == 1:
            scale, zp = const_value(op, "scale"), const_value(op, "zero_point")
            data = next((program_var_type(program, a) for a in acts), None)
            if scale is not None and np.asarray(scale).size == 1 and data in INTEGER_RANGES:
                g.kind = "epilogue"
                g.quant = Quant(float(np.asarray(scale).reshape(())), int(np.asarray(zp).reshape(())) if zp is not None else 0, *INTEGER_RANGES[data])
        elif op.type == "quantize" and len(acts) == 1:
            g.kind = "epilogue"
        ops.append(g)
    return ops


def program_var_type(program: MILProgram, name: str) -> Optional[str]:
    """The dtype name (``"int8"``, ``"fp16"`` ...) a variable of ``program`` is declared with."""
    for op in program.ops:
        for n, t in op.outputs:
            if n == name:
                return t.dtype_name.lower()
    return None


class MILProbe:
    """The checker's run of the program, keeping the located variables."""

    def __init__(self, program: MILProgram, located, runner: CoreMLRunner, same_as_runner: bool):
        from .probe import wanted_tensors

        self.program, self.located, self.runner, self.same_as_runner = program, located, runner, same_as_runner
        self.names = wanted_tensors(located)
        backend = "the runner's own computation" if same_as_runner else "not Core ML's: this runner's logits come from Core ML itself"
        self.source = f"crossvit_edge numpy ML Program checker, every op of the saved program ({backend})"

    def run(self, images: np.ndarray):
        images = np.ascontiguousarray(images, dtype=np.float32)
        x = self.runner._pixels(images) if self.runner.image_input else images
        env = self.program.run({INPUT_NAME: x}, threads=self.runner.threads or 1, keep=self.names)
        out = {key: np.asarray(env[loc.tensor], np.float32) for key, loc in self.located.items() if loc.tensor is not None}
        logits = np.asarray(env[OUTPUT_NAME], np.float32)
        out["logits"] = logits
        return out, (logits if self.same_as_runner else None)

    def close(self) -> None:
        pass
