"""The aarch64 side of tests/test_arm.py: run under an aarch64 CPython (qemu-user with the arm64
root of scripts/install_arm_deps.sh), with no torch, it does what an app on an ARM board does with
ONNX bundles through ``crossvit_edge.runtime`` and writes what it saw as JSON for the x86 side to
judge:

    python tests/arm_side.py JOB.json OUT.json

JOB: {"bundles": [bundle folders], "images": [image paths], "threads": N}. OUT: per bundle the
runtime's description, the top-1 label and probability of ``classify()`` on the image files, the
logits of ``logits(preprocess(images))`` with the preprocessed tensor saved beside OUT (the x86 side
compares it with its own preprocessing), and, for int8 bundles, the fusion report of ONNX Runtime's
optimized graph on this machine (``converters.onnx.integer_kernel_report``), plus where it ran.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path


def main(job_path: str, out_path: str) -> int:
    import numpy as np
    import onnxruntime

    from crossvit_edge.converters.onnx import integer_kernel_report, ort_optimized_graph
    from crossvit_edge.runtime import load

    job = json.loads(Path(job_path).read_text())
    out = Path(out_path)
    images = [Path(p) for p in job["images"]]
    report = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
              "torch_imported": False, "bundles": {}}
    for i, bundle in enumerate(job["bundles"]):
        t = time.perf_counter()
        with load(bundle, threads=job.get("threads", 1)) as model:
            top1 = [top[0] for top in model.classify(images, top_k=1)]
            x = model.preprocess(images)
            logits = model.logits(x)
            entry = {"runtime": model.description, "labels": [label for label, _ in top1],
                     "probabilities": [p for _, p in top1], "logits": logits.tolist(), "input": f"{out.stem}.input{i}.npy"}
            np.save(out.with_name(entry["input"]), x)
            if model.bundle.manifest["precision"] == "int8":
                entry["fusion"] = integer_kernel_report(ort_optimized_graph(model.bundle.artifact_path, threads=1))
        entry["seconds"] = time.perf_counter() - t
        report["bundles"][bundle] = entry
    report["torch_imported"] = "torch" in sys.modules  # the board's runtime is torch-free
    out.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
