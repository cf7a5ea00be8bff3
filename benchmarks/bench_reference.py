"""The fp32 PyTorch reference against timm's eager model: latency, side by side in one run.

    python benchmarks/bench_reference.py [--models crossvit_tiny_240 crossvit_9_240] [--batches 1 8]
        [--threads 2] [--rounds 7] [--runs 10] [--devices cpu cuda]

Every artifact's accuracy and latency are judged against this project's eager fp32 model (the
profiling harness's reference row), so it must be no slower than timm's implementation of the same
function. For each model, batch and device: both models get the same random weights (timm's,
loaded into ours; the logits must agree within 1e-4), then ``--rounds`` rounds each time one block
of ``--runs`` forward passes of ours and one of timm's, back to back and in alternating order, so
that load from other processes hits both alike. A row reports the median over all passes and the
ratio ours / timm (below 1: ours is faster). ``cuda`` rows are added when a GPU is present
(synchronised timing); eager fp32 on both sides, no ``torch.compile``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_block(model, x, runs: int, sync) -> list:
    out = []
    for _ in range(runs):
        s = time.perf_counter()
        model(x)
        sync()
        out.append(time.perf_counter() - s)
    return out


def compare(name: str, batch: int, device: str, rounds: int, runs: int) -> dict:
    import timm
    import torch

    from crossvit_edge.crossvit import create_model

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=1000).eval().to(device)
    ours = create_model(name, num_classes=1000)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.to(device)
    size = ours.config.img_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {"ours": [], "timm": []}
    models = {"ours": ours, "timm": ref}
    with torch.inference_mode():
        diff = (ours(x) - ref(x)).abs().max().item()
        for key in models:  # warm-up: allocator, kernels, caches
            time_block(models[key], x, 3, sync)
        for r in range(rounds):
            order = ("ours", "timm") if r % 2 == 0 else ("timm", "ours")
            for key in order:
                times[key] += time_block(models[key], x, runs, sync)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    return {
        "model": name, "batch": batch, "device": device, "ours_ms": med["ours"], "timm_ms": med["timm"],
        "ratio": med["ours"] / med["timm"], "max_abs_diff": diff, "passes": len(times["ours"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["crossvit_tiny_240", "crossvit_9_240"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when a GPU is present")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating blocks per path")
    ap.add_argument("--runs", type=int, default=10, help="forward passes per block")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device: cuda rows skipped", file=sys.stderr)
        devices = [d for d in devices if d != "cuda"]
    rows = []
    for device in devices:
        for name in args.models:
            for batch in args.batches:
                row = compare(name, batch, device, args.rounds, args.runs)
                rows.append(row)
                print(f"  {name} b{batch} {device}: ours {row['ours_ms']:.2f} ms, timm {row['timm_ms']:.2f} ms", file=sys.stderr)
    cpu = torch.cuda.get_device_name() if "cuda" in devices else ""
    print(f"torch {torch.__version__}, {args.threads} CPU threads{', ' + cpu if cpu else ''}; "
          f"{args.rounds} alternating rounds x {args.runs} passes per path; medians")
    print("| model | batch | device | ours ms | timm ms | ours / timm | max abs logit diff |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['device']} | {r['ours_ms']:.2f} | {r['timm_ms']:.2f} | {r['ratio']:.3f} | {r['max_abs_diff']:.1e} |")
    bad = [r for r in rows if r["max_abs_diff"] > 1e-4]
    if bad:
        print(f"parity with timm broken (> 1e-4) in {len(bad)} rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
