"""ExecuTorch target: the adapt stage against the original model, fp32, fp16 and int8 ``.pte`` programs
run through the real ExecuTorch runtime against the fp32 PyTorch model, delegation, BundledProgram,
ETDump, and bad input."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from crossvit_edge.converters.executorch import ExecuTorchRunner, stage_adapt  # noqa: E402
from crossvit_edge.bundle import read_manifest  # noqa: E402
from crossvit_edge.checkpoint import load_checkpoint  # noqa: E402
from crossvit_edge.crossvit import create_model  # noqa: E402
from crossvit_edge.data import open_image_set  # noqa: E402
from crossvit_edge.pipeline import convert, reference_logits, run_batched  # noqa: E402
from crossvit_edge.preprocess import Preprocessing  # noqa: E402
from crossvit_edge.spec import BuildSpec, CalibrationSettings  # noqa: E402

from .conftest import MICRO_DAGGER_408_MODEL, demo_int8_acceptance, make_micro_checkpoint, row_cosine, run_cli  # noqa: E402


def _build(tmp, ckpt, precision, digits_dir=None, samples=32, eval_samples=16, **options):
    calib = CalibrationSettings(data=digits_dir / "train" if digits_dir else None, samples=samples)
    spec = BuildSpec(target="executorch", output=tmp / f"et_{precision}", precision=precision, checkpoint=str(ckpt), calibration=calib,
                     eval_data=digits_dir / "val" if digits_dir else None, eval_samples=eval_samples, overwrite=True, options=options)
    convert(spec)
    return spec.output


def _images(digits_dir, n=None):
    s = open_image_set(digits_dir / "val")
    if n:
        s = s.sample(n, seed=0)
    return s.load(Preprocessing()).astype(np.float32), np.asarray(s.labels)


def _runner(bundle, threads=2):
    return ExecuTorchRunner(bundle, read_manifest(bundle), threads=threads)


@pytest.mark.parametrize("name,batch", [("crossvit_tiny_240", 1), ("crossvit_tiny_240", 2), ("crossvit_15_dagger_240", 1)])
def test_adapt_computes_the_same_function(name, batch):
    """The class swaps change the ops, not the numbers (dagger: conv patch embedding)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    adapted = stage_adapt(model)
    x = torch.randn(batch, 3, 240, 240)
    with torch.no_grad():
        ref, got = model(x), adapted(x)
    assert torch.abs(ref - got).max().item() <= 1e-5
    assert type(model.blocks[0].fusion[0].attn) is not type(adapted.blocks[0].fusion[0].attn)
    # parameters and their names are untouched, so PT2E module names still match the plan
    assert list(model.state_dict()) == list(adapted.state_dict())


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory, micro_checkpoint, digits_dir):
    return _build(tmp_path_factory.mktemp("et"), micro_checkpoint, "fp32", digits_dir, bundled_inputs=2, etdump=True)


def test_fp32_pte_matches_pytorch_and_is_fully_delegated(fp32_bundle, micro_checkpoint, digits_dir):
    x, _ = _images(digits_dir, 8)
    ref = reference_logits(load_checkpoint(micro_checkpoint).model, x)
    got = run_batched(_runner(fp32_bundle), x)
    assert np.abs(got - ref).max() <= 1e-4
    manifest = read_manifest(fp32_bundle)
    assert manifest["accuracy_check"]["max_abs_diff"] <= 1e-4
    report = json.loads((fp32_bundle / "executorch_report.json").read_text())
    # the whole forward pass is one XNNPACK subgraph: nothing left on portable kernels
    assert report["delegate_calls"] == 1 and report["portable_op_count"] == 0, report
    assert manifest["executorch"]["portable_ops"] == {}
    assert manifest["versions"]["executorch"]


