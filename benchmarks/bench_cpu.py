"""Every CPU path of crossvit_tiny_240 and crossvit_9_240 in one run and one table, as ratios.

    python benchmarks/bench_cpu.py [--models crossvit_tiny_240,crossvit_9_240] [--paths all]
                                   [--runs 30] [--rounds 3] [--threads 2] [--calib-samples 32]

Paths (``--paths`` takes a comma list of these keys, or ``all``):

    naive        timm's model -> torch.onnx.export -> ONNX Runtime fp32 (cubic Resize and all)
    eager        timm's model in PyTorch eager mode, fp32
    ort-fp32-plain  our fp32 ONNX without ORT contrib-op fusions (what a plain --target onnx gives)
    ort-fp32     our fp32 ONNX as the cpu-onnxruntime profile builds it (GELU fused), project runner
    ort-trt      our int8 ONNX, TensorRT form (the graph TensorRT builds from), the project's runner
    ort-cpu      our int8 ONNX, ONNX Runtime CPU form (static uint8 activations, integer GEMMs),
                 as the cpu-onnxruntime profile builds it
    ort-dyn      the same with dynamic activation ranges (DynamicQuantizeMatMul)
    ort-cpu-attn ort-cpu with the plan's int8 attention option (profile key ``int8_attention``): the
                 self-attention matmuls as MatMulIntegerToFloat / QLinearMatMul (docs/cpu_int8.md)
    ort-dyn-attn ort-dyn with the same option
    et-fp32      our ExecuTorch .pte, XNNPACK, fp32
    et-int8      our ExecuTorch .pte, XNNPACK, int8 (PT2E, the plan's layers)
    floor        the matmul floor: every GEMM of our fp32 graph (same shapes, weight and attention
                 matmuls) alone in one ONNX Runtime graph; and the int8 floor: the plan's int8
                 layers as MatMulInteger (uint8 x int8, VNNI where the CPU has it), the rest fp32

Timing: each path is timed in a block of ``--runs`` back-to-back runs (after warm-up) with its own
session, created for the block and released after it, so that no idle ORT thread pool spins on the
cores another path is using; the blocks of all paths are repeated ``--rounds`` times in turn and the
table gives, per path, the fastest of its block medians (``--stat min``, the default) or their median
(``--stat median``). The minimum is the default because interference on a shared virtual machine
only ever adds time: a neighbour's burst slows a whole block of one path by 1.5x or more, so a
median over three rounds can still land on a disturbed block (seen here), while the fastest block is
the one that ran undisturbed. Every round's block medians are logged, so the spread is on record. Every row is a ratio to our ORT fp32 of
the same run. Weights are random (timm's init, no downloads): latency does not depend on them;
accuracy is measured on the trained demo model by ``benchmarks/cpu_int8_accuracy.py``.
"""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_description  # noqa: E402

