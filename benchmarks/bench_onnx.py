"""ONNX Runtime latency, batch 1, side by side in one run (issue: ONNX export and INT8 calibration).

    python benchmarks/bench_onnx.py [--model crossvit_9_240] [--runs 50] [--threads 2]

Rows: the naive path (timm's model -> torch.onnx.export -> ONNX Runtime fp32, cubic Resize and all),
our fp32 ONNX, and our int8 Q/DQ ONNX, with medians and ratios to the naive path. Also times the
int8 conversion itself (calibration on 256 digits images + export), and profiles where the int8
graph spends its time (ONNX Runtime's per-node profiler) to say what limits it on this CPU.
Weights are random (timm's init; no downloads): latency does not depend on their values.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_args, workspace  # noqa: E402


def median_ms(session, x, runs, warmup=10):
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: x})
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        session.run(None, {name: x})
        t.append(time.perf_counter() - s)
    return 1e3 * float(np.median(t))


def session(path, threads, profile=False, fold_weight_dq=True):
    """Options as crossvit_edge.converters.onnx.OnnxRuntimeRunner sets them on x86: weight DQ folded for the
    TensorRT form, ORT's QDQ fusion kept for the ort-cpu form (the uint8-activation row)."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    if fold_weight_dq:
        o.add_session_config_entry("session.disable_quant_qdq", "1")
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    if profile:
        o.enable_profiling = True
        o.profile_file_prefix = str(Path(path).with_suffix(""))
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def op_time_shares(path, x, threads, runs=20):
    """Share of node time by op type from ONNX Runtime's profiler."""
    s = session(path, threads, profile=True, fold_weight_dq="u8act" not in str(path))
    name = s.get_inputs()[0].name
    for _ in range(runs):
        s.run(None, {name: x})
    trace = json.loads(Path(s.end_profiling()).read_text())
    per_op = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(per_op.values()) or 1.0
    return sorted(((op, 100 * t / total) for op, t in per_op.items()), key=lambda kv: -kv[1])


def export_naive(model_name, path):
    import timm
    import torch

    m = timm.create_model(model_name, pretrained=False, num_classes=10).eval()
    x = torch.zeros(1, 3, 240, 240)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(m, (x,), str(path), opset_version=17, dynamo=True, verbose=False)
            return "torch.onnx.export(dynamo=True)"
        except Exception:  # the dynamo exporter may refuse timm's Python branches: use the TorchScript one
            torch.onnx.export(m, (x,), str(path), opset_version=17, dynamo=False)
            return "torch.onnx.export(dynamo=False)"


def main():
    args = parse_args(__doc__.splitlines()[0], calib_samples=256)

    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    work, train_dir, _, ckpt = workspace("bench_onnx_", args.model, args.threads)

    naive = work / "naive.onnx"
    how = export_naive(args.model, naive)
    convert(BuildSpec(target="onnx", output=work / "fp32", precision="fp32", checkpoint=str(ckpt)))
    t = time.time()
    convert(BuildSpec(target="onnx", output=work / "int8", precision="int8", checkpoint=str(ckpt),
                      calibration=CalibrationSettings(data=train_dir, samples=args.calib_samples)))
    int8_build_s = time.time() - t

    # the same plan in ONNX Runtime's CPU form (docs/cpu_int8.md), from the same statistics
    convert(BuildSpec(target="onnx", output=work / "int8_u8act", precision="int8", checkpoint=str(ckpt),
                      calibration=CalibrationSettings(stats=work / "int8" / "calibration_stats.npz"), options={"int8_form": "ort-cpu"}))
    paths = {
        f"naive: timm -> {how} -> ORT fp32": naive,
        "crossvit_edge fp32 ONNX": next((work / "fp32").glob("*.onnx")),
        "crossvit_edge int8 Q/DQ ONNX": next((work / "int8").glob("*.onnx")),
        "same plan, int8_form ort-cpu (uint8 activations, QGemm; not TensorRT-legal)": next((work / "int8_u8act").glob("*.onnx")),
    }
    x = np.random.default_rng(0).standard_normal((1, 3, 240, 240)).astype(np.float32)
    sessions = {k: session(p, args.threads, fold_weight_dq="u8act" not in str(p)) for k, p in paths.items()}
    # interleave the rounds so that load on the machine hits every row alike
    samples = defaultdict(list)
    for _ in range(5):
        for k, s in sessions.items():
            samples[k].append(median_ms(s, x, max(1, args.runs // 5), warmup=3))
    medians = {k: float(np.median(v)) for k, v in samples.items()}
    base = medians[next(iter(medians))]
    print(f"\n{args.model}, batch 1, {args.threads} threads, ONNX Runtime CPU, median of {args.runs} runs\n")
    print(f"| path | median ms | ratio to naive |\n|---|---|---|")
    for k, v in medians.items():
        print(f"| {k} | {v:.2f} | {v / base:.2f}x |")
    fp32, int8, u8 = list(medians.values())[1:]
    print(f"\nint8 / our fp32: {int8 / fp32:.2f}x; uint8-activation form / our fp32: {u8 / fp32:.2f}x")
    print(f"int8 conversion (calibration on {args.calib_samples} images + export + check): {int8_build_s:.1f} s")
    for label, key in (("naive fp32", 0), ("int8", 2), ("uint8-activation", 3)):
        shares = op_time_shares(list(paths.values())[key], x, args.threads)
        print(f"\nwhere the {label} graph spends its time (ORT profiler, share of node time):")
        print(", ".join(f"{op} {pct:.1f}%" for op, pct in shares[:8]))
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"\nCPU flags: avx2={'avx2' in cpu} avx512f={'avx512f' in cpu} avx_vnni={'avx_vnni' in cpu or 'avx512_vnni' in cpu}")


if __name__ == "__main__":
    main()
