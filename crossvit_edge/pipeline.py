"""The conversion pipeline behind ``python -m crossvit_edge.convert``, as named stages:

    validate -> load checkpoint -> calibrate (statistics -> smoothing -> plan -> mixed precision)
             -> convert (target) -> check against fp32 -> bundle (manifest, atomic rename)

Data flows one way; each stage's output is the next one's input and is written into the bundle.
"""
from __future__ import annotations

import importlib
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .bundle import check_batch_input, size_bytes, staged_bundle, write_json, write_manifest
from .checkpoint import LoadedCheckpoint, load_checkpoint
from .data import ImageSet, open_image_set
from .errors import UserError, brief
from .metrics import compare_logits
from .preprocess import Preprocessing
from .spec import BuildSpec

log = logging.getLogger(__name__)

PLAN_FILE = "quant_plan.json"
CHECK_FILE = "accuracy_check.json"

# What the post-conversion check expects of an artifact against the fp32 model, by precision: the
# least top-1 agreement and mean logit cosine, and (with labelled --eval-data) the largest top-1 drop
# in points (--max-drop replaces it: the user's own budget). fp32 artifacts compute the same
# function (only summation order differs); fp16 rounds every op; int8 clips and rounds activations.
# A random-weight model has near-tied logits, so its agreement says little: the warning says so.
CHECK_THRESHOLDS: Dict[str, Dict[str, float]] = {
    "fp32": {"top1_agreement": 0.99, "cosine": 0.9999, "top1_drop_points": 0.5},
    "fp16": {"top1_agreement": 0.98, "cosine": 0.999, "top1_drop_points": 1.0},
    "int8-weights": {"top1_agreement": 0.95, "cosine": 0.99, "top1_drop_points": 2.0},
    "int8": {"top1_agreement": 0.90, "cosine": 0.98, "top1_drop_points": 3.0},
}
CHECK_ADVICE = {
    "fp32": "an fp32 artifact should compute the fp32 model's function: this is a converter bug, please report it with the manifest",
    "fp16": ("keep the precision-sensitive ops in fp32 where the target can (Core ML: fp32_ops layer_norm,softmax; "
             "ExecuTorch's fp16 program runs them in fp16) or build fp32"),
    "int8-weights": "build fp16, or int8 with calibration",
    "int8": ("calibrate on more, or more representative, images (--calib-data, --calib-samples), try another "
             "--calib-method (onnx, tensorrt, executorch, coreai: minmax, entropy, percentile, mse; auto is the default) or --smooth-alpha 0.5, or return the most sensitive "
             "layers to float with --max-drop POINTS --eval-data DIR"),
}
# every failed check also names the command that finds where the error comes from
DEBUG_ADVICE = "To see which layer the error comes from: python -m crossvit_edge.debug BUNDLE --data DIR --output DIR"


@dataclass
class Calibration:
    """What calibration produced: the (possibly smoothed) fp32 model the plan applies to."""

    model: torch.nn.Module
    plan: Any  # crossvit_edge.calibration.plan.QuantPlan
    stats: Any  # crossvit_edge.calibration.collect.CalibrationStatistics
    images: Optional[ImageSet]
    settings: Dict[str, Any]


@dataclass
class ConversionContext:
    spec: BuildSpec
    checkpoint: LoadedCheckpoint
    preprocessing: Preprocessing
    calibration: Optional[Calibration] = None
    eval_images: Optional[ImageSet] = None  # --eval-data, labels matched to the checkpoint's class names
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.checkpoint.name

    @property
    def fp32_model(self) -> torch.nn.Module:
        return self.checkpoint.model

    @property
    def labels(self) -> Optional[List[str]]:
        return self.checkpoint.labels

    @property
    def plan(self):
        return self.calibration.plan if self.calibration else None

    def model_for_export(self) -> torch.nn.Module:
        """fp32 model, or for int8 the plan applied as explicit Q/DQ to the calibrated model, in
        export form (``crossvit.for_export``: explicit attention graph, a copy)."""
        from .crossvit import for_export

        if self.spec.precision == "int8" and self.calibration is not None:
            from crossvit_edge.calibration.qdq import apply_qdq

            return apply_qdq(for_export(self.calibration.model), self.calibration.plan, inplace=True)
        return for_export(self.fp32_model)

    def calibration_batches(self, batch_size: Optional[int] = None):
        """The calibration images, preprocessed, in the recorded fixed batch size."""
        if self.calibration is None or self.calibration.images is None:
            raise UserError("this conversion needs calibration images (--calib-data DIR)")
        return self.calibration.images.batches(self.preprocessing, batch_size or self.spec.calibration.batch_size)

    def example_input(self) -> torch.Tensor:
        size = self.fp32_model.config.img_size
        return torch.zeros(self.spec.batch_size, 3, size, size)


