"""The TensorRT converter: the TensorRT-ready ONNX for the profile's TensorRT, checked statically
against its parser, ``build_engine.sh``, the manifest options the device builder reads, and, when
TensorRT and a matching GPU are present, the engine itself (``crossvit_edge.converters.tensorrt.device``).

INT8 is explicit Q/DQ for every profile by default (8.5 included): the graph carries the plan's
placement, TensorRT's rule checker passes it, and the engine computes what the accuracy check ran.
Implicit INT8 (``mode: implicit``, 8.5-10.x) is an option; see ``crossvit_edge.converters.tensorrt.implicit``.
"""
from __future__ import annotations

import importlib.util
import logging
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from crossvit_edge.convert_flags import TARGET_PRECISIONS
from crossvit_edge.errors import UserError

from ..base import Artifact, Converter
from .build_script import BUILD_SCRIPT, DEVICE_PROG, TIMING_CACHE, build_script, latency_flags, trtexec_flags
from .versions import FP32_PREFIX, TrtTarget, builder_flags, is_jetson, resolve_target, version_guard

log = logging.getLogger(__name__)


def _engine_possible(target: TrtTarget) -> Tuple[bool, str]:
    """(True, '') when this host can build the engine for ``target``: tensorrt importable, a GPU
    TensorRT can use, and a TensorRT the profile's bundle passes ``version_guard`` with."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed here"
    from . import device

    ok, why = device.device_status()
    if not ok:
        return False, why
    why = version_guard(target.version_text, device.installed_version(), dla=target.dla_core is not None,
                        jetson=is_jetson({"jetpack": target.jetpack, "device": target.device}))
    if why:
        return False, why
    sm = device.compute_capability()
    if target.sm and sm and sm != target.sm:
        return False, f"this GPU is sm {sm}, the profile targets sm {target.sm}"
    return True, ""


def _version_int(target: TrtTarget) -> int:
    from crossvit_edge.calibration.trt_cache import version_int

    return version_int(target.version)


def implicit_int8_graph(ctx, proto, target: TrtTarget, out_dir: Path, stem: str) -> Tuple[Any, str, Dict[str, Any], List[str]]:
    """Implicit INT8: the plain fp32 build graph (Q/DQ stripped, LayerNorm decomposed for 8.5), the
    calibration cache with a range for every float activation tensor of that graph, and the report
    of which nodes can run INT8. Returns (build graph, cache file, report, fp32 pinned layers)."""
    import onnx

    from crossvit_edge.calibration.trt_cache import amax_to_scale, format_cache

    from .implicit import activation_amax, float_activations, onnx_int8_report
    from .onnx_surgery import decompose_layernorm, int8_layer_io, strip_qdq

    if ctx.calibration is None or ctx.calibration.images is None:
        raise UserError("implicit INT8 needs calibration images (--calib-data DIR): the range of every tensor comes from running the fp32 graph on them")
    ios = int8_layer_io(proto, ctx.calibration.plan)
    weights = {}
    for io in ios:
        module = ctx.calibration.model.get_submodule(io.layer)
        w = module.weight.detach().float().cpu().numpy()
        weights[io.layer] = w.T if io.op_type == "MatMul" else w
    build = onnx.ModelProto()
    build.CopyFrom(proto)
    strip_qdq(build, ios, weights)
    fp32_layers = decompose_layernorm(build) if target.decompose_layernorm else []
    onnx.checker.check_model(build, full_check=True)

    amax, images = activation_amax(build, ctx.calibration_batches())
    source = {name: f"max |x| over {images} calibration images" for name in amax}
    # The plan's int8 layer inputs keep the plan's calibrated range (its method, not max |x|).
    plan_amax = {l.name: float(l.input_amax) for l in ctx.calibration.plan.int8_layers()}
    method = ctx.calibration.settings.get("method") if isinstance(ctx.calibration.settings, dict) else None
    for io in ios:
        if io.activation in amax:
            a = plan_amax[io.layer]
            if source[io.activation].startswith("plan"):
                a = max(a, amax[io.activation])
            amax[io.activation] = a
            source[io.activation] = f"plan ({method or 'calibrated'})"
    activations = float_activations(build)
    missing = [t for t in activations if t not in amax]
    if missing:  # pragma: no cover - activation_amax ranges exactly these
        raise UserError(f"implicit INT8: no range for tensor {missing[0]!r}")
    cache_file = f"{stem}.calib.cache"
    (out_dir / cache_file).write_text(format_cache(target.version, {t: amax_to_scale(max(amax[t], 1e-8)) for t in activations}))
    from_plan = sum(1 for s in source.values() if s.startswith("plan"))
    report = {
        "file": cache_file,
        "header": f"TRT-{_version_int(target)}-EntropyCalibration2",
        "tensors": len(activations),
        "activation_tensors_in_graph": len(activations),
        "ranges_from": {"plan": from_plan, "max_abs": len(activations) - from_plan},
        "calibration_images": images,
        "int8_layers": onnx_int8_report(build, activations, amax, FP32_PREFIX if fp32_layers else None),
    }
    return build, cache_file, report, fp32_layers


class TensorRTConverter(Converter):
    target = "tensorrt"
    precisions = TARGET_PRECISIONS["tensorrt"]  # crossvit_edge.convert_flags: the one table
    requires = ("onnx", "onnxruntime")

    def validate(self, spec) -> None:
        super().validate(spec)
        target = resolve_target(spec)
        if spec.option("require_engine"):
            ok, why = _engine_possible(target)
            if not ok:
                raise UserError(f"--require-engine: the TensorRT engine cannot be built here ({why}); build it on the device with build_engine.sh")

    def needs_calibration(self, spec) -> bool:
        return spec.precision == "int8"

    def convert(self, ctx, out_dir: Path) -> Artifact:
        import onnx

        from ..onnx import check_qdq_rules, export_for_precision
        from .onnx_surgery import decompose_layernorm
        from .static_check import static_check

        spec = ctx.spec
        target = resolve_target(spec)
        out_dir = Path(out_dir)
        precision = spec.precision
        stem = f"{ctx.model_name}_{precision}"
        files: List[str] = []
        cache_file: Optional[str] = None
        cache_info: Dict[str, Any] = {}
        reference: Optional[str] = None
        fp32_layers: List[str] = []
        onnx_name = f"{stem}.onnx"
        rewrite = False  # the build graph differs from what the export wrote
        if precision == "int8":
            if ctx.calibration is None:
                raise UserError("--precision int8 needs calibration (--calib-data DIR or --calib-stats FILE)")
            implicit = target.mode == "implicit"
            qdq_name = f"{stem}_qdq.onnx" if implicit or target.decompose_layernorm else onnx_name
            proto = export_for_precision(ctx, out_dir / qdq_name, target.opset, "int8", fp16_with_int8=target.strongly_typed)
            if implicit:
                # The Q/DQ graph stays in the bundle as the stand-in ONNX Runtime checks: what the
                # plan means. The engine is built from the plain graph plus the cache.
                reference = qdq_name
                build_proto, cache_file, cache_info, fp32_layers = implicit_int8_graph(ctx, proto, target, out_dir, stem)
                files.append(cache_file)
                onnx_name = f"{stem}_implicit.onnx"
                rewrite = True
            else:
                build_proto = proto
                if target.decompose_layernorm:
                    (out_dir / qdq_name).unlink()
                    fp32_layers = decompose_layernorm(build_proto)
                    rewrite = True
        else:
            fp16_graph = precision == "fp16" and target.strongly_typed
            build_proto = export_for_precision(ctx, out_dir / onnx_name, target.opset, "fp16" if fp16_graph else "fp32")
            if target.decompose_layernorm:
                fp32_layers = decompose_layernorm(build_proto)
                rewrite = True
        if rewrite:
            onnx.checker.check_model(build_proto, full_check=True)
            onnx.save(build_proto, str(out_dir / onnx_name))
        report = static_check(build_proto, target)
        if reference:
            files.append(reference)
            # The stand-in is for ONNX Runtime only (TensorRT never reads it; for 8.5 it keeps the
            # LayerNormalization op the 8.5 parser lacks), so it gets the Q/DQ rules, not the parser check.
            report["reference_onnx"] = {"file": reference, "qdq_nodes": check_qdq_rules(proto),
                                        "parser_check": "not applicable: ONNX Runtime stand-in, not given to TensorRT"}
        report["fp32_pinned_layers"] = len(fp32_layers)
        report["int8"] = int8_mode_summary(target, report, cache_info) if precision == "int8" else None
        if cache_info:
            report["calibration_cache"] = cache_info

        engine_name = f"{stem}.engine"
        layer_info = f"{stem}.layers.json"
        build = trtexec_flags(target, onnx_name, engine_name, layer_info, cache_file, fp32_layers)
        script = build_script(target, build, latency_flags(target, engine_name), cache_file, ctx.model_name)
        (out_dir / BUILD_SCRIPT).write_text(script)
        (out_dir / BUILD_SCRIPT).chmod(0o755)
        files.append(BUILD_SCRIPT)

        trt_manifest: Dict[str, Any] = {
            "version": target.version_text,
            "version_int": _version_int(target),
            "jetpack": target.jetpack,
            "device": target.device,
            "sm": target.sm,
            "mode": target.mode,
            "precision": precision,
            "network": target.network,
            "builder_flags": target.builder_flags,
            "dla": {"core": target.dla_core, "gpu_fallback": target.gpu_fallback} if target.dla_core is not None else None,
            "workspace_mib": target.workspace_mib,
            "opset": target.opset,
            "opset_requested": target.opset_requested,
            "onnx": onnx_name,
            "engine": engine_name,
            "engine_built": False,
            "calibration_cache": cache_file,
            "calibration_batch_size": spec.calibration.batch_size if cache_file else None,
            "fp32_layer_prefix": FP32_PREFIX if fp32_layers else None,
            "fp32_layers": len(fp32_layers),
            "timing_cache": TIMING_CACHE,
            "layer_info": layer_info,
            "build_script": BUILD_SCRIPT,
            "trtexec": "trtexec " + " ".join(shlex.quote(f) for f in build if not f.startswith("--layer")),
            "reference_onnx": reference or onnx_name,
            "int8": report["int8"],
            "parser": {"source": target.parser.source, "derived": target.parser.derived, "opset_range": [target.parser.opset_min, target.parser.opset_max]},
            "files": {"onnx": onnx_name, "calibration_cache": cache_file, "build_script": BUILD_SCRIPT, "reference_onnx": reference},
        }
        notes = list(target.notes)
        if cache_file:
            trtexec_float = cache_info["int8_layers"]["trtexec"]["float_for_lack_of_range"]
            notes.append(f"implicit INT8: build with python -m {DEVICE_PROG} BUNDLE --build (ranges every tensor); build_engine.sh (trtexec) leaves "
                         f"{trtexec_float} nodes fed by constant tensors in float; the accuracy check ran the Q/DQ stand-in, not this graph")
        fp16_baseline = None
        if precision == "int8" and spec.option("fp16_baseline", True):
            fp16_baseline, baseline_report = fp16_baseline_graph(ctx, target, out_dir)
            files.append(fp16_baseline["onnx"])
            report["fp16_baseline"] = baseline_report
        trt_manifest["fp16_baseline"] = fp16_baseline
        primary, runnable = onnx_name, False
        ok, why = _engine_possible(target)
        if ok:
            from .device import build_engine

            options = dict(trt_manifest, bundle_dir=str(out_dir))
            engine_bytes, info, build_report = build_engine(out_dir / onnx_name, options)
            (out_dir / engine_name).write_bytes(engine_bytes)
            (out_dir / layer_info).write_text(info)
            files += [layer_info] + ([TIMING_CACHE] if (out_dir / TIMING_CACHE).exists() else [])
            trt_manifest["engine_built"] = True
            report["engine_build"] = build_report
            primary, runnable = engine_name, True
            files.append(onnx_name)
        else:
            if spec.option("require_engine"):
                raise UserError(f"--require-engine: the TensorRT engine cannot be built here ({why})")
            notes.insert(0, f"engine must be built on the device: run sh {BUILD_SCRIPT} in the bundle on the {target.device or 'Jetson'} "
                            f"(TensorRT {target.version_text}), or python -m {DEVICE_PROG} BUNDLE --build --data DIR --output results.json "
                            f"(not built here: {why})")
        report["engine"] = {"built": trt_manifest["engine_built"], "reason": None if ok else why}
        return Artifact(
            primary=primary,
            kind="engine",
            files=files,
            manifest={"opset": target.opset, "tensorrt": trt_manifest, "notes": notes},
            report=report,
            runnable_here=runnable,
            check_with=reference or onnx_name,
        )


FP16_BASELINE_FORMAT = 1


def fp16_baseline_graph(ctx, target: TrtTarget, out_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """What the device needs to build the FP16 engine of the same model beside the INT8 one (so
    the report can say whether INT8 pays there): the fp32 model (no Q/DQ, no smoothing) exported
    for this TensorRT's mode. Strongly typed (10.x ``strongly-typed``, every 11.x) builds the
    precision the graph states, so the graph is fp16 inside with float32 I/O, as ``--precision
    fp16`` writes it; weakly typed and implicit builds take the fp32 graph with ``BuilderFlag.FP16``
    (``versions.builder_flags``). The 8.5 LayerNorm decomposition and its fp32 pins apply as in
    the main build. Returns (manifest ``tensorrt.fp16_baseline``, report entry)."""
    import onnx

    from crossvit_edge.crossvit import for_export

    from ..onnx import export_onnx, onnx_metadata
    from .onnx_surgery import decompose_layernorm
    from .static_check import static_check

    stem = f"{ctx.model_name}_fp16_baseline"
    onnx_name = f"{stem}.onnx"
    fp16_graph = target.strongly_typed
    metadata = {**onnx_metadata(ctx), "precision": "fp16"}
    proto = export_onnx(for_export(ctx.fp32_model), out_dir / onnx_name, ctx.spec.batch_size, opset=target.opset,
                        fp16=fp16_graph, metadata=metadata)
    pins: List[str] = []
    if target.decompose_layernorm:
        pins = decompose_layernorm(proto)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(out_dir / onnx_name))
    mode = target.mode if target.strongly_typed else "explicit"  # implicit INT8's mode means nothing without INT8
    flags = builder_flags(target.version, mode, "fp16", target.dla_core is not None, target.gpu_fallback, bool(pins) and not fp16_graph)
    section = {
        "format": FP16_BASELINE_FORMAT,
        "precision": "fp16",
        "mode": mode,
        "graph": "fp16 weights and activations, float32 I/O (strongly typed)" if fp16_graph else "fp32 graph, BuilderFlag.FP16 (weakly typed)",
        "onnx": onnx_name,
        "engine": f"{stem}.engine",
        "layer_info": f"{stem}.layers.json",
        "builder_flags": flags,
        "fp32_layer_prefix": FP32_PREFIX if pins else None,
        "fp32_layers": len(pins),
    }
    report = static_check(proto, target)
    report.update(file=onnx_name, bytes=(out_dir / onnx_name).stat().st_size, graph=section["graph"])
    return section, report


def int8_mode_summary(target: TrtTarget, report: Dict[str, Any], cache_info: Dict[str, Any]) -> Dict[str, Any]:
    """How this bundle's INT8 is made effective, in one record (manifest ``tensorrt.int8``)."""
    if target.mode == "implicit":
        layers = cache_info["int8_layers"]
        return {
            "mode": "implicit",
            "how": "calibration cache with a range for every float activation tensor of the build graph; "
                   "the Python builder adds constant and Shuffle ranges",
            "activation_tensors_ranged": cache_info["tensors"],
            "nodes_int8_possible": {"python_builder": layers["python_builder"]["int8_possible"], "trtexec": layers["trtexec"]["int8_possible"]},
            "pinned_fp32": layers["python_builder"]["pinned_fp32"],
        }
    return {
        "mode": target.mode,
        "how": "explicit Q/DQ nodes on the plan's int8 layers (TensorRT's rules checked)",
        "qdq_nodes": report.get("qdq_nodes"),
    }
