"""ExecuTorch latency, batch 1, side by side in one run, and where each program spends its time (ETDump).

    python benchmarks/bench_executorch.py [--model crossvit_9_240] [--runs 50] [--threads 2]
                                          [--programs naive,fp32,fp16,int8,int8-attn] [--demo]

Programs (``--programs``, a comma list; all by default), each run through the ExecuTorch runtime
with the XNNPACK delegate:

    naive      the model lowered as written (no ``adapt`` stage: LayerNorm, expand and select fall
               back to portable kernels between delegate calls), fp32
    fp32       our fp32 ``.pte``
    fp16       our fp16 ``.pte`` (float32 in and out, fp16 inside; the two boundary casts run on
               portable kernels: ETDump's ``native_call__to_dim_order_copy.out``)
    int8       our int8 ``.pte`` (PT2E, the quantization plan's layers)
    int8-attn  the same plus static int8 attention matmuls (build option ``int8_attention``:
               per-tensor int8 Q, K, V and softmax output, XNNPACK's QS8 batch matmul)

Timing: the programs' blocks of back-to-back runs are interleaved in 5 rounds, so that load on the
machine hits every row alike; the table gives the median. Then ETDump's per-operator table of the
fp32 and int8 programs (XNNPACK operator names, which carry the datatype: what still runs in float
in an int8 program is read off the names, not guessed). Weights are random (no downloads: latency
does not depend on their values) unless ``--demo``: then the shipped demo checkpoint
(crossvit_tiny_240 on digits) is built and every program is also scored on the full digits val
split (top-1, top-1 agreement and mean logit cosine with our fp32 program), the issue's accuracy bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_description, workspace  # noqa: E402

PROGRAMS = ("naive", "fp32", "fp16", "int8", "int8-attn")
LABELS = {"fp32": "crossvit_edge fp32 .pte", "fp16": "crossvit_edge fp16 .pte", "int8": "crossvit_edge int8 .pte (plan layers)",
          "int8-attn": "crossvit_edge int8 .pte + int8 attention matmuls"}


def median_ms(runner, x, runs, warmup=3):
    for _ in range(warmup):
        runner.run(x)
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        runner.run(x)
        t.append(time.perf_counter() - s)
    return 1e3 * float(np.median(t))


def operator_class(name: str) -> str:
    """What an XNNPACK operator computes in, from its name (``Fully Connected (NC, QS8, QC8W)``):
    int8 (quantized datatypes), float (F32), Q/DQ (``Convert``: float <-> int8), data movement
    (transpose, copy, slice, concatenate: X32 / X8 element types, no arithmetic)."""
    if name.startswith("native_call_"):
        return "portable kernels"  # outside the delegate (the fp16 program's boundary casts)
    if name.startswith("Convert"):
        return "Q/DQ conversion"
    if name.startswith("Invalid Unary Op"):
        # XNNPACK's name for the int8 GELU it makes of dequantize -> GELU -> quantize (fc1 -> fc2):
        # its count is the int8 fc2 layers', and the Convert ops around it are gone
        return "int8"
    if re.search(r"\b(Transpose|Copy|Slice|Concatenate|Constant Pad|Even Split)", name):
        return "data movement"
    if re.search(r"\bQ[SUDCP]\d|QC8W|QD8|QDU8", name):
        return "int8"
    return "float"


def etdump_table(profiles: Dict[str, dict]) -> str:
    """Markdown: one row per XNNPACK operator kind, per program its share of the operator time and
    its count; then the time per class (int8, float, Q/DQ, data movement)."""
    kinds, totals = [], {}
    for name, profile in profiles.items():
        ops = profile["ops_by_kind"]
        totals[name] = sum(v["median_ms"] for v in ops.values()) or 1.0
        kinds += [k for k in ops if k not in kinds]
    kinds.sort(key=lambda k: -max(p["ops_by_kind"].get(k, {}).get("median_ms", 0) / totals[n] for n, p in profiles.items()))
    lines = ["| XNNPACK operator | class | " + " | ".join(f"{n}: share (count)" for n in profiles) + " |",
             "|---|---|" + "---|" * len(profiles)]
    for k in kinds:
        cells = []
        for n, p in profiles.items():
            v = p["ops_by_kind"].get(k)
            cells.append(f"{100 * v['median_ms'] / totals[n]:.1f}% (x{v['count']})" if v else "-")
        lines.append(f"| {k} | {operator_class(k)} | " + " | ".join(cells) + " |")
    by_class = {n: defaultdict(float) for n in profiles}
    for n, p in profiles.items():
        for k, v in p["ops_by_kind"].items():
            by_class[n][operator_class(k)] += v["median_ms"]
    for c in ("int8", "float", "Q/DQ conversion", "data movement", "portable kernels"):
        cells = [f"{100 * by_class[n][c] / totals[n]:.1f}% ({by_class[n][c]:.2f} ms)" for n in profiles]
        lines.append(f"| **all {c}** | | " + " | ".join(cells) + " |")
    lines.append("| **operator time, ms (Method::execute)** | | " + " | ".join(
        f"{totals[n]:.2f} ({p['method_execute_median_ms']:.2f})" for n, p in profiles.items()) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="crossvit_9_240")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration images (default 64; 256 with --demo)")
    ap.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma list of: {', '.join(PROGRAMS)}")
    ap.add_argument("--etdump-runs", type=int, default=10, help="profiled runs per program (after one warm-up)")
    ap.add_argument("--demo", action="store_true", help="the shipped demo checkpoint (crossvit_tiny_240), scored on the full digits val split")
    args = ap.parse_args()
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        ap.error(f"unknown program(s) {', '.join(unknown)}; choose from {', '.join(PROGRAMS)}")
    if args.demo:
        args.model = "crossvit_tiny_240"
    calib_samples = args.calib_samples or (256 if args.demo else 64)

    import torch

    from crossvit_edge.converters.executorch import ExecuTorchRunner, delegation_report, stage_capture, stage_lower, stage_serialize
    from crossvit_edge.bundle import read_manifest
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.pipeline import convert, run_batched
    from crossvit_edge.spec import DEMO_CHECKPOINT, BuildSpec, CalibrationSettings

    work, train_dir, model, ckpt = workspace("bench_executorch_", args.model, args.threads)
    if args.demo:
        ckpt, model = DEMO_CHECKPOINT, load_checkpoint(DEMO_CHECKPOINT).model.eval()

    builds, runners = {}, {}
    for key in ("fp32", "fp16", "int8", "int8-attn"):
        if key not in programs:
            continue
        precision = key if key in ("fp32", "fp16") else "int8"
        options = {"etdump": True, "etdump_runs": args.etdump_runs}
        if key == "int8-attn":
            options["int8_attention"] = True
        calib = CalibrationSettings(data=train_dir, samples=calib_samples) if precision == "int8" else CalibrationSettings()
        t = time.time()
        convert(BuildSpec(target="executorch", output=work / key, precision=precision, checkpoint=str(ckpt), options=options,
                          calibration=calib))
        builds[key] = time.time() - t
        runners[LABELS[key]] = ExecuTorchRunner(work / key, read_manifest(work / key), threads=args.threads)
    if "naive" in programs:
        # the same model lowered as written, without the adapt stage (run with the fp32 bundle's manifest)
        if "fp32" not in programs:
            ap.error("naive needs fp32 in --programs (it borrows the fp32 bundle's manifest)")
        naive_dir = work / "naive"
        naive_dir.mkdir()
        edge = stage_lower(stage_capture(model, torch.zeros(1, 3, 240, 240)))
        naive_report = delegation_report(edge)
        stage_serialize(edge, naive_dir / "naive.pte")
        label = f"as written, no adapt ({naive_report['delegate_calls']} delegate calls, {naive_report['portable_op_count']} portable ops) fp32"
        runners = {label: ExecuTorchRunner(naive_dir, read_manifest(work / "fp32"), artifact="naive.pte", threads=args.threads), **runners}

    x = np.random.default_rng(0).standard_normal((1, 3, 240, 240)).astype(np.float32)
    samples = defaultdict(list)
    for _ in range(5):
        for k, r in runners.items():
            samples[k].append(median_ms(r, x, max(1, args.runs // 5)))
    medians = {k: float(np.median(v)) for k, v in samples.items()}
    print(f"\n{args.model}{' (demo checkpoint)' if args.demo else ' (random weights)'}, batch 1, {args.threads} threads, "
          f"ExecuTorch runtime + XNNPACK, median of 5 rounds of {max(1, args.runs // 5)}-run blocks; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu_description()}; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    base = medians.get(LABELS["fp32"])
    print("| program | median ms | ratio to our fp32 | size MB |\n|---|---|---|---|")
    for k, v in medians.items():
        size = runners[k].artifact_path.stat().st_size / 1e6
        print(f"| {k} | {v:.2f} | {f'{v / base:.2f}x' if base else '-'} | {size:.1f} |")
    if base:
        for key in ("int8", "int8-attn"):
            if LABELS[key] in medians:
                print(f"{key} / fp32: {medians[LABELS[key]] / base:.2f}x (target <= 0.5x on a VNNI CPU)")
        if LABELS["fp16"] in medians:
            print(f"fp16 / fp32: {medians[LABELS['fp16']] / base:.2f}x (fp16 pays on cores with fp16 arithmetic: asimdhp or "
                  f"avx512_fp16 in the CPU line above)")
    print("build time: " + ", ".join(f"{k} {v:.0f} s" for k, v in builds.items()) + f" (int8 calibration on {calib_samples} images)")

    if args.demo:
        from crossvit_edge.data import open_image_set
        from crossvit_edge.metrics import compare_logits
        from crossvit_edge.preprocess import Preprocessing

        val = open_image_set(train_dir.parent / "val")
        images, labels = val.load(Preprocessing()).astype(np.float32), np.asarray(val.labels)
        logits = {k: run_batched(r, images) for k, r in runners.items()}
        ref = logits.get(LABELS["fp32"])
        print(f"\naccuracy on the full digits val split ({len(labels)} images):\n")
        print("| program | top-1 | drop vs our fp32 (points) | top-1 agreement with our fp32 | mean logit cosine with our fp32 |\n"
              "|---|---|---|---|---|")
        for k, v in logits.items():
            top1 = float((v.argmax(1) == labels).mean())
            if ref is not None:
                ref_top1 = float((ref.argmax(1) == labels).mean())
                cosine = compare_logits(v, ref)["cosine"]
                print(f"| {k} | {100 * top1:.2f}% | {100 * (ref_top1 - top1):.2f} | {100 * float((v.argmax(1) == ref.argmax(1)).mean()):.2f}% "
                      f"| {cosine:.6f} |")
            else:
                print(f"| {k} | {100 * top1:.2f}% | - | - | - |")

    profiles = {}
    for key in ("fp32", "fp16", "int8", "int8-attn"):
        if key in programs:
            profiles[key] = json.loads((work / key / "executorch_report.json").read_text())["etdump"]
    if profiles:
        print(f"\nwhere each program spends its time: ETDump, share of the XNNPACK operator time, median of "
              f"{args.etdump_runs} profiled runs right after the build (one input):\n")
        print(etdump_table(profiles))


if __name__ == "__main__":
    main()