def get_converter(target: str):
    from crossvit_edge.converters import CONVERTERS

    if target not in CONVERTERS:
        raise UserError(f"unknown target {target!r}; choose one of: {', '.join(CONVERTERS)}")
    module, _, cls = CONVERTERS[target].partition(":")
    return getattr(importlib.import_module(module), cls)()


# --------------------------------------------------------------------------------------------------
# Stages


def stage_load(spec: BuildSpec) -> ConversionContext:
    ckpt = load_checkpoint(spec.checkpoint, model_name=spec.model)
    check_batch_input(spec.batch_size, ckpt.model.config.img_size, "--batch-size")  # what every open of the bundle allows
    pre = Preprocessing(input_size=ckpt.model.config.img_size, crop_pct=ckpt.model.config.crop_pct)
    torch.set_grad_enabled(False)
    return ConversionContext(spec=spec, checkpoint=ckpt, preprocessing=pre, eval_images=open_eval_images(spec, ckpt))


def open_eval_images(spec: BuildSpec, ckpt: LoadedCheckpoint) -> Optional[ImageSet]:
    """--eval-data, opened before any calibration work so that a folder whose class names are not
    the checkpoint's labels is refused at once: scored by sorted folder order, a folder holding a
    subset of the classes would shift every label and report a wrong top-1 and --max-drop."""
    if spec.eval_data is None:
        return None
    labels = None if spec.ignore_class_names else ckpt.labels
    images = open_image_set(spec.eval_data).with_class_names(labels, ckpt.num_classes, "--ignore-class-names")
    return images.sample(min(spec.eval_samples, len(images)), seed=0)


def open_calibration_images(spec: BuildSpec) -> ImageSet:
    settings = spec.calibration
    if settings.data is None:
        raise UserError("--precision int8 needs calibration images: pass --calib-data DIR (or --calib-stats FILE)")
    images = open_image_set(settings.data)
    return images.sample(settings.samples, seed=settings.seed)


