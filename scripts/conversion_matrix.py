"""Every variant through every target at every precision it supports: the conversion matrix.

    python scripts/conversion_matrix.py                       # everything (hours on 2 cores)
    python scripts/conversion_matrix.py --variants crossvit_9_dagger_240 crossvit_18_dagger_408 \\
        --targets onnx coreml --precisions int8 --results runs/matrix/results.jsonl

Each cell converts a random-weight checkpoint of the variant (10 classes, seeded) with the real CLI
(``python -m crossvit_edge.convert`` in a child process, so a crash is a failed cell and not a
failed run) using a few calibration images (scikit-learn's digits, written once into the work
folder), and then asserts: exit code 0; the bundle opens (manifest validated, every file's sha256
verified) and names the variant, target, precision and input size; int8 bundles carry a plan whose
int8 layers include every patch-embedding conv (the dagger stems' three per branch); and the
post-conversion check against the fp32 model ran on held-out images with a logit cosine at least
``COSINE_FLOOR[precision]``. Random weights have near-tied logits, so top-1 agreement is reported
and the CLI's own verdict recorded, but only the cosine is asserted.

Per cell: wall time, CPU time (user + system, which other work on the machine does not inflate)
and the child process's peak RSS (``wait4``). Results go to a JSON-lines file,
one line per cell; a second run with the same ``--results`` skips the cells that passed (resume),
``--rerun`` converts them again. The table (variant rows, target/precision columns) is printed as
Markdown at the end and can be written with ``--markdown FILE``.

Targets and their precisions come from the converters themselves; TensorRT cells use the
``jetson-orin-nano-jp6`` profile (static checks and the ONNX stand-in run here; no engine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_PROFILE = {"tensorrt": "jetson-orin-nano-jp6"}  # targets that need a device profile
# Least logit cosine against fp32 on the check images, for a random-weight model (whose near-tied
# logits make agreement meaningless): a broken graph lands far below these.
COSINE_FLOOR = {"fp32": 0.9999, "fp16": 0.995, "int8-weights": 0.98, "int8": 0.90}
NUM_CLASSES = 10


def target_precisions() -> Dict[str, Sequence[str]]:
    """target -> the precisions its converter supports (read from the converter classes)."""
    import importlib

    from crossvit_edge.converters import CONVERTERS

    out = {}
    for target, where in CONVERTERS.items():
        module, _, cls = where.partition(":")
        out[target] = tuple(getattr(importlib.import_module(module), cls).precisions)
    return out


def cells(variants: Iterable[str], targets: Iterable[str], precisions: Optional[Iterable[str]]) -> List[tuple]:
    supported = target_precisions()
    wanted = set(precisions) if precisions else None
    return [(v, t, p) for v in variants for t in targets for p in supported[t] if wanted is None or p in wanted]


def make_checkpoint(variant: str, path: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``variant`` (any name in the model table) with 10 classes."""
    from dataclasses import replace

    import torch

    from crossvit_edge.checkpoint import save_checkpoint
    from crossvit_edge.crossvit import CROSSVIT_CONFIGS, CrossViT

    if not path.exists():
        torch.manual_seed(seed)
        model = CrossViT(replace(CROSSVIT_CONFIGS[variant], num_classes=NUM_CLASSES))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model.state_dict(), path, {"model": variant})
    return path


def calibration_folders(work: Path):
    """(train, val) digits ImageFolders under ``work`` (written once)."""
    from crossvit_edge.data import write_digits_imagefolder

    root = work / "digits"
    if not (root / "val").is_dir():
        write_digits_imagefolder(root)
    return root / "train", root / "val"