def test_bundled_program_carries_the_fp32_outputs(fp32_bundle, micro_checkpoint):
    from executorch.devtools.bundled_program.serialize import deserialize_from_flatbuffer_to_bundled_program
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    manifest = read_manifest(fp32_bundle)
    path = fp32_bundle / manifest["executorch"]["bundled_program"]
    assert manifest["files"][path.name]["sha256"]
    buffer = path.read_bytes()
    cases = deserialize_from_flatbuffer_to_bundled_program(buffer).method_test_suites[0].test_cases
    assert len(cases) == 2

    def array(value):
        t = value.val
        return np.frombuffer(bytes(t.data), dtype=np.float32).reshape(t.sizes).copy()

    model = load_checkpoint(micro_checkpoint).model
    runner = _runner(fp32_bundle)
    for i, case in enumerate(cases):
        x, expected = array(case.inputs[0]), array(case.expected_outputs[0])
        assert x.shape == (1, 3, 240, 240) and np.abs(x).max() > 0.1  # real images, not zeros
        with torch.no_grad():
            assert np.abs(model(torch.from_numpy(x)).numpy() - expected).max() <= 1e-5
        assert np.abs(runner.run(x) - expected).max() <= 1e-4
        # and ExecuTorch's own check, as an app's test harness would run it (raises on mismatch)
        _load_bundled_program_from_buffer(buffer).verify_result_with_bundled_expected_output("forward", i, 1e-3, 1e-4)


def test_etdump_profiles_the_delegate_per_operator(fp32_bundle):
    from executorch.devtools import Inspector

    manifest = read_manifest(fp32_bundle)
    etdump = fp32_bundle / manifest["executorch"]["etdump"]
    assert etdump.stat().st_size > 0
    report = json.loads((fp32_bundle / "executorch_report.json").read_text())["etdump"]
    ops = report["ops_by_kind"]
    # XNNPACK's own operator names: the GEMMs of every linear, run inside the delegate
    gemm = [k for k in ops if k.startswith("Fully Connected")]
    assert gemm and all(ops[k]["delegated"] for k in gemm)
    assert report["method_execute_median_ms"] > sum(v["median_ms"] for v in ops.values()) * 0.5
    # the files in the bundle are what the Inspector reads back, independently of the report
    frame = Inspector(etdump_path=str(etdump), etrecord=str(fp32_bundle / etdump.with_suffix(".etrecord").name)).to_dataframe()
    assert (frame["event_name"] == "Method::execute").any()


