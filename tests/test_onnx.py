"""ONNX target: export properties, fp32/fp16/int8 accuracy against the fp32 PyTorch model in ONNX
Runtime, TensorRT's Q/DQ rules, calibration reuse and bad input."""
from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from crossvit_edge.converters.onnx import OnnxRuntimeRunner, QDQRuleError, check_qdq_rules
from crossvit_edge.bundle import read_manifest
from crossvit_edge.checkpoint import load_checkpoint
from crossvit_edge.data import open_image_set
from crossvit_edge.pipeline import convert, reference_logits, run_batched
from crossvit_edge.preprocess import Preprocessing
from crossvit_edge.spec import BuildSpec, CalibrationSettings

from .conftest import demo_int8_acceptance, row_cosine, run_cli


def _build(tmp, ckpt, precision, digits_dir=None, **kw):
    calib = CalibrationSettings(data=digits_dir / "train" if digits_dir else None, samples=kw.pop("samples", 32), method=kw.pop("method", "entropy"), stats=kw.pop("stats", None))
    spec = BuildSpec(target="onnx", output=tmp / f"b_{precision}", precision=precision, checkpoint=str(ckpt), calibration=calib,
                     eval_data=digits_dir / "val" if digits_dir else None, eval_samples=16, overwrite=True, **kw)
    convert(spec)
    return spec.output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, micro_checkpoint, digits_dir):
    tmp = tmp_path_factory.mktemp("onnx")
    return {p: _build(tmp, micro_checkpoint, p, digits_dir) for p in ("fp32", "fp16", "int8")}


@pytest.fixture(scope="module")
def val_images(digits_dir):
    s = open_image_set(digits_dir / "val").sample(16, seed=0)
    return s.load(Preprocessing()).astype(np.float32), np.asarray(s.labels)


def _runner(bundle, **kw):
    m = read_manifest(bundle)
    return OnnxRuntimeRunner(bundle, m, **kw), m


