"""``python -m crossvit_edge.demo``: the whole job on the shipped demo model, offline.

1. write scikit-learn's digits as PNG ImageFolders (train/ and val/);
2. load the demo checkpoint and evaluate it on the val split through the project's preprocessing;
3. convert it for every target (ONNX fp32/int8, TensorRT bundle for a Jetson profile, ExecuTorch
   fp32/int8, Core ML fp16/int8-weights/W8A8), calibrating on the train split;
4. profile every bundle against the fp32 model on every digits image not used for calibration (the
   val split and the train images outside the calibration sample, ``heldout/``): report.json,
   report.md, report.png. The post-conversion checks score 100 of the same images.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from .cli_common import require_convert_extra, run_cli, setup_logging

PROG = "crossvit_edge.demo"
log = logging.getLogger(__name__)

# (bundle name, target, precision, profile)
BUILDS = [
    # the CPU profile: ORT's fusions for fp32, and for int8 the form ORT runs on integer kernels
    ("onnx-fp32", "onnx", "fp32", "cpu-onnxruntime"),
    ("onnx-int8", "onnx", "int8", "cpu-onnxruntime"),
    ("tensorrt-orin-nano-jp6", "tensorrt", "int8", "jetson-orin-nano-jp6"),
    ("executorch-fp32", "executorch", "fp32", "linux-x86-xnnpack"),
    ("executorch-int8", "executorch", "int8", "linux-x86-xnnpack"),
    ("coreml-fp16", "coreml", "fp16", "mac-m4"),
    ("coreml-int8-weights", "coreml", "int8-weights", "mac-m4"),
    ("coreml-int8", "coreml", "int8", "iphone-15-pro"),
]
EXTRA_MODULE = {"executorch": "executorch", "coreml": "coremltools", "tensorrt": "onnx", "onnx": "onnxruntime"}


def evaluate_checkpoint(checkpoint: str, val_dir: Path) -> float:
    import torch

    from .checkpoint import load_checkpoint
    from .data import open_image_set
    from .pipeline import reference_logits
    from .preprocess import Preprocessing

    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.model.config
    images = open_image_set(val_dir, require_labels=True)
    x = images.load(Preprocessing(cfg.img_size, cfg.crop_pct)).astype(np.float32)
    with torch.no_grad():
        logits = reference_logits(ckpt.model, x)
    return float((logits.argmax(1) == np.asarray(images.labels)).mean())


# The post-conversion check of each build is a gate (its bounds resolve a broken artifact on 100
# images); the measurements are the profile's, on every held-out image. Scoring all 1541 images in
# every build's check as well took 397 s for the ONNX fp32 build alone on 2 loaded cores.
CHECK_IMAGES = 100


def check_samples(target: str, heldout: int, checker_samples: int) -> int:
    """Images for a build's post-conversion check: ``CHECK_IMAGES`` held-out images, fewer where the
    runner here is the numpy Core ML checker (off macOS, ~1.5 s an image): ``--checker-samples``,
    as the profile scores it."""
    count = min(CHECK_IMAGES, heldout)
    if target == "coreml" and sys.platform != "darwin" and checker_samples:
        return min(checker_samples, count)
    return count


def write_heldout_imagefolder(train_dir: Path, val_dir: Path, calibration_paths, out_dir: Path) -> Path:
    """Every image of ``val_dir`` and ``train_dir`` except ``calibration_paths`` (the calibration
    sample), as one ImageFolder ``out_dir`` (class sub-folders; the digits' file names are unique
    across the splits). Rebuilt in a temporary folder that replaces ``out_dir`` in one rename."""
    used = {Path(p).resolve() for p in calibration_paths}
    out_dir = Path(out_dir)
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        for split in (val_dir, train_dir):
            for image in sorted(Path(split).glob("*/*.png")):
                if image.resolve() in used:
                    continue
                (stage / image.parent.name).mkdir(exist_ok=True)
                shutil.copyfile(image, stage / image.parent.name / image.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return out_dir


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("demo_data/digits"))
    p.add_argument("--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--checkpoint", default=None, help="default: the shipped demo model")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--only", nargs="*", help="bundle names to build (default: all)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--checker-samples", type=int, default=100,
                   help="val images for the numpy Core ML checker (about 1.5 s an image here); 0: all")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        require_convert_extra()
        from .data import write_digits_imagefolder
        from .device_profiles import load_profile
        from .harness import ProfileSettings, profile_bundles, write_report
        from .checkpoint import load_checkpoint
        from .data import open_image_set
        from .pipeline import convert
        from .preprocess import Preprocessing
        from .spec import DEMO_CHECKPOINT, BuildSpec, CalibrationSettings

        # the profiling flags are checked now, not after minutes of conversions
        settings = ProfileSettings(runs=args.runs, warmup=3, threads=2, checker_samples=args.checker_samples)
        checkpoint = args.checkpoint or str(DEMO_CHECKPOINT)
        train_dir, val_dir = write_digits_imagefolder(args.data)
        calibration = CalibrationSettings(data=train_dir, samples=args.calib_samples)
        calibration.validate()
        # the measurements: every digits image the int8 builds are not calibrated on
        calib_sample = open_image_set(train_dir).sample(min(calibration.samples, len(open_image_set(train_dir))), seed=calibration.seed)
        heldout_dir = write_heldout_imagefolder(train_dir, val_dir, calib_sample.paths, Path(args.data) / "heldout")
        heldout = open_image_set(heldout_dir)
        print(f"demo data: {train_dir} and {val_dir} (scikit-learn digits as PNG); measured on {heldout_dir}: "
              f"the {len(heldout)} images outside the {len(calib_sample)}-image calibration sample")
        top1 = evaluate_checkpoint(checkpoint, val_dir)
        print(f"fp32 PyTorch top-1 on the digits val split: {100 * top1:.2f}%")

        bundles = []
        for name, target, precision, profile in BUILDS:
            if args.only and name not in args.only:
                continue
            if importlib.util.find_spec(EXTRA_MODULE[target]) is None:
                print(f"skip {name}: the {target} extra is not installed")
                continue
            spec = BuildSpec(
                target=target,
                output=args.output / name,
                precision=precision,
                checkpoint=checkpoint,
                profile=load_profile(profile) if profile else None,
                calibration=calibration if precision == "int8" else CalibrationSettings(),
                eval_data=heldout_dir,
                eval_samples=check_samples(target, len(heldout), args.checker_samples),
                overwrite=True,
            )
            t = time.time()
            manifest = convert(spec)
            check = manifest.get("accuracy_check", {})
            print(
                f"built {name:24s} {manifest['artifact']['file']:40s} {manifest['artifact']['bytes'] / 1e6:7.2f} MB "
                f"agreement {100 * check.get('top1_agreement', float('nan')):6.2f}% SNR {check.get('snr_db', float('nan')):5.1f} dB "
                f"in {time.time() - t:5.1f} s"
            )
            for note in manifest.get("notes", []):
                print(f"    {note}")
            bundles.append(spec.output)

        ckpt = load_checkpoint(checkpoint)
        images = heldout
        report = profile_bundles(
            bundles, images, Preprocessing(ckpt.model.config.img_size, ckpt.model.config.crop_pct), ckpt.model,
            settings,
        )
        md = write_report(report, args.output)
        print()
        print(md)
        print(f"report: {args.output / 'report.md'} (and report.json, report.png)")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