def test_fp16_gelu_form_and_adapted_model():
    """The fp16 adapt stage: GELU's tanh form stays within its documented 4.8e-4 of the exact GELU
    (float64, the whole range that matters), fp32 and int8 keep the exact GELU, and the fp16 model
    takes and returns float32 with fp16 parameters and constants inside, close to the fp32 model."""
    import math

    from crossvit_edge.converters.executorch import _xnn_classes

    x = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    form = _xnn_classes()[1][torch.nn.GELU]()
    form.add_constants(form)
    err = (form.double()(x) - torch.nn.functional.gelu(x)).abs()
    assert 4e-4 < err.max().item() <= 4.8e-4 and abs(abs(x[err.argmax()].item()) - 2.7) < 0.1
    assert math.isclose(form.linear_coeff.item(), 2 * math.sqrt(2 / math.pi), rel_tol=1e-6)

    torch.manual_seed(0)
    model = create_model("crossvit_tiny_240", num_classes=7).eval()
    assert not any(type(m).__name__ == "XnnFp16GELU" for m in stage_adapt(model).modules())
    fp16 = stage_adapt(model, fp16=True)
    assert {p.dtype for p in fp16.parameters()} == {torch.float16}
    assert {b.dtype for b in fp16.buffers()} == {torch.float16}  # the constants too: no fp32 scalar left to cast
    assert sum(type(m).__name__ == "XnnFp16GELU" for m in fp16.modules()) == sum(isinstance(m, torch.nn.GELU) for m in model.modules())
    assert list(fp16.inner.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        ref, got = model(x), fp16(x)
    assert got.dtype == torch.float32 and row_cosine(got, ref).min() >= 0.999
    assert not torch.allclose(got, ref, atol=1e-5)  # it is really fp16


def test_fp16_layer_norm_is_layer_norm_with_its_terms_in_fp16_normal_range():
    """The fp16 programs' LayerNorm (rescaled before squaring: on ARM XNNPACK flushes fp16
    subnormals, and the plain form's squares / C underflowed to a variance of 0 on the demo model,
    docs/arm.md): the same function as LayerNorm over row spreads 1e-4 .. 100 (float64), no NaN on a
    constant row, and, for rows of spread >= 1e-2 (the demo's CLS token is 0.018), every squared term
    and the eps term of fp16 normal magnitude (>= 6.1e-5) or contributing < 1e-3 of the variance,
    where the plain form's terms are subnormal."""
    from crossvit_edge import crossvit as cv
    from crossvit_edge.converters.executorch import _xnn_classes

    torch.manual_seed(0)
    c = 192
    ref = cv.LayerNorm(c, eps=1e-6).double()
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    form = cv.LayerNorm(c, eps=1e-6).double()
    form.load_state_dict(ref.state_dict())
    form.__class__ = _xnn_classes()[1][cv.LayerNorm]
    form.add_constants(form)
    form.double()
    spreads = torch.tensor([1e-4, 1e-3, 1e-2, 0.018, 1.0, 30.0, 100.0], dtype=torch.float64)
    x = torch.randn(len(spreads), 5, c, dtype=torch.float64) * spreads.reshape(-1, 1, 1)
    x[0, 0] = 3.0  # a constant row: LayerNorm gives the bias
    with torch.no_grad():
        want = torch.nn.functional.layer_norm(x, (c,), ref.weight, ref.bias, 1e-6)
        got = form(x)
    # (the 1/C row is an fp32 constant: a constant row's mean is off by ~1e-7, LayerNorm's eps scales it up)
    assert not got.isnan().any() and (got[0, 0] - ref.bias).abs().max().item() < 1e-3
    assert (got[:, 1:] - want[:, 1:]).abs().max().item() < 1e-6
    # the squared terms the variance GEMV sums, for the spreads >= 1e-2
    centred = (x - x.mean(-1, keepdim=True))[2:]
    spread = (centred.abs().mean(-1, keepdim=True) + math.sqrt(1e-6)) * 16
    unit_sq = (centred / spread) ** 2
    variance = unit_sq.mean(-1, keepdim=True)
    lost = torch.where(unit_sq < 6.1e-5, unit_sq, torch.zeros_like(unit_sq)).sum(-1, keepdim=True) / c
    assert (lost / variance).max().item() < 1e-3
    plain_sq = centred[0:2] ** 2 / c  # the plain form's terms at spread 1e-2 / 0.018: subnormal in fp16
    assert (plain_sq < 6.1e-5).float().mean().item() > 0.99


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory, micro_checkpoint, digits_dir):
    return _build(tmp_path_factory.mktemp("et16"), micro_checkpoint, "fp16", digits_dir, eval_samples=16, etdump=True)


