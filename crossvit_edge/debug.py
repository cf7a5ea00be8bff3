"""``python -m crossvit_edge.debug``: which layer broke it. Runs a bundle's artifact and the fp32
model on the same images and compares them at the quantization plan's points (every layer's
output, every int8 layer's input, each block's residual stream, the CLS tokens before the heads);
writes layerwise.json, layerwise.md, layerwise.png and, when int8 layers lose the most,
float_layers.txt for ``crossvit_edge.convert --float-layers``.

A thin layer over ``crossvit_edge.layerwise``. TensorRT bundles are compared through their ONNX
stand-in here, and the command writes ``tensorrt_points.json``: on the Jetson,
``python -m crossvit_edge.converters.tensorrt.device BUNDLE --data DIR --points tensorrt_points.json
--output results.json`` marks those tensors as engine outputs, and ``--merge results.json`` here
compares the engine's own values.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .cli_common import check_int, check_output_outside, quiet_libraries, require_convert_extra, run_cli, setup_logging
from .errors import UserError, brief

PROG = "crossvit_edge.debug"
TRT_POINTS_FILE = "tensorrt_points.json"
# a device's intermediates file (debug --merge): the file and what its arrays inflate to, in all
MAX_INTERMEDIATE_BYTES = 2 << 30
MAX_INTERMEDIATE_POINTS = 100_000  # points (arrays) in it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, help="bundle folder written by crossvit_edge.convert")
    p.add_argument("--data", type=Path, required=True, help="images to compare on (ImageFolder or a plain folder)")
    p.add_argument("--samples", type=int, default=32, help="use this many images (deterministic, class-balanced; default 32)")
    p.add_argument("--output", type=Path, required=True, help="folder for layerwise.json, layerwise.md, layerwise.png")
    p.add_argument("--checkpoint", help="fp32 reference checkpoint (default: the one the bundle was built from)")
    p.add_argument("--calib-data", type=Path, help="executorch int8: the folder the bundle was calibrated on (its program "
                   "before lowering is rebuilt from it; the sample is checked against the manifest's sha256)")
    p.add_argument("--merge", type=Path, help="tensorrt: the device runner's results file written with --points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temporary file + rename), like ``bundle.write_json``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def calibration_images(bundle, calib_data: Optional[Path]):
    """With ``--calib-data``, the build's calibration sample (size and seed from the manifest,
    checked at open), checked against its recorded sha256; None without it. Torch-free: run before
    any work that depends on it. The manifest's own data path is never read (a bundle names no
    paths outside itself)."""
    settings = bundle.manifest.get("calibration") or {}
    if calib_data is None or not settings:
        return None
    from .data import open_image_set

    if settings.get("samples") is None or settings.get("batch_size") is None:
        raise UserError(f"--calib-data: {bundle.name} records no calibration sample size or batch size (built from --calib-stats?)")
    images = open_image_set(calib_data).sample(settings["samples"], seed=int(settings.get("seed") or 0))
    if settings.get("image_set_sha256") and images.sha256() != settings["image_set_sha256"]:
        raise UserError(f"--calib-data {brief(str(calib_data), 200)}: its sample of {settings['samples']} images is not the one the bundle "
                        "was calibrated on (sha256 differs from the manifest's calibration.image_set_sha256)")
    return images


def calibration_context(bundle, calib_data: Optional[Path], model, plan, images=None):
    """What a probe may need: the (smoothed, if the plan was) fp32 model and, with ``--calib-data``
    (or its sample ``images`` from ``calibration_images``), the build's calibration batches."""
    from crossvit_edge.converters.probe import ProbeContext

    if images is None:
        images = calibration_images(bundle, calib_data)
    if images is None:
        return ProbeContext(model=model, plan=plan)
    pre, batch = bundle.preprocessing, int(bundle.manifest["calibration"]["batch_size"])
    if plan is not None and plan.smoothing:
        model = smoothed_model(model, plan, lambda: images.batches(pre, batch), -(-len(images) // batch))
    return ProbeContext(model=model, plan=plan, calibration_batches=lambda: images.batches(pre, batch))


def smoothed_model(model, plan, batches, n_batches: int):
    """The fp32 model with the plan's LayerNorm -> Linear smoothing folded in, recomputed from the
    calibration images as the build did (``pipeline.stage_calibrate``)."""
    from crossvit_edge.calibration.collect import collect_statistics
    from crossvit_edge.calibration.plan import quantizable_layer_names
    from crossvit_edge.calibration.smoothing import apply_smoothing, smoothing_factors

    stats = collect_statistics(model, plan.model, quantizable_layer_names(model), batches(), total_batches=n_batches,
                               histograms=False, settings={}, desc="smoothing ranges")
    return apply_smoothing(model, smoothing_factors(model, stats.channel_amax, plan.smoothing["alpha"]))


def tensorrt_points(bundle, points, layers) -> Optional[Dict[str, Any]]:
    """The points located in the ONNX a TensorRT bundle's engine is built from (its manifest's
    ``tensorrt.onnx``), for the device runner's ``--points``; None for other bundles."""
    options = bundle.manifest.get("tensorrt")
    if not options or not options.get("onnx"):
        return None
    import onnx

    from crossvit_edge.converters.onnx import onnx_graph_ops
    from crossvit_edge.converters.probe import locate

    path = bundle.path(options["onnx"], "tensorrt.onnx")
    located = locate(points, layers, onnx_graph_ops(onnx.load(str(path)).graph))
    return {"format": "crossvit_edge tensorrt points", "onnx": options["onnx"], "points": [p.to_dict() for p in points],
            "located": {k: v.to_dict() for k, v in located.items()}}


def load_device_values(path: Path, images, num_classes: int) -> Dict[str, Any]:
    """The device runner's results file written with ``--points``: its logits and the arrays of its
    intermediates file, ordered as ``images``. Every part is checked before it is used: the
    ``intermediates`` entry against its schema, the file by the size and sha256 the results file
    records (the intermediates of another run are refused), then each array by its ``.npy`` header
    (``npz.CheckedNpz``: float, one row per image, bounded in all) before its data is read."""
    from crossvit_edge.bundle import SchemaCheck, resolve_in_bundle, validate_located
    from crossvit_edge.converters.probe import Located

    from . import safe_io
    from .harness import check_results_images, load_results
    from .npz import CheckedNpz

    label = f"--merge {brief(str(path), 200)}"
    result = load_results(path, num_classes)
    check_results_images(result, images, label)
    entry = result.get("intermediates")
    if not isinstance(entry, dict) or not isinstance(entry.get("points"), dict):
        raise UserError(f"{label}: no intermediates (run the device runner with --points {TRT_POINTS_FILE})")
    c = SchemaCheck(label)
    name = c.path(entry, "file", "intermediates.file")
    size = c.integer(entry, "bytes", "intermediates.bytes", 0, MAX_INTERMEDIATE_BYTES)
    digest = c.value(entry, "sha256", "intermediates.sha256", str)
    if len(entry["points"]) > MAX_INTERMEDIATE_POINTS:
        c.fail("intermediates.points", f"{len(entry['points'])} points, more than {MAX_INTERMEDIATE_POINTS}")
    points = {}
    for key, point in entry["points"].items():
        where = f"intermediates.points[{brief(key, 80)}]"
        validate_located(point, label, where)
        c.value(point, "array", f"{where}.array", str, required=False)
        c.value(point, "status", f"{where}.status", str, required=False)
        points[key] = point
    npz = resolve_in_bundle(Path(path).resolve().parent, name, f"{label}: intermediates.file")
    where = f"{label}: intermediates file {brief(name)}"
    if safe_io.sha256(npz, where, max_bytes=size) != digest or os.stat(npz).st_size != size:
        raise UserError(f"{where}: not the file this results file was written with (size or sha256 differs)")
    rows = len(result["images"])
    order = [result["images"].index(p.relative_to(images.root).as_posix()) for p in images.paths]
    located: Dict[str, Located] = {}
    values: Dict[str, np.ndarray] = {}
    with CheckedNpz(npz, where, max_file_bytes=size, max_inflated_bytes=MAX_INTERMEDIATE_BYTES,
                    max_members=MAX_INTERMEDIATE_POINTS) as arrays:
        available = set(arrays.names())
        for key, point in points.items():
            loc = Located.from_dict(point)
            array = point.get("array")
            if loc.tensor is not None and array in available:
                data = arrays.array(array, f"points[{brief(key, 80)}]", kinds="f", ndims=(1, 8), first_dim=rows,
                                    max_values=MAX_INTERMEDIATE_BYTES // 4).astype(np.float32)
                if not np.isfinite(data).all():
                    raise UserError(f"{where}: points[{brief(key, 80)}]: values must be finite")
                values[key] = data[order]
            elif loc.tensor is not None:
                loc = Located(None, loc.quant, point.get("status") or "not marked on the device")
            located[key] = loc
    return {"located": located, "values": values, "logits": result["logits"][order],
            "source": f"TensorRT engine on the device, the points marked as network outputs ({brief(result.get('runner') or 'device', 300)})"}


OUTPUT_FILES = ("layerwise.json", "layerwise.md", "layerwise.png", "float_layers.txt", TRT_POINTS_FILE)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        require_convert_extra()
        from .bundle import check_output_folder, open_bundle, staged_output, write_json
        from .data import open_image_set

        check_int("--samples", args.samples, 1)
        check_int("--threads", args.threads, 1, 1024)
        check_output_outside(args.output, {"--data": args.data, "--calib-data": args.calib_data})
        check_output_folder(args.output, OUTPUT_FILES, PROG)
        bundle = open_bundle(args.bundle)  # the manifest's plan and calibration sections are checked here too
        if args.merge is not None and bundle.target != "tensorrt":
            raise UserError(f"--merge takes a TensorRT device results file; {bundle.name} is a {bundle.target} bundle")
        images = open_image_set(args.data)
        images = images.sample(min(args.samples, len(images)), seed=0)
        # the device's results and intermediates, checked before any work that depends on them
        device = load_device_values(args.merge, images, bundle.num_classes) if args.merge is not None else None
        calib_images = calibration_images(bundle, args.calib_data)

        from crossvit_edge.calibration.plan import QuantPlan

        from .checkpoint import load_checkpoint  # torch from here on
        from .harness import _open_runner
        from .layerwise import FLOAT_LAYERS_FILE, compare_bundle, markdown_report, plot_report, reference_points

        quiet_libraries(args.verbose)
        ckpt = load_checkpoint(args.checkpoint or bundle.manifest["checkpoint"]["source"])
        if bundle.manifest["model"] != ckpt.name or bundle.num_classes != ckpt.num_classes:
            raise UserError(f"{bundle.name}: built for {brief(bundle.manifest['model'])} with {bundle.num_classes} classes, "
                            f"the reference is {ckpt.name} with {ckpt.num_classes}")
        plan = QuantPlan.from_dict(bundle.manifest["quantization_plan"]) if bundle.manifest.get("quantization_plan") else None
        x = images.load(bundle.preprocessing).astype(np.float32)
        notes: List[str] = []
        runner = None
        if args.merge is None:
            runner, notes = _open_runner(bundle, args.threads)
        context = calibration_context(bundle, args.calib_data, ckpt.model, plan, images=calib_images)
        try:
            report = compare_bundle(runner, ckpt.model, x, plan, context, device_values=device)
        finally:
            if runner is not None:
                runner.close()
        header = {"bundle": bundle.name, "target": bundle.target, "precision": bundle.manifest["precision"], "data": str(args.data),
                  "checkpoint": ckpt.source, "notes": notes}
        report = {**header, **report}
        out = Path(args.output)
        command = f"python -m crossvit_edge.convert ... --float-layers {out / FLOAT_LAYERS_FILE}"
        # the whole folder at once: a previous run's float_layers.txt never survives beside this report
        with staged_output(args.output, OUTPUT_FILES, PROG) as stage:
            if report["float_layers"]:
                write_text(stage / FLOAT_LAYERS_FILE, f"# layers {PROG} found losing the most SNR in {bundle.name}; one per line\n"
                           + "".join(f"{n}\n" for n in report["float_layers"]))
                report["float_layers_file"] = FLOAT_LAYERS_FILE
            if bundle.target == "tensorrt" and args.merge is None:
                points, layers = reference_points(ckpt.model, plan)
                write_json(stage / TRT_POINTS_FILE, tensorrt_points(bundle, points, layers))
                notes.append(f"on the device: python -m crossvit_edge.converters.tensorrt.device {bundle.name} --data DIR --points "
                             f"{TRT_POINTS_FILE} --output results.json; then here: python -m {PROG} {bundle.name} --data DIR --merge results.json")
            write_json(stage / "layerwise.json", report)
            md = markdown_report(report, header, command)
            for note in notes:
                md += f"\n- {note}"
            write_text(stage / "layerwise.md", md + ("\n" if notes else ""))
            plot_report(report, stage / "layerwise.png", f"{bundle.name}: SNR and cosine vs fp32 at every point")
        print(md)
        print(f"wrote {out / 'layerwise.json'}, layerwise.md, layerwise.png" + (f", {FLOAT_LAYERS_FILE}" if report["float_layers"] else ""))
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
