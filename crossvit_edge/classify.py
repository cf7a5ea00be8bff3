"""``python -m crossvit_edge.classify BUNDLE IMAGE_OR_FOLDER...``: classify images with a bundle.

One line per image, ``path<TAB>label<TAB>probability`` (``--top-k K``: K label/probability pairs
on the line), every field escaped by ``crossvit_edge.tsv`` (a backslash, control characters, line
separators and bidi controls become ``\\``, ``\\t``, ``\\xHH``, ``\\uHHHH``), or one JSON document with
``--json`` (JSON's own escaping). Folders are searched recursively for images, in
sorted order. A thin layer over ``crossvit_edge.runtime``; torch-free for ONNX and TensorRT bundles.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from .cli_common import run_cli

PROG = "crossvit_edge.classify"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path, help="bundle folder written by crossvit_edge.convert")
    p.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    p.add_argument("--top-k", type=int, default=1, help="most probable classes per image (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tab-separated lines")
    p.add_argument("--threads", type=int, help="runtime CPU threads (default: the runtime's choice)")
    return p


def list_images(inputs: List[Path]) -> List[Path]:
    """Files as given; folders searched recursively for image files (sorted, hidden names skipped)."""
    from .data import _is_image_file
    from .errors import UserError, brief

    paths: List[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if _is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise UserError(f"{brief(str(item), 200)}: no images in this folder")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{brief(str(item), 200)}: no such image file or folder")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # warnings and errors only: stdout carries the results
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)

    def body() -> int:
        from .cli_common import check_int
        from .runtime import load
        from .tsv import tsv_field

        check_int("--top-k", args.top_k, 1)
        check_int("--threads", args.threads, 1, 1024)
        images = list_images(args.images)
        with load(args.bundle, threads=args.threads) as model:
            predictions = []
            # one static batch at a time, printed as it comes (a long folder streams)
            for start in range(0, len(images), model.batch_size):
                chunk = images[start : start + model.batch_size]
                for path, top in zip(chunk, model.classify(chunk, top_k=args.top_k)):
                    if args.json:
                        predictions.append({"image": str(path), "top_k": [{"label": label, "probability": p} for label, p in top]})
                    else:
                        # every field escaped: a file name with a newline, tab or ESC cannot forge lines (crossvit_edge.tsv)
                        print("\t".join([tsv_field(str(path))] + [f"{tsv_field(label)}\t{p:.6f}" for label, p in top]), flush=True)
            if args.json:
                print(json.dumps({"bundle": str(args.bundle), "runtime": model.description, "predictions": predictions}, indent=1))
        return 0

    try:
        return run_cli(PROG, body)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a C tool killed by SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
