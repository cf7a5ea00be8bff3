"""Core AI target (iOS 27 / macOS 27): ``.aimodel`` assets at fp16, weight-only int8 and W8A8.

Apple's Core AI stack (docs/coreai.md): ``coreai-torch`` converts a decomposed ``torch.export``
program to Core AI IR and saves it as an ``.aimodel`` asset folder (``main.mlirb`` MLIR bytecode,
``main.hash`` its sha256, ``metadata.json``); ``coreai-core`` carries the runtime. How each
precision is built:

* ``fp16``: the fp32 model in export form (``crossvit.for_export``: LayerNorm and softmax stay fp32
  inside the fp16 model, as on every other target) cast to fp16 behind float32 input and output
  (``crossvit.fp16_inside``), exported, decomposed with ``coreai_torch.get_decomp_table()`` and
  converted. Input ``image`` (float32 NCHW), output ``logits`` (float32).
* ``int8-weights``: the fp16 program with the weight of every Linear and Conv2d stored int8
  (symmetric, per output channel, [-127, 127]) behind ``coreai::constexpr_blockwise_shift_scale``,
  the op coreai-opt's own export writes for quantized weights.
* ``int8`` (W8A8): the quantization plan as explicit Q/DQ (``calibration.qdq.apply_qdq``, the same
  plan layers and calibrated input scales as the ONNX, TensorRT and ExecuTorch builds), its two ops
  rewritten to Core AI's: each plan layer's input becomes ``coreai::quantize`` (int8, per tensor,
  the plan's scale, taken up to the next fp16 value where fp16's nearest would narrow the plan's
  range) -> ``coreai::dequantize``, each weight ``constexpr_blockwise_shift_scale`` on
  int8 data. These are exactly the ops coreai-opt's ``Quantizer.finalize`` writes for a W8A8 model
  (coreai_opt/quantization/_graph/_prepare_for_export.py); the numbers are ours rather than its
  observers', so LayerNorm, softmax, GELU, residual adds and concatenations stay float as the plan
  decides and every target quantizes the same tensors with the same scales.

Running here: ``coreai.runtime`` (coreai-core's Linux wheel) does run an asset. ``AIModel.load``
on the ``.aimodel`` folder itself fails with "No such file or directory" because it opens a
compiled form (``main-unspecialized.odix`` or ``program.odix``, seen with strace) that only the OS
framework's specialization writes; coreai-core's ``AIModelAsset.executable()`` lowers the IR to
ODIX in a temporary ``.aimodelx`` folder and loads that, which is what ``CoreAIRunner`` does, on a
private copy of the verified bytes. That is Apple's portable CPU path, not the Neural Engine: its
numbers are the program's, its times say nothing about a device.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from crossvit_edge.convert_flags import TARGET_PRECISIONS
from crossvit_edge.errors import UserError, brief

from .base import Artifact, Converter, Runner

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FUNCTION = "main"
# what coreai-core 1.0.0b3's AIProgram.save_asset writes, and all a bundle's asset may hold: any
# other file would be read by the runtime unverified (a precompiled main-unspecialized.odix or
# program.odix is loaded *instead of* the IR, see the module docstring)
BYTECODE, HASH, METADATA = "main.mlirb", "main.hash", "metadata.json"
ASSET_FILES = (BYTECODE, HASH, METADATA)
BYTECODE_MAGIC = b"ML\xefR"  # MLIR bytecode's magic number
MAX_METADATA_BYTES = 1 << 16
DEFAULT_MINIMUM_OS = "iOS27"
MINIMUM_OS = ("iOS27", "macOS27")
_DTYPES = {"Float32": "float32", "Float16": "float16", "Int8": "int8", "Int32": "int32"}
_SIGNATURE = re.compile(r"NDArray \((\w+), ([0-9 ×]*)\)")



# --------------------------------------------------------------------------------------------------
# PyTorch side: Core AI's quantization ops in place of the plan's Q/DQ


def _coreai_ops():
    """The ``coreai::`` custom ops, registered with torch by coreai-torch's compression layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only validated with torch<=2.13" (docs/coreai.md pins)
        import coreai_torch._compression.custom_layers  # noqa: F401
    import torch

    return torch.ops.coreai


