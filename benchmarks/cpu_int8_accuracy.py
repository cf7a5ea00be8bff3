"""int8 accuracy of the demo model per ONNX int8 form, through ONNX Runtime on the CPU.

    python benchmarks/cpu_int8_accuracy.py [--samples 256] [--threads 2]

Builds the shipped demo checkpoint as fp32 ONNX and as int8 in each form (``tensorrt``, the
TensorRT-legal Q/DQ graph; ``ort-cpu``, the layout ONNX Runtime's x86 CPU EP fuses into integer
GEMMs; ``ort-cpu-dynamic``, the plan's layers with per-run activation ranges), all from one set of
calibration statistics (the digits train split), runs the full digits val split (360 images)
through the project's runner and prints top-1, the drop against fp32 ONNX and top-1 agreement with
fp32. The ``ort-cpu`` form is also run with graph optimisations off (ORT then computes the Q/DQ
semantics exactly), to show what the integer kernels change. With ``--attention`` (default on) the
same forms are built again with the plan's int8 attention option (``int8_attention``: the
self-attention matmuls on int8 operands), from their own calibration pass over the same images
(the attention operands are observed in the export form), and one more row keeps the softmax output
and the value matmul float (only q k^T int8) to show which operand costs the accuracy.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def without_softmax_output_qdq(src: Path, dst: Path) -> Path:
    """A copy of an int8-attention graph whose value matmuls (softmax output x v) read their float
    operands again: only q k^T stays int8 (an experiment, not a form)."""
    import onnx

    from crossvit_edge.converters.onnx import _attention_matmuls, _const_values, _drop_unused, _producers

    model = onnx.load(str(src))
    graph = model.graph
    producer = _producers(graph)
    for matmul, (q_a, _dq_a), (q_b, _dq_b) in _attention_matmuls(graph, _const_values(graph), producer):
        source = producer.get(q_a.input[0])
        if source is not None and source.op_type == "Softmax":  # probs v: both operands float again
            matmul.input[0], matmul.input[1] = q_a.input[0], q_b.input[0]
    _drop_unused(model.graph)
    onnx.save(model, str(dst))
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256, help="calibration images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True, help="also the int8 attention rows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from crossvit_edge.converters.onnx import OnnxRuntimeRunner
    from crossvit_edge.bundle import read_manifest
    from crossvit_edge.data import open_image_set, write_digits_imagefolder
    from crossvit_edge.pipeline import convert, run_batched
    from crossvit_edge.preprocess import Preprocessing
    from crossvit_edge.spec import DEMO_CHECKPOINT, BuildSpec, CalibrationSettings

    work = Path(tempfile.mkdtemp(prefix="cpu_int8_accuracy_"))
    train_dir, val_dir = write_digits_imagefolder(work / "digits")
    val = open_image_set(val_dir)
    x, y = val.load(Preprocessing()).astype(np.float32), np.asarray(val.labels)

    def evaluate(bundle, exact=False):
        return run_batched(OnnxRuntimeRunner(bundle, read_manifest(bundle), threads=args.threads, exact=exact), x)

    def evaluate_file(path):  # an edited graph outside a bundle: a plain ORT session
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads = args.threads
        o.log_severity_level = 3
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(len(x))])

    convert(BuildSpec(target="onnx", output=work / "fp32", checkpoint=str(DEMO_CHECKPOINT)))
    l32 = evaluate(work / "fp32")
    rows = [("fp32", "-", l32)]
    stats = None
    for form in ("tensorrt", "ort-cpu", "ort-cpu-dynamic"):
        out = work / form
        calib = CalibrationSettings(data=None if stats else train_dir, samples=args.samples, stats=stats)
        convert(BuildSpec(target="onnx", output=out, precision="int8", checkpoint=str(DEMO_CHECKPOINT), calibration=calib,
                          options={"int8_form": form}))
        stats = stats or out / "calibration_stats.npz"
        rows.append((f"int8 {form}", "all graph optimisations", evaluate(out)))
        if form == "ort-cpu":
            rows.append((f"int8 {form}", "no graph optimisation (exact Q/DQ semantics)", evaluate(out, exact=True)))
    attention_stats = None
    for form in ("tensorrt", "ort-cpu", "ort-cpu-dynamic") if args.attention else ():
        out = work / f"{form}-attention"
        calib = CalibrationSettings(data=None if attention_stats else train_dir, samples=args.samples, stats=attention_stats)
        convert(BuildSpec(target="onnx", output=out, precision="int8", checkpoint=str(DEMO_CHECKPOINT), calibration=calib,
                          options={"int8_form": form, "int8_attention": True}))
        attention_stats = attention_stats or out / "calibration_stats.npz"
        name = f"int8 {form} + int8 attention"
        rows.append((name, "all graph optimisations", evaluate(out)))
        if form == "ort-cpu":
            rows.append((name, "no graph optimisation (exact Q/DQ semantics)", evaluate(out, exact=True)))
            rows.append((f"int8 {form} + int8 q k^T only (softmax output, v float)", "all graph optimisations",
                         evaluate_file(without_softmax_output_qdq(next(out.glob("*.onnx")), work / "qk_only.onnx"))))
    top1_32 = float((l32.argmax(1) == y).mean())
    print(f"\ndemo model (crossvit_tiny_240, digits), full val split ({len(y)} images), ONNX Runtime CPU, "
          f"calibration: {args.samples} train images, entropy\n")
    print("| artifact | ORT session | top-1 | drop vs fp32 (points) | top-1 agreement with fp32 |\n|---|---|---|---|---|")
    for name, mode, logits in rows:
        top1 = float((logits.argmax(1) == y).mean())
        agree = float((logits.argmax(1) == l32.argmax(1)).mean())
        print(f"| {name} | {mode} | {100 * top1:.2f}% | {100 * (top1_32 - top1):.2f} | {100 * agree:.2f}% |")


if __name__ == "__main__":
    main()