def stage_calibrate(ctx: ConversionContext) -> None:
    from crossvit_edge.calibration.collect import CalibrationStatistics, collect_statistics, weights_digest
    from crossvit_edge.calibration.plan import attention_point_names, build_plan, image_input_ranges, quantizable_layer_names
    from crossvit_edge.calibration.smoothing import apply_smoothing, smoothing_factors, smoothing_pairs

    from .crossvit import for_export

    spec, settings = ctx.spec, ctx.spec.calibration
    model = ctx.fp32_model
    # the profile's int8 attention option: the attention matmul operands are observed too, in the
    # export form (the explicit attention that carries them); off, nothing changes
    attention = bool(spec.option("int8_attention", False))
    layers = quantizable_layer_names(model) + (attention_point_names(model, calibrated_only=True) if attention else [])
    images: Optional[ImageSet] = None
    if settings.stats is None or settings.data is not None:
        images = open_calibration_images(spec)
    n_batches = math.ceil(len(images) / settings.batch_size) if images else 0
    record = {
        **settings.to_dict(),
        "images": len(images) if images else None,
        "image_set_sha256": images.sha256() if images else None,
    }

    def run_pass(m, histograms, desc):
        return collect_statistics(
            m, ctx.model_name, layers, images.batches(ctx.preprocessing, settings.batch_size),
            total_batches=n_batches, histograms=histograms, settings=record, desc=desc,
        )

    smoothing = None
    if spec.smoothing_alpha is not None:
        if images is None:
            raise UserError("--smooth-alpha needs --calib-data (the folding factors come from the images)")
        channel_stats = run_pass(model, False, "smoothing ranges")
        factors = smoothing_factors(model, channel_stats.channel_amax, spec.smoothing_alpha)
        model = apply_smoothing(model, factors)
        smoothing = {"alpha": spec.smoothing_alpha, "pairs": [[n, c] for n, c in smoothing_pairs(model)]}

    # what is observed: with int8 attention, the export form that carries the operand points
    observed = for_export(model) if attention else model
    if settings.stats is not None:
        stats = CalibrationStatistics.load(settings.stats)
        stats.check_matches(ctx.model_name, weights_digest(model), layers, str(settings.stats))
        record = {**stats.settings, "method": settings.method, "percentile": settings.percentile, "stats": str(settings.stats)}
    else:
        stats = run_pass(observed, True, "calibrating")
    plan_record = {k: record.get(k) for k in ("method", "percentile", "batch_size", "samples", "seed", "images", "image_set_sha256", "data", "stats")}
    # the image's range is known exactly from the preprocessing: never calibrated, never clipped
    fixed = image_input_ranges(model, ctx.preprocessing.mean, ctx.preprocessing.std)
    choices = None
    if settings.method == "auto":
        from crossvit_edge.calibration import auto

        judged = [n for n in layers if n not in fixed]
        if not all(n in stats.fisher for n in judged):
            if images is None:
                raise UserError(f"--calib-method auto: {brief(str(settings.stats), 200)} holds no Fisher weights (its statistics were "
                                "taken for another --calib-method); pass --calib-data too, or choose another --calib-method")
            sample = images.subset(range(min(auto.AUTO_EVAL_IMAGES, len(images))))
            stats.fisher = auto.fisher_histograms(observed, stats.layers, judged, sample.batches(ctx.preprocessing, settings.batch_size),
                                                  total_batches=math.ceil(len(sample) / settings.batch_size))
            stats.fisher_images = len(sample)
        amax, choices = auto.choose_ranges(stats.layers, stats.fisher, judged)
        plan_record["auto"] = {**auto.summary(choices), "evaluation_images": stats.fisher_images}
        plan_record["percentile"] = None  # the candidates carry their own levels
    else:
        amax = stats.amax(settings.method, settings.percentile)
    plan = build_plan(model, ctx.model_name, amax, plan_record, attention=attention, fixed_amax=fixed)
    if choices is not None:
        from crossvit_edge.calibration.plan import record_choices

        record_choices(plan, choices)
    plan.smoothing = smoothing
    if spec.float_layers is not None:
        plan = plan_with_float_layers(plan, spec.float_layers)
    if spec.max_drop is not None:
        from crossvit_edge.calibration.sensitivity import mixed_precision

        eval_x, eval_y = load_eval_images(ctx)
        if eval_x is None:
            raise UserError("--max-drop needs held-out images: pass --eval-data DIR")
        plan = mixed_precision(model, plan, eval_x, eval_y, spec.max_drop)
    ctx.calibration = Calibration(model=model, plan=plan, stats=stats, images=images, settings=record)


def plan_with_float_layers(plan, path: Path):
    """``plan`` with the int8 layers a ``--float-layers`` file names returned to float; a name that
    is no layer of the plan is refused."""
    from .errors import brief
    from .spec import read_float_layers

    names = read_float_layers(path)
    known = {l.name for l in plan.layers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"--float-layers {brief(str(path), 200)}: {brief(unknown[0], 120)} is not a layer of {plan.model} "
                        f"({len(unknown)} unknown)")
    log.info("--float-layers: %d layers kept float", len(names))
    return plan.with_float(names, "kept float by --float-layers")


def load_eval_images(ctx: ConversionContext):
    """(images, labels or None) for checks: --eval-data, else none."""
    s = ctx.eval_images
    if s is None:
        return None, None
    x = s.load(ctx.preprocessing).astype(np.float32)
    y = np.asarray(s.labels) if s.labels is not None else None
    return x, y