def _weight(q: "torch.Tensor", scale: "torch.Tensor", axis: int):
    """int8 data -> float weight through ``constexpr_blockwise_shift_scale`` (scale of the data's
    rank: one block per output channel)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return _coreai_ops().constexpr_blockwise_shift_scale(q, scale.reshape(shape))


def _int8_input(x, scale):
    ops = _coreai_ops()
    import torch

    return ops.dequantize(ops.quantize(x, scale.to(x.dtype), torch.int8), scale.to(x.dtype))


def _fp16_input_scale(scale: "torch.Tensor") -> "torch.Tensor":
    """The plan's per-tensor input scale as the fp16 program will hold it, rounded up so that the
    grid never narrows below the plan's range (nearest rounding clipped the image at its bound)."""
    import torch

    from crossvit_edge.calibration.qdq import fp16_scale_holding

    return torch.tensor(fp16_scale_holding(float(scale.reshape(-1)[0]) * 127.0), dtype=torch.float32).reshape(scale.shape)


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class CoreAIQDQLinear(nn.Module):
        """``calibration.qdq.QDQLinear`` with Core AI's ops: same int8 weight, scales, bias."""

        def __init__(self, m):
            super().__init__()
            for name in ("weight_int8", "weight_scale"):
                self.register_buffer(name, getattr(m, name).detach().clone())
            self.register_buffer("input_scale", _fp16_input_scale(m.input_scale))
            self.axis = m.axis
            self.bias = m.bias

        def forward(self, x):
            w = _weight(self.weight_int8, self.weight_scale, self.axis).to(x.dtype)
            y = torch.matmul(_int8_input(x, self.input_scale), w)
            return y + self.bias.to(x.dtype) if self.bias is not None else y

    class CoreAIQDQConv2d(nn.Module):
        def __init__(self, m):
            super().__init__()
            for name in ("weight_int8", "weight_scale"):
                self.register_buffer(name, getattr(m, name).detach().clone())
            self.register_buffer("input_scale", _fp16_input_scale(m.input_scale))
            self.axis, self.bias = m.axis, m.bias
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups

        def forward(self, x):
            w = _weight(self.weight_int8, self.weight_scale, self.axis).to(x.dtype)
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return F.conv2d(_int8_input(x, self.input_scale), w, b, self.stride, self.padding, self.dilation, self.groups)

    class CoreAIQDQActivation(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.register_buffer("scale", _fp16_input_scale(m.scale))

        def forward(self, x):
            return _int8_input(x, self.scale)

    class Int8WeightLinear(nn.Module):
        """Weight-only int8: float input, int8 weight (per output channel) dequantized in the program."""

        def __init__(self, linear):
            super().__init__()
            from crossvit_edge.calibration.qdq import quantize_weight

            q, s = quantize_weight(linear.weight.detach(), axis=0)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", s)
            self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

        def forward(self, x):
            w = _weight(self.weight_int8, self.weight_scale, 0).to(x.dtype)
            return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    class Int8WeightConv2d(nn.Module):
        def __init__(self, conv):
            super().__init__()
            from crossvit_edge.calibration.qdq import quantize_weight

            q, s = quantize_weight(conv.weight.detach(), axis=0)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", s)
            self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
            self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

        def forward(self, x):
            w = _weight(self.weight_int8, self.weight_scale, 0).to(x.dtype)
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    return CoreAIQDQLinear, CoreAIQDQConv2d, CoreAIQDQActivation, Int8WeightLinear, Int8WeightConv2d


def _replace(model, match) -> int:
    """Replace every submodule for which ``match(module)`` returns a new module; returns how many."""
    count = 0
    for name, m in list(model.named_modules()):
        new = match(m) if name else None
        if new is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        count += 1
    return count


def to_coreai_qdq(model) -> Dict[str, int]:
    """The plan's Q/DQ modules of ``model`` (``apply_qdq``) as Core AI quantize / dequantize (in place)."""
    from crossvit_edge.calibration.qdq import QDQActivation, QDQConv2d, QDQLinear

    lin, conv, act, _, _ = _modules()
    table = {QDQLinear: lin, QDQConv2d: conv, QDQActivation: act}
    counts = {"layers": 0, "activation_points": 0}

    def match(m):
        cls = table.get(type(m))
        if cls is None:
            return None
        counts["activation_points" if type(m) is QDQActivation else "layers"] += 1
        return cls(m)

    _replace(model, match)
    return counts


def int8_weights(model) -> int:
    """Every Linear and Conv2d weight of ``model`` stored int8 per output channel (in place)."""
    from torch import nn

    _, _, _, lin, conv = _modules()
    return _replace(model, lambda m: lin(m) if type(m) is nn.Linear else conv(m) if type(m) is nn.Conv2d else None)


def build_program(model, example):
    """``model`` (float32 in and out) -> Core AI ``AIProgram`` with input ``image``, output ``logits``."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coreai_torch

        exported = torch.export.export(model, (example,))
        exported = exported.run_decompositions(coreai_torch.get_decomp_table())
        converter = coreai_torch.TorchConverter(mode=coreai_torch.TorchConverter.Mode.RELEASE)
        converter.add_exported_program(exported, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
        return converter.to_coreai()


def asset_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("coreai-core", "coreai-torch")}


# --------------------------------------------------------------------------------------------------
# Converter


class CoreAIConverter(Converter):
    target = "coreai"
    precisions = TARGET_PRECISIONS["coreai"]  # crossvit_edge.convert_flags: the one table
    requires = ("coreai_torch", "coreai.runtime")
    extra = "coreai"

    def validate(self, spec) -> None:
        super().validate(spec)
        os_name = str(spec.target_option("minimum_os", DEFAULT_MINIMUM_OS))
        if os_name not in MINIMUM_OS:
            raise UserError(f"coreai.minimum_os {brief(os_name)} is not supported; choose one of: {', '.join(MINIMUM_OS)}")

    def convert(self, ctx, out_dir: Path) -> Artifact:
        import torch

        from crossvit_edge.crossvit import fp16_inside, for_export

        spec = ctx.spec
        precision = spec.precision
        report: Dict[str, Any] = {}
        if precision == "int8":
            if ctx.plan is None:
                raise UserError("--precision int8 needs a quantization plan (calibration did not run)")
            if not ctx.plan.int8_layers():
                raise UserError("the quantization plan has no int8 layers: nothing to quantize for --precision int8")
            model = ctx.model_for_export()  # the plan's Q/DQ on the calibrated model
            counts = to_coreai_qdq(model)
            report["w8a8"] = {
                "form": "coreai::quantize -> coreai::dequantize on each plan layer's input (int8, per tensor, the plan's "
                        "scale rounded up to fp16); coreai::constexpr_blockwise_shift_scale on int8 weights (per output channel)",
                "int8_layers": counts["layers"],
                "activation_points": counts["activation_points"],
                "scales": "crossvit_edge.calibration.plan (the same as every other target's int8 build)",
            }
        else:
            model = for_export(ctx.fp32_model)
            if precision == "int8-weights":
                report["int8_weight_layers"] = int8_weights(model)
        wrapped = fp16_inside(model)
        example = ctx.example_input()
        with torch.no_grad():
            program = build_program(wrapped, example)
        os_name = str(spec.target_option("minimum_os", DEFAULT_MINIMUM_OS))
        name = f"{ctx.model_name}_{precision}.aimodel"
        path = Path(out_dir) / name
        from coreai.authoring.asset import OSVersion

        program.save_asset(path, minimum_os=OSVersion.v27)
        extra = sorted(p.name for p in path.iterdir() if p.name not in ASSET_FILES)
        if extra:  # a newer coreai-core writing more: refuse rather than ship files the check refuses
            raise UserError(f"coreai-core wrote {', '.join(extra)} into the asset; this crossvit_edge knows {', '.join(ASSET_FILES)}")
        summary = read_asset_summary(path)
        info = {
            "minimum_os": os_name,
            "compute_dtype": "float16",
            "device": spec.target_option("device"),
            "function": FUNCTION,
            **_versions(),
        }
        report.update({
            "conversion": "torch.export -> run_decompositions(coreai_torch.get_decomp_table()) -> coreai_torch.TorchConverter "
                          "-> AIProgram.save_asset",
            **info,
            "operation_distribution": summary["operations"],
            "storage_types": summary["storage_types"],
            "asset_bytes": asset_bytes(path),
        })
        manifest = {"coreai": {**info, "asset_bytes": report["asset_bytes"], "storage_types": summary["storage_types"]}}
        log.info("wrote %s (%.1f MiB)", name, report["asset_bytes"] / 2**20)
        return Artifact(primary=name, kind="aimodel", manifest=manifest, report=report)


# --------------------------------------------------------------------------------------------------
# Reading an asset (as data first, then through coreai-core's reader in a child process)


def _parse_signature(entries) -> List[Any]:
    from crossvit_edge.artifact_check import TensorSignature

    out = []
    for name, desc in entries:
        m = _SIGNATURE.fullmatch(str(desc))
        if m is None:
            out.append(TensorSignature(str(name), (), brief(str(desc), 60)))
            continue
        dims = tuple(int(d) for d in m.group(2).replace("×", " ").split())
        out.append(TensorSignature(str(name), dims, _DTYPES.get(m.group(1), m.group(1))))
    return out


def read_asset_summary(path: Path) -> Dict[str, Any]:
    """coreai-core's summary of an asset folder (its own reader of the bytecode): functions, the
    ``main`` signature, storage types, operation counts. Raises on an unreadable asset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coreai.authoring.asset import AIModelAsset

    summary = AIModelAsset.load(Path(path)).summary(include_statistics=True)
    if summary is None:
        raise UserError("the asset holds no program")
    functions = list(summary.function_names)
    if FUNCTION not in functions:
        return {"functions": functions}
    return {
        "functions": functions,
        "inputs": [list(map(str, e)) for e in summary.function_inputs(FUNCTION)],
        "outputs": [list(map(str, e)) for e in summary.function_outputs(FUNCTION)],
        "states": [list(map(str, e)) for e in summary.function_states(FUNCTION)],
        "storage_types": [str(s) for s in summary.storage_types],
        "operations": [str(s) for s in summary.operation_distribution],
    }


def verified_copy(root: Path, manifest: Dict[str, Any], rel: str, source: str, dest: Path) -> Path:
    """The asset's three files as listed and verified (``read_listed_file``), written into a new
    asset folder under ``dest``: what coreai-core reads is exactly what was checked, and nothing
    else is in the folder it reads."""
    from crossvit_edge.artifact_check import read_listed_file

    root = Path(root).resolve()
    asset = root / rel
    out = Path(dest) / "model.aimodel"
    out.mkdir()
    for name in ASSET_FILES:
        if "files" in manifest:
            data = read_listed_file(root, manifest, asset / name, f"{source}: {rel}/{name}")
        else:  # the pipeline's post-conversion check, on the artifact it has just written
            data = (asset / name).read_bytes()
        (out / name).write_bytes(data)
    return out


def check_asset(root: Path, manifest: Dict[str, Any], rel: str, source: str) -> None:
    """An ``.aimodel`` of a verified bundle: a folder of exactly ``main.mlirb``, ``main.hash`` and
    ``metadata.json``, each listed and inside the bundle; MLIR bytecode whose sha256 is
    ``main.hash``; a metadata object; and the ``main`` function's signature, read by coreai-core's
    asset reader in a child process (native code on bundle bytes: a crash there is one error line),
    is the manifest's."""
    from crossvit_edge import isolation
    from crossvit_edge.artifact_check import check_file_identifier, check_referenced_file, check_signature, contained_path, read_listed_file
    from crossvit_edge.bundle import load_json_file

    root = Path(root).resolve()
    where = f"{source}: {rel}"
    try:
        asset = contained_path(root, root, rel, "artifact.file")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if not asset.is_dir():
        raise UserError(f"{where}: not a Core AI asset folder")
    for entry in sorted(asset.iterdir()):
        if entry.name not in ASSET_FILES:
            what = ("a precompiled form the runtime would load instead of the verified IR"
                    if entry.suffix == ".odix" else "not part of a Core AI asset this crossvit_edge writes")
            raise UserError(f"{where}: holds {brief(entry.name)} ({what}); an asset holds only {', '.join(ASSET_FILES)}")
    paths = {name: check_referenced_file(root, asset, name, manifest, where, f"asset file {name}") for name in ASSET_FILES}
    check_file_identifier(paths[BYTECODE], 0, BYTECODE_MAGIC, f"{where}/{BYTECODE}", "MLIR bytecode")
    digest = read_listed_file(root, manifest, paths[HASH], f"{where}/{HASH}")
    bytecode = read_listed_file(root, manifest, paths[BYTECODE], f"{where}/{BYTECODE}")
    if hashlib.sha256(bytecode).digest() != digest:
        raise UserError(f"{where}: {BYTECODE} does not match {HASH} (a truncated or corrupted asset)")
    metadata = load_json_file(paths[METADATA], f"{where}/{METADATA}", max_bytes=MAX_METADATA_BYTES)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("assetVersion"), str):
        raise UserError(f"{where}/{METADATA}: not Core AI asset metadata (an object with assetVersion)")

    def read() -> Dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="crossvit_coreai_check_") as tmp:
            try:
                return read_asset_summary(verified_copy(root, manifest, rel, source, Path(tmp)))
            except UserError:
                raise
            except Exception as e:  # coreai-core's reader: RuntimeError on bad bytecode
                raise UserError(f"{where}: coreai-core cannot read the asset ({brief(str(e), 120)})") from None

    summary = isolation.in_child(f"{where}: reading the asset with coreai-core", read)
    if FUNCTION not in summary["functions"]:
        raise UserError(f"{where}: the asset has no function {FUNCTION!r} (it has {brief(', '.join(summary['functions']), 80)})")
    if summary["states"]:
        raise UserError(f"{where}: function {FUNCTION!r} has state ({len(summary['states'])} tensors); a classifier has none")
    check_signature(_parse_signature(summary["inputs"]), _parse_signature(summary["outputs"]), manifest, where)


