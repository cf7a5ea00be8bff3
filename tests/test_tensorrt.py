"""TensorRT target: bundles for every Jetson profile (ONNX checked statically against the profile's
TensorRT parser and numerically in ONNX Runtime), the calibration cache format, the static checker,
the CLI without TensorRT, profile requests a TensorRT cannot honour, and the torch-free device side.

Engine build and run need the tensorrt package and a CUDA GPU; those tests skip with the reason
when either is missing (this project never fakes tensorrt)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from crossvit_edge.calibration import trt_cache
from crossvit_edge.converters.tensorrt.onnx_surgery import decompose_layernorm
from crossvit_edge.converters.tensorrt.static_check import TensorRTCheckError, const_input_rules, static_check
from crossvit_edge.converters.tensorrt.versions import (
    FP32_PREFIX, JETPACK_RELEASES, builder_flags, jetpack_of, jetson_support, resolve_target, version_guard,
)
from crossvit_edge.bundle import read_manifest
from crossvit_edge.checkpoint import load_checkpoint
from crossvit_edge.data import open_image_set
from crossvit_edge.errors import UserError
from crossvit_edge.metrics import compare_logits
from crossvit_edge.pipeline import convert
from crossvit_edge.preprocess import Preprocessing
from crossvit_edge.spec import BuildSpec, CalibrationSettings
from crossvit_edge.device_profiles import list_profiles, load_profile

from .conftest import MICRO_MODEL, REPO, run_cli

# Every shipped Jetson profile (profiles/jetson-*.yaml), one or more per JetPack (versions.JETPACK_RELEASES).
JETSON_PROFILES = [p for p in list_profiles() if p.startswith("jetson-")]
# One export per bundle costs ~15 s on two cores: the three graph families (8.5 explicit Q/DQ with
# LayerNorm decomposed; explicit Q/DQ with the LayerNormalization op, 8.6 and 10.x DLA; strongly typed
# fp16 + Q/DQ at opset 19, 10.x and 11.x) run by default, the others under -m slow; every profile's
# ONNX is still statically checked in the default suite on its family's bundle
# (test_every_jetpack_resolves_to_profiles_whose_static_checks_pass), and its trtexec flags and build
# script without an export (test_build_script_of_every_jetson_profile).
FAST_PROFILES = ("jetson-xavier-nx-jp5", "jetson-orin-nano-jp60", "jetson-orin-nano-jp6")
PROFILE_PARAMS = [p if p in FAST_PROFILES else pytest.param(p, marks=pytest.mark.slow) for p in JETSON_PROFILES]
NOTE = "engine must be built on the device: run sh build_engine.sh"


def _trt_status():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "tensorrt is not installed (it comes with JetPack; NVIDIA's wheels are not on PyPI here)"
    from crossvit_edge.converters.tensorrt.device import device_status

    return device_status()


TRT_OK, TRT_WHY = _trt_status()
needs_trt_gpu = pytest.mark.skipif(not TRT_OK, reason=f"engine build/run needs tensorrt and a CUDA GPU: {TRT_WHY}")


# --------------------------------------------------------------------------------------------------
# Bundles for every shipped Jetson profile


def _spec(tmp, ckpt, digits_dir, profile, precision="int8", **options):
    prof = load_profile(profile) if isinstance(profile, str) else profile
    return BuildSpec(
        target="tensorrt", output=tmp / f"b_{prof.name}_{precision}", precision=precision, checkpoint=str(ckpt),
        profile=prof, batch_size=prof.batch_size,
        calibration=CalibrationSettings(data=digits_dir / "train", samples=16, batch_size=8),
        eval_data=digits_dir / "val", eval_samples=8, options=dict(options), overwrite=True,
    )


@pytest.fixture(scope="module")
def bundle_of(tmp_path_factory, micro_checkpoint, digits_dir):
    tmp = tmp_path_factory.mktemp("trt")
    built = {}

    def get(profile: str) -> Path:
        if profile not in built:
            spec = _spec(tmp, micro_checkpoint, digits_dir, profile)
            convert(spec)
            built[profile] = spec.output
        return built[profile]

    return get


@pytest.fixture(scope="module")
def val_images(digits_dir, micro_checkpoint):
    model = load_checkpoint(str(micro_checkpoint)).model
    pre = Preprocessing(input_size=model.config.img_size, crop_pct=model.config.crop_pct)
    images = open_image_set(digits_dir / "val").sample(8, seed=3)
    x = images.load(pre).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return x, ref


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float32)


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_every_jetson_profile_gives_a_checked_bundle_close_to_fp32(profile, bundle_of, val_images, micro_checkpoint):
    bundle = bundle_of(profile)
    manifest = read_manifest(bundle)
    trt = manifest["tensorrt"]
    prof = load_profile(profile)
    assert manifest["target"] == "tensorrt" and manifest["precision"] == "int8"
    assert trt["version"] == prof.options["version"] and not trt["engine_built"]
    # No tensorrt here: the artifact is the ONNX the device builds from, with the one-line note.
    assert manifest["artifact"]["file"] == trt["onnx"] and (bundle / trt["onnx"]).is_file()
    assert manifest["artifact"]["kind"] == "engine"
    assert manifest["artifact"]["stand_in"]["file"] == trt["reference_onnx"]
    notes = [n for n in manifest["notes"] if n.startswith(NOTE)]
    assert len(notes) == 1 and "\n" not in notes[0]

    # The static check passed at conversion time and passes again on the file in the bundle.
    report = json.loads((bundle / "tensorrt_report.json").read_text())
    assert report["passed"] and report["tensorrt_version"] == trt["version"]
    spec = SimpleNamespace(options=dict(prof.options), precision="int8", profile=prof)
    model = onnx.load(str(bundle / trt["onnx"]))
    static_check(model, resolve_target(spec))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == trt["opset"] <= resolve_target(spec).parser.opset_max
    ops = {n.op_type for n in model.graph.node}
    assert "Pow" not in ops

    # The ONNX the engine is built from, and the stand-in, run in ONNX Runtime close to fp32.
    x, ref = val_images
    stand_in = compare_logits(_ort_logits(bundle / trt["reference_onnx"], x), ref)
    assert stand_in["cosine"] > 0.99, stand_in
    assert manifest["accuracy_check"]["cosine"] > 0.99
    build = compare_logits(_ort_logits(bundle / trt["onnx"], x), ref)
    print(f"{profile}: stand-in {stand_in}; build ONNX {build}")

    # build_engine.sh, run for real in dry-run mode as if by the device's trtexec (same version).
    r = _dry_run(bundle, trt["version_int"])
    assert r.returncode == 0, r.stderr
    cmd = r.stdout
    assert f"--onnx={trt['onnx']} " in cmd and f"--saveEngine={trt['engine']} " in cmd
    assert f"--exportLayerInfo={trt['layer_info']} " in cmd
    _assert_trtexec_flags(cmd, resolve_target(spec))
    # INT8-effective by construction: every shipped profile is explicit Q/DQ (or strongly typed Q/DQ).
    assert trt["mode"] in ("explicit", "strongly-typed") and trt["int8"]["mode"] == trt["mode"]
    assert_int8_effective(bundle)
    assert build["cosine"] > 0.99
    assert "--calib" not in cmd and not list(bundle.glob("*.cache*"))
    assert "--int8" in cmd.split() or trt["mode"] == "strongly-typed"
    # The manifest's builder flags are the ones the device builder computes (same function).
    t = resolve_target(spec)
    assert trt["builder_flags"] == builder_flags(t.version, t.mode, "int8", t.dla_core is not None, t.gpu_fallback, t.fp32_pins)
    if trt["version"].startswith("8.5"):
        assert "LayerNormalization" not in ops
        pinned = [n.name for n in model.graph.node if n.name.startswith(FP32_PREFIX)]
        # LayerNorm decomposed into 9 named nodes, each pinned to fp32
        n_layernorms = sum(isinstance(m, torch.nn.LayerNorm) for m in load_checkpoint(str(micro_checkpoint)).model.modules())
        assert len(pinned) == trt["fp32_layers"] == 9 * n_layernorms
        assert "--precisionConstraints=obey " in cmd
        assert f"--layerPrecisions={','.join(n + ':fp32' for n in pinned)} " in cmd
        assert f"--layerOutputTypes={','.join(n + ':fp32' for n in pinned)} " in cmd
    else:
        assert "--layerPrecisions" not in cmd
    if trt["mode"] == "strongly-typed":
        assert opset == 19  # fp16 Q/DQ scales
        scales16 = [i for i in model.graph.initializer if i.name.endswith("input_scale")]
        assert scales16 and all(i.data_type == TensorProto.FLOAT16 for i in scales16)
    # A trtexec of another TensorRT release refuses the bundle in one line, before building.
    other = 100300 if trt["version"].startswith("8.") else 8502
    r = _dry_run(bundle, other)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and "reconvert with the matching profile" in r.stderr


def test_implicit_int8_option_ranges_every_activation_tensor(tmp_path, micro_checkpoint, digits_dir, val_images):
    """The implicit option for TensorRT 8.5 (not a shipped default): the build graph is the fp32 model
    (Q/DQ stripped, LayerNorm decomposed), the cache has a range for every float activation tensor of
    it (the plan's int8 inputs with the plan's ranges), the report says which nodes can run INT8
    under each builder, and build_engine.sh hands trtexec the cache with its own version header."""
    from crossvit_edge.converters.tensorrt.implicit import float_activations

    path = tmp_path / "jp5-implicit.yaml"
    path.write_text((REPO / "profiles" / "jetson-xavier-nx-jp5.yaml").read_text().replace("mode: explicit", "mode: implicit").replace(
        "name: jetson-xavier-nx-jp5", "name: jp5-implicit"))
    prof = load_profile(str(path))
    assert prof.options["mode"] == "implicit"
    spec = _spec(tmp_path, micro_checkpoint, digits_dir, prof)
    manifest = convert(spec)
    bundle = spec.output
    trt = manifest["tensorrt"]
    assert trt["mode"] == "implicit" and trt["int8"]["mode"] == "implicit"
    assert_int8_effective(bundle)
    model = onnx.load(str(bundle / trt["onnx"]))
    x, ref = val_images
    build = compare_logits(_ort_logits(bundle / trt["onnx"], x), ref)
    assert build["max_abs_diff"] < 1e-3, build  # the build graph is the fp32 model (LayerNorm decomposed)
    version, algorithm, scales = trt_cache.parse_cache((bundle / trt["calibration_cache"]).read_bytes())
    assert (version, algorithm) == (8502, "EntropyCalibration2")
    activations = float_activations(model)
    assert set(scales) == set(activations) and len(scales) > 100  # every activation tensor, not just the int8 inputs
    plan = json.loads((bundle / "quant_plan.json").read_text())
    amax = [l["input_amax"] for l in plan["layers"] if l["precision"] == "int8"]
    assert sum(any(np.isclose(s * 127, a, rtol=1e-6) for a in amax) for s in scales.values()) >= len(set(np.round(amax, 6))) - 1
    report = json.loads((bundle / "tensorrt_report.json").read_text())["calibration_cache"]
    assert report["tensors"] == len(activations) and report["ranges_from"]["plan"] > 0
    layers = report["int8_layers"]
    assert layers["python_builder"]["unranged"] == [] and layers["python_builder"]["pinned_fp32"] == trt["fp32_layers"] > 0
    # trtexec leaves every node that reads a constant tensor (MatMul weights, biases) in float.
    assert 0 < layers["trtexec"]["int8_possible"] < layers["python_builder"]["int8_possible"]
    assert any("--build" in n and "build_engine.sh (trtexec) leaves" in n for n in manifest["notes"])
    # build_engine.sh: the cache goes to trtexec with the trtexec's own version in its header.
    r = _dry_run(bundle, 8502)
    assert r.returncode == 0, r.stderr
    assert f"--calib={trt['calibration_cache']}.device" in r.stdout.split()
    cache = (bundle / trt["calibration_cache"]).read_bytes()
    assert (bundle / f"{trt['calibration_cache']}.device").read_bytes() == cache
    r = _dry_run(bundle, 8503)
    assert r.returncode == 0, r.stderr
    device = (bundle / f"{trt['calibration_cache']}.device").read_bytes()
    assert device == trt_cache.with_header_version(cache, "8.5.3") and device.startswith(b"TRT-8503-EntropyCalibration2\n")


def test_every_jetson_profile_quantizes_explicitly():
    """Which INT8 mode each shipped profile resolves to (README's table): explicit Q/DQ for all of
    them; the per-bundle tests above check that the Q/DQ graph is complete and legal."""
    for profile in JETSON_PROFILES:
        prof = load_profile(profile)
        target = resolve_target(SimpleNamespace(options=dict(prof.options), precision="int8", profile=prof))
        assert target.mode in ("explicit", "strongly-typed"), (profile, target.mode)


def assert_int8_effective(bundle: Path) -> None:
    """The bundle's int8 engine cannot silently run in float for lack of quantization information:
    explicit modes: the build ONNX's Q/DQ nodes pass TensorRT's rule checker and every int8 layer of
    the plan has its weight DQ and activation Q/DQ in it; implicit mode: the calibration cache has a
    range for every float activation tensor of the build ONNX."""
    from crossvit_edge.converters.onnx import check_qdq_rules
    from crossvit_edge.converters.tensorrt.implicit import float_activations
    from crossvit_edge.converters.tensorrt.onnx_surgery import int8_layer_io

    manifest = read_manifest(bundle)
    trt = manifest["tensorrt"]
    model = onnx.load(str(bundle / trt["onnx"]))
    plan = json.loads((bundle / "quant_plan.json").read_text())
    int8 = [l["name"] for l in plan["layers"] if l["precision"] == "int8"]
    assert int8
    if trt["mode"] == "implicit":
        _, _, scales = trt_cache.parse_cache((bundle / trt["calibration_cache"]).read_bytes())
        activations = float_activations(model)
        assert activations and set(activations) <= set(scales), sorted(set(activations) - set(scales))[:5]
        assert not {n.op_type for n in model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    else:
        assert check_qdq_rules(model) > 0
        ios = int8_layer_io(model, SimpleNamespace(int8_layers=lambda: [SimpleNamespace(name=n) for n in int8]))
        assert sorted(io.layer for io in ios) == sorted(int8)


def _dry_run(folder: Path, version_int: int, script: str = "build_engine.sh"):
    """Run a bundle's build script with DRY_RUN=1 (prints the trtexec command instead of running it)
    as if the device's trtexec reported ``version_int`` in its banner. No trtexec is involved."""
    import os

    env = {**os.environ, "DRY_RUN": "1", "TRT_VERSION_INT": str(version_int), "TRTEXEC": "/nonexistent/trtexec"}
    return subprocess.run(["sh", str(folder / script)], capture_output=True, text=True, env=env)


def _assert_trtexec_flags(cmd: str, target) -> None:
    """The version-specific trtexec flags (each checked in samples/common/sampleOptions.cpp of the
    NVIDIA/TensorRT release branch: see crossvit_edge.converters.tensorrt.build_script.trtexec_flags)."""
    words = cmd.split()
    assert words[0] == "/nonexistent/trtexec"
    assert f"--memPoolSize=workspace:{target.workspace_mib}" in words
    assert "--timingCacheFile=timing.cache" in words and "--profilingVerbosity=detailed" in words
    # 8.5 has --buildOnly only; 8.6 added --skipInference; 10.x/11.x have --skipInference only.
    assert ("--buildOnly" in words) == (target.version[:2] == (8, 5)) != ("--skipInference" in words)
    if target.strongly_typed:  # 10.x flag, the only mode of 11.x: no precision flags
        assert "--stronglyTyped" in words and "--int8" not in words and "--fp16" not in words
    else:
        assert "--stronglyTyped" not in words
        assert ("--int8" in words) == (target.precision == "int8")
        assert ("--fp16" in words) == (target.precision in ("fp16", "int8") or target.dla_core is not None)
    if target.dla_core is not None:
        assert f"--useDLACore={target.dla_core}" in words and ("--allowGPUFallback" in words) == target.gpu_fallback
    else:
        assert not any(w.startswith("--useDLACore") or w == "--allowGPUFallback" for w in words)
    if target.major >= 11:  # removed from 11.0's sampleOptions.cpp
        assert not any(w.startswith(("--calib", "--int8", "--fp16", "--precisionConstraints", "--layerPrecisions")) for w in words)


@pytest.mark.parametrize("profile", JETSON_PROFILES + ["jetson-xavier-nx-jp5:implicit"])
def test_build_script_of_every_jetson_profile(profile, tmp_path):
    """Without an export: the trtexec command each shipped profile gets (and the implicit-INT8
    option of the JetPack 5 one), and the script's guards."""
    from crossvit_edge.converters.tensorrt.build_script import build_script, latency_flags, trtexec_flags

    profile, _, mode = profile.partition(":")
    prof = load_profile(profile)
    options = dict(prof.options, **({"mode": mode} if mode else {}))
    target = resolve_target(SimpleNamespace(options=options, precision=prof.precision, profile=prof))
    cache = "m.calib.cache" if target.mode == "implicit" else None
    pinned = ["fp32_layernorm_0_mean", "fp32_layernorm_0_sub"] if target.decompose_layernorm else []
    flags = trtexec_flags(target, "m.onnx", "m.engine", "m.layers.json", cache, pinned)
    (tmp_path / "build_engine.sh").write_text(build_script(target, flags, latency_flags(target, "m.engine"), cache, "m"))
    vint = trt_cache.version_int(target.version)
    if cache:
        r = _dry_run(tmp_path, vint)
        assert r.returncode == 1 and "missing m.calib.cache" in r.stderr  # never calibrate on random data
        (tmp_path / cache).write_text(trt_cache.format_cache(target.version, {"image": 0.02}))
    r = _dry_run(tmp_path, vint)
    assert r.returncode == 0, r.stderr
    _assert_trtexec_flags(r.stdout, target)
    assert r.stdout.split()[1:3] == ["--onnx=m.onnx", "--saveEngine=m.engine"]
    if cache:
        assert "--calib=m.calib.cache.device" in r.stdout.split()
        assert (tmp_path / "m.calib.cache.device").read_text().splitlines() == [f"TRT-{vint}-EntropyCalibration2", "image: 3ca3d70a"]
    expected = {"jetson-xavier-nx-jp5": (mode or "explicit", None), "jetson-orin-nano-jp60": ("explicit", None),
                "jetson-agx-orin-jp60-dla": ("explicit", 0), "jetson-orin-nano-jp6": ("strongly-typed", None),
                "jetson-agx-orin-jp6-dla": ("explicit", 0), "jetson-thor-jp7": ("strongly-typed", None),
                "jetson-agx-orin-jp720": ("strongly-typed", None), "jetson-thor-jp720": ("strongly-typed", None),
                "jetson-agx-orin-jp722": ("strongly-typed", None), "jetson-agx-orin-jp722-dla": ("strongly-typed", 0),
                "jetson-thor-jp722": ("strongly-typed", None)}[profile]
    assert (target.mode, target.dla_core) == expected
    # The banner of another release's trtexec (patch releases pass; see the cache header above).
    major, minor, _ = target.version
    other = 8601 if (major, minor) == (8, 5) else 8502
    r = _dry_run(tmp_path, other)
    assert r.returncode == 1 and "reconvert with the matching profile" in r.stderr and r.stdout == ""


# The graph a conversion writes depends only on (LayerNorm decomposed, strongly typed) for an int8
# profile (converter.py: ``decompose_layernorm``, ``fp16_with_int8=strongly_typed``; the opset follows
# from the mode): the default suite exports one bundle per family and checks every profile on it.
FAMILY_BUNDLE = {(True, False): "jetson-xavier-nx-jp5", (False, False): "jetson-orin-nano-jp60", (False, True): "jetson-orin-nano-jp6"}


def test_every_jetpack_resolves_to_profiles_whose_static_checks_pass(bundle_of):
    """Each JetPack row (versions.JETPACK_RELEASES) names profiles with that JetPack in their name,
    whose TensorRT is the row's, and whose ONNX passes that version's static check (Q/DQ rules,
    every op in its parser's set, opset in range); every shipped Jetson profile is in one row."""
    covered = []
    for row in JETPACK_RELEASES:
        assert row.profiles and row.seen in ("source", "release notes") and row.source
        assert jetpack_of(row.tensorrt) == row and jetson_support(row.tensorrt) is None
        for name in row.profiles:
            prof = load_profile(name)
            assert str(prof.options["jetpack"]) in row.jetpack and f"-jp{str(prof.options['jetpack'])[0]}" in name
            assert any(b in prof.options["device"] for b in row.boards), (name, prof.options["device"], row.boards)
            target = resolve_target(SimpleNamespace(options=dict(prof.options), precision=prof.precision, profile=prof))
            assert jetpack_of(target.version) == row, (name, target.version)
            bundle = bundle_of(FAMILY_BUNDLE[(target.decompose_layernorm, target.strongly_typed)])
            trt = read_manifest(bundle)["tensorrt"]
            assert trt["opset"] == target.opset, (name, trt["opset"], target.opset)
            model = onnx.load(str(bundle / trt["onnx"]))
            report = static_check(model, target)
            assert report["passed"] and report["qdq_nodes"] > 0 and report["tensorrt_version"] == prof.options["version"]
            assert {n.op_type for n in model.graph.node} <= target.parser.ops
            assert target.parser.opset_min <= target.opset <= target.parser.opset_max
            if target.major >= 11 or target.strongly_typed:  # no precision flags where types come from the graph
                assert not {"FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"} & set(target.builder_flags)
            covered.append(name)
    assert sorted(covered) == sorted(JETSON_PROFILES)


@pytest.mark.parametrize(
    "bundle,installed,dla,jetson,message",
    [
        ("11.4.1", "11.4.0", True, True, r"^this bundle builds for DLA with TensorRT 11\.4\.1, this device has 11\.4\.0: DLA was unavailable in TensorRT 11\.0 through 11\.4\.0"),
        ("11.4.1", "11.4.0", True, False, r"DLA was unavailable in TensorRT 11\.0 through 11\.4\.0"),
        ("11.4.1", "11.5.0", False, True, r"^this device has TensorRT 11\.5\.0: TensorRT 11\.5 and later support no JetPack .*Orin DLA ends at 11\.4\.1"),
        ("11.4.1", "11.6.2", True, True, r"11\.5 and later support no JetPack"),
        ("11.4.1", "11.4.0", False, True, r"no JetPack ships TensorRT 11\.4\.0"),
        ("10.3", "10.16.2.10", False, True, r"made for TensorRT 10\.3\.0, this device has 10\.16\.2: reconvert"),
        ("8.6.2", "8.5.2.2", False, True, r"made for TensorRT 8\.6\.2, this device has 8\.5\.2: reconvert"),
        ("10.16", "10.16.2", True, True, r"10\.7 was the last 10\.x release that supported DLA"),
    ],
)
def test_version_guard_refuses_in_one_line(bundle, installed, dla, jetson, message):
    why = version_guard(bundle, installed, dla=dla, jetson=jetson)
    assert why and "\n" not in why and __import__("re").search(message, why), why


def test_version_guard_accepts_what_each_jetpack_ships():
    for row in JETPACK_RELEASES:
        dla = any("AGX Orin" in b or "Xavier" in b for b in row.boards) and row.tensorrt[:2] not in ((10, 13), (10, 16))
        full = ".".join(map(str, row.tensorrt)) + ".1"  # JetPack wheels report a 4th, build, number
        assert version_guard(".".join(map(str, row.tensorrt[:2])), full, dla=dla, jetson=True) is None, row
    assert version_guard("11.4.1", "11.4.2", dla=True, jetson=True) is None  # a later 11.4 patch keeps DLA
    assert version_guard("11.5.0", "11.5.0", dla=False, jetson=False) is None  # not a Jetson: the notes do not apply
    assert jetpack_of((11, 4, 0)) is None and jetpack_of((11, 5, 0)) is None and jetpack_of((10, 15, 1)) is None


def test_build_script_applies_the_patch_level_guard(tmp_path):
    """build_engine.sh runs version_guard's patch rules in sh: an 11.4.1 DLA bundle is refused by
    an 11.4.0 trtexec, and 11.5 on a Jetson is refused saying why, in one line each."""
    from crossvit_edge.converters.tensorrt.build_script import build_script, latency_flags, trtexec_flags

    def script_for(profile):
        prof = load_profile(profile)
        target = resolve_target(SimpleNamespace(options=dict(prof.options), precision=prof.precision, profile=prof))
        folder = tmp_path / profile
        folder.mkdir()
        flags = trtexec_flags(target, "m.onnx", "m.engine", "m.layers.json", None, [])
        text = build_script(target, flags, latency_flags(target, "m.engine"), None, "m")
        (folder / "build_engine.sh").write_text(text)
        return folder, text

    dla, text = script_for("jetson-agx-orin-jp722-dla")
    assert "release/11.1" in text and "release/11.4 was not read" in text  # what the flags were checked against
    assert _dry_run(dla, 110401).returncode == 0 and _dry_run(dla, 110402).returncode == 0
    for vint, message in ((110400, "DLA was unavailable in TensorRT 11.0 through 11.4.0"), (110500, "11.5 and later support no JetPack"),
                          (110600, "11.5 and later support no JetPack")):
        r = _dry_run(dla, vint)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1 and message in r.stderr, (vint, r.stderr)
    thor, text = script_for("jetson-thor-jp722")
    r = _dry_run(thor, 110400)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no JetPack ships TensorRT 11.0-11.4.0" in r.stderr
    assert _dry_run(thor, 110401).returncode == 0
    nano, text = script_for("jetson-orin-nano-jp60")
    assert "checked against NVIDIA/TensorRT release/8.6 samples/common/sampleOptions.cpp." in text and "inferred" not in text
    assert _dry_run(nano, 8602).returncode == 0 and _dry_run(nano, 8603).returncode == 0


# --------------------------------------------------------------------------------------------------
# Calibration cache

# NVIDIA/TensorRT samples/sampleINT8/README.md (release/8.4, lines 127-136): a cache TensorRT 7.0
# wrote for the MNIST sample, quoted verbatim (README lines 138-140 explain the header and the
# per-tensor "floating point activation scales"). The README shows lines, not bytes: every line
# here ends in "\n", which is also what trtexec's reader (std::getline in
# readScalesFromCalibrationCache, samples/common/sampleEngines.cpp release/8.5 and 10.3) splits on.
TRT_SAMPLE_CACHE = textwrap.dedent(
    """\
    TRT-7000-EntropyCalibration2
    data: 3c008912
    conv1: 3c88edfc
    pool1: 3c88edfc
    conv2: 3ddc858b
    pool2: 3ddc858b
    ip1: 3db6bd6e
    ip2: 3e691968
    prob: 3c010a14
    """
)


def test_cache_matches_tensorrts_own_example_byte_for_byte(tmp_path):
    version, algorithm, scales = trt_cache.parse_cache(TRT_SAMPLE_CACHE)
    assert (version, algorithm) == (7000, "EntropyCalibration2")
    assert list(scales) == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
    # Hand check: 0x3c008912 is the float32 0.0078452..., i.e. amax = 127 * scale = 0.99634 (the
    # MNIST input in [0, 1]); 0x3c010204 would be exactly 1/127.
    assert scales["data"] == pytest.approx(0.0078452, rel=1e-4)
    assert scales["data"] * 127 == pytest.approx(0.99634, rel=1e-4)
    assert trt_cache.scale_hex(1 / 127) == "3c010204"
    path = tmp_path / "c.cache"
    trt_cache.write_cache(path, "7.0.0", scales)
    assert path.read_bytes() == TRT_SAMPLE_CACHE.encode("ascii")


def test_cache_round_trip_and_versions(tmp_path):
    amax = {"image": 2.64, "layer_norm": 7.93, "blocks.0.blocks.0.0.attn.qkv.weight": 0.31, "/model.0/act/Mul_output_0": 1e-3}
    text = trt_cache.cache_from_amax("8.5.2", amax)
    assert text.splitlines()[0] == "TRT-8502-EntropyCalibration2"
    for line in text.splitlines()[1:]:
        name, _, digits = line.rpartition(": ")  # trtexec: last colon, then 8 hex digits
        assert len(digits) == 8 and digits == digits.lower()
    version, algorithm, scales = trt_cache.parse_cache(text)
    assert version == 8502 and list(scales) == list(amax)
    # trtexec's own reader, transliterated (readScalesFromCalibrationCache, samples/common/
    # sampleEngines.cpp, release/8.5 and 10.3): per line, the last colon, then 8 hex digits from
    # colon + 2, std::stoi(..., 16) reinterpreted as a float32. It reads the same scales.
    trtexec = {}
    for line in text.splitlines():
        colon = line.rfind(":")
        if colon >= 0:
            bits = int(line[colon + 2 : colon + 2 + 8], 16)
            assert bits < 2**31  # std::stoi would throw on a negative float's bits
            trtexec[line[:colon]] = float(np.array([bits], np.uint32).view(np.float32)[0])
    assert trtexec == scales
    for name, a in amax.items():
        assert scales[name] == np.float32(np.float32(a) / np.float32(127.0))  # bit-exact float32
    assert {trt_cache.version_int(v) for v in ("8.5.2", "8.5.2.2")} == {8502}
    assert [trt_cache.version_int(v) for v in ("8.6.1", "10.3", "10.13.0", "11.4.1")] == [8601, 100300, 101300, 110401]
    rewritten = trt_cache.with_header_version(text, "8.5.3")
    assert rewritten.decode().splitlines()[0] == "TRT-8503-EntropyCalibration2"
    assert rewritten.decode().splitlines()[1:] == text.splitlines()[1:]
    with pytest.raises(UserError, match="cannot go into"):
        trt_cache.format_cache("8.5.2", {"a\nb": 0.1})
    with pytest.raises(UserError, match="positive"):
        trt_cache.format_cache("8.5.2", {"a": 0.0})
    with pytest.raises(UserError, match="not a TensorRT calibration cache"):
        trt_cache.parse_cache("hello\nx: 00000000\n")


def test_cache_values_tensorrt_writes_unpadded_are_read():
    """TensorRT writes the scale's bits without leading zeros (a zero scale is a bare ``0``); the
    reader takes 1 to 8 hex digits, as trtexec's (``stoi`` of up to 8 characters after ": ")."""
    text = "TRT-8502-EntropyCalibration2\n(Unnamed Layer* 64) [Shuffle]_output: 0\ninput: 3c010204\nsmall: 1\nmid: 3c0102\n"
    version, algorithm, scales = trt_cache.parse_cache(text)
    assert (version, algorithm) == (8502, "EntropyCalibration2")
    assert scales["(Unnamed Layer* 64) [Shuffle]_output"] == 0.0
    assert scales["input"] == np.float32(1 / 127)
    assert scales["small"] == np.array([1], np.uint32).view(np.float32)[0]  # the smallest subnormal
    assert scales["mid"] == np.array([0x3C0102], np.uint32).view(np.float32)[0]
    for bad in ("x: 123456789", "x: 3c01020g", "x:3c010204", "x: "):
        with pytest.raises(UserError, match="1 to 8 hex digits"):
            trt_cache.parse_cache("TRT-8502-EntropyCalibration2\n" + bad + "\n")


# --------------------------------------------------------------------------------------------------
# Static checker and LayerNorm decomposition


def _target(version, mode="explicit", precision="fp32", **extra):
    return resolve_target(SimpleNamespace(options={"version": version, "mode": mode, **extra}, precision=precision, profile=None))


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ln_model(opset=17, name="ln_node"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])
    rng = np.random.default_rng(0)
    g = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "gamma")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta")
    ln = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name=name, axis=-1, epsilon=1e-6)
    return _model([ln], [x], [y], [g, b], opset)


