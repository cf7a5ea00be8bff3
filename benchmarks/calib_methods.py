"""int8 accuracy of the demo model per calibration method, through ONNX Runtime on the CPU.

    python benchmarks/calib_methods.py [--samples 256] [--smooth-alpha 0.5]

For each method (minmax, percentile, entropy, mse), with and without LayerNorm folding, converts
the demo checkpoint to an int8 Q/DQ ONNX calibrated on the digits train split, runs the full val
split (360 images) and prints top-1, the drop against fp32 ONNX, and top-1 agreement with fp32.
Statistics are collected once per smoothing setting and reused (--calib-stats) for the other methods.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--smooth-alpha", type=float, default=0.5)
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from crossvit_edge.converters.onnx import OnnxRuntimeRunner
    from crossvit_edge.bundle import read_manifest
    from crossvit_edge.data import open_image_set, write_digits_imagefolder
    from crossvit_edge.pipeline import convert, run_batched
    from crossvit_edge.preprocess import Preprocessing
    from crossvit_edge.spec import DEMO_CHECKPOINT, BuildSpec, CalibrationSettings

    ckpt = args.checkpoint or str(DEMO_CHECKPOINT)
    work = Path(tempfile.mkdtemp(prefix="calib_methods_"))
    train_dir, val_dir = write_digits_imagefolder(work / "digits")
    val = open_image_set(val_dir)
    x, y = val.load(Preprocessing()).astype(np.float32), np.asarray(val.labels)

    def evaluate(bundle):
        m = read_manifest(bundle)
        return run_batched(OnnxRuntimeRunner(bundle, m, threads=2), x)

    convert(BuildSpec(target="onnx", output=work / "fp32", checkpoint=ckpt))
    l32 = evaluate(work / "fp32")
    top1_32 = float((l32.argmax(1) == y).mean())
    print(f"\ndemo model, digits val ({len(y)} images), ONNX Runtime CPU; fp32 top-1 {100 * top1_32:.2f}%\n")
    print("| calibration | LayerNorm folding | int8 top-1 | drop (points) | agreement with fp32 | build s |")
    print("|---|---|---|---|---|---|")
    for alpha in (None, args.smooth_alpha):
        stats = None
        for method in ("minmax", "percentile", "entropy", "mse"):
            out = work / f"int8_{method}_{alpha}"
            t = time.time()
            convert(BuildSpec(
                target="onnx", output=out, precision="int8", checkpoint=ckpt, smoothing_alpha=alpha,
                calibration=CalibrationSettings(data=train_dir, samples=args.samples, method=method, stats=stats),
            ))
            build_s = time.time() - t
            stats = out / "calibration_stats.npz"
            l8 = evaluate(out)
            top1 = float((l8.argmax(1) == y).mean())
            agree = float((l8.argmax(1) == l32.argmax(1)).mean())
            fold = f"alpha {alpha}" if alpha is not None else "off"
            print(f"| {method} | {fold} | {100 * top1:.2f}% | {100 * (top1_32 - top1):.2f} | {100 * agree:.2f}% | {build_s:.0f} |")


if __name__ == "__main__":
    main()
