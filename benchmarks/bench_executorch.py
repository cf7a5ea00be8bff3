"""ExecuTorch latency, batch 1, side by side in one run (issue: ExecuTorch .pte, fp32 and int8 XNNPACK).

    python benchmarks/bench_executorch.py [--model crossvit_9_240] [--runs 50] [--threads 2]

Rows: the model lowered as written (no ``adapt`` stage: LayerNorm, expand and select fall back to
portable kernels between delegate calls), our fp32 ``.pte`` and our int8 ``.pte`` (PT2E, the
quantization plan's layers), all through the ExecuTorch runtime with the XNNPACK delegate. Rounds
are interleaved so that load on the machine hits every row alike. Then ETDump per-operator times of
the fp32 and int8 programs, to say where the time goes. Weights are random (no downloads): latency
does not depend on their values.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_args, workspace  # noqa: E402


def median_ms(runner, x, runs, warmup=3):
    for _ in range(warmup):
        runner.run(x)
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        runner.run(x)
        t.append(time.perf_counter() - s)
    return 1e3 * float(np.median(t))


def main():
    args = parse_args(__doc__.splitlines()[0], calib_samples=64, calib_help="latency does not depend on it")

    import torch

    from converters.executorch import ExecuTorchRunner, delegation_report, stage_capture, stage_lower, stage_serialize
    from crossvit_edge.bundle import read_manifest
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    work, train_dir, model, ckpt = workspace("bench_executorch_", args.model, args.threads)

    builds = {}
    t = time.time()
    convert(BuildSpec(target="executorch", output=work / "fp32", precision="fp32", checkpoint=str(ckpt), options={"etdump": True}))
    builds["fp32"] = time.time() - t
    t = time.time()
    convert(BuildSpec(target="executorch", output=work / "int8", precision="int8", checkpoint=str(ckpt), options={"etdump": True},
                      calibration=CalibrationSettings(data=train_dir, samples=args.calib_samples)))
    builds["int8"] = time.time() - t

    # the same model lowered as written, without the adapt stage (into a copy of the fp32 bundle)
    naive_dir = work / "naive"
    naive_dir.mkdir()
    edge = stage_lower(stage_capture(model, torch.zeros(1, 3, 240, 240)))
    naive_report = delegation_report(edge)
    stage_serialize(edge, naive_dir / "naive.pte")

    fp32_manifest = read_manifest(work / "fp32")
    runners = {
        f"as written, no adapt ({naive_report['delegate_calls']} delegate calls, {naive_report['portable_op_count']} portable ops) fp32":
            ExecuTorchRunner(naive_dir, fp32_manifest, artifact="naive.pte", threads=args.threads),
        "crossvit_edge fp32 .pte": ExecuTorchRunner(work / "fp32", fp32_manifest, threads=args.threads),
        "crossvit_edge int8 .pte": ExecuTorchRunner(work / "int8", read_manifest(work / "int8"), threads=args.threads),
    }
    x = np.random.default_rng(0).standard_normal((1, 3, 240, 240)).astype(np.float32)
    samples = defaultdict(list)
    for _ in range(5):
        for k, r in runners.items():
            samples[k].append(median_ms(r, x, max(1, args.runs // 5)))
    medians = {k: float(np.median(v)) for k, v in samples.items()}
    fp32 = medians["crossvit_edge fp32 .pte"]
    print(f"\n{args.model}, batch 1, {args.threads} threads, ExecuTorch runtime + XNNPACK on this CPU, median of {args.runs} runs\n")
    print("| program | median ms | ratio to our fp32 | size MB |\n|---|---|---|---|")
    sizes = {k: r.artifact_path.stat().st_size / 1e6 for k, r in runners.items()}
    for k, v in medians.items():
        print(f"| {k} | {v:.2f} | {v / fp32:.2f}x | {sizes[k]:.1f} |")
    print(f"\nint8 / fp32: {medians['crossvit_edge int8 .pte'] / fp32:.2f}x (target <= 0.67x)")
    print(f"build time: fp32 {builds['fp32']:.1f} s, int8 {builds['int8']:.1f} s (calibration on {args.calib_samples} images)")
    for precision in ("fp32", "int8"):
        profile = json.loads((work / precision / "executorch_report.json").read_text())["etdump"]
        ops = profile["ops_by_kind"]
        total = sum(v["median_ms"] for v in ops.values()) or 1.0
        print(f"\nwhere the {precision} program spends its time (ETDump, {profile['method_execute_median_ms']:.1f} ms per run):")
        print(", ".join(f"{k} {100 * v['median_ms'] / total:.1f}% (x{v['count']})" for k, v in list(ops.items())[:8]))
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"\nCPU flags: avx2={'avx2' in cpu} avx512f={'avx512f' in cpu} avx512_vnni={'avx512_vnni' in cpu} avx_vnni={' avx_vnni' in cpu}")


if __name__ == "__main__":
    main()
