"""The layer-wise comparison's cost against the plain profile of the same bundle, in one run.

    python benchmarks/bench_debug.py [--model crossvit_9_240] [--samples 32] [--rounds 2] [--threads 2]

Builds an int8 ONNX bundle of a random-weight model (calibration on digits images; the numbers do
not depend on the weights' values), then times the two commands end to end as a user runs them
(subprocesses: imports, checkpoint load, the work, the report files), on the same images, back to
back and never at the same time, ``--rounds`` times each; prints the medians and their ratio.
The profile runs with its defaults (5 warm-up and 30 timed runs per artifact and for the fp32
reference, plus every image once); the layer-wise comparison runs every image once through the
fp32 model with hooks, the instrumented copy of the artifact and the bundle's own runner.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_description, workspace  # noqa: E402


def timed(cmd) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{r.stderr[-2000:]}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="crossvit_9_240")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    work, train_dir, _model, ckpt = workspace("bench_debug_", args.model, args.threads)
    val_dir = train_dir.parent / "val"
    bundle = work / "onnx_int8"
    t = time.perf_counter()
    convert(BuildSpec(target="onnx", output=bundle, precision="int8", checkpoint=str(ckpt),
                      calibration=CalibrationSettings(data=train_dir, samples=64), eval_data=val_dir, eval_samples=16))
    print(f"built {bundle.name} ({args.model}, int8) in {time.perf_counter() - t:.0f} s")
    common = ["--data", str(val_dir), "--samples", str(args.samples), "--threads", str(args.threads)]
    profile = [sys.executable, "-m", "crossvit_edge.profile", str(bundle), *common, "--output", str(work / "profile")]
    debug = [sys.executable, "-m", "crossvit_edge.debug", str(bundle), *common, "--output", str(work / "debug")]
    times = {"profile": [], "debug": []}
    for _ in range(args.rounds):  # alternate, one command at a time
        times["profile"].append(timed(profile))
        times["debug"].append(timed(debug))
    p, d = (float(np.median(times[k])) for k in ("profile", "debug"))
    print()
    print(f"{args.model}, int8 ONNX (TensorRT form) in ONNX Runtime, {args.samples} images, {args.threads} threads, "
          f"median of {args.rounds} rounds; {datetime.date.today()}; CPU: {cpu_description()}")
    print()
    print("| command | seconds (each round) | median s | ratio to profile |")
    print("|---|---|---|---|")
    print(f"| python -m crossvit_edge.profile | {', '.join(f'{x:.1f}' for x in times['profile'])} | {p:.1f} | 1.00 |")
    print(f"| python -m crossvit_edge.debug | {', '.join(f'{x:.1f}' for x in times['debug'])} | {d:.1f} | {d / p:.2f} |")
    print()
    print(f"target: debug < 3x profile: {'met' if d < 3 * p else 'NOT met'} ({d / p:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