def test_static_check_names_the_offending_node():
    t85 = _target("8.5.2")
    # Unsupported op: TensorRT 8.5's parser has no LayerNormalization importer.
    with pytest.raises(TensorRTCheckError, match=r"TensorRT 8\.5\.2 static check failed: node 'ln_node' \(LayerNormalization\)"):
        static_check(_ln_model(), t85)
    static_check(_ln_model(), _target("8.6.1"))  # 8.6 has it
    # Opset above the parser's range.
    with pytest.raises(TensorRTCheckError, match=r"opset 18 is outside 7-17"):
        static_check(_ln_model(opset=18), _target("8.6.1"))
    # Dynamic shape.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    with pytest.raises(TensorRTCheckError, match=r"input 'x': dynamic shape \['N', 3\]"):
        static_check(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y]), _target("10.3", "strongly-typed"))
    # A dtype the parser rejects (BFLOAT16 does not exist for the 8.5 parser; 10.x maps it).
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    yb = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Cast", ["x"], ["xb"], name="to_bf16", to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["xb"], ["y"], name="back", to=TensorProto.FLOAT)]
    with pytest.raises(TensorRTCheckError, match="BFLOAT16"):
        static_check(_model(nodes, [x], [yb]), t85)
    static_check(_model(nodes, [x], [yb]), _target("10.3", "strongly-typed"))
    # A custom-domain op, and an op no TensorRT version here imports.
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    with pytest.raises(TensorRTCheckError, match=r"node 'mine' \(MyOp\).*plugin"):
        static_check(_model([helper.make_node("MyOp", ["x"], ["y"], name="mine", domain="com.example")], [x], [y]), t85)
    with pytest.raises(TensorRTCheckError, match=r"node 'det' \(Det\)"):
        static_check(_model([helper.make_node("Det", ["x"], ["y"], name="det")], [x], [y]), _target("10.13", "strongly-typed"))
    # Gelu (opset 20) exists from TensorRT 10.0 on, not in 8.6.
    with pytest.raises(TensorRTCheckError, match=r"node 'g' \(Gelu\)"):
        static_check(_model([helper.make_node("Gelu", ["x"], ["y"], name="g")], [x], [y]), _target("8.6.1"))
    # Q/DQ rules are TensorRT's: a non-zero zero point is named.
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(3, np.int8), "z")
    qdq = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_bad"), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")]
    with pytest.raises(TensorRTCheckError, match="q_bad"):
        static_check(_model(qdq, [x], [y], [s, z]), _target("10.3", "strongly-typed", precision="int8"))
    # Several violations: the first is named, the rest counted, still one line.
    many = [helper.make_node("Det", ["x"], ["a"], name="d1"), helper.make_node("Det", ["a"], ["y"], name="d2")]
    with pytest.raises(TensorRTCheckError) as e:
        static_check(_model(many, [x], [y]), t85)
    assert "'d1'" in str(e.value) and "(+1 more)" in str(e.value) and "\n" not in str(e.value)