def test_fp16_pte_runs_fp16_in_one_delegate_call(fp16_bundle, micro_checkpoint, digits_dir):
    """float32 in and out, fp16 inside: one XNNPACK delegate call that holds the whole model in fp16
    (ETDump names every GEMM, batch matmul, convolution and softmax F16, none F32), the two boundary
    casts the only ops outside it, and the logits within the fp16 bounds of the fp32 model."""
    from crossvit_edge.pipeline import CHECK_THRESHOLDS

    manifest = read_manifest(fp16_bundle)
    assert manifest["precision"] == "fp16" and manifest["input"]["dtype"] == manifest["output"]["dtype"] == "float32"
    assert manifest["executorch"]["compute_dtype"] == "float16"
    report = json.loads((fp16_bundle / "executorch_report.json").read_text())
    assert report["delegate_calls"] == 1 and report["portable_ops"] == {"_to_dim_order_copy.default": 2}, report
    fp16 = report["fp16"]
    assert fp16["program_inputs"] == ["float32"] and fp16["program_outputs"] == ["float32"]
    assert fp16["casts_outside_delegate"] == ["float32 -> float16", "float16 -> float32"]
    assert fp16["delegate_input_dtypes"] == ["float16"]
    ops = report["etdump"]["ops_by_kind"]
    arithmetic = [k for k in ops if k.startswith(("Fully Connected", "Batch Matrix Multiply", "Convolution", "Softmax"))]
    assert {k.split(" (")[0] for k in arithmetic} == {"Fully Connected", "Batch Matrix Multiply", "Convolution", "Softmax"}
    assert all("F16" in k and "F32" not in k for k in arithmetic), arithmetic
    assert [k for k, v in ops.items() if not v["delegated"]] == ["native_call__to_dim_order_copy.out"]
    check = manifest["accuracy_check"]
    assert check["passed"] is True and check["thresholds"] == CHECK_THRESHOLDS["fp16"], check
    x, _ = _images(digits_dir, 8)
    fp32 = reference_logits(load_checkpoint(micro_checkpoint).model, x)
    runner = _runner(fp16_bundle)
    assert "fp16" in runner.description
    got = run_batched(runner, x)
    assert got.dtype == np.float32 and row_cosine(got, fp32).min() >= 0.999
    assert 1e-5 < np.abs(got - fp32).max() <= 0.05  # rounded to fp16 inside, not an fp32 program


def test_int8_follows_the_plan(tmp_path, micro_checkpoint, digits_dir):
    """Exactly the plan's layers carry int8 weights; adds, concatenations, LayerNorm and the
    single-token paths stay float (read from the quantized graph), and it is all delegated."""
    bundle = _build(tmp_path, micro_checkpoint, "int8", digits_dir, samples=16, eval_samples=8)
    manifest = read_manifest(bundle)
    report = json.loads((bundle / "executorch_report.json").read_text())
    assert report["delegate_calls"] == 1 and report["portable_op_count"] == 0, report
    plan = json.loads((bundle / "quant_plan.json").read_text())["layers"]
    int8 = sorted(l["name"] for l in plan if l["precision"] == "int8")
    assert int8 and len(int8) < len(plan)
    assert report["quantization"]["int8_layers"] == int8
    # quantized tensors are only the plan layers' inputs (LayerNorm / GELU / reshape / resize
    # outputs feeding them) and their own outputs: never a concatenation (the residual stream)
    produced = set(report["quantization"]["quantized_outputs_by_op"])
    assert "cat.default" not in produced
    assert produced <= {"linear.default", "conv2d.default", "add.Tensor", "gelu.default", "reshape.default", "transpose.int"}, produced
    check = manifest["accuracy_check"]
    assert check["cosine"] >= 0.98, check  # random weights: a loose bound; the demo test is the real one
    x, _ = _images(digits_dir, 4)
    fp32 = reference_logits(load_checkpoint(micro_checkpoint).model, x)
    got = run_batched(_runner(bundle), x)
    assert got.shape == fp32.shape and not np.allclose(got, fp32, atol=1e-6)  # it is really quantized


def test_int8_attention_follows_the_plan_and_is_off_without_it():
    """Which attention modules get int8 matmuls comes from the plan's attention entries only: a plan
    without the field (older plans, the option off) gives none; cross-attention never does."""
    from types import SimpleNamespace

    from crossvit_edge.converters.executorch import int8_attention_modules

    torch.manual_seed(0)
    model = create_model("crossvit_tiny_240", num_classes=3)
    assert int8_attention_modules(SimpleNamespace(), model) == []
    assert int8_attention_modules(SimpleNamespace(attention=None), model) == []
    names = ["blocks.0.blocks.0.0.attn", "blocks.2.blocks.1.3.attn", "blocks.0.fusion.0.attn"]
    entries = [SimpleNamespace(name=f"{n}.points.{t}") for n in names for t in ("q", "k", "v", "probs")]
    assert int8_attention_modules(SimpleNamespace(attention=entries), model) == names[:2]


