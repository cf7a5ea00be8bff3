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

from .cli_common import run_cli, setup_logging

PROG = "crossvit_edge.profile"


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
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        from .bundle import read_manifest, write_json
        from .checkpoint import load_checkpoint
        from .data import open_image_set
        from .errors import UserError
        from .harness import ProfileSettings, markdown_report, plot_report, profile_bundles
        from .preprocess import Preprocessing

        settings = ProfileSettings(warmup=args.warmup, runs=args.runs, threads=args.threads, reference_device=args.reference_device,
                                   checker_samples=args.checker_samples)
        if not args.bundles and not args.merge:
            raise UserError("nothing to profile: give bundle folders and/or --merge results files")
        manifests = [read_manifest(b) for b in args.bundles]
        sources = {m["checkpoint"]["source"] for m in manifests}
        checkpoint = args.checkpoint or (sources.pop() if len(sources) == 1 else None)
        if checkpoint is None:
            raise UserError("the bundles come from different checkpoints; pass --checkpoint for the fp32 reference")
        ckpt = load_checkpoint(checkpoint)
        for b, m in zip(args.bundles, manifests):
            if m["model"] != ckpt.name or m["num_classes"] != ckpt.num_classes:
                raise UserError(f"{b}: built for {m['model']} with {m['num_classes']} classes, the reference is {ckpt.name} with {ckpt.num_classes}")
        pre = Preprocessing.from_dict(manifests[0]["preprocessing"]) if manifests else Preprocessing(ckpt.model.config.img_size, ckpt.model.config.crop_pct)
        images = open_image_set(args.data)
        if args.samples:
            images = images.sample(min(args.samples, len(images)), seed=0)
        merged = []
        for path in args.merge:
            try:
                merged.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as e:
                raise UserError(f"--merge {path}: unreadable results file ({e})") from None
        report = profile_bundles(list(args.bundles), images, pre, ckpt.model, settings, merged)
        args.output.mkdir(parents=True, exist_ok=True)
        write_json(args.output / "report.json", report)
        md = markdown_report(report)
        (args.output / "report.md").write_text(md)
        plot_report(report, args.output / "report.png")
        print(md)
        print(f"wrote {args.output / 'report.json'}, report.md, report.png")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