def test_constant_input_rules_follow_each_versions_operator_table():
    """Slice: 8.5 and 10.x tables require only ``axes`` to be constant (starts/ends may be tensors);
    the 10.15 table drops the restriction. Reduce* ``axes`` from the 10.0 table on."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])
    ends_in = helper.make_tensor_value_info("ends_in", TensorProto.INT64, [1])
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    # ends computed at run time from a graph input: a tensor, not an initializer
    tensor_ends = _model([helper.make_node("Slice", ["x", "starts", "ends_in", "axes"], ["y"], name="sl")],
                         [x, ends_in], [y], [axes, starts])
    tensor_axes = _model([helper.make_node("Slice", ["x", "starts", "ends", "axes_in"], ["y"], name="sl")],
                         [x, helper.make_tensor_value_info("axes_in", TensorProto.INT64, [1])], [y],
                         [starts, numpy_helper.from_array(np.array([2], np.int64), "ends")])
    for version, mode in (("8.5.2", "explicit"), ("8.6.1", "explicit"), ("10.3", "strongly-typed"), ("10.13", "strongly-typed"),
                          ("10.15", "strongly-typed"), ("11.4.1", "strongly-typed")):
        target = _target(version, mode)
        static_check(tensor_ends, target)  # no table restricts starts/ends
        if target.version[:2] < (10, 15):
            with pytest.raises(TensorRTCheckError, match=r"node 'sl' \(Slice\): input 3 \('axes_in'\).*`axes` must be an initializer"):
                static_check(tensor_axes, target)
        else:
            static_check(tensor_axes, target)
    table, rules = const_input_rules((10, 3, 0))
    assert table.endswith("@10.1-GA") and rules["Slice"] == {3: "`axes` must be an initializer"} and 1 in rules["ReduceMean"]
    table, rules = const_input_rules((8, 5, 2))
    assert table.endswith("@8.5-GA") and "ReduceMean" not in rules and rules["Unsqueeze"] == {1: "`axes` must be a constant tensor"}
    assert "Slice" not in const_input_rules((11, 4, 1))[1]


def test_builder_flags_per_version_are_what_trtexec_sets():
    """``builder_flags`` is what the device builder calls (with the installed version) and what the
    manifest records: trtexec (sampleEngines.cpp) sets PREFER_PRECISION_CONSTRAINTS with every
    --useDLACore in 8.5 and 10.3; 11.x removed the flag and the precision flags."""
    assert builder_flags((8, 5, 2), "explicit", "int8", False, True, True) == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    assert builder_flags((8, 5, 2), "explicit", "fp16", True, True, False) == ["FP16", "PREFER_PRECISION_CONSTRAINTS", "GPU_FALLBACK"]
    assert builder_flags((10, 3, 0), "explicit", "int8", True, False, False) == ["FP16", "INT8", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"]
    assert builder_flags((10, 3, 0), "strongly-typed", "int8", False, True, False) == []
    assert builder_flags((10, 3, 0), "explicit", "fp32", False, True, False) == []
    assert builder_flags((11, 4, 1), "strongly-typed", "int8", True, True, False) == ["GPU_FALLBACK"]
    dla = _target("10.3", "explicit", precision="int8", dla_core=0, device="Jetson AGX Orin")
    assert dla.builder_flags == ["FP16", "INT8", "PREFER_PRECISION_CONSTRAINTS", "GPU_FALLBACK"]
    assert _target("8.5.2", "explicit", precision="int8").builder_flags == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]


def test_layernorm_decomposition_is_exact_named_and_pow_free():
    import onnxruntime as ort

    model = _ln_model()
    x = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32) * 30 + 5
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    names = decompose_layernorm(model)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add"]
    assert names == [n.name for n in model.graph.node] and all(n.startswith(FP32_PREFIX) for n in names)
    square = model.graph.node[2]
    assert square.input[0] == square.input[1]  # Mul(d, d), never Pow
    assert model.graph.node[-1].output[0] == "y"  # downstream tensor names unchanged
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    static_check(model, _target("8.5.2"))
    # Rank-matched constants: no broadcast Shuffle layers inside the pinned region.
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    assert set(ranks.values()) == {3}


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_without_tensorrt_writes_bundle_and_one_line_note(tmp_path, micro_checkpoint, digits_dir):
    if TRT_OK:
        pytest.skip("tensorrt and a GPU are present: the engine would be built here")
    out = tmp_path / "nano_fp16"
    r = run_cli("crossvit_edge.convert", "--target", "tensorrt", "--profile", "jetson-orin-nano-jp6", "--precision", "fp16",
                "--checkpoint", micro_checkpoint, "--eval-data", digits_dir / "val", "--eval-samples", "8", "--output", out, micro=True)
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stdout.splitlines() if l.startswith(NOTE)]
    assert len(notes) == 1 and "Jetson Orin Nano" in notes[0] and "TensorRT 10.3" in notes[0]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["artifact"] == f"{MICRO_MODEL}_fp16.onnx" and summary["cosine"] > 0.99
    manifest = read_manifest(out)
    assert manifest["notes"][0] == notes[0]
    assert (out / "build_engine.sh").is_file() and (out / f"{MICRO_MODEL}_fp16.onnx").is_file()
    model = onnx.load(str(out / f"{MICRO_MODEL}_fp16.onnx"))
    # Strongly typed fp16: the types are in the graph (fp16 weights), LayerNorm stays an opset-17 op.
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
    assert manifest["tensorrt"]["opset"] == 17 and manifest["tensorrt"]["builder_flags"] == []


def test_cli_require_engine_fails_before_any_work(tmp_path, tiny_checkpoint):
    if TRT_OK:
        pytest.skip("tensorrt and a GPU are present")
    out = tmp_path / "never"
    (tmp_path / "empty").mkdir()  # calibration would fail on it: the engine check must come first
    r = run_cli("crossvit_edge.convert", "--target", "tensorrt", "--profile", "jetson-orin-nano-jp6", "--require-engine",
                "--checkpoint", tiny_checkpoint, "--calib-data", tmp_path / "empty", "--output", out)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--require-engine" in lines[0] and "build_engine.sh" in lines[0], r.stderr
    assert not out.exists()


def _write_profile(tmp_path, name, version, device, **section):
    body = {"version": version, "device": device, **section}
    lines = [f"name: {name}", "target: tensorrt", "precision: int8", "tensorrt:"] + [f"  {k}: {json.dumps(v)}" for k, v in body.items()]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "name,version,device,section,message",
    [
        ("thor-dla", "10.13", "Jetson AGX Thor", {"mode": "explicit", "dla_core": 0}, "Jetson AGX Thor has no DLA"),
        ("nano-dla", "10.3", "Jetson Orin Nano", {"mode": "explicit", "dla_core": 0}, "Jetson Orin Nano has no DLA"),
        ("orin-dla-strong", "10.3", "Jetson AGX Orin", {"mode": "strongly-typed", "dla_core": 0}, "strongly typed network"),
        ("orin-dla-1016", "10.16", "Jetson AGX Orin", {"mode": "explicit", "dla_core": 0}, "10.7 was the last"),
        ("orin-dla-core2", "10.3", "Jetson AGX Orin", {"mode": "explicit", "dla_core": 2}, "has 2 DLA core"),
        ("jp72-implicit", "11.4.1", "Jetson AGX Orin", {"mode": "implicit"}, "calibrator API was removed in 11.0"),
        ("jp72-explicit", "11.4.1", "Jetson AGX Orin", {"mode": "explicit"}, "always strongly typed"),
        ("jp5-strong", "8.5.2", "Jetson Xavier NX", {"mode": "strongly-typed"}, "no strongly typed networks"),
        ("jp5-opset18", "8.5.2", "Jetson Xavier NX", {"mode": "implicit", "opset": 18}, "opset 18 is above"),
        ("jp6-opset21", "10.3", "Jetson Orin Nano", {"opset": 21}, r"opset 21 is above .*9-20"),
        ("jp-115", "11.5", "Jetson AGX Orin", {}, r"TensorRT 11\.5 on a Jetson: TensorRT 11\.5 and later support no JetPack .*Orin DLA ends at 11\.4\.1"),
        ("jp-1140-dla", "11.4.0", "Jetson AGX Orin", {"dla_core": 0}, r"TensorRT 11\.4\.0 on a Jetson: no JetPack ships TensorRT 11\.4\.0"),
        ("unknown", "9.9", "Jetson AGX Orin", {}, "unknown TensorRT version '9.9'"),
        ("garbage", "latest", "Jetson AGX Orin", {}, "unknown TensorRT version 'latest'"),
    ],
)
def test_profile_the_tensorrt_cannot_honour_fails_in_one_line_before_any_work(tmp_path, tiny_checkpoint, name, version, device, section, message, capsys):
    from crossvit_edge.convert import main

    path = _write_profile(tmp_path, name, version, device, **section)
    out = tmp_path / "out"
    # --calib-data is an empty folder: reaching calibration would fail with another message.
    (tmp_path / "empty").mkdir()
    code = main(["--target", "tensorrt", "--profile", str(path), "--checkpoint", "/nonexistent.safetensors",
                 "--calib-data", str(tmp_path / "empty"), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert __import__("re").search(message, err[0]), err[0]
    assert not out.exists()


def test_cli_subprocess_dla_on_thor_is_one_line(tmp_path):
    path = _write_profile(tmp_path, "thor-dla", "10.13", "Jetson AGX Thor", mode="explicit", dla_core=0)
    r = run_cli("crossvit_edge.convert", "--target", "tensorrt", "--profile", path, "--output", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no DLA" in r.stderr, r.stderr


def test_no_profile_is_refused(tmp_path):
    from crossvit_edge.converters.tensorrt import TensorRTConverter

    spec = BuildSpec(target="tensorrt", output=tmp_path / "o", precision="fp16")
    with pytest.raises(UserError, match="needs --profile"):
        TensorRTConverter().validate(spec)


# --------------------------------------------------------------------------------------------------
# Device side


# Prepended to every torch-free subprocess: a meta-path finder that refuses torch and PyYAML (and
# their submodules) however they are imported, so an indirect import fails loudly instead of loading them.
BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class _BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "yaml"):  # a Jetson runs this without torch or PyYAML
                raise ImportError(f"{name.split('.')[0]} is blocked in this process (tried to import {name})")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker does not work")
    """
)