def run_child(cmd: List[str], log_path: Path, timeout: float) -> dict:
    """Run ``cmd``; returns exit code, wall seconds and the child's own peak RSS (bytes)."""
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline, timed_out = t + timeout, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    # CPU seconds (user + system of the child and everything it waited for) do not grow when other
    # work shares the cores or the run is paused; wall seconds do.
    return {"exit": proc.returncode, "seconds": round(time.time() - t, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
            "timed_out": timed_out}


def check_bundle(out: Path, variant: str, target: str, precision: str) -> List[str]:
    """What is wrong with the bundle at ``out`` (empty when nothing)."""
    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.crossvit import CROSSVIT_CONFIGS
    from crossvit_edge.errors import UserError

    try:
        bundle = open_bundle(out)
    except UserError as e:
        return [f"bundle does not open: {e}"]
    m = bundle.manifest
    problems = []
    size = CROSSVIT_CONFIGS[variant].img_size
    for key, want in (("model", variant), ("target", target), ("precision", precision)):
        if m.get(key) != want:
            problems.append(f"manifest {key} {m.get(key)!r} != {want!r}")
    if m["input"]["shape"] != [1, 3, size, size]:
        problems.append(f"manifest input shape {m['input']['shape']}")
    if not bundle.artifact_path.exists():
        problems.append("artifact missing")
    if precision == "int8":
        plan = m.get("quantization_plan") or {}
        int8 = {l["name"] for l in plan.get("layers", []) if l["precision"] == "int8"}
        convs = {l["name"] for l in plan.get("layers", []) if l["kind"] == "conv"}
        if not int8 or not convs or not convs <= int8:
            problems.append(f"plan: patch-embedding convs not all int8 ({sorted(convs - int8)[:3]})")
    check = m.get("accuracy_check") or {}
    if "skipped" in check or "cosine" not in check:
        problems.append(f"no check against fp32 ({check.get('skipped', 'missing')})")
    elif not check["cosine"] >= COSINE_FLOOR[precision]:
        problems.append(f"cosine {check['cosine']:.4f} < {COSINE_FLOOR[precision]}")
    return problems


def run_cell(variant: str, target: str, precision: str, work: Path, launcher: Sequence[str], calib_samples: int = 16,
             eval_samples: int = 16, timeout: float = 3600) -> dict:
    """Convert one cell with the CLI and check its bundle; returns the result record."""
    train, val = calibration_folders(work)
    ckpt = make_checkpoint(variant, work / "checkpoints" / f"{variant}.safetensors")
    out = work / "bundles" / f"{variant}-{target}-{precision}"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [*launcher, "crossvit_edge.convert", "--target", target, "--precision", precision, "--model", variant,
           "--checkpoint", str(ckpt), "--output", str(out), "--overwrite",
           "--eval-data", str(val), "--eval-samples", str(eval_samples)]
    if precision == "int8":
        cmd += ["--calib-data", str(train), "--calib-samples", str(calib_samples)]
    if target in TARGET_PROFILE:
        cmd += ["--profile", TARGET_PROFILE[target]]
    log_path = logs / f"{variant}-{target}-{precision}.log"
    record = {"variant": variant, "target": target, "precision": precision, **run_child(cmd, log_path, timeout)}
    problems = [] if record["exit"] == 0 else [f"exit {record['exit']}{' (timed out)' if record['timed_out'] else ''}: "
                                               + _last_line(log_path)]
    if not problems:
        problems = check_bundle(out, variant, target, precision)
        check = json.loads((out / "manifest.json").read_text()).get("accuracy_check", {})
        record.update({k: check.get(k) for k in ("top1_agreement", "cosine", "passed")}, check_failures=check.get("failures", []))
    record.update(ok=not problems, problems=problems, log=str(log_path))
    return record


def _last_line(path: Path) -> str:
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    return lines[-1][:300] if lines else "(no output)"


def load_results(path: Optional[Path]) -> Dict[tuple, dict]:
    out = {}
    if path and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[(r["variant"], r["target"], r["precision"])] = r
    return out


def markdown_table(results: Dict[tuple, dict], variants: Sequence[str], columns: Sequence[tuple]) -> str:
    head = "| variant | " + " | ".join(f"{t} {p}" for t, p in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for v in variants:
        row = []
        for t, p in columns:
            r = results.get((v, t, p))
            if r is None:
                row.append("not run")
            else:
                mem = f"{r['peak_rss_bytes'] / 2**30:.1f} GiB"
                cpu = f" ({r['cpu_seconds']:.0f} s CPU)" if r.get("cpu_seconds") is not None else ""
                # the conversion's own check warned: shown, not failed, because random weights leave
                # near-tied logits (the matrix asserts the cosine, docs in README)
                warned = ""
                if r.get("passed") is False:
                    warned = ", check warned" + (f": {'; '.join(r['check_failures'])}" if r.get("check_failures") else "")
                row.append(f"{'ok' if r['ok'] else '**FAIL**'} {r['seconds']:.0f} s{cpu}, {mem}"
                           + (f", cos {r['cosine']:.4f}" if r.get("cosine") is not None else "") + warned)
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    from crossvit_edge.crossvit import list_models

    supported = target_precisions()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list_models(), help="default: all eleven")
    ap.add_argument("--targets", nargs="+", default=list(supported), choices=list(supported))
    ap.add_argument("--precisions", nargs="+", help="default: every precision each target supports")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "matrix", help="checkpoints, images, bundles and logs")
    ap.add_argument("--results", type=Path, help="JSON-lines results file (default: WORK/results.jsonl); passed cells are skipped")
    ap.add_argument("--rerun", action="store_true", help="convert cells that already passed again")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--table-only", action="store_true", help="print the table from the results file; convert nothing")
    args = ap.parse_args(argv)

    unknown = [v for v in args.variants if v not in list_models()]
    if unknown:
        ap.error(f"unknown variants: {', '.join(unknown)}")
    results_path = args.results or args.work / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(results_path)
    todo = cells(args.variants, args.targets, args.precisions)
    from tqdm import tqdm

    bar = tqdm(todo, desc="matrix", unit="cell", file=sys.stderr, disable=args.table_only)
    for v, t, p in bar:
        if args.table_only or (not args.rerun and results.get((v, t, p), {}).get("ok")):
            continue
        bar.set_postfix_str(f"{v} {t} {p}")
        r = run_cell(v, t, p, args.work, [sys.executable, "-m"], args.calib_samples, args.eval_samples, args.timeout)
        results[(v, t, p)] = r
        with open(results_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        if not r["ok"]:
            print(f"FAIL {v} {t} {p}: {'; '.join(r['problems'])}", file=sys.stderr)
    columns = [(t, p) for t in args.targets for p in supported[t] if not args.precisions or p in args.precisions]
    table = markdown_table(results, args.variants, columns)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    failed = [k for k in todo if not results.get(k, {}).get("ok")]
    print(f"{len(todo) - len(failed)}/{len(todo)} cells passed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
