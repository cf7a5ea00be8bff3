"""The layer-wise comparison (python -m crossvit_edge.debug): a bundle whose fc1 input range is
deliberately broken is diagnosed at that layer on ONNX, ExecuTorch and Core ML; a healthy bundle's
final point equals the profile's numbers; the suggestion goes back into the converter; the
TensorRT device side's results file merges on the host."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from crossvit_edge.bundle import open_bundle
from crossvit_edge.calibration.plan import QuantPlan
from crossvit_edge.checkpoint import load_checkpoint
from crossvit_edge.data import open_image_set
from crossvit_edge.pipeline import convert
from crossvit_edge.spec import BuildSpec, CalibrationSettings

from .conftest import REPO, run_cli

BROKEN = "blocks.0.blocks.0.0.mlp.fc1"  # branch 0's fc1 in the micro model
SHRINK = 30.0  # the broken range: the calibrated one divided by this (issue 28)


def _build(out, ckpt, digits_dir, target, precision="int8", method="minmax", **spec_kw):
    # minmax: no calibrated range clips the images themselves, so the one broken range is the only one
    spec = BuildSpec(target=target, output=out, precision=precision, checkpoint=str(ckpt),
                     calibration=CalibrationSettings(data=digits_dir / "train", samples=16, method=method),
                     eval_data=digits_dir / "val", eval_samples=4, overwrite=True, **spec_kw)
    convert(spec)
    return out


def _images(digits_dir, n=4):
    return open_image_set(digits_dir / "val").sample(n, seed=0)


def _compare(bundle_dir, ckpt, digits_dir, n=4, calib=False):
    from crossvit_edge.debug import calibration_context
    from crossvit_edge.layerwise import compare_bundle

    bundle = open_bundle(bundle_dir)
    model = load_checkpoint(str(ckpt)).model
    plan = QuantPlan.from_dict(bundle.manifest["quantization_plan"]) if bundle.manifest.get("quantization_plan") else None
    x = _images(digits_dir, n).load(bundle.preprocessing).astype(np.float32)
    context = calibration_context(bundle, digits_dir / "train" if calib else None, model, plan)
    runner = bundle.runner(threads=2)
    try:
        return compare_bundle(runner, model, x, plan, context)
    finally:
        runner.close()


def _break_plan(monkeypatch):
    """The plan (ONNX's Q/DQ scales) with BROKEN's input range shrunk."""
    import crossvit_edge.calibration.plan as plan_module

    original = plan_module.build_plan

    def broken(*args, **kwargs):
        plan = original(*args, **kwargs)
        plan.get(BROKEN).input_amax /= SHRINK
        return plan

    monkeypatch.setattr(plan_module, "build_plan", broken)


def _break_executorch(monkeypatch):
    """The PT2E program's input quantization of BROKEN shrunk after calibration (the ExecuTorch
    target calibrates its own observers): the .pte and the rebuilt program before lowering both
    carry it, as they would a bad range from the build's own calibration."""
    import torch

    import crossvit_edge.converters.executorch as et

    original = et.stage_quantize

    def broken(model, example, plan, batches):
        program = original(model, example, plan, batches)
        for node in program.graph.nodes:
            if node.target == torch.ops.aten.linear.default and et._module_path(node) == BROKEN:
                dq = node.args[0]
                for qdq in (dq, dq.args[0]):
                    qdq.args = (qdq.args[0], qdq.args[1] / SHRINK, *qdq.args[2:])
        return program

    monkeypatch.setattr(et, "stage_quantize", broken)


def _break_coreml(monkeypatch):
    """LinearQuantizer's input scale of BROKEN shrunk after calibration (Core ML's W8A8 calibrates
    its own ranges)."""
    import crossvit_edge.converters.coreml as cm

    original = cm.calibrate_w8a8

    def broken(model, layers, batches, example, transform=None, fixed=None):
        finalized, quantized, images = original(model, layers, batches, example, transform, fixed)
        for node in finalized.graph.nodes:
            if node.op == "call_module" and cm._layer_of(str(node.target), [BROKEN]) and node.args:
                scale = node.args[0].args[0].args[1].target  # call_module <- dequantize <- quantize_per_tensor(x, scale, zp)
                getattr(finalized, scale).div_(SHRINK)
        return finalized, quantized, images

    monkeypatch.setattr(cm, "calibrate_w8a8", broken)


BREAKS = {"onnx": _break_plan, "executorch": _break_executorch, "coreml": _break_coreml}


