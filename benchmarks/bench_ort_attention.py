"""One CrossViT self-attention block in ONNX Runtime: the graph the exporter writes against ORT's
fused ``com.microsoft.MultiHeadAttention``, fp32, batch 1, side by side in one run.

    python benchmarks/bench_ort_attention.py [--threads 2] [--runs 200] [--rounds 4]

The block is x -> qkv Linear -> attention -> proj Linear, on crossvit_tiny's and crossvit_9's
branch shapes. "exported" is the form our ONNX graphs carry (one qkv GEMM, Reshape, Transpose,
Split, Squeeze, scaled q k^T, Softmax, probs v, Transpose, Reshape); "fused" computes the same
function with three q / k / v GEMMs and one MultiHeadAttention, because ORT's CPU kernel does not
implement the packed-QKV layout (ORT 1.32: "Packed QKV ... not implemented for CPU"). Both graphs
are checked against each other before timing. Each graph is timed in its own back-to-back block
(sessions are never interleaved run by run), fastest block median reported. Random weights.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description  # noqa: E402

# (label, tokens, width, heads): the self-attention shapes of the two models' branches
SHAPES = (
    ("crossvit_tiny_240 branch 0", 401, 96, 3),
    ("crossvit_tiny_240 branch 1", 197, 192, 3),
    ("crossvit_9_240 branch 0", 401, 128, 4),
    ("crossvit_9_240 branch 1", 197, 256, 4),
)


def block_weights(width: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w_qkv": (rng.standard_normal((width, 3 * width)) * width**-0.5).astype(np.float32),
        "b_qkv": (rng.standard_normal(3 * width) * 0.1).astype(np.float32),
        "w_proj": (rng.standard_normal((width, width)) * width**-0.5).astype(np.float32),
        "b_proj": (rng.standard_normal(width) * 0.1).astype(np.float32),
    }


def attention_block(tokens: int, width: int, heads: int, weights: dict, fused: bool) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    dim = width // heads
    inits = {"w_proj": weights["w_proj"], "b_proj": weights["b_proj"]}
    nodes = []
    if fused:
        for i, name in enumerate("qkv"):  # the qkv weight's output features are ordered (3, heads, dim)
            inits[f"w_{name}"] = np.ascontiguousarray(weights["w_qkv"][:, i * width : (i + 1) * width])
            inits[f"b_{name}"] = weights["b_qkv"][i * width : (i + 1) * width].copy()
            nodes += [helper.make_node("MatMul", ["x", f"w_{name}"], [f"{name}_mm"]),
                      helper.make_node("Add", [f"{name}_mm", f"b_{name}"], [name])]
        nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["attn"], domain="com.microsoft",
                                      num_heads=heads, scale=dim**-0.5))
    else:
        inits.update(w_qkv=weights["w_qkv"], b_qkv=weights["b_qkv"], heads_shape=np.array([1, tokens, 3, heads, dim], np.int64),
                     tokens_shape=np.array([1, tokens, width], np.int64), scale=np.array([dim**-0.5], np.float32),
                     axis0=np.array([0], np.int64))
        nodes += [
            helper.make_node("MatMul", ["x", "w_qkv"], ["qkv_mm"]),
            helper.make_node("Add", ["qkv_mm", "b_qkv"], ["qkv"]),
            helper.make_node("Reshape", ["qkv", "heads_shape"], ["qkv5"]),
            helper.make_node("Transpose", ["qkv5"], ["qkv5t"], perm=[2, 0, 3, 1, 4]),
            helper.make_node("Split", ["qkv5t"], ["q5", "k5", "v5"], axis=0, num_outputs=3),
            *(helper.make_node("Squeeze", [f"{n}5", "axis0"], [n]) for n in "qkv"),
            helper.make_node("Mul", ["q", "scale"], ["q_scaled"]),
            helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q_scaled", "k_t"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
            helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
            helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["ctx_t", "tokens_shape"], ["attn"]),
        ]
    nodes += [helper.make_node("MatMul", ["attn", "w_proj"], ["proj_mm"]), helper.make_node("Add", ["proj_mm", "b_proj"], ["y"])]
    graph = helper.make_graph(nodes, "attention_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, width])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def block_median_ms(model: bytes, x: np.ndarray, threads: int, runs: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="runs per block")
    ap.add_argument("--rounds", type=int, default=4, help="blocks per graph, alternating")
    args = ap.parse_args()
    print(f"CPU: {cpu_description()}; onnxruntime {ort.__version__}; {args.threads} threads; batch 1\n")
    print("| shape | tokens x width, heads | exported ms | fused (MultiHeadAttention) ms | fused / exported | max abs diff |")
    print("|---|---|---:|---:|---:|---:|")
    for label, tokens, width, heads in SHAPES:
        weights = block_weights(width)
        graphs = {fused: attention_block(tokens, width, heads, weights, fused) for fused in (False, True)}
        x = np.random.default_rng(1).standard_normal((1, tokens, width)).astype(np.float32)
        outputs = {}
        for fused, model in graphs.items():
            sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            outputs[fused] = sess.run(None, {"x": x})[0]
            del sess
        diff = float(np.abs(outputs[True] - outputs[False]).max())
        if diff > 1e-3:
            print(f"the two graphs disagree on {label}: max abs diff {diff:.2e}", file=sys.stderr)
            return 1
        best = {False: [], True: []}
        for _ in range(args.rounds):
            for fused, model in graphs.items():
                best[fused].append(block_median_ms(model, x, args.threads, args.runs))
        a, b = min(best[False]), min(best[True])
        print(f"| {label} | {tokens} x {width}, {heads} | {a:.3f} | {b:.3f} | {b / a:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
