"""Per-tensor range selection (``--calib-method auto``) against every single estimator, on the demo
model, and what it costs in calibration time.

    python benchmarks/calib_auto.py [--samples 256] [--forms onnx-tensorrt,onnx-ort-cpu,executorch]
                                    [--methods minmax,percentile,entropy,mse,auto] [--timing-model crossvit_9_240]

Accuracy: for each int8 form and method, the demo checkpoint calibrated on the demo's 256-image
sample of the digits train split (statistics collected once per form, reused with --calib-stats),
run on every digits image outside that sample (the demo's heldout/ set) and compared with the fp32
PyTorch model: logit SNR (dB), KL, top-1 agreement. Timing: calibration of ``--timing-model``
(untrained weights: the time does not depend on them) on ``--samples`` images, the statistics
pass with the entropy estimator (the method before auto) against the same pass plus auto's
selection; the ratio is measured in this run, on this machine.
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# form -> (target, options). ExecuTorch's int8 layer inputs take the plan's ranges (its layer
# outputs XNNPACK's own observers'), so --calib-method reaches it too
FORMS = {
    "onnx-tensorrt": ("onnx", {"int8_form": "tensorrt"}),
    "onnx-ort-cpu": ("onnx", {"int8_form": "ort-cpu", "ort_fusions": True}),
    "executorch": ("executorch", {}),
}

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def accuracy(args, work: Path) -> None:
    import torch

    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.data import open_image_set, write_digits_imagefolder
    from crossvit_edge.demo import write_heldout_imagefolder
    from crossvit_edge.metrics import compare_logits
    from crossvit_edge.pipeline import convert, run_batched
    from crossvit_edge.preprocess import Preprocessing
    from crossvit_edge.spec import DEMO_CHECKPOINT, BuildSpec, CalibrationSettings

    ckpt_path = args.checkpoint or str(DEMO_CHECKPOINT)
    ckpt = load_checkpoint(ckpt_path)
    train_dir, val_dir = write_digits_imagefolder(work / "digits")
    settings = CalibrationSettings(data=train_dir, samples=args.samples)
    sample = open_image_set(train_dir).sample(settings.samples, seed=settings.seed)
    heldout = open_image_set(write_heldout_imagefolder(train_dir, val_dir, sample.paths, work / "heldout"))
    pre = Preprocessing(input_size=ckpt.model.config.img_size, crop_pct=ckpt.model.config.crop_pct)
    x = heldout.load(pre).astype(np.float32)
    with torch.no_grad():
        reference = np.concatenate([ckpt.model(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)])
    print(f"\ndemo model ({ckpt.name}), calibrated on {len(sample)} digits train images, measured on the {len(x)} "
          f"held-out images against fp32 PyTorch; {cpu_name()}\n")
    print("| form | method | logit SNR dB | KL | top-1 agreement | build s |")
    print("|---|---|---|---|---|---|")
    for form in args.forms.split(","):
        target, options = FORMS[form]
        stats = None
        for method in args.methods.split(","):
            out = work / f"{form}_{method}"
            t = time.time()
            convert(BuildSpec(target=target, output=out, precision="int8", checkpoint=ckpt_path, options=dict(options),
                              calibration=CalibrationSettings(data=train_dir, samples=args.samples, method=method, stats=stats)))
            build_s = time.time() - t
            if stats is None:
                stats = out / "calibration_stats.npz"
            bundle = open_bundle(out)
            runner = bundle.runner()
            try:
                logits = run_batched(runner, x)
            finally:
                runner.close()
            m = compare_logits(logits, reference)
            print(f"| {form} | {method} | {m['snr_db']:.2f} | {m['kl']:.2e} | {100 * m['top1_agreement']:.2f}% | {build_s:.0f} |",
                  flush=True)


def timing(args, work: Path) -> None:
    import torch

    from crossvit_edge.calibration import auto
    from crossvit_edge.calibration.collect import collect_statistics
    from crossvit_edge.calibration.plan import image_input_ranges, quantizable_layer_names
    from crossvit_edge.crossvit import CROSSVIT_CONFIGS, CrossViT
    from crossvit_edge.data import open_image_set, write_digits_imagefolder
    from crossvit_edge.preprocess import Preprocessing

    torch.manual_seed(0)
    config = CROSSVIT_CONFIGS[args.timing_model]
    model = CrossViT(config).eval()
    train_dir, _ = write_digits_imagefolder(work / "digits")
    images = open_image_set(train_dir).sample(args.samples, seed=0)
    pre = Preprocessing(input_size=config.img_size, crop_pct=config.crop_pct)
    layers = quantizable_layer_names(model)
    fixed = image_input_ranges(model, pre.mean, pre.std)
    batch = 8

    t = time.perf_counter()
    stats = collect_statistics(model, args.timing_model, layers, images.batches(pre, batch))
    stats_s = time.perf_counter() - t
    t = time.perf_counter()
    stats.amax("entropy")
    entropy_s = time.perf_counter() - t
    sample = images.subset(range(min(auto.AUTO_EVAL_IMAGES, len(images))))
    judged = [n for n in layers if n not in fixed]
    t = time.perf_counter()
    auto.select_ranges(model, stats.layers, judged, sample.batches(pre, batch))
    auto_s = time.perf_counter() - t
    before = stats_s + entropy_s
    after = stats_s + auto_s
    print(f"\ncalibration time, {args.timing_model} (untrained weights), {len(images)} images, batch {batch}, "
          f"torch threads {torch.get_num_threads()}; {cpu_name()}\n")
    print("| step | s |")
    print("|---|---|")
    print(f"| statistics pass ({len(images)} images, {len(layers)} layers) | {stats_s:.1f} |")
    print(f"| entropy ranges from the histograms | {entropy_s:.1f} |")
    print(f"| auto: candidates + judging on {len(sample)} images ({len(judged)} tensors) | {auto_s:.1f} |")
    print(f"| **entropy (before) / auto (now)** | {before:.1f} / {after:.1f} = **{after / before:.2f}x** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse,auto")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--timing-model", default="crossvit_9_240")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="calib_auto_"))
    if not args.skip_accuracy:
        accuracy(args, work)
    if not args.skip_timing:
        timing(args, work)


if __name__ == "__main__":
    main()