def test_device_module_imports_without_torch():
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import crossvit_edge.converters.tensorrt.device as d
        from crossvit_edge.converters.tensorrt.device import TensorRTRunner, build_engine, folder_results, main
        import crossvit_edge.data, crossvit_edge.preprocess, crossvit_edge.metrics, crossvit_edge.bundle
        import crossvit_edge.converters.tensorrt.versions, crossvit_edge.converters.tensorrt.implicit
        loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("torch", "yaml", "onnx", "onnxruntime", "onnxscript"))
        assert not loaded, loaded
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_host_buffers_of_every_engine_dtype_wrap_without_copying():
    """The cuda-python backend's pinned host buffers are numpy views of raw memory (``host_array``);
    here the memory is a ctypes buffer instead of cudaMallocHost's, the wrapping is the same."""
    import ctypes

    from crossvit_edge.converters.tensorrt.device import host_array

    for dtype in (np.float16, np.float32, np.int8, np.int32, np.bool_):
        buf = (ctypes.c_char * (2 * 3 * np.dtype(dtype).itemsize))()
        a = host_array(ctypes.addressof(buf), (2, 3), dtype)
        assert a.shape == (2, 3) and a.dtype == dtype and a.flags.writeable
        values = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
        np.copyto(a, values)
        assert bytes(buf) == values.tobytes()  # written in place, no copy
    scalar = host_array(ctypes.addressof((ctypes.c_char * 2)()), (), np.float16)
    assert scalar.shape == ()