@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
def test_a_broken_fc1_range_is_the_first_jump(target, tmp_path, micro_checkpoint, digits_dir, monkeypatch):
    """One fc1 input range shrunk 40x: that layer's quantized input is the first point whose SNR
    drops by more than 10 dB, it is the layer that loses the most, and the suggestion names it;
    the same bundle built without the break has no such jump there."""
    if target == "executorch":
        pytest.importorskip("executorch")
    if target == "coreml":
        pytest.importorskip("coremltools")
    # the healthy build for comparison on ONNX only: ExecuTorch's lowering alone takes minutes
    healthy = _compare(_build(tmp_path / "healthy", micro_checkpoint, digits_dir, target), micro_checkpoint, digits_dir) if target == "onnx" else None
    BREAKS[target](monkeypatch)
    report = _compare(_build(tmp_path / "broken", micro_checkpoint, digits_dir, target), micro_checkpoint, digits_dir,
                      calib=target == "executorch")
    rows = {r["key"]: r for r in report["points"]}
    print(target, report["headline"]["text"], [(r["key"], round(r["snr_db"], 1), r["grid_snr_db"] and round(r["grid_snr_db"], 1))
                                                 for r in report["points"][:12]])
    if healthy is not None:
        print("healthy", healthy["headline"]["text"])
    assert report["first_jump"] is not None and report["first_jump"]["key"] == f"{BROKEN}:input", report["first_jump"]
    assert report["headline"]["jump"] and report["headline"]["text"].startswith(f"first jump: {BROKEN}:input")
    assert report["layers_by_snr_lost"][0]["layer"] == BROKEN and BROKEN in report["float_layers"]
    assert rows[f"{BROKEN}:input"]["clipped_share"] > 0.01  # the shrunk range clips
    assert report["missing_points"] == 0
    assert rows[f"{BROKEN}:input"]["drop_db"] > 10 and rows[f"{BROKEN}:input"]["snr_db"] < 25
    if healthy is not None:
        healthy_rows = {r["key"]: r for r in healthy["points"]}
        assert healthy_rows[f"{BROKEN}:input"]["snr_db"] > rows[f"{BROKEN}:input"]["snr_db"] + 10
        assert healthy["first_jump"] is None or healthy["first_jump"]["layer"] != BROKEN
        # the healthy bundle's headline names no jump, its worst point within its own grid's allowance
        assert healthy["first_jump"] is None and not healthy["headline"]["jump"], healthy["headline"]
        assert healthy["headline"]["text"].startswith("no jump: worst point")
    # the intermediate values' own logits are the artifact's (ONNX, Core ML) or close (the program before lowering)
    assert report["probe_vs_artifact"]["cosine"] > 0.999


@pytest.fixture(scope="module")
def onnx_int8(tmp_path_factory, micro_checkpoint, digits_dir):
    return _build(tmp_path_factory.mktemp("dbg") / "onnx_int8", micro_checkpoint, digits_dir, "onnx")


def test_final_point_is_the_profiles_output_level_numbers(onnx_int8, micro_checkpoint, digits_dir, tmp_path):
    """The CLI on a healthy int8 ONNX bundle: its final point (logits) has the profile's agreement
    and cosine on the same images; every point is found and the files are written."""
    from crossvit_edge.harness import ProfileSettings, profile_bundles

    out = tmp_path / "report"
    r = run_cli("crossvit_edge.debug", onnx_int8, "--data", digits_dir / "val", "--samples", 6, "--output", out, micro=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "layerwise.json").read_text())
    assert (out / "layerwise.md").read_text().startswith("# crossvit_edge layer-wise comparison")
    assert (out / "layerwise.png").stat().st_size > 10_000
    assert report["missing_points"] == 0 and report["images"] == 6
    kinds = {p["kind"] for p in report["points"]}
    assert kinds == {"int8 input", "layer output", "residual", "cls token", "logits"}
    images = _images(digits_dir, 6)
    bundle = open_bundle(onnx_int8)
    profile = profile_bundles([bundle], images, bundle.preprocessing, load_checkpoint(str(micro_checkpoint)).model,
                              ProfileSettings(warmup=0, runs=1, threads=2))
    row = profile["rows"][1]["accuracy"]
    assert report["final"]["cosine"] == pytest.approx(row["cosine"], abs=1e-9)
    assert report["final"]["top1_agreement"] == row["top1_agreement"]
    # every int8 input is read with the scale the plan gave it (the ONNX Q/DQ carry the plan's scales)
    plan = QuantPlan.from_dict(bundle.manifest["quantization_plan"])
    for p in report["points"]:
        if p["kind"] == "int8 input":
            assert p["quant"]["scale"] == pytest.approx(plan.get(p["layer"]).input_scale, rel=1e-6)