# --------------------------------------------------------------------------------------------------
# Runner


class CoreAIRunner(Runner):
    """coreai-core's runtime (``coreai.runtime``) on the asset: on Linux (and macOS without the OS
    framework) ``AIModelAsset.executable()`` lowers the IR to ODIX and runs it on the CPU; on macOS
    27 it loads through the OS Core AI framework. Either way from a private copy of the verified
    files."""

    target = "coreai"

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coreai.runtime as rt
            from coreai.authoring.asset import AIModelAsset

        self._rt = rt
        self._tmp = tempfile.mkdtemp(prefix="crossvit_coreai_")
        self._loop = asyncio.new_event_loop()
        self._cm = None
        try:
            rel = self.artifact_path.relative_to(self.bundle_dir.resolve()).as_posix()
            copy = verified_copy(self.bundle_dir, manifest, rel, str(self.bundle_dir.name), Path(self._tmp))
            self._cm = AIModelAsset.load(copy).executable()
            self._model = self._loop.run_until_complete(self._cm.__aenter__())
            self._fn = self._model.load_function(FUNCTION)
        except UserError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise UserError(f"{self.artifact_path.name}: the Core AI runtime cannot load the asset ({brief(str(e), 120)})") from None
        self._os_framework = bool(getattr(rt, "_use_os_coreai", False))
        self._version = _versions()["coreai-core"]

    @classmethod
    def check_artifact(cls, root, manifest, rel, source) -> None:
        check_asset(root, manifest, rel, source)

    @property
    def description(self) -> str:
        where = "the OS Core AI framework" if self._os_framework else "ODIX lowered on this host, CPU (not the Neural Engine)"
        return f"Core AI runtime (coreai-core {self._version}), {where}"

    @property
    def timing_meaningful(self) -> bool:
        """Off Apple devices the portable CPU path's times say nothing about an iPhone or Mac."""
        return self._os_framework

    def run(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape[0] != self.batch_size:
            raise UserError(f"this Core AI model takes batches of {self.batch_size}, got {images.shape[0]}")
        out = self._loop.run_until_complete(self._fn({INPUT_NAME: self._rt.NDArray(images)}))
        return np.array(out[OUTPUT_NAME].numpy(), dtype=np.float32)

    def probe(self, points, layers, context=None):
        """The runtime's own intermediate values (``coreai.runtime.IntermediateLogger``) at the
        points, located in the asset's IR (``coreai_graph_ops``) and found in the ODIX program through
        the lowering's debug info; batch 1 per run, as the runtime's logger reports one execution."""
        from .probe import locate

        if self._os_framework:
            raise UserError(f"{self.description}: the layer-wise probe lowers the asset itself (coreai-core's Linux path); "
                            "the OS framework's specialized program has no debug info mapping here")
        asset = Path(self._tmp) / "model.aimodel"  # the verified private copy the runner loaded
        try:
            ops, value_ids = coreai_graph_ops(ir_text(asset))
            located = locate(points, layers, ops)
            return CoreAIProbe(self, asset, located, value_ids)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{self.artifact_path.name}: cannot probe the Core AI asset ({brief(str(e), 160)})") from None

    def close(self) -> None:
        if self._cm is not None:
            try:
                self._loop.run_until_complete(self._cm.__aexit__(None, None, None))
            finally:
                self._cm = None
        if not self._loop.is_closed():
            self._loop.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Layer-wise comparison (crossvit_edge.layerwise): the IR as the point matcher sees it, and the
# runtime's IntermediateLogger at the ODIX ops lowered from the located IR values

_IR_OP = re.compile(r"^\s*(%[\w]+)(?::(\d+))? = ([\w.]+)(.*?)\s+loc\((#[\w]+)\)\s*$")
_IR_LOC = re.compile(r"^(#loc\d+) = (.*)$")
_IR_OP_ID = re.compile(r'^(#metadata\d+) = #debuginfo\.metadata<"op_id": \{type = "coreai", value = (\d+) : ui64\}>$')
_IR_TENSOR = re.compile(r"tensor<([0-9x]*?)x?([a-z]+\d*)>")
_IR_SCALAR = re.compile(r"^ dense<(-?[0-9.e+-]+)> : tensor<(?:1x)*(f16|f32)>$")
_IR_WEIGHT_PATH = ("coreai.transpose", "coreai.cast", "coreai.constexpr_blockwise_shift_scale")


def _ir_shape(text: str) -> Optional[Tuple[int, ...]]:
    found = _IR_TENSOR.findall(text)
    if not found:
        return None
    dims = found[-1][0]
    return tuple(int(d) for d in dims.split("x") if d) if dims else ()


def ir_text(asset_path: Path) -> str:
    """The asset's program as MLIR text with its debug locations (large constants elided)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coreai.authoring.asset import AIModelAsset, Context, load_module_from_bytecode

    asset = AIModelAsset.load(Path(asset_path))
    module = load_module_from_bytecode(context=Context()._mlir_context, path=asset._model_asset._program_bytecode_path)
    return str(module.operation.get_asm(enable_debug_info=True, large_elements_limit=16, large_resource_limit=16))


def coreai_graph_ops(text: str) -> Tuple[List[Any], Dict[str, Tuple[Optional[int], Optional[Tuple[int, ...]]]]]:
    """``probe.GraphOp`` records of the ``main`` graph of Core AI IR text (``ir_text``), and each
    value's (coreai operation id, shape): the id is the one coreai-torch put in the value's location,
    which the ODIX lowering's debug info maps its ops back to; None where the location has none or
    shares it with another value (the int8 asset has ids on several ops: a bias add and the resize
    matmul carried one id, and the runtime's values for it were the resize's). Weighted ops: ``broadcasting_batch_matmul`` whose second
    operand is a constant (through transpose / cast / the int8 weight expansion) and ``conv2d``
    with a constant weight, weight shapes in PyTorch layout; adds of a constant and quantize /
    dequantize as epilogues (a dequantize with its scalar scale as grid), adds of two activations."""
    from .probe import INTEGER_RANGES, GraphOp, Quant

    lines = text.splitlines()
    loc_meta = {m.group(1): m.group(2) for m in map(_IR_LOC.match, lines) if m}
    op_ids = {m.group(1): int(m.group(2)) for m in map(_IR_OP_ID.match, lines) if m}

    def op_id(loc: str) -> Optional[int]:
        body = loc_meta.get(loc, "")
        own = re.findall(r"metadata = \[([^\]]*)\]>$", body)  # the location's own metadata, after any fused ones
        ids = [op_ids[m.strip()] for m in own[-1].split(",") if m.strip() in op_ids] if own else []
        return ids[0] if ids else None

    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("coreai.graph @main(")), None)
    if start is None:
        raise UserError("the Core AI program has no main graph to probe")
    records = []  # (results, op name, operands, rest of the line, loc)
    for line in lines[start + 1:]:
        if line.strip() == "}":
            break
        m = _IR_OP.match(line)
        if m is None:
            continue
        name, count, kind, rest, loc = m.groups()
        results = [f"{name}#{i}" for i in range(int(count))] if count else [name]
        operands = re.findall(r"%[\w]+(?:#\d+)?", rest.split(" : ")[0])
        records.append((results, kind, operands, rest, loc))

    shape, const, kind_of, ids, scalars = {}, set(), {}, {}, {}
    for results, kind, operands, rest, loc in records:
        for r in results:
            shape[r], kind_of[r], ids[r] = _ir_shape(rest), kind, op_id(loc)
        if kind == "coreai.constant" or (operands and all(o in const for o in operands)):
            const.update(results)
            s = _IR_SCALAR.match(rest)
            if kind == "coreai.constant" and s:
                scalars[results[0]] = float(s.group(1))
    producer = {r: rec for rec in records for r in rec[0]}

    def weight_shape(value: str) -> Optional[Tuple[int, ...]]:
        """The PyTorch-layout shape of the constant behind a matmul's second operand."""
        transposed = False
        while value in producer and kind_of[value] in _IR_WEIGHT_PATH:
            transposed ^= kind_of[value] == "coreai.transpose"
            value = producer[value][2][0]
        s = shape.get(value)
        if value not in const or s is None or len(s) != 2:
            return None
        return s if transposed else s[::-1]  # a matmul's [in, out] constant is nn.Linear's [out, in] transposed

    ops = []
    for results, kind, operands, rest, loc in records:
        if results[0] in const:
            continue
        acts = tuple(o for o in operands if o not in const)
        g = GraphOp("other", acts, results[0], results[0])
        if kind == "coreai.decomposable.broadcasting_batch_matmul" and len(operands) == 2 and operands[0] not in const:
            w = weight_shape(operands[1]) if operands[1] in const else None
            if w is not None:
                g.kind, g.weight_shape = "layer", w
        elif kind in ("coreai.conv2d", "coreai.conv") and len(operands) > 1 and operands[0] not in const and operands[1] in const:
            g.kind, g.weight_shape = "layer", shape.get(operands[1])
        elif kind == "coreai.decomposable.broadcasting_add":
            g.kind = "add" if len(acts) == 2 else "epilogue"
        elif kind == "coreai.quantize" and len(acts) == 1:
            g.kind = "epilogue"
        elif kind == "coreai.dequantize" and len(acts) == 1:
            g.kind = "epilogue"
            data = _IR_TENSOR.findall(rest.split(" : ")[-1])
            dtype = {"si8": "int8", "i8": "int8", "ui8": "uint8"}.get(data[0][1]) if data else None
            scale = next((scalars[o] for o in operands if o in scalars), None)
            if dtype in INTEGER_RANGES and scale is not None:
                g.quant = Quant(scale, 0, *INTEGER_RANGES[dtype])
        ops.append(g)
    uses: Dict[int, int] = {}
    for i in ids.values():
        if i is not None:
            uses[i] = uses.get(i, 0) + 1
    return ops, {r: (i if i is not None and uses[i] == 1 else None, shape.get(r)) for r, i in ids.items()}


def odix_outputs(debug_infos: bytes) -> Dict[Tuple[int, int], List[Tuple[int, int]]]:
    """(coreai op id, output index) -> the ODIX ops (id, output index) that write that value, from
    the runtime's debug infos of a program lowered with ``enable_debug_info``."""
    import json

    out: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for table in json.loads(debug_infos):
        for op in table.get("operations", []):
            for meta in op.get("metadatas", []):
                if meta.get("key") != "output_maps":
                    continue
                for entry in meta["value"]["array"]["_0"]:
                    e = entry["dictionary"]["_0"]
                    source, target = e["source"]["dictionary"]["_0"], e["target"]["dictionary"]["_0"]
                    if source["level"]["string"]["_0"] != "coreai":
                        continue
                    key = (int(source["id"]["integer"]["_0"]), int(source["output"]["integer"]["_0"]))
                    out.setdefault(key, []).append((int(op["odixId"]), int(target["output"]["integer"]["_0"])))
    return out


class CoreAIProbe:
    """The asset lowered again with debug info, run by coreai-core's runtime with an
    ``IntermediateLogger`` on the ODIX ops that write the located IR values: the runtime's own
    values. A value several ODIX ops write is taken from the last write in the run."""

    def __init__(self, runner: "CoreAIRunner", asset_path: Path, located, values: Dict[str, Tuple[Optional[int], Any]]):
        from .probe import Located

        rt = runner._rt
        self._runner = runner
        self._dir = Path(tempfile.mkdtemp(prefix="crossvit_coreai_probe_", suffix=".aimodelx"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from coreai.authoring.asset import AIModelAsset
        AIModelAsset.load(asset_path)._write_odix(self._dir, enable_debug_info=True)
        self._model = runner._loop.run_until_complete(rt.AIModel.load(path=str(self._dir), specialization_options=None))
        writers = odix_outputs(self._model._debug_infos)
        self._targets: Dict[int, List[Tuple[str, int]]] = {}  # odix id -> (IR value, output index)
        self.located = {}
        for key, loc in located.items():
            if loc.tensor is None:
                self.located[key] = loc
                continue
            value = loc.tensor
            op_id, _ = values.get(value, (None, None))
            if op_id is None:
                self.located[key] = Located(None, loc.quant, f"IR value {value} has no operation id of its own (none, or shared with another op)")
                continue
            found = writers.get((op_id, int(value.partition("#")[2] or 0)), [])
            if not found:
                # the grid stays on the row: the IR's dequantize says it even where no value can be read
                self.located[key] = Located(None, loc.quant, f"no ODIX op of the lowered program writes IR value {value} (fused away)")
                continue
            self.located[key] = loc
            for odix, output in found:
                self._targets.setdefault(odix, []).append((value, output))
        self._shapes = {v: values[v][1] for targets in self._targets.values() for v, _ in targets}
        self._events: List[Tuple[int, Any]] = []
        self._logger = rt.IntermediateLogger(requested_intermediates=[rt.CompileIdentifiers(i) for i in self._targets],
                                             callback=self._record)
        self._fn = self._model.load_function(FUNCTION, intermediate_logger=self._logger)
        self.source = (f"{runner.description}: IntermediateLogger on {len(self._targets)} ODIX ops of the asset lowered "
                       "again with debug info (ops mapped to IR values by the lowering's output maps)")

    def _record(self, arrays, kind, ids) -> None:
        if kind == "output":
            self._events.append((int(ids.id), [None if a is None else self._runner._rt.NDArray._wrap(a).numpy().copy() for a in arrays]))

    def run(self, images: np.ndarray):
        from .probe import Located

        rt = self._runner._rt
        rows: List[Dict[str, np.ndarray]] = []
        logits = []
        for image in np.ascontiguousarray(images, dtype=np.float32):
            self._events = []
            out = self._runner._loop.run_until_complete(self._fn({INPUT_NAME: rt.NDArray(image[None])}))
            logits.append(np.array(out[OUTPUT_NAME].numpy(), dtype=np.float32))
            last: Dict[str, np.ndarray] = {}
            for odix, arrays in self._events:  # in execution order: the last write of a value wins
                for value, output in self._targets.get(odix, []):
                    a = arrays[output] if output < len(arrays) else None
                    if a is not None and tuple(a.shape) == self._shapes[value]:  # a write of another shape is not this value
                        last[value] = a
            rows.append({key: last[loc.tensor] for key, loc in self.located.items() if loc.tensor in last})
        values = {key: np.concatenate([np.asarray(r[key], np.float32) for r in rows]) for key in rows[0] if all(key in r for r in rows)}
        for key, loc in self.located.items():
            if loc.tensor is not None and key not in values:
                self.located[key] = Located(None, note=f"the runtime's logger delivered no write of IR value {loc.tensor} "
                                                       f"shaped {list(self._shapes[loc.tensor] or [])}")
        values["logits"] = np.concatenate(logits)  # this lowering's own logits: what the logger run computed
        return values, None

    def close(self) -> None:
        self._fn = self._model = self._logger = None
        shutil.rmtree(self._dir, ignore_errors=True)