def test_pycuda_backend_uses_the_primary_context():
    """TensorRT works in the device's primary context; ``pycuda.autoinit`` would create a second one."""
    import ast

    import crossvit_edge.converters.tensorrt.device as d

    tree = ast.parse(Path(d.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "pycuda.autoprimaryctx" in imported and "pycuda.autoinit" not in imported


def test_dynamic_ranges_cover_the_tensors_tensorrt_makes_itself():
    """What the TensorRT 8.5 parser makes of ``y = MatMul(x, W) + b`` with a 2-D weight: a constant
    layer (named after the initializer, its output unnamed), a Shuffle that adds the broadcast
    dimension (unnamed output), the MatMul, a constant for b and the Add. The cache names only ONNX
    tensors (x, the MatMul output, y): the constants get ranges from their weights, the Shuffle from
    its input, so every layer can run INT8; a layer TensorRT adds whose output nothing ranges
    cannot, and says why."""
    from crossvit_edge.converters.tensorrt.implicit import NetLayer, dynamic_ranges

    w = "(Unnamed Layer* 0) [Constant]_output"
    ws = "(Unnamed Layer* 1) [Shuffle]_output"
    bias = "(Unnamed Layer* 3) [Constant]_output"
    layers = [
        NetLayer("fc.weight", "CONSTANT", [], [w], weights_amax=0.5),
        NetLayer("(Unnamed Layer* 1) [Shuffle]", "SHUFFLE", [w], [ws]),
        NetLayer("MatMul_0", "MATRIX_MULTIPLY", ["x", ws], ["mm"]),
        NetLayer("fc.bias", "CONSTANT", [], [bias], weights_amax=0.0),
        NetLayer("Add_0", "ELEMENTWISE", ["mm", bias], ["y"]),
        NetLayer("fp32_layernorm_0_mean", "REDUCE", ["y"], ["m"]),
        NetLayer("(Unnamed Layer* 6) [ElementWise]", "ELEMENTWISE", ["y", "m"], ["(Unnamed Layer* 6) [ElementWise]_output"]),
    ]
    plan = dynamic_ranges(layers, ["x"], {"x": 2.0, "mm": 3.0, "y": 3.5, "m": 1.0}, fp32_prefix="fp32_layernorm_")
    assert plan.ranges["x"] == (2.0, "cache") and plan.ranges[w] == (0.5, "constant weights")
    assert plan.ranges[ws] == (0.5, "shuffle input") and plan.ranges[bias][0] > 0  # an all-zero bias still gets a positive range
    assert plan.int8_layers == ["(Unnamed Layer* 1) [Shuffle]", "MatMul_0", "Add_0"]
    assert plan.float_layers == {"fp32_layernorm_0_mean": "pinned to fp32",
                                 "(Unnamed Layer* 6) [ElementWise]": "no range for (Unnamed Layer* 6) [ElementWise]_output"}
    summary = plan.summary()
    assert summary["ranges_from"] == {"cache": 4, "constant weights": 2, "shuffle input": 1} and summary["layers_float"] == 2
    assert len(plan.warnings()) == 1 and "1 layers" in plan.warnings()[0]


def test_device_cli_and_runner_without_an_engine_fail_cleanly(bundle_of, digits_dir, tmp_path):
    from crossvit_edge.converters.tensorrt.device import TensorRTRunner

    bundle = bundle_of("jetson-orin-nano-jp6")
    manifest = read_manifest(bundle)
    # The harness falls back to the ONNX stand-in on a UserError from the bundle's runner.
    with pytest.raises(UserError, match="no TensorRT engine"):
        TensorRTRunner(bundle, manifest)
    code = BLOCK_TORCH + textwrap.dedent(
        f"""
        from crossvit_edge.converters.tensorrt.device import main
        sys.exit(main([{str(bundle)!r}, "--data", {str(digits_dir / "val")!r}, "--output", {str(tmp_path / "r.json")!r}]))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if not TRT_OK:
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr, r.stderr
        assert not (tmp_path / "r.json").exists()


def test_a_rebuild_on_the_device_keeps_the_bundle_openable(bundle_of, tmp_path):
    """An engine built at conversion is listed in ``files``; rebuilding it on the device (--build)
    must record the new hash, or the next open refuses the bundle as modified."""
    import shutil

    from crossvit_edge.converters.tensorrt.device import _refresh_listed_files
    from crossvit_edge.bundle import open_bundle, write_manifest

    bundle = tmp_path / "b"
    shutil.copytree(bundle_of("jetson-orin-nano-jp6"), bundle)
    manifest = read_manifest(bundle)
    engine = bundle / manifest["tensorrt"]["engine"]
    engine.write_bytes(b"engine built at conversion")
    write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"})
    opened = open_bundle(bundle)
    assert engine.name in opened.manifest["files"]
    engine.write_bytes(b"engine rebuilt on the device, another size")
    with pytest.raises(UserError, match="modified or corrupt"):
        open_bundle(bundle)
    _refresh_listed_files(bundle, opened.manifest, [engine, None])
    assert open_bundle(bundle).manifest["files"][engine.name]["bytes"] == engine.stat().st_size


def test_an_unlisted_engine_is_loaded_only_once_adopted(bundle_of, digits_dir, tmp_path):
    """An engine file that came with a bundle, unlisted, is never deserialized; --adopt-engine (the
    user's word that build_engine.sh made it on this device) lists it with its sha256."""
    import shutil

    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.converters.tensorrt.device import TensorRTRunner

    bundle = tmp_path / "b"
    shutil.copytree(bundle_of("jetson-orin-nano-jp6"), bundle)
    manifest = read_manifest(bundle)
    engine = bundle / manifest["tensorrt"]["engine"]
    engine.write_bytes(b"an engine from trtexec")
    assert engine.name not in open_bundle(bundle).manifest["files"]
    with pytest.raises(UserError, match="not listed in its manifest.*--adopt-engine"):
        TensorRTRunner(bundle, manifest)

    def device(*flags):
        code = BLOCK_TORCH + textwrap.dedent(
            f"""
            from crossvit_edge.converters.tensorrt.device import main
            sys.exit(main([{str(bundle)!r}, *{list(flags)!r}, "--data", {str(digits_dir / "val")!r}, "--output", {str(tmp_path / "r.json")!r}]))
            """
        )
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)

    r = device("--build", "--adopt-engine")
    assert r.returncode == 2 and "exclude each other" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = device("--adopt-engine")
    listed = open_bundle(bundle).manifest["files"][engine.name]
    assert listed["bytes"] == engine.stat().st_size
    if not TRT_OK:  # listed, then TensorRT itself is missing: one line
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tensorrt" in r.stderr, r.stderr


def test_a_build_never_overwrites_what_it_reads(bundle_of, digits_dir, tmp_path, capsys):
    """A manifest pointing the engine at the bundle's ONNX (or the manifest) is refused before
    TensorRT is needed, and nothing in the bundle changes."""
    import shutil

    from crossvit_edge.converters.tensorrt.device import main
    from crossvit_edge.bundle import write_manifest

    for victim in ("onnx", "manifest.json"):
        bundle = tmp_path / victim / "b"
        shutil.copytree(bundle_of("jetson-orin-nano-jp6"), bundle)
        manifest = read_manifest(bundle)
        manifest["tensorrt"]["engine"] = manifest["tensorrt"]["onnx"] if victim == "onnx" else "manifest.json"
        write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"})
        before = {p.name: p.read_bytes() for p in bundle.iterdir()}
        code = main([str(bundle), "--build", "--data", str(digits_dir / "val"), "--output", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "refusing to overwrite" in err, err
        assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
        assert not (tmp_path / "r.json").exists()


def test_device_results_file_merges_into_the_harness(bundle_of, digits_dir, tmp_path, micro_checkpoint):
    """The device side's folder run and results file, torch-free, executed with the bundle's ONNX
    stand-in in ONNX Runtime (a real Runner; the TensorRT runner itself needs the device), then
    merged by the profiling harness against its own fp32 reference on the same images."""
    import shutil

    from crossvit_edge.harness import ProfileSettings, profile_bundles

    bundle = bundle_of("jetson-orin-nano-jp6")
    manifest = read_manifest(bundle)
    folder = tmp_path / "imgs"
    for i, path in enumerate(open_image_set(digits_dir / "val").sample(6, seed=5).paths):
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    out = tmp_path / "results.json"
    code = BLOCK_TORCH + textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from crossvit_edge.converters.onnx import OnnxRuntimeRunner
        from crossvit_edge.converters.tensorrt.device import folder_results, run_folder
        from crossvit_edge.bundle import read_manifest, write_json
        from crossvit_edge.data import open_image_set
        from crossvit_edge.preprocess import Preprocessing

        bundle = Path({str(bundle)!r})
        manifest = read_manifest(bundle)
        runner = OnnxRuntimeRunner(bundle, manifest, artifact=manifest["artifact"]["stand_in"]["file"], exact=True)
        images = open_image_set(Path({str(folder)!r}))
        logits = run_folder(runner, images, Preprocessing.from_dict(manifest["preprocessing"]))
        seconds = []
        for _ in range(3):
            t = time.perf_counter()
            runner.run(Preprocessing.from_dict(manifest["preprocessing"])(images.paths[0])[None])
            seconds.append(time.perf_counter() - t)
        write_json(Path({str(out)!r}), folder_results(bundle, manifest, runner, images, logits, seconds, device="this CPU", timing="perf_counter"))
        assert "torch" not in sys.modules
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert {"bundle", "target", "precision", "runner", "device", "images", "logits", "latency", "engine_bytes", "device_memory_bytes"} <= set(result)
    assert result["bundle"] == bundle.name and result["latency"]["runs"] == 3 and len(result["logits"]) == 6

    model = load_checkpoint(str(micro_checkpoint)).model
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    images = open_image_set(folder)
    report = profile_bundles([], images, pre, model, ProfileSettings(warmup=0, runs=1, threads=1), merged=[result])
    row = report["rows"][1]
    assert row["name"] == bundle.name and row["latency"] == result["latency"] and row["notes"][0].startswith("merged from device results")
    assert "not compared" not in " ".join(row["notes"])
    # The harness matched every image by path: its accuracy is the stand-in's against fp32.
    with torch.no_grad():
        ref = model(torch.from_numpy(images.load(pre).astype(np.float32))).numpy()
    expected = compare_logits(np.asarray(result["logits"], np.float32), ref, np.asarray(images.labels))
    assert row["accuracy"]["cosine"] == pytest.approx(expected["cosine"]) and row["accuracy"]["cosine"] > 0.99
    assert row["accuracy"]["top1_agreement"] == expected["top1_agreement"]


# --------------------------------------------------------------------------------------------------
# Engine build and run: need tensorrt and a GPU


def _local_profile(tmp_path, precision):
    from crossvit_edge.converters.tensorrt.device import compute_capability, installed_version

    major, minor, patch = installed_version()
    mode = "explicit" if major < 10 else "strongly-typed"
    section = {"version": f"{major}.{minor}.{patch}", "mode": mode, "workspace_mib": 1024}
    sm = compute_capability()
    if sm:
        section["sm"] = sm
    path = tmp_path / "local.yaml"
    path.write_text("name: local\ntarget: tensorrt\n" + f"precision: {precision}\n" + "tensorrt:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in section.items()))
    return load_profile(str(path))


@needs_trt_gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_is_built_and_runs_close_to_fp32(tmp_path, micro_checkpoint, digits_dir, precision, val_images):
    from crossvit_edge.converters.tensorrt.device import TensorRTRunner

    prof = _local_profile(tmp_path, precision)
    spec = _spec(tmp_path, micro_checkpoint, digits_dir, prof, precision=precision, require_engine=True)
    manifest = convert(spec)
    assert manifest["tensorrt"]["engine_built"] and manifest["artifact"]["file"].endswith(".engine")
    assert manifest["accuracy_check"]["runner"].startswith("TensorRT")
    assert manifest["accuracy_check"]["cosine"] > 0.99
    info = json.loads((spec.output / manifest["tensorrt"]["layer_info"]).read_text())
    assert info.get("Layers")
    runner = TensorRTRunner(spec.output, read_manifest(spec.output))
    try:
        x, ref = val_images
        logits = np.concatenate([runner.run(x[i : i + 1]) for i in range(len(x))])
        assert compare_logits(logits, ref)["cosine"] > 0.99
        times = runner.time(x[:1], warmup=3, runs=5)
        assert len(times) == 5 and all(t > 0 for t in times)
        assert runner.memory_bytes() > 0
    finally:
        runner.close()


@needs_trt_gpu
def test_device_cli_builds_and_writes_mergeable_results(tmp_path, micro_checkpoint, digits_dir):
    prof = _local_profile(tmp_path, "fp16")
    spec = _spec(tmp_path, micro_checkpoint, digits_dir, prof, precision="fp16")
    convert(spec)
    (spec.output / f"{MICRO_MODEL}_fp16.engine").unlink()
    out = tmp_path / "results.json"
    r = run_cli("crossvit_edge.converters.tensorrt.device", spec.output, "--data", digits_dir / "val", "--build", "--runs", "5", "--output", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    images = open_image_set(digits_dir / "val")
    assert result["images"] == [str(p.relative_to(images.root)) for p in images.paths]
    assert np.asarray(result["logits"]).shape == (len(images), 10)
    assert {"bundle", "target", "precision", "runner", "device", "latency", "engine_bytes", "device_memory_bytes"} <= set(result)
    assert result["latency"]["runs"] == 5


@pytest.mark.parametrize("content", ["[1, 2]", '"points"', "null"])
def test_device_cli_points_file_of_any_json_is_one_line(bundle_of, digits_dir, tmp_path, content):
    """Issue 29: a --points file that is a JSON list, string or null ended in AttributeError; now
    it is refused in one line, before any build, with or without TensorRT installed."""
    points = tmp_path / "points.json"
    points.write_text(content)
    code = BLOCK_TORCH + textwrap.dedent(
        f"""
        from crossvit_edge.converters.tensorrt.device import main
        sys.exit(main([{str(bundle_of("jetson-orin-nano-jp6"))!r}, "--data", {str(digits_dir / "val")!r}, "--points", {str(points)!r},
                       "--output", {str(tmp_path / "r.json")!r}]))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a points file" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "r.json").exists()