def test_fp32_graph_properties_and_logits(bundles, micro_checkpoint, val_images):
    runner, manifest = _runner(bundles["fp32"])
    proto = onnx.load(str(runner.artifact_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 240, 240]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    ops = {n.op_type for n in proto.graph.node}
    assert "LayerNormalization" in ops and "Pow" not in ops
    assert not ops & {"Identity", "Dropout", "Resize", "Upsample"}
    x, _ = val_images
    ref = reference_logits(load_checkpoint(micro_checkpoint).model, x)
    got = run_batched(runner, x)
    assert np.abs(got - ref).max() <= 1e-4
    assert manifest["accuracy_check"]["max_abs_diff"] <= 1e-4
    assert manifest["input"] == {"name": "image", "shape": [1, 3, 240, 240], "dtype": "float32", "layout": "NCHW"}
    for rel, entry in manifest["files"].items():
        assert len(entry["sha256"]) == 64
    assert manifest["versions"]["onnxruntime"] and manifest["preprocessing"]["resize_short_side"] == 274


def test_fp16_keeps_layernorm_and_softmax_in_fp32(bundles, micro_checkpoint, val_images):
    runner, manifest = _runner(bundles["fp16"])
    proto = onnx.load(str(runner.artifact_path))
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    for node in proto.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
    matmul_types = {types.get(n.input[0]) for n in proto.graph.node if n.op_type == "MatMul"}
    assert TensorProto.FLOAT16 in matmul_types
    x, _ = val_images
    ref = reference_logits(load_checkpoint(micro_checkpoint).model, x)
    got = run_batched(runner, x)
    cos = row_cosine(got, ref)
    assert cos.min() > 0.999 and (got.argmax(1) == ref.argmax(1)).mean() == 1.0


def test_int8_graph_obeys_tensorrt_rules_and_the_plan(bundles, micro_checkpoint, val_images):
    runner, manifest = _runner(bundles["int8"], exact=True)
    proto = onnx.load(str(runner.artifact_path))
    n_qdq = check_qdq_rules(proto)
    plan = manifest["quantization_plan"]
    n_int8 = plan["summary"]["int8_layers"]
    int8_weights = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2}
    assert len(int8_weights) == n_int8
    producer = {o: n for n in proto.graph.node for o in n.output}
    weighted = 0
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Conv") and node.input[1] in producer and producer[node.input[1]].input[0] in int8_weights:
            weighted += 1
            act = producer[node.input[0]]  # the activation side is Q -> DQ too
            assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear", node.name
    assert weighted == n_int8
    # wk and wv of a fusion share their input and its scale: the exporter keeps one Q/DQ pair for both
    assert 2 * n_int8 < n_qdq <= 3 * n_int8
    # every int8 layer's input scale in the graph is the plan's
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    graph_scales = {float(consts[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    plan_scales = {float(np.float32(l["input_amax"] / 127)) for l in plan["layers"] if l["precision"] == "int8"}
    assert graph_scales == plan_scales
    # ORT with optimisations off computes exactly the PyTorch Q/DQ model
    from crossvit_edge.calibration.plan import QuantPlan
    from crossvit_edge.calibration.qdq import apply_qdq

    model = load_checkpoint(micro_checkpoint).model
    qmodel = apply_qdq(model, QuantPlan.from_dict(plan))
    x, _ = val_images
    got, ref, sim = run_batched(runner, x), reference_logits(model, x), reference_logits(qmodel, x)
    # Float summation order differs between the two, which flips a few roundings, and flips spread
    # through 74 quantized layers. A semantic error (a wrong scale or axis) would be far larger than
    # the quantization error itself; these stay below it.
    assert np.abs(got - sim).mean() < np.abs(sim - ref).mean()
    assert np.abs(got - ref).mean() < 2 * np.abs(sim - ref).mean()
    # and the int8 model stays close to fp32. Random weights give small logit margins, so top-1
    # agreement with fp32 is a coin toss on a few images; it is tested on the trained demo model
    # (test_demo_model_int8_accuracy). Here: the direction of the logits, and ORT's top-1 against
    # the PyTorch Q/DQ model it should reproduce.
    cosine = row_cosine(got, ref)
    assert cosine.min() >= 0.99, cosine
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.9
    assert (bundles["int8"] / "calibration_stats.npz").exists()
    # the int8 layers' weights are stored as int8: 3 bytes saved per weight, the rest as in fp32
    n_weights = sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.name in int8_weights)
    fp32_bytes = (bundles["fp32"] / read_manifest(bundles["fp32"])["artifact"]["file"]).stat().st_size
    assert abs(runner.artifact_path.stat().st_size - (fp32_bytes - 3 * n_weights)) < 0.02 * fp32_bytes


def test_calibration_stats_reuse_gives_identical_scales(bundles, micro_checkpoint, digits_dir, tmp_path):
    stats = bundles["int8"] / "calibration_stats.npz"
    spec = BuildSpec(target="onnx", output=tmp_path / "reuse", precision="int8", checkpoint=str(micro_checkpoint),
                     calibration=CalibrationSettings(stats=stats, method="entropy"))
    convert(spec)
    a = read_manifest(bundles["int8"])["quantization_plan"]["layers"]
    b = read_manifest(spec.output)["quantization_plan"]["layers"]
    assert [l["input_amax"] for l in a] == [l["input_amax"] for l in b]


@pytest.fixture(scope="module")
def cpu_form_bundles(bundles, micro_checkpoint, tmp_path_factory):
    """The ONNX Runtime CPU int8 forms, from the TensorRT-form bundle's statistics (one plan)."""
    tmp = tmp_path_factory.mktemp("onnx_cpu")
    stats = bundles["int8"] / "calibration_stats.npz"
    out = {}
    for form in ("ort-cpu", "ort-cpu-dynamic"):
        spec = BuildSpec(target="onnx", output=tmp / form, precision="int8", checkpoint=str(micro_checkpoint),
                         calibration=CalibrationSettings(stats=stats, method="entropy"),
                         options={"int8_form": form, "ort_fusions": form == "ort-cpu"})
        convert(spec)
        out[form] = spec.output
    return out


def _config_entries(runner):
    opts = runner.session.get_session_options()
    found = set()
    for key in ("session.disable_quant_qdq",):
        try:
            if opts.get_session_config_entry(key) == "1":
                found.add(key)
        except RuntimeError:  # ORT raises for a key that was never set
            pass
    return found


def test_ort_cpu_form_runs_integer_kernels_with_the_plans_ranges(bundles, cpu_form_bundles, micro_checkpoint, val_images):
    from crossvit_edge.converters.onnx import integer_kernel_report, ort_optimized_graph

    trt_runner, trt_manifest = _runner(bundles["int8"], exact=True)
    runner, manifest = _runner(cpu_form_bundles["ort-cpu"])
    plan = manifest["quantization_plan"]
    n_int8 = plan["summary"]["int8_layers"]
    n_linear = sum(1 for l in plan["layers"] if l["precision"] == "int8" and l["kind"] == "linear")
    assert manifest["onnx"]["int8_form"] == "ort-cpu" and manifest["onnx"]["activation_dtype"] == "uint8"
    assert plan["layers"] == trt_manifest["quantization_plan"]["layers"]  # same layers, same ranges
    # the graph: uint8 activations with zero point 128 and the plan's scales; int8 weights
    proto = onnx.load(str(runner.artifact_path))
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(consts[n.input[2]].dtype == np.uint8 and int(consts[n.input[2]]) == 128 for n in quantize)
    plan_scales = {float(np.float32(l["input_amax"] / 127)) for l in plan["layers"] if l["precision"] == "int8"}
    assert {float(consts[n.input[1]]) for n in quantize} == plan_scales
    int8_weights = [i for i in proto.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8_weights) == n_linear  # the patch-embedding convs keep dequantized weights (no float-output integer Conv)
    assert manifest["onnx"]["ort_fusions"]["Gelu"] == sum(1 for n in proto.graph.node if n.op_type == "Gelu") > 0
    assert not {"Erf", "Div"} & {n.op_type for n in proto.graph.node}
    # what ORT runs: one integer GEMM per int8 Linear, no DequantizeLinear left on a GEMM path
    fused = integer_kernel_report(ort_optimized_graph(runner.artifact_path))
    assert fused["integer_ops"] == {"QGemm": n_linear}, fused
    assert fused["float_gemms_fed_by_dequantize"] == []
    assert len(fused["float_convs_fed_by_dequantize"]) == n_int8 - n_linear
    assert manifest["onnx"]["int8_gemms"] == n_linear
    # the project's runner keeps ORT's QDQ fusion for this form (it folds it away for the TensorRT form on x86)
    assert "session.disable_quant_qdq" not in _config_entries(runner)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "session.disable_quant_qdq" in _config_entries(_runner(bundles["int8"])[0])
    # numbers: ORT without optimisations computes the graph's Q/DQ semantics exactly; they are the
    # TensorRT form's (the same grid shifted by 128) up to the int32 bias rounding
    from crossvit_edge.calibration.plan import QuantPlan
    from crossvit_edge.calibration.qdq import apply_qdq

    model = load_checkpoint(micro_checkpoint).model
    x, _ = val_images
    ref, sim = reference_logits(model, x), reference_logits(apply_qdq(model, QuantPlan.from_dict(plan)), x)
    quant_error = np.abs(sim - ref).mean()
    exact = run_batched(_runner(cpu_form_bundles["ort-cpu"], exact=True)[0], x)
    trt_exact = run_batched(trt_runner, x)
    assert np.abs(exact - trt_exact).mean() < 0.2 * quant_error
    assert np.abs(exact - sim).mean() < quant_error
    # the integer kernels: same semantics up to float summation order
    got = run_batched(runner, x)
    assert np.abs(got - exact).mean() < quant_error
    assert np.abs(got - ref).mean() < 2 * quant_error
    cosine = row_cosine(got, ref)
    assert cosine.min() >= 0.99, cosine
    assert (got.argmax(1) == exact.argmax(1)).mean() >= 0.9


def test_ort_cpu_dynamic_form_quantizes_the_same_layers(cpu_form_bundles, micro_checkpoint, val_images):
    from crossvit_edge.converters.onnx import integer_kernel_report, ort_optimized_graph

    runner, manifest = _runner(cpu_form_bundles["ort-cpu-dynamic"])
    n_linear = sum(1 for l in manifest["quantization_plan"]["layers"] if l["precision"] == "int8" and l["kind"] == "linear")
    fused = integer_kernel_report(ort_optimized_graph(runner.artifact_path))
    assert fused["integer_ops"] == {"DynamicQuantizeMatMul": n_linear} and fused["float_gemms_fed_by_dequantize"] == []
    x, _ = val_images
    ref = reference_logits(load_checkpoint(micro_checkpoint).model, x)
    got = run_batched(runner, x)
    cosine = row_cosine(got, ref)
    assert cosine.min() >= 0.99, cosine


@pytest.fixture(scope="module")
def attention_bundles(micro_checkpoint, digits_dir, tmp_path_factory):
    """int8 with the plan's int8 attention option: the ORT CPU form (own calibration pass, which
    observes the attention operands) and the TensorRT form from the same statistics."""
    tmp = tmp_path_factory.mktemp("onnx_attention")
    out, stats = {}, None
    for form in ("ort-cpu", "tensorrt"):
        calib = CalibrationSettings(data=None if stats else digits_dir / "train", samples=32, method="entropy", stats=stats)
        spec = BuildSpec(target="onnx", output=tmp / form, precision="int8", checkpoint=str(micro_checkpoint), calibration=calib,
                         options={"int8_form": form, "int8_attention": True, "ort_fusions": form == "ort-cpu"})
        convert(spec)
        stats = stats or spec.output / "calibration_stats.npz"
        out[form] = spec.output
    return out


def test_int8_attention_off_leaves_the_graph_unchanged(bundles, cpu_form_bundles, micro_checkpoint, tmp_path):
    from crossvit_edge.converters.onnx import _attention_matmuls, _const_values

    # off said explicitly builds the very bytes of the default (the form without the option)
    spec = BuildSpec(target="onnx", output=tmp_path / "off", precision="int8", checkpoint=str(micro_checkpoint),
                     calibration=CalibrationSettings(stats=bundles["int8"] / "calibration_stats.npz", method="entropy"),
                     options={"int8_form": "ort-cpu", "ort_fusions": True, "int8_attention": False})
    convert(spec)
    default, off = (_runner(b)[0].artifact_path for b in (cpu_form_bundles["ort-cpu"], spec.output))
    assert default.read_bytes() == off.read_bytes()
    for bundle in (bundles["int8"], spec.output):
        manifest = read_manifest(bundle)
        assert "attention_matmuls" not in manifest["quantization_plan"] and "int8_attention" not in manifest["onnx"]
        assert "attention score and value matmuls" in manifest["quantization_plan"]["float_ops"]
        proto = onnx.load(str(_runner(bundle)[0].artifact_path))
        assert _attention_matmuls(proto.graph, _const_values(proto.graph)) == []
    with pytest.raises(Exception, match="int8_attention"):
        convert(BuildSpec(target="onnx", output=tmp_path / "bad", precision="int8", checkpoint=str(micro_checkpoint),
                          calibration=CalibrationSettings(stats=bundles["int8"] / "calibration_stats.npz"),
                          options={"int8_attention": "yes"}))


def test_int8_attention_option_runs_integer_attention_matmuls(attention_bundles, micro_checkpoint, val_images):
    import json

    from crossvit_edge.calibration.plan import QuantPlan
    from crossvit_edge.calibration.qdq import apply_qdq
    from crossvit_edge.converters.onnx import _attention_matmuls, _const_values, integer_kernel_report, ort_optimized_graph

    model = load_checkpoint(micro_checkpoint).model
    n_blocks = sum(1 for n, _ in model.named_modules() if n.endswith(".attn.qkv"))  # self-attention blocks
    x, _ = val_images
    ref = reference_logits(model, x)
    # the plan: q * scale, k^T, v calibrated, the softmax output on [0, 1]; the cross-attention stays float
    trt_runner, manifest = _runner(attention_bundles["tensorrt"], exact=True)
    plan = manifest["quantization_plan"]
    tensors = plan["attention_matmuls"]["tensors"]
    assert len(tensors) == 4 * n_blocks and all(".blocks." in t["name"] and ".fusion." not in t["name"] for t in tensors)
    assert all(t["amax"] == 1.0 and not t["calibrated"] for t in tensors if t["tensor"] == "probs")
    assert all(t["amax"] > 0 and t["calibrated"] for t in tensors if t["tensor"] != "probs")
    assert "attention score and value matmuls" not in plan["float_ops"]
    # TensorRT form: still TensorRT-legal; the attention operands carry the plan's scales; ORT with
    # optimisations off computes the PyTorch Q/DQ model (quantization error as the yardstick)
    proto = onnx.load(str(trt_runner.artifact_path))
    check_qdq_rules(proto)
    consts = _const_values(proto.graph)
    found = _attention_matmuls(proto.graph, consts)
    assert len(found) == 2 * n_blocks
    graph_scales = {float(consts[pair[0].input[1]]) for _, a, b in found for pair in (a, b)}
    assert graph_scales == {float(np.float32(t["amax"] / 127)) for t in tensors}
    sim = reference_logits(apply_qdq(model, QuantPlan.from_dict(plan)), x)
    trt_exact = run_batched(trt_runner, x)
    quant_error = np.abs(sim - ref).mean()
    assert np.abs(trt_exact - sim).mean() < 0.2 * quant_error
    # ORT CPU form: k^T and v keep the int8 grid, q * scale is uint8 (zero point 128), the softmax
    # output uint8 with step 1/255 and zero point 0
    runner, manifest = _runner(attention_bundles["ort-cpu"])
    assert manifest["onnx"]["int8_attention"] and manifest["onnx"]["int8_attention_matmuls"] == 2 * n_blocks
    assert manifest["quantization_plan"]["attention_matmuls"] == plan["attention_matmuls"]
    proto = onnx.load(str(runner.artifact_path))
    consts = _const_values(proto.graph)
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = _attention_matmuls(proto.graph, consts)
    assert len(found) == 2 * n_blocks
    for _, (q_a, _dq_a), (q_b, _dq_b) in found:
        zp_a, zp_b = consts[q_a.input[2]], consts[q_b.input[2]]
        assert zp_b.dtype == np.int8 and int(zp_b) == 0 and zp_a.dtype == np.uint8
        if producer[q_a.input[0]].op_type == "Softmax":
            assert int(zp_a) == 0 and float(consts[q_a.input[1]]) == float(np.float32(1 / 255))
        else:
            assert int(zp_a) == 128
    # what ORT runs: integer kernels for every int8 GEMM and attention matmul, no DQ on a float GEMM
    n_linear = sum(1 for l in plan["layers"] if l["precision"] == "int8" and l["kind"] == "linear")
    fused = integer_kernel_report(ort_optimized_graph(runner.artifact_path))
    assert fused["integer_ops"]["QGemm"] == n_linear
    attention_ops = {k: v for k, v in fused["integer_ops"].items() if k != "QGemm"}
    assert set(attention_ops) <= {"MatMulIntegerToFloat", "QLinearMatMul"} and sum(attention_ops.values()) == 2 * n_blocks, fused
    assert fused["float_gemms_fed_by_dequantize"] == []
    report = json.loads((attention_bundles["ort-cpu"] / "onnx_report.json").read_text())
    assert report["ort_cpu"]["optimized_graph"]["integer_ops"] == fused["integer_ops"]
    # numbers: the integer kernels compute the artifact's exact Q/DQ semantics up to float rounding,
    # and the artifact stays close to fp32
    exact = run_batched(_runner(attention_bundles["ort-cpu"], exact=True)[0], x)
    got = run_batched(runner, x)
    cpu_error = np.abs(exact - ref).mean()
    assert np.abs(got - exact).mean() < 0.05 * cpu_error  # measured: 1e-4 of it
    assert np.abs(got - ref).mean() < 1.5 * cpu_error
    assert row_cosine(got, ref).min() >= 0.99, row_cosine(got, ref)  # measured: 0.994 on this random-weight micro model
    assert (got.argmax(1) == exact.argmax(1)).mean() >= 0.9


def test_int8_form_comes_from_the_profile_and_is_checked(bundles, tmp_path):
    import json

    from crossvit_edge.device_profiles import load_profile
    from crossvit_edge.errors import UserError

    assert load_profile("cpu-onnxruntime").options["int8_form"] == "ort-cpu" and load_profile("cpu-onnxruntime").options["ort_fusions"]
    assert load_profile("cpu-onnxruntime-arm64").options["activation_dtype"] == "int8"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntarget: onnx\nonnx:\n  int8_form: fast\n")
    with pytest.raises(UserError, match="int8_form"):
        load_profile(str(bad))
    manifest = json.loads(json.dumps(read_manifest(bundles["int8"])))
    assert OnnxRuntimeRunner(bundles["int8"], manifest).int8_form == "tensorrt"  # bundles without the key
    manifest["onnx"]["int8_form"] = "../../evil"
    with pytest.raises(UserError, match="int8_form"):
        OnnxRuntimeRunner(bundles["int8"], manifest)


def _qdq_graph(zp=0, zp_type=TensorProto.INT8, scale=0.1, act_scale_shape=(), w_axis=1, w_scales=4):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, act_scale_shape, np.full(act_scale_shape or (), scale, np.float32).flatten().tolist()),
        helper.make_tensor("zp", zp_type, act_scale_shape, np.full(act_scale_shape or (), zp).flatten().tolist()),
        numpy_helper.from_array(np.ones((8, 4), np.int8), "w"),
        numpy_helper.from_array(np.full(w_scales, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(w_scales, np.int8), "wzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], name="dq_w", axis=w_axis),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_checker_accepts_a_legal_graph_and_names_offenders():
    assert check_qdq_rules(_qdq_graph()) == 3
    cases = [
        (dict(zp=3), "q_in", "non-zero zero point"),
        (dict(zp_type=TensorProto.UINT8, zp=0), "q_in", "zero point is uint8"),
        (dict(scale=-0.1), "q_in", "positive and finite"),
        (dict(scale=float("inf")), "q_in", "positive and finite"),
        (dict(act_scale_shape=(8,)), "q_in", "per-channel scales on an activation"),
        (dict(w_axis=0, w_scales=8), "dq_w", "output-channel axis is 1"),
    ]
    for kwargs, node, message in cases:
        with pytest.raises(QDQRuleError) as e:
            check_qdq_rules(_qdq_graph(**kwargs))
        assert node in str(e.value) and message in str(e.value), (kwargs, str(e.value))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--calib-data", "EMPTY"], "no decodable images in"),
        (["--calib-data", "MISSING"], "image folder not found"),
        (["--calib-data", "VAL", "--calib-samples", "5000"], "asked for 5000 images but it holds only 360"),
        (["--calib-data", "VAL", "--calib-method", "kl"], "unknown calibration method 'kl'"),
        (["--calib-stats", "OTHER"], "statistics were taken on crossvit_9_240, not crossvit_tiny_240"),
        ([], "needs calibration images"),
    ],
)
def test_cli_bad_calibration_input(tmp_path, tiny_checkpoint, digits_dir, args, message):
    from crossvit_edge.calibration.collect import CalibrationStatistics

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    other = tmp_path / "other.npz"
    if "OTHER" in args:
        CalibrationStatistics("crossvit_9_240", "0" * 64, {}, {}, {}).save(other)
    subst = {"EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing", "VAL": digits_dir / "val", "OTHER": other}
    args = [str(subst.get(a, a)) for a in args]
    out = tmp_path / "bundle"
    r = run_cli("crossvit_edge.convert", "--target", "onnx", "--precision", "int8", "--checkpoint", tiny_checkpoint, "--output", out, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


@pytest.mark.slow
@pytest.mark.parametrize("int8_form", ["tensorrt", "ort-cpu"])
def test_demo_model_int8_accuracy_full_val(demo_checkpoint, digits_dir, tmp_path, int8_form):
    """The issue's acceptance numbers in ONNX Runtime: the full digits val split, 256 calibration
    images, for the TensorRT form and for ONNX Runtime's CPU form (integer kernels)."""

    def build_runner(precision, samples):
        bundle = _build(tmp_path, demo_checkpoint, precision, digits_dir if samples else None, samples=samples or 32,
                        options={"int8_form": int8_form})
        return _runner(bundle, threads=2)[0]

    demo_int8_acceptance(demo_checkpoint, digits_dir, build_runner, "onnx")