@pytest.mark.parametrize("options, expect", [({"etdump_runs": "5"}, "executorch.etdump_runs must be a whole number in [1, 1000]"),
                                             ({"etdump_runs": 0}, "executorch.etdump_runs"),
                                             ({"int8_attention": "yes"}, "executorch.int8_attention must be true or false"),
                                             ({"fp16_arithmetic": 1}, "executorch.fp16_arithmetic must be true or false")])
def test_options_from_python_are_checked_like_profile_keys(tmp_path, options, expect):
    """A BuildSpec built in Python skips the profile schema; the converter refuses the same values
    before any work."""
    from crossvit_edge.converters.executorch import ExecuTorchConverter
    from crossvit_edge.errors import UserError
    from crossvit_edge.spec import BuildSpec

    with pytest.raises(UserError, match=re.escape(expect)):
        ExecuTorchConverter().validate(BuildSpec(target="executorch", output=tmp_path / "b", options=options))
    ExecuTorchConverter().validate(BuildSpec(target="executorch", output=tmp_path / "b", options={"etdump_runs": 3, "int8_attention": False}))


def test_fp16_for_a_device_without_fp16_arithmetic_warns(tmp_path, caplog):
    """The x86 profile says its cores have no fp16 arithmetic: an fp16 build for it is allowed (it
    runs, on conversion kernels) but warned about before any work; the ARM profile's is not."""
    import logging

    from crossvit_edge.converters.executorch import ExecuTorchConverter
    from crossvit_edge.device_profiles import load_profile

    for name, warned in (("linux-x86-xnnpack", True), ("android-arm64-xnnpack", False)):
        profile = load_profile(name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="crossvit_edge.converters.executorch"):
            ExecuTorchConverter().validate(BuildSpec(target="executorch", output=tmp_path / "b", precision="fp16",
                                                     profile=profile, options=dict(profile.options)))
        assert any("fp16_arithmetic: false" in r.getMessage() for r in caplog.records) is warned, (name, caplog.records)


def test_int8_attention_matmuls_run_on_xnnpack_integer_kernels(tmp_path, micro_checkpoint, digits_dir):
    """``int8_attention``: the plan lists the self-attention matmul operands, both matmuls of each
    ViT block's self-attention are static int8 and XNNPACK runs them as its QS8 batch matmul (ETDump
    names the kernel; the one-query cross-attention keeps its float bmm), nothing is left to
    portable kernels, and the logits stay close to fp32."""
    bundle = _build(tmp_path, micro_checkpoint, "int8", digits_dir, samples=16, eval_samples=8, int8_attention=True, etdump=True)
    manifest = read_manifest(bundle)
    report = json.loads((bundle / "executorch_report.json").read_text())
    assert report["delegate_calls"] == 1 and report["portable_op_count"] == 0, report
    assert manifest["executorch"]["int8_attention_matmuls"] is True
    model = load_checkpoint(micro_checkpoint).model
    from crossvit_edge.calibration.plan import attention_owner
    from crossvit_edge.crossvit import Attention, CrossAttention

    self_attention = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    cross_attention = [n for n, m in model.named_modules() if isinstance(m, CrossAttention)]
    assert self_attention and cross_attention
    plan = json.loads((bundle / "quant_plan.json").read_text())
    assert {attention_owner(t["name"]) for t in plan["attention_matmuls"]["tensors"]} == set(self_attention)
    assert report["quantization"]["int8_attention_matmuls"] == 2 * len(self_attention), report["quantization"]
    ops = report["etdump"]["ops_by_kind"]
    bmm = {k: v["count"] for k, v in ops.items() if k.startswith("Batch Matrix Multiply")}
    assert bmm == {"Batch Matrix Multiply (NC, QS8) GEMM": 2 * len(self_attention),
                   "Batch Matrix Multiply (NC, F32) GEMM": 2 * len(cross_attention)}, bmm
    x, _ = _images(digits_dir, 8)
    fp32 = reference_logits(model, x)
    got = run_batched(_runner(bundle), x)
    cosine = row_cosine(got, fp32)
    assert cosine.min() >= 0.98, cosine
    assert not np.allclose(got, fp32, atol=1e-6)


