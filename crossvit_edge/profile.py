"""``python -m crossvit_edge.profile``: run bundles and their fp32 reference on the same images and
report accuracy and latency as JSON, Markdown and a plot.

A thin layer over ``crossvit_edge.harness``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .cli_common import check_int, check_output_outside, quiet_libraries, require_convert_extra, run_cli, setup_logging
from .errors import brief

PROG = "crossvit_edge.profile"
REPORT_FILES = ("report.json", "report.md", "report.png")  # the output folder, written as a whole


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="*", type=Path, help="bundle folders written by crossvit_edge.convert")
    p.add_argument("--data", type=Path, required=True, help="images (ImageFolder for top-1/top-5, or a plain folder)")
    p.add_argument("--samples", type=int, help="use this many images (deterministic, class-balanced)")
    p.add_argument("--checkpoint", help="fp32 reference checkpoint (default: the one the bundles were built from)")
    p.add_argument("--output", type=Path, required=True, help="folder for report.json, report.md, report.png")
    p.add_argument("--runs", type=int, default=30, help="timed runs per artifact")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reference-device", default="cpu", help="cpu or cuda for the fp32 PyTorch reference")
    p.add_argument("--checker-samples", type=int, help="score numerical checkers (the Core ML checker off macOS) on a "
                   "class-balanced sample of this many images (0: all); the real runtimes still run every image")
    p.add_argument("--merge", type=Path, action="append", default=[], help="results JSON from the device-side TensorRT runner")
    p.add_argument("--ignore-class-names", action="store_true", help="score an ImageFolder whose class folder names are not the "
                   "model's labels by sorted folder order (by default folder names are matched to the labels, and must be among them)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        require_convert_extra()
        # Everything untrusted (bundles, results files, images) and every flag is checked here,
        # torch-free, before the checkpoint loads and before any profiling work.
        from .bundle import check_output_folder, open_bundle, staged_output
        from .data import open_image_set
        from .errors import UserError
        from .harness import ProfileSettings, check_results_images, load_results, profile_bundles, write_report

        settings = ProfileSettings(warmup=args.warmup, runs=args.runs, threads=args.threads, reference_device=args.reference_device,
                                   checker_samples=args.checker_samples)
        check_int("--samples", args.samples, 1)
        if not args.bundles and not args.merge:
            raise UserError("nothing to profile: give bundle folders and/or --merge results files")
        check_output_outside(args.output, {"--data": args.data})
        bundles = [open_bundle(b) for b in args.bundles]
        if len({json.dumps(b.manifest["preprocessing"], sort_keys=True) for b in bundles}) > 1:
            raise UserError("the bundles differ in preprocessing; profile them in separate runs (every row runs on the same inputs)")
        if len({(b.manifest["model"], b.num_classes) for b in bundles}) > 1:
            raise UserError("the bundles are of different models or class counts; profile them in separate runs")
        merged = [load_results(path, bundles[0].num_classes if bundles else None) for path in args.merge]
        images = open_image_set(args.data)
        if args.samples:
            images = images.sample(min(args.samples, len(images)), seed=0)
        for path, result in zip(args.merge, merged):
            check_results_images(result, images, f"--merge {path}")
        if len({tuple(b.labels) for b in bundles if b.labels is not None}) > 1:
            raise UserError("the bundles have different labels; profile them in separate runs")
        bundle_labels = next((b.labels for b in bundles if b.labels is not None), None)
        if bundle_labels is not None and not args.ignore_class_names:  # folder names vs labels, before any heavy work
            images = images.with_class_names(bundle_labels, bundles[0].num_classes, "--ignore-class-names")
        check_output_folder(args.output, REPORT_FILES, PROG)  # written as a whole at the end (bundle.staged_output)

        from .checkpoint import load_checkpoint  # torch from here on
        from .preprocess import Preprocessing

        quiet_libraries(args.verbose)
        sources = {b.manifest["checkpoint"]["source"] for b in bundles}
        checkpoint = args.checkpoint or (sources.pop() if len(sources) == 1 else None)
        if checkpoint is None:
            raise UserError("the bundles come from different checkpoints (or there are none); pass --checkpoint for the fp32 reference")
        ckpt = load_checkpoint(checkpoint)
        for b in bundles:
            if b.manifest["model"] != ckpt.name or b.num_classes != ckpt.num_classes:
                raise UserError(f"{b.name}: built for {brief(b.manifest['model'])} with {b.num_classes} classes, "
                                f"the reference is {ckpt.name} with {ckpt.num_classes}")
            if b.labels is not None and ckpt.labels is not None and list(b.labels) != list(ckpt.labels):
                raise UserError(f"{b.name}: its labels differ from the reference checkpoint's")
        for path, result in zip(args.merge, merged):
            if result["logits"].shape[1] != ckpt.num_classes:
                raise UserError(f"--merge {path}: logits: {result['logits'].shape[1]} classes, the fp32 reference has {ckpt.num_classes}")
        labels = ckpt.labels or bundle_labels
        images = images.with_class_names(None if args.ignore_class_names else labels, ckpt.num_classes, "--ignore-class-names")
        pre = bundles[0].preprocessing if bundles else Preprocessing(ckpt.model.config.img_size, ckpt.model.config.crop_pct)
        report = profile_bundles(bundles, images, pre, ckpt.model, settings, merged)
        with staged_output(args.output, REPORT_FILES, PROG) as stage:
            md = write_report(report, stage)
        print(md)
        print(f"wrote {args.output / 'report.json'}, report.md, report.png")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