def test_float_layers_suggestion_goes_back_into_the_converter(tmp_path, micro_checkpoint, digits_dir, monkeypatch):
    """The report's float_layers.txt, passed to --float-layers, keeps those layers float; an
    unknown name is a one-line error."""
    _break_plan(monkeypatch)
    broken = _build(tmp_path / "broken", micro_checkpoint, digits_dir, "onnx")
    out = tmp_path / "report"
    from crossvit_edge.debug import main

    assert main([str(broken), "--data", str(digits_dir / "val"), "--samples", "4", "--output", str(out)]) == 0
    listed = [l for l in (out / "float_layers.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert BROKEN in listed
    fixed = _build(tmp_path / "fixed", micro_checkpoint, digits_dir, "onnx", float_layers=out / "float_layers.txt")
    plan = QuantPlan.from_dict(open_bundle(fixed).manifest["quantization_plan"])
    assert all(plan.get(n).precision == "float" for n in listed)
    report = _compare(fixed, micro_checkpoint, digits_dir)
    assert report["first_jump"] is None or report["first_jump"]["layer"] != BROKEN
    bad = tmp_path / "bad.txt"
    bad.write_text("blocks.0.no_such_layer\n")
    with pytest.raises(Exception, match="not a layer"):
        _build(tmp_path / "x", micro_checkpoint, digits_dir, "onnx", float_layers=bad)


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples must be"),
    (["--merge", "nothing.json"], "--merge takes a TensorRT"),
])
def test_cli_bad_input_is_one_line(onnx_int8, digits_dir, tmp_path, args, message):
    r = run_cli("crossvit_edge.debug", onnx_int8, "--data", digits_dir / "val", "--output", tmp_path / "o", *args, micro=True)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("crossvit_edge.debug", tmp_path / "missing", "--data", digits_dir / "val", "--output", tmp_path / "o")
    assert r.returncode == 2 and "not a bundle" in r.stderr and "Traceback" not in r.stderr


BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "yaml"):
                raise ImportError(f"{name} is blocked on the device side")
    sys.meta_path.insert(0, _Block())
    """
)


def test_tensorrt_points_and_device_intermediates_merge(tmp_path, micro_checkpoint, digits_dir):
    """A TensorRT bundle: the command compares through the ONNX stand-in and writes the points file
    for the device; the device side's torch-free folder run with every point fetched (executed here
    by ONNX Runtime on the engine's ONNX, the tensors added as outputs: TensorRT needs the device)
    and its intermediates file, merged back with --merge, give the stand-in's numbers."""
    from crossvit_edge.device_profiles import load_profile

    profile = load_profile("jetson-orin-nano-jp6")
    bundle = tmp_path / "trt"
    spec = BuildSpec(target="tensorrt", output=bundle, precision="int8", checkpoint=str(micro_checkpoint), profile=profile,
                     batch_size=profile.batch_size, calibration=CalibrationSettings(data=digits_dir / "train", samples=16),
                     eval_data=digits_dir / "val", eval_samples=4, overwrite=True)
    convert(spec)
    folder = tmp_path / "imgs"
    for path in _images(digits_dir, 4).paths:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    host = tmp_path / "host"
    r = run_cli("crossvit_edge.debug", bundle, "--data", folder, "--output", host, micro=True)
    assert r.returncode == 0, r.stderr
    points = json.loads((host / "tensorrt_points.json").read_text())
    assert points["located"] and all(v["tensor"] for v in points["located"].values())
    results = tmp_path / "device" / "results.json"
    results.parent.mkdir()
    code = BLOCK_TORCH + textwrap.dedent(
        f"""
        from pathlib import Path
        import numpy as np, onnx, onnxruntime as ort
        from crossvit_edge.converters.onnx import OnnxRuntimeRunner
        from crossvit_edge.converters.tensorrt.device import folder_results, read_points_file, run_folder, write_intermediates
        from crossvit_edge.bundle import read_manifest, write_json
        from crossvit_edge.data import open_image_set
        from crossvit_edge.preprocess import Preprocessing

        bundle = Path({str(bundle)!r})
        manifest = read_manifest(bundle)
        located = read_points_file(Path({str(host / "tensorrt_points.json")!r}))
        names = list(dict.fromkeys(e["tensor"] for e in located.values() if e["tensor"]))
        model = onnx.load(str(bundle / manifest["tensorrt"]["onnx"]))
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        runner = OnnxRuntimeRunner(bundle, manifest, artifact=manifest["tensorrt"]["onnx"])
        session = ort.InferenceSession(model.SerializeToString(), runner._options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        fetch = lambda x: dict(zip(outputs, session.run(outputs, {{"image": x}})))
        images = open_image_set(Path({str(folder)!r}))
        arrays = run_folder(runner, images, Preprocessing.from_dict(manifest["preprocessing"]), fetch=fetch)
        entry = write_intermediates(Path({str(results)!r}), located, {{n: "marked" for n in names}}, arrays)
        write_json(Path({str(results)!r}), folder_results(bundle, manifest, runner, images, arrays["logits"], [0.001],
                   device="this CPU (ONNX Runtime standing in)", timing="none", intermediates=entry))
        assert "torch" not in sys.modules
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    merged_out = tmp_path / "merged"
    r = run_cli("crossvit_edge.debug", bundle, "--data", folder, "--merge", results, "--output", merged_out, micro=True)
    assert r.returncode == 0, r.stderr
    merged = json.loads((merged_out / "layerwise.json").read_text())
    stand_in = json.loads((host / "layerwise.json").read_text())
    assert merged["source"].startswith("TensorRT engine on the device") and merged["missing_points"] == 0
    same_onnx = open_bundle(bundle).manifest["artifact"]["stand_in"]["file"] == open_bundle(bundle).manifest["tensorrt"]["onnx"]
    for a, b in zip(merged["points"], stand_in["points"]):
        assert a["key"] == b["key"]
        # the same graph in ONNX Runtime with the same settings and the same extra outputs: the same
        # numbers (the stand-in report's logits come from the bundle's own, uninstrumented session)
        if same_onnx and a["key"] != "logits":
            assert a["snr_db"] == pytest.approx(b["snr_db"], abs=1e-6), a["key"]
    assert merged["final"]["cosine"] > 0.99
    # a results file without intermediates is refused in one line
    plain = json.loads(results.read_text())
    del plain["intermediates"]
    (results.parent / "plain.json").write_text(json.dumps(plain))
    r = run_cli("crossvit_edge.debug", bundle, "--data", folder, "--merge", results.parent / "plain.json", "--output", tmp_path / "x", micro=True)
    assert r.returncode == 2 and "no intermediates" in r.stderr


from .test_tensorrt import TRT_OK, TRT_WHY  # noqa: E402  (the one TensorRT + GPU status of the tests)


@pytest.mark.skipif(not TRT_OK, reason=f"engine build/run needs tensorrt and a CUDA GPU: {TRT_WHY}")
def test_device_marks_the_points_as_engine_outputs(tmp_path, micro_checkpoint, digits_dir):
    """With TensorRT and a GPU: the device CLI with --points builds the engine with the points
    marked as outputs (in memory: the bundle stays verifiable), and --merge compares them."""
    from .test_tensorrt import _local_profile

    prof = _local_profile(tmp_path, "int8")
    bundle = tmp_path / "trt"
    convert(BuildSpec(target="tensorrt", output=bundle, precision="int8", checkpoint=str(micro_checkpoint), profile=prof,
                      batch_size=prof.batch_size, calibration=CalibrationSettings(data=digits_dir / "train", samples=16),
                      eval_data=digits_dir / "val", eval_samples=4, overwrite=True))
    folder = tmp_path / "imgs"
    for path in _images(digits_dir, 4).paths:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    host = tmp_path / "host"
    assert run_cli("crossvit_edge.debug", bundle, "--data", folder, "--output", host, micro=True).returncode == 0
    results = tmp_path / "results.json"
    r = run_cli("crossvit_edge.converters.tensorrt.device", bundle, "--data", folder, "--points", host / "tensorrt_points.json",
                "--runs", "3", "--output", results)
    assert r.returncode == 0, r.stderr
    entry = json.loads(results.read_text())["intermediates"]
    assert sum(p["status"] == "marked" for p in entry["points"].values()) > len(entry["points"]) // 2
    open_bundle(bundle)  # unchanged: every listed file still verifies
    r = run_cli("crossvit_edge.debug", bundle, "--data", folder, "--merge", results, "--output", tmp_path / "merged", micro=True)
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "merged" / "layerwise.json").read_text())
    assert merged["final"]["cosine"] > 0.99 and merged["points"][-1]["snr_db"] > 10


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
def test_demo_model_broken_fc1_is_diagnosed(target, tmp_path, demo_checkpoint, digits_dir, monkeypatch):
    """The trained demo model, full size: the same diagnosis on every target, and the headline
    names the broken layer."""
    BREAKS[target](monkeypatch)
    bundle = _build(tmp_path / "b", demo_checkpoint, digits_dir, target)
    report = _compare(bundle, demo_checkpoint, digits_dir, n=8, calib=target == "executorch")
    print(target, "broken:", report["headline"]["text"])
    assert report["first_jump"] is not None and report["first_jump"]["key"] == f"{BROKEN}:input", report["first_jump"]
    assert report["headline"]["jump"] and report["headline"]["text"].startswith(f"first jump: {BROKEN}:input")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "executorch", "coreml"])
def test_demo_model_healthy_bundle_headline_names_no_jump(target, tmp_path, demo_checkpoint, digits_dir):
    """The trained demo model with the default calibration: the headline names no jump (its worst
    point within what its own int8 grid allows), so it can never be confused with the broken fc1.
    Needs the image input's range from the preprocessing (issue 28 item 1): an entropy-calibrated
    image range clips several % of the image and is (rightly) named."""
    from crossvit_edge.spec import CalibrationSettings as Defaults

    bundle = _build(tmp_path / "h", demo_checkpoint, digits_dir, target, method=Defaults().method)
    report = _compare(bundle, demo_checkpoint, digits_dir, n=8, calib=target == "executorch")
    print(target, "healthy:", report["headline"]["text"])
    assert report["first_jump"] is None and not report["headline"]["jump"], report["headline"]
    assert report["headline"]["text"].startswith("no jump: worst point")
    assert report["headline"]["layer"] != BROKEN


def test_grid_noise_matches_a_real_quantization():
    """The grid's expected error (scale^2/12 inside the range, the distance to the edge outside)
    against fake-quantizing the same values on that grid: equal within a few percent, clipped or not."""
    from crossvit_edge.converters.probe import Quant
    from crossvit_edge.layerwise import expected_grid_noise

    x = np.random.default_rng(0).standard_normal(200_000)
    for amax in (4.0, 1.0):  # 4 sigma: nothing clipped to speak of; 1 sigma: a third clipped
        q = Quant(amax / 127, 0, -127, 127)
        fake = np.clip(np.round(x / q.scale), -127, 127) * q.scale
        assert expected_grid_noise(x, q) == pytest.approx(float(np.sum((fake - x) ** 2)), rel=0.03)


def test_headline_rule_on_rows():
    """A 12 dB drop that its own grid explains is no jump (the headline names it as the worst point
    and what its grid allows); the same drop 8 dB below the grid, or with 5% clipped, or at a point
    without a grid, is the first jump."""
    from crossvit_edge.layerwise import headline

    def rows(**kw):
        base = {"key": "l:input", "layer": "l", "kind": "int8 input", "snr_db": 28.0, "drop_db": 12.0, "grid_snr_db": 29.0,
                "clipped_share": 0.0}
        return [{"key": "a:output", "layer": "a", "kind": "layer output", "snr_db": 40.0, "drop_db": 0.0, "grid_snr_db": None,
                 "clipped_share": None}, {**base, **kw}]

    jump, head = headline(rows())
    assert jump is None and head["text"] == "no jump: worst point l:input, within what its int8 grid allows (measured 28.0 dB, grid allows 29.0 dB)"
    for kw, why in ((dict(grid_snr_db=36.1), "8.1 dB below"), (dict(clipped_share=0.05), "clips 5.00%"),
                    (dict(grid_snr_db=None, clipped_share=None), "no int8 grid")):
        jump, head = headline(rows(**kw))
        assert jump["key"] == "l:input" and why in jump["why"] and head["text"].startswith("first jump: l:input"), (kw, head)
    jump, head = headline(rows(drop_db=9.0, clipped_share=0.5))  # below the drop rule: never a jump
    assert jump is None and not head["jump"]


def test_plan_scale_column_names_the_estimator_when_the_plan_records_one():
    """The scale column: the plan's scale, with the estimator that chose it where the plan's layer
    entry records one (issue 28 item 2's per-tensor winner); a plan without it shows the scale alone."""
    from types import SimpleNamespace

    from crossvit_edge.layerwise import _plan_scale, estimator_of

    assert estimator_of(SimpleNamespace(name="l")) is None
    assert estimator_of(SimpleNamespace(estimator="percentile-99.99")) == "percentile-99.99"
    assert estimator_of(SimpleNamespace(winner={"estimator": "mse", "error": 1.0})) == "mse"
    assert _plan_scale({"plan_scale": 0.0125, "estimator": "mse"}) == "0.0125 (mse)"
    assert _plan_scale({"plan_scale": 0.0125, "estimator": None}) == "0.0125"