def test_int8_dagger_stems_follow_the_plan(tmp_path, digits_dir, micro_model_registered):
    """The dagger (three-conv) stems in PT2E, on the 408 input path (branch 1 resized 408 -> 384):
    every stem conv carries an int8 weight and an int8 input, the ReLUs between them run in float
    and their outputs are quantized only as the next conv's input (never fused into a layer the plan
    did not choose), all in one XNNPACK delegate. (tests/test_matrix.py leaves this cell to here.)"""
    ckpt = make_micro_checkpoint(tmp_path / "dagger.safetensors", model=MICRO_DAGGER_408_MODEL)
    bundle = _build(tmp_path, ckpt, "int8", digits_dir, samples=16, eval_samples=8)
    report = json.loads((bundle / "executorch_report.json").read_text())
    assert report["delegate_calls"] == 1 and report["portable_op_count"] == 0, report
    plan = json.loads((bundle / "quant_plan.json").read_text())["layers"]
    int8 = sorted(l["name"] for l in plan if l["precision"] == "int8")
    stem = [f"patch_embed.{b}.proj.{i}" for b in (0, 1) for i in (0, 2, 4)]
    assert set(stem) <= set(int8) and report["quantization"]["int8_layers"] == int8
    produced = report["quantization"]["quantized_outputs_by_op"]
    assert produced.get("relu.default") == 4 and "cat.default" not in produced, produced
    check = read_manifest(bundle)["accuracy_check"]
    assert check["cosine"] >= 0.99 and check["passed"] is True, check


@pytest.mark.slow
def test_demo_model_acceptance_full_val(demo_checkpoint, digits_dir, tmp_path):
    """The issue's acceptance numbers in the ExecuTorch runtime: the full digits val split, 256 calibration images."""

    def build_runner(precision, samples):
        return _runner(_build(tmp_path, demo_checkpoint, precision, digits_dir if samples else None, samples=samples or 32, eval_samples=8))

    demo_int8_acceptance(demo_checkpoint, digits_dir, build_runner, "pte")