PATHS = ("naive", "eager", "ort-fp32-plain", "ort-fp32", "ort-trt", "ort-cpu", "ort-dyn", "ort-cpu-attn", "ort-dyn-attn", "et-fp32", "et-int8", "floor")
# what the cpu-onnxruntime profile sets; the ort-* rows other than ort-trt are built with it
CPU_PROFILE = "cpu-onnxruntime"
LABELS = {
    "naive": "naive: timm -> torch.onnx.export -> ORT fp32",
    "eager": "PyTorch eager fp32 (timm)",
    "ort-fp32-plain": "our ORT fp32, no ORT contrib fusions (portable ONNX)",
    "ort-fp32": "our ORT fp32 (cpu-onnxruntime profile: + GELU fusion)",
    "ort-trt": "our ORT int8, TensorRT form (project runner)",
    "ort-cpu": "our ORT int8, CPU form (static uint8, QGemm)",
    "ort-dyn": "our ORT int8, CPU dynamic form (DynamicQuantizeMatMul)",
    "ort-cpu-attn": "our ORT int8, CPU form + int8 attention matmuls",
    "ort-dyn-attn": "our ORT int8, CPU dynamic form + int8 attention matmuls",
    "et-fp32": "our ExecuTorch fp32 (XNNPACK)",
    "et-int8": "our ExecuTorch int8 (XNNPACK)",
    "floor-fp32": "matmul floor fp32 (ORT, GEMMs only)",
    "floor-int8": "matmul floor int8 (ORT MatMulInteger u8s8 on the plan's layers, rest fp32)",
}
def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def ort_feeds(session) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        if "uint8" in i.type:
            feeds[i.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# --------------------------------------------------------------------------------------------------
# the matmul floor


def matmul_floor_graphs(int8_onnx: Path, out_dir: Path):
    """(fp32 floor, int8 floor) ONNX files: every MatMul/Gemm of the int8 (TensorRT form) graph
    (the fp32 graph's GEMMs, plus which of them the plan makes int8)
    with its inferred shapes, as independent nodes fed by graph inputs (so nothing folds away).
    In the int8 floor the plan's layers (MatMul fed by two DequantizeLinear) are MatMulInteger."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(int8_onnx)))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    gemms = []  # (a_shape, b_shape, b_is_weight, int8)
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = n.input[0], n.input[1]
        pa, pb = producer.get(a), producer.get(b)
        int8 = pa is not None and pb is not None and pa.op_type == pb.op_type == "DequantizeLinear" and pb.input[0] in inits
        b_shape = list(inits[pb.input[0]].shape) if int8 else (list(inits[b].shape) if b in inits else shapes.get(b))
        a_shape = shapes.get(a)
        if not a_shape or not b_shape or 0 in a_shape or 0 in b_shape:
            continue
        if n.op_type == "Gemm" and any(x.name == "transB" and x.i for x in n.attribute):
            b_shape = b_shape[::-1]
        gemms.append((a_shape, b_shape, b in inits or int8, int8))
    rng = np.random.default_rng(0)
    files = []
    for kind in ("fp32", "int8"):
        nodes, inputs, outputs, initializers = [], {}, [], []

        def graph_input(shape, dtype):
            name = f"in_{'u8' if dtype == TensorProto.UINT8 else 'f'}_{'x'.join(map(str, shape))}"
            inputs.setdefault(name, helper.make_tensor_value_info(name, dtype, shape))
            return name

        for i, (a_shape, b_shape, b_const, int8) in enumerate(gemms):
            if kind == "int8" and int8:
                a = graph_input(a_shape, TensorProto.UINT8)
                w = rng.integers(-127, 128, b_shape, dtype=np.int8)
                initializers += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.array(128, np.uint8), f"azp{i}"),
                                 numpy_helper.from_array(np.zeros((), np.int8), f"wzp{i}")]
                nodes.append(helper.make_node("MatMulInteger", [a, f"w{i}", f"azp{i}", f"wzp{i}"], [f"y{i}"]))
                out_type = TensorProto.INT32
            else:
                a = graph_input(a_shape, TensorProto.FLOAT)
                if b_const:
                    initializers.append(numpy_helper.from_array(rng.standard_normal(b_shape).astype(np.float32), f"w{i}"))
                    b = f"w{i}"
                else:
                    b = graph_input(b_shape, TensorProto.FLOAT)
                nodes.append(helper.make_node("MatMul", [a, b], [f"y{i}"]))
                out_type = TensorProto.FLOAT
            outputs.append(helper.make_tensor_value_info(f"y{i}", out_type, None))
        m = helper.make_model(helper.make_graph(nodes, f"matmul_floor_{kind}", list(inputs.values()), outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
        path = out_dir / f"matmul_floor_{kind}.onnx"
        onnx.save(m, str(path))
        files.append(path)
    return files, len(gemms), sum(1 for g_ in gemms if g_[3])


# --------------------------------------------------------------------------------------------------
# builds


def export_naive(model_name: str, path: Path) -> None:
    from bench_onnx import export_naive as export

    export(model_name, path)


def build_model_paths(model_name: str, paths: List[str], args) -> Dict[str, Callable]:
    """key -> a function that loads the path and returns a ``run()`` closure (timed) and a release."""
    import torch

    from common import workspace
    from crossvit_edge.bundle import read_manifest
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    log = logging.getLogger("bench_cpu")
    wdir, train_dir, model, ckpt = workspace(f"bench_cpu_{model_name}_", model_name, args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 240, 240)).astype(np.float32)
    loaders: Dict[str, Callable] = {}

    def ort_loader(path):
        def load():
            s = ort_session(path, args.threads)
            feeds = ort_feeds(s)
            return (lambda: s.run(None, feeds)), s
        return load

    def runner_loader(cls, bundle, **kw):
        def load():
            r = cls(bundle, read_manifest(bundle), threads=args.threads, **kw)
            return (lambda: r.run(x)), r
        return load

    if "naive" in paths:
        log.info("%s: exporting the naive path", model_name)
        export_naive(model_name, wdir / "naive.onnx")
        loaders["naive"] = ort_loader(wdir / "naive.onnx")
    if "eager" in paths:
        import timm

        timm_model = timm.create_model(model_name, pretrained=False, num_classes=10).eval()
        xt = torch.from_numpy(x)

        def eager():
            torch.set_num_threads(args.threads)

            def run():
                with torch.inference_mode():
                    timm_model(xt)
            return run, None
        loaders["eager"] = eager
    need_onnx = {"ort-fp32-plain", "ort-fp32", "ort-trt", "ort-cpu", "ort-dyn", "ort-cpu-attn", "ort-dyn-attn", "floor"} & set(paths)
    if need_onnx:
        from crossvit_edge.converters.onnx import OnnxRuntimeRunner
        from crossvit_edge.device_profiles import load_profile

        cpu = load_profile(CPU_PROFILE)
        log.info("%s: building our ONNX fp32 and int8 forms", model_name)
        for key, profile in (("ort-fp32-plain", None), ("ort-fp32", cpu)):
            if key in paths:
                convert(BuildSpec(target="onnx", output=wdir / key, precision="fp32", checkpoint=str(ckpt), profile=profile))
                loaders[key] = runner_loader(OnnxRuntimeRunner, wdir / key)
        stats = None
        attn = {"int8_attention": True}
        for key, profile, options in (("ort-trt", None, {}), ("ort-cpu", cpu, {}), ("ort-dyn", cpu, {"int8_form": "ort-cpu-dynamic"}),
                                      ("ort-cpu-attn", cpu, attn), ("ort-dyn-attn", cpu, {"int8_form": "ort-cpu-dynamic", **attn})):
            if key not in paths and not (key == "ort-trt" and "floor" in paths):
                continue
            own = bool(options.get("int8_attention"))  # its own pass: the attention operands are observed too
            reuse = stats if not own else None
            calib = CalibrationSettings(data=None if reuse else train_dir, samples=args.calib_samples, stats=reuse)
            convert(BuildSpec(target="onnx", output=wdir / key, precision="int8", checkpoint=str(ckpt), calibration=calib,
                              profile=profile, options=dict(options)))
            if not own:
                stats = stats or wdir / key / "calibration_stats.npz"
            if key in paths:
                loaders[key] = runner_loader(OnnxRuntimeRunner, wdir / key)
        if "floor" in paths:
            (f32, i8), n, n8 = matmul_floor_graphs(next((wdir / "ort-trt").glob("*.onnx")), wdir)
            log.info("%s: matmul floor of %d GEMMs (%d int8)", model_name, n, n8)
            loaders["floor-fp32"] = ort_loader(f32)
            loaders["floor-int8"] = ort_loader(i8)
    if {"et-fp32", "et-int8"} & set(paths):
        from crossvit_edge.converters.executorch import ExecuTorchRunner

        log.info("%s: building ExecuTorch programs", model_name)
        if "et-fp32" in paths:
            convert(BuildSpec(target="executorch", output=wdir / "et_fp32", precision="fp32", checkpoint=str(ckpt)))
            loaders["et-fp32"] = runner_loader(ExecuTorchRunner, wdir / "et_fp32")
        if "et-int8" in paths:
            convert(BuildSpec(target="executorch", output=wdir / "et_int8", precision="int8", checkpoint=str(ckpt),
                              calibration=CalibrationSettings(data=train_dir, samples=args.calib_samples)))
            loaders["et-int8"] = runner_loader(ExecuTorchRunner, wdir / "et_int8")
    return loaders


def time_block(load: Callable, runs: int, warmup: int) -> float:
    run, handle = load()
    try:
        for _ in range(warmup):
            run()
        t = []
        for _ in range(runs):
            s = time.perf_counter()
            run()
            t.append(time.perf_counter() - s)
        return 1e3 * float(np.median(t))
    finally:
        del run, handle
        gc.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="crossvit_tiny_240,crossvit_9_240")
    ap.add_argument("--paths", default="all", help=f"comma list of: {', '.join(PATHS)} (or all)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per block")
    ap.add_argument("--rounds", type=int, default=3, help="blocks per path")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=32, help="latency does not depend on it")
    ap.add_argument("--stat", choices=("min", "median"), default="min", help="per path, over the rounds' block medians")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("bench_cpu").setLevel(logging.INFO)
    paths = list(PATHS) if args.paths == "all" else [p.strip() for p in args.paths.split(",")]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    results: Dict[str, Dict[str, float]] = {}
    for model_name in models:
        loaders = build_model_paths(model_name, paths, args)
        samples: Dict[str, List[float]] = {k: [] for k in loaders}
        for r in range(args.rounds):
            for key, load in loaders.items():
                samples[key].append(time_block(load, args.runs, args.warmup))
            logging.getLogger("bench_cpu").info("%s round %d: %s", model_name, r + 1, {k: round(v[-1], 1) for k, v in samples.items()})
        pick = np.min if args.stat == "min" else np.median
        results[model_name] = {k: float(pick(v)) for k, v in samples.items()}

    import onnxruntime
    import torch

    print(f"\nCPU: {cpu_description()}")
    print(f"batch 1, {args.threads} threads, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}; "
          f"{'fastest' if args.stat == 'min' else 'median'} of {args.rounds} rounds' block medians "
          f"({args.runs} back-to-back runs per block); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    keys = [k for k in LABELS if any(k in r for r in results.values())]
    header = "| path | " + " | ".join(f"{m} ms | x our ORT fp32" for m in models) + " |"
    print(header)
    print("|---|" + "---|---|" * len(models))
    for k in keys:
        cells = []
        for m in models:
            v, base = results[m].get(k), results[m].get("ort-fp32")
            cells.append(f"{v:.1f} | {v / base:.2f}x" if v is not None and base else (f"{v:.1f} | -" if v is not None else "- | -"))
        print(f"| {LABELS[k]} | " + " | ".join(cells) + " |")
    print()
    for m in models:
        r = results[m]
        lines = []
        if "ort-fp32" in r and "naive" in r:
            lines.append(f"our ORT fp32 / naive {r['ort-fp32'] / r['naive']:.2f}x (target <= 0.45x)")
        if "ort-fp32" in r and "floor-fp32" in r:
            lines.append(f"our ORT fp32 / fp32 matmul floor {r['ort-fp32'] / r['floor-fp32']:.2f}x (target <= 1.3x)")
        for k in ("ort-cpu", "ort-dyn", "ort-cpu-attn", "ort-dyn-attn"):
            if k in r and "ort-fp32" in r:
                lines.append(f"{k} / our ORT fp32 {r[k] / r['ort-fp32']:.2f}x (target <= 0.5x on VNNI, <= 0.7x on AVX2)")
        if "ort-cpu" in r and "floor-int8" in r:
            lines.append(f"ort-cpu / int8 matmul floor {r['ort-cpu'] / r['floor-int8']:.2f}x")
        if "et-int8" in r and "et-fp32" in r:
            lines.append(f"ExecuTorch int8 / fp32 {r['et-int8'] / r['et-fp32']:.2f}x (target <= 0.5x on VNNI)")
        print(f"{m}: " + "; ".join(lines))


if __name__ == "__main__":
    main()