@torch.no_grad()
def reference_logits(model: torch.nn.Module, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[s : s + batch])).numpy() for s in range(0, len(images), batch)])


def run_batched(runner, images: np.ndarray) -> np.ndarray:
    """Feed a runner of fixed batch size, padding the last batch by repeating its last image."""
    b = runner.batch_size
    outs = []
    for s in range(0, len(images), b):
        chunk = images[s : s + b]
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
        outs.append(runner.run(chunk)[:n])
    return np.concatenate(outs)


def stage_check(ctx: ConversionContext, bundle_dir: Path, artifact, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Run the artifact (or its runnable stand-in) on held-out images against the fp32 model."""
    from crossvit_edge.converters.base import runner_class

    images, labels = load_eval_images(ctx)
    source = "eval images"
    if images is None:
        if ctx.calibration is not None and ctx.calibration.images is not None:
            s = ctx.calibration.images.sample(min(32, len(ctx.calibration.images)), seed=1)
            images, labels, source = s.load(ctx.preprocessing).astype(np.float32), None, "calibration images (no --eval-data)"
        else:
            size = ctx.fp32_model.config.img_size
            images = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
            source = "random inputs (no --eval-data)"
    reference = reference_logits(ctx.fp32_model, images)
    if artifact.runnable_here:
        kind, file = artifact.kind, artifact.primary
    elif artifact.check_with:
        kind, file = "onnx", artifact.check_with
    else:
        return {"skipped": "the artifact cannot run on this host and has no runnable stand-in"}
    runner = runner_class(kind)(bundle_dir, manifest, artifact=file)
    try:
        logits = run_batched(runner, images)
        desc = runner.description
    finally:
        runner.close()
    result = check_metrics(logits, reference, labels)
    result.update(images_source=source, runner=desc, file=file)
    result.update(judge_check(result, ctx.spec.precision, ctx.spec.max_drop))
    return result


def check_metrics(logits: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray]) -> Dict[str, Any]:
    """``compare_logits`` of the artifact against fp32, over the images whose logits are finite; the
    count of the others is ``non_finite_images`` (an artifact that overflows, fp16 past 65504, is a
    failed check, not numbers that cannot be written: ``judge_check`` fails it)."""
    finite = np.isfinite(np.asarray(logits, np.float64)).all(axis=1)
    bad = int((~finite).sum())
    if bad == 0:
        return compare_logits(logits, reference, labels)
    if finite.any():
        result = compare_logits(logits[finite], reference[finite], None if labels is None else labels[finite])
        result["images"] = int(len(logits))
    else:
        result = {"images": int(len(logits)), "top1_agreement": 0.0}
    result["non_finite_images"] = bad
    return result


def judge_check(check: Dict[str, Any], precision: str, max_drop: Optional[float] = None) -> Dict[str, Any]:
    """The check's verdict against ``CHECK_THRESHOLDS[precision]``: ``passed``, the ``thresholds``
    applied, ``failures`` (one short reason per number out of bounds) and the ``warnings`` line
    that names them all and ends with what to try."""
    limits = dict(CHECK_THRESHOLDS.get(precision, CHECK_THRESHOLDS["int8"]))
    if max_drop is not None:
        limits["top1_drop_points"] = float(max_drop)
    failures = []
    if check.get("non_finite_images"):
        failures.append(f"{check['non_finite_images']} of {check.get('images')} images gave non-finite logits (NaN or infinity; "
                        f"the other numbers are over the finite ones)")
    for key in ("top1_agreement", "cosine"):
        value = check.get(key)
        if value is not None and not (value >= limits[key]):  # NaN fails
            failures.append(f"{key} {value:.4f} < {limits[key]}")
    if check.get("top1_drop") is not None:
        drop = 100.0 * check["top1_drop"]
        if not drop <= limits["top1_drop_points"]:
            failures.append(f"top-1 drop {drop:.2f} points > {limits['top1_drop_points']:g}")
    else:
        limits.pop("top1_drop_points")  # no labels: not judged
    warnings = []
    if failures:
        warnings.append(
            f"post-conversion check FAILED for {precision} on {check.get('images')} {check.get('images_source', 'images')}: "
            f"{'; '.join(failures)} (against the fp32 model). Try: {CHECK_ADVICE.get(precision, CHECK_ADVICE['int8'])}. "
            f"(A random-weight model has near-tied logits, so its agreement says little; judge a trained one.) {DEBUG_ADVICE}"
        )
    return {"passed": not failures, "thresholds": limits, "failures": failures, "warnings": warnings}


def _versions() -> Dict[str, str]:
    """Installed versions, read from package metadata (importing coremltools or executorch just to
    ask would cost seconds and log warnings)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao", "coremltools", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def convert(spec: BuildSpec) -> Dict[str, Any]:
    """Build ``spec`` into a bundle at ``spec.output``; returns the manifest."""
    t0 = time.time()
    if spec.profile is not None:
        spec.options = {**spec.profile.options, **spec.options}
    spec.validate()
    from .convert_flags import not_applied

    for reason in not_applied(spec):  # a spec built in Python (the CLI refuses these): said, and left out of the manifest
        log.warning("WARNING: %s; it is not applied and not recorded in the manifest", reason)
    converter = get_converter(spec.target)
    converter.validate(spec)
    ctx = stage_load(spec)
    ctx.timings["load_s"] = time.time() - t0
    if converter.needs_calibration(spec):
        t = time.time()
        stage_calibrate(ctx)
        ctx.timings["calibrate_s"] = time.time() - t
    with staged_bundle(spec.output, overwrite=spec.overwrite) as stage:
        t = time.time()
        artifact = converter.convert(ctx, stage)
        ctx.timings["convert_s"] = time.time() - t
        manifest = base_manifest(ctx, artifact, stage)
        if ctx.calibration is not None:
            ctx.calibration.stats.save(stage / "calibration_stats.npz")
            write_json(stage / PLAN_FILE, ctx.calibration.plan.to_dict())
        if artifact.report:
            write_json(stage / f"{spec.target}_report.json", artifact.report)
        t = time.time()
        check = stage_check(ctx, stage, artifact, manifest)
        ctx.timings["check_s"] = time.time() - t
        write_json(stage / CHECK_FILE, check)
        manifest["accuracy_check"] = check
        for warning in check.get("warnings", []):
            log.warning("WARNING: %s", warning)
        manifest["timings"] = {k: round(v, 2) for k, v in ctx.timings.items()}
        manifest = write_manifest(stage, manifest)
    log.info("wrote %s in %.1f s", spec.output, time.time() - t0)
    return manifest


def base_manifest(ctx: ConversionContext, artifact, stage: Path) -> Dict[str, Any]:
    spec = ctx.spec
    size = ctx.fp32_model.config.img_size
    manifest: Dict[str, Any] = {
        "format": "crossvit_edge bundle",
        "target": spec.target,
        "model": ctx.model_name,
        "variant": ctx.model_name,
        "num_classes": ctx.checkpoint.num_classes,
        "labels": ctx.labels,
        "checkpoint": {"source": ctx.checkpoint.source, "metadata": ctx.checkpoint.metadata},
        "precision": spec.precision,
        "profile": spec.profile.to_dict() if spec.profile else None,
        "input": {"name": "image", "shape": [spec.batch_size, 3, size, size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [spec.batch_size, ctx.checkpoint.num_classes], "dtype": "float32"},
        "preprocessing": ctx.preprocessing.to_dict(),
        "artifact": {"file": artifact.primary, "kind": artifact.kind, "bytes": size_bytes(stage / artifact.primary)},
        "build": spec.to_dict(),
        "calibration": ctx.calibration.settings if ctx.calibration else None,
        "quantization_plan": ctx.calibration.plan.to_dict() if ctx.calibration else None,
        "versions": _versions(),
    }
    if artifact.check_with:
        manifest["artifact"]["stand_in"] = {"file": artifact.check_with, "kind": "onnx"}
    manifest.update(artifact.manifest)
    return manifest