@pytest.mark.slow
def test_demo_model_fp16_full_val(demo_checkpoint, digits_dir, tmp_path):
    """The fp16 program of the trained demo model on the full digits val split, against the fp32
    model: within the fp16 bounds (top-1 agreement, mean cosine, top-1 drop) and still one delegate call."""
    from crossvit_edge.pipeline import CHECK_THRESHOLDS, judge_check
    from crossvit_edge.metrics import compare_logits

    bundle = _build(tmp_path, demo_checkpoint, "fp16", digits_dir, eval_samples=8)
    report = json.loads((bundle / "executorch_report.json").read_text())
    assert report["delegate_calls"] == 1 and report["portable_ops"] == {"_to_dim_order_copy.default": 2}, report
    x, y = _images(digits_dir)
    fp32 = reference_logits(load_checkpoint(demo_checkpoint).model, x)
    got = run_batched(_runner(bundle), x)
    result = compare_logits(got, fp32, y)
    verdict = judge_check(result, "fp16")
    print({k: result[k] for k in ("images", "top1", "reference_top1", "top1_agreement", "cosine", "max_abs_diff")})
    assert result["images"] == len(y) > 300 and verdict["passed"], (result, verdict)
    assert verdict["thresholds"] == CHECK_THRESHOLDS["fp16"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--precision", "int8-weights"], "does not support --precision int8-weights"),
        (["--precision", "int8", "--calib-data", "EMPTY"], "no decodable images in"),
        (["--precision", "int8"], "needs calibration images"),
        # the plan's ranges cover the layers' inputs; their int8 outputs are observed on images
        (["--precision", "int8", "--calib-stats", "STATS"], "--calib-stats alone is not enough"),
    ],
)
def test_cli_bad_input(tmp_path, tiny_checkpoint, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "stats.npz").write_bytes(b"refused before it is read")
    args = [str(tmp_path / "empty") if a == "EMPTY" else str(tmp_path / "stats.npz") if a == "STATS" else a for a in args]
    out = tmp_path / "bundle"
    r = run_cli("crossvit_edge.convert", "--target", "executorch", "--checkpoint", tiny_checkpoint, "--output", out, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_cli_without_the_executorch_extra(tmp_path, tiny_checkpoint):
    """As on a machine without the extra: importing executorch fails."""
    import subprocess
    import sys

    from .conftest import REPO

    out = tmp_path / "bundle"
    code = (
        "import sys; sys.modules['executorch'] = None\n"
        "from crossvit_edge.convert import main\n"
        f"sys.exit(main(['--target', 'executorch', '--checkpoint', {str(tiny_checkpoint)!r}, '--output', {str(out)!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'crossvit-edge[executorch]'" in lines[0], r.stderr
    assert not out.exists()


_SHARED_POOL_SCRIPT = r"""
import sys, threading
import numpy as np
from crossvit_edge.errors import UserError
from crossvit_edge.runtime import load

bundle = sys.argv[1]
serving = load(bundle, isolate=False)                     # the pool's default size, serving 8 threads
x = np.random.default_rng(0).standard_normal((1, 3, 240, 240)).astype(np.float32)
reference = serving.logits(x)
stop, bad, calls = threading.Event(), [], [0]
def serve():
    while not stop.is_set():
        if not np.array_equal(serving.logits(x), reference):
            bad.append(1)
        calls[0] += 1
workers = [threading.Thread(target=serve) for _ in range(8)]
for w in workers:
    w.start()
refused = set()
try:
    for i in range(12):                                   # loads with threads= while the 8 serve
        try:
            other = load(bundle, threads=1 + i % 3, isolate=False)
            assert np.array_equal(other.logits(x), reference)
            other.close()
        except UserError as e:
            refused.add(str(e))
finally:
    stop.set()
    for w in workers:
        w.join()
from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count
print(len(bad), calls[0], _threadpool_get_thread_count(), "|".join(sorted(refused)))
"""


def test_loading_with_threads_never_disturbs_models_serving_on_8_threads(fp32_bundle, tmp_path):
    """One model called from 8 threads gives its single-threaded logits; loads of another with
    threads=1, 2, 3 meanwhile (before: ExecuTorch's process-wide pool reset under running
    inferences, SIGABRT in one attempt of three) either share the pool the first one sized or are
    refused in one line while it is loaded. Three processes, twelve loads each."""
    import subprocess
    import sys

    from .conftest import REPO

    script = tmp_path / "shared_pool.py"
    script.write_text(_SHARED_POOL_SCRIPT)
    for attempt in range(3):
        done = subprocess.run([sys.executable, str(script), str(fp32_bundle)], capture_output=True, text=True, timeout=600,
                              env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, (attempt, done.returncode, done.stderr[-2000:])
        bad, calls, size, messages = done.stdout.strip().split(" ", 3)
        assert bad == "0" and int(calls) > 8, done.stdout
        asked = {1, 2, 3} - {int(size)}  # the sizes other than the pool's: refused while the first model is loaded
        refusals = [m for m in messages.split("|") if m]
        assert len(refusals) == len(asked), messages
        for message in refusals:
            assert "\n" not in message and "process-wide" in message and f"with {size} threads" in message, message
