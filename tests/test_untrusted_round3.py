"""Untrusted input, third round (issue 29, items 1, 5, 6, 7): every file a command reads is checked
before the work that depends on it (the plan and calibration sections of a manifest, the device
runner's points file, a device's intermediates .npz, an adopted engine), outputs are whole or
absent after a kill at any moment (SIGKILL included), a non-finite artifact is a failed check, and
library noise never reaches a refusal's one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from crossvit_edge.errors import UserError

from .conftest import MICRO_CLI, MICRO_MODEL, REPO, micro_configs, run_cli
from .test_security import base_bundle, make_image_folder  # noqa: F401 (fixture)
from .test_security_bounds import _deflate_bomb, _npy_header, growth, sparse

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def _one_line(r: subprocess.CompletedProcess, expect: str) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2 and expect in err and len(err.splitlines()) == 1 and "Traceback" not in err, r.stderr[-3000:]


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, micro_checkpoint, digits_dir) -> Path:
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    out = tmp_path_factory.mktemp("r3") / "int8"
    convert(BuildSpec(target="onnx", output=out, precision="int8", checkpoint=str(micro_checkpoint),
                      calibration=CalibrationSettings(data=digits_dir / "train", samples=8), overwrite=True))
    return out


# --------------------------------------------------------------------------------------------------
# Item 1: the plan and calibration sections, checked at open


@pytest.mark.parametrize("mutate, expect", [
    (lambda m: m["quantization_plan"].__setitem__("layers", 7), "quantization_plan.layers: expected a list, got 7"),
    (lambda m: m["quantization_plan"].pop("model"), "quantization_plan.model: missing"),
    (lambda m: m["calibration"].__setitem__("seed", "x"), "calibration.seed: expected an integer"),
    (lambda m: m["quantization_plan"]["layers"][0].__setitem__("precision", "int4"), "layers[0].precision: expected one of"),
    (lambda m: m["quantization_plan"]["layers"][0].__setitem__("input_amax", "big"), "layers[0].input_amax: expected a number"),
    (lambda m: m["quantization_plan"]["layers"][0].__setitem__("extra", {"a": 1}), "layers[0].extra: expected a string, number"),
    (lambda m: m["quantization_plan"].__setitem__("smoothing", {"alpha": "x"}), "smoothing.alpha: expected a number"),
])
def test_plan_and_calibration_sections_are_checked_at_open(tmp_path, int8_bundle, mutate, expect):
    """Before, debug ended in TypeError/KeyError/ValueError tracebacks on these (after loading the
    checkpoint); now open_bundle refuses them in one line naming the key, and debug too."""
    from crossvit_edge.bundle import open_bundle

    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    mutate(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=expect.replace("[", r"\[")) as e:
        open_bundle(bundle)
    assert "\n" not in str(e.value)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    r = run_cli("crossvit_edge.debug", bundle, "--data", images, "--output", tmp_path / "out", micro=True)
    _one_line(r, expect.split(": ")[-1])
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b", "images"]


def test_plan_accepts_extra_scalar_fields_per_layer(tmp_path, int8_bundle):
    """A later build may record more per layer (an estimator's name, a score): scalars are fine."""
    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.calibration.plan import QuantPlan

    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    for layer in m["quantization_plan"]["layers"]:
        layer.update(estimator="percentile", estimator_score=0.5, chosen=True, note=None)
    (bundle / "manifest.json").write_text(json.dumps(m))
    plan = QuantPlan.from_dict(open_bundle(bundle).manifest["quantization_plan"])
    assert len(plan.int8_layers()) > 0


# --------------------------------------------------------------------------------------------------
# Item 1: the device runner's --points, a device's intermediates .npz


@pytest.mark.parametrize("content", ["[1, 2]", '"points"', "null", '{"format": "crossvit_edge tensorrt points", "located": []}',
                                     '{"format": "crossvit_edge tensorrt points", "located": {"a": {"tensor": 3}}}',
                                     '{"format": "crossvit_edge tensorrt points", "located": {"a": {"tensor": "t", "quant": {"scale": -1}}}}'])
def test_points_file_of_any_json_is_one_line(tmp_path, content):
    """A points file that is a JSON list, string or null: before, AttributeError."""
    from crossvit_edge.converters.tensorrt.device import read_points_file

    path = tmp_path / "points.json"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        read_points_file(path)
    assert "\n" not in str(e.value) and "--points" in str(e.value)


def _merge_inputs(tmp_path: Path, members: dict, rows: int = 2):
    """An image folder, a results file of ``rows`` images with one intermediates point, and the
    intermediates file made of ``members`` (name -> .npy bytes), its size and sha256 recorded."""
    import hashlib

    from crossvit_edge.data import open_image_set

    images = open_image_set(make_image_folder(tmp_path / "images", classes=2, per_class=rows // 2))
    npz = tmp_path / "results.intermediates.npz"
    if not npz.exists():
        with zipfile.ZipFile(npz, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    results = {"images": [p.relative_to(images.root).as_posix() for p in images.paths], "logits": [[0.0] * 10] * len(images),
               "intermediates": {"file": npz.name, "bytes": npz.stat().st_size, "sha256": hashlib.sha256(npz.read_bytes()).hexdigest(),
                                 "points": {"blocks.0": {"tensor": "t0", "quant": None, "note": "", "status": "marked", "array": "p0"}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    return tmp_path / "results.json", images


@pytest.mark.parametrize("header, data, expect", [
    (_npy_header("<f4", ()), bytes(4), "of shape '()'"),  # a 0-d array: before, IndexError
    (_npy_header("<f4", (3, 4)), bytes(48), "with 2 rows"),  # rows that are not the images
    (_npy_header("|O", (2,)), bytes(16), "numeric array"),  # objects (would need pickle)
    (_npy_header("|V2000000000", (2,)), bytes(8), "numeric array"),  # a 2 GB item
    (_npy_header("<f4", (2, 1000)), bytes(80), "does not match its header"),  # a header that claims more
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}   \n", b"", "unreadable array"),  # a bad header
])
def test_merge_intermediates_checked_by_header(tmp_path, header, data, expect):
    from crossvit_edge.debug import load_device_values

    results, images = _merge_inputs(tmp_path, {"p0.npy": header + data})
    with pytest.raises(UserError, match=expect.replace("(", r"\(").replace(")", r"\)")) as e:
        load_device_values(results, images, 10)
    assert "\n" not in str(e.value)


def test_merge_intermediates_deflate_bomb_is_refused_before_inflating(tmp_path):
    """A member of 3 GB of zeros, deflated to a few MB: refused from the zip directory; peak memory
    stays where it was (before, it grew past 3 GiB)."""
    header = _npy_header("<f4", (2, 750_000_000))
    bomb = _deflate_bomb(tmp_path / "results.intermediates.npz", {}, "p0.npy", header, 3_000_000_000)
    results, _ = _merge_inputs(tmp_path, {})
    assert bomb.stat().st_size < 16 << 20
    rc, err, grew, seconds = growth(tmp_path, "from crossvit_edge.debug import load_device_values\nfrom crossvit_edge.data import open_image_set\n",
                                    "load_device_values(sys.argv[1], open_image_set(sys.argv[2]), 10)", results, tmp_path / "images")
    assert rc == 0, err
    assert "inflate to" in err and err.count("\n") == 1, err
    assert grew < 64 << 20, f"peak memory grew by {grew >> 20} MiB"


def test_merge_refuses_intermediates_of_another_run(tmp_path):
    """A results file and an intermediates file that are not of the same run (one killed between
    its two writes, or a file swapped in): refused by the recorded sha256, before reading."""
    from crossvit_edge.debug import load_device_values

    results, images = _merge_inputs(tmp_path, {"p0.npy": _npy_header("<f4", (2, 3)) + bytes(24)})
    values = load_device_values(results, images, 10)
    assert values["values"]["blocks.0"].shape == (2, 3)
    npz = tmp_path / "results.intermediates.npz"
    with zipfile.ZipFile(npz, "w") as z:
        z.writestr("p0.npy", _npy_header("<f4", (2, 3)) + np.ones(6, np.float32).tobytes())
    with pytest.raises(UserError, match="not the file this results file was written with"):
        load_device_values(results, images, 10)


# --------------------------------------------------------------------------------------------------
# Item 1: --adopt-engine bounded by size before hashing; the manifest rewritten only when it verifies


def test_adopt_engine_sparse_file_is_refused_by_its_size(tmp_path, base_bundle):
    """A 9 GiB sparse engine: before, hashed for many seconds and then listed, which made the
    manifest list more than MAX_BUNDLE_BYTES (no tool opened it again). Now refused by its size at
    once, the manifest unchanged, the bundle still opens."""
    from crossvit_edge.bundle import MAX_BUNDLE_BYTES, open_bundle
    from crossvit_edge.converters.tensorrt.device import _refresh_listed_files

    bundle = tmp_path / "b"
    shutil.copytree(base_bundle, bundle)
    before = (bundle / "manifest.json").read_bytes()
    engine = sparse(bundle / "model.engine", MAX_BUNDLE_BYTES + (1 << 30))
    manifest = open_bundle(bundle).manifest
    t = time.time()
    with pytest.raises(UserError, match="more than the 8 GiB") as e:
        _refresh_listed_files(bundle, manifest, [engine])
    assert time.time() - t < 5 and "\n" not in str(e.value)
    assert (bundle / "manifest.json").read_bytes() == before
    open_bundle(bundle)


# --------------------------------------------------------------------------------------------------
# Item 6: a non-finite artifact is a failed check


@pytest.fixture(scope="module")
def overflowing_checkpoint(tmp_path_factory, micro_model_registered) -> Path:
    """The micro model with head biases of 1e5: finite in fp32, past fp16's 65504 (inf) in fp16."""
    import torch

    from crossvit_edge.checkpoint import save_checkpoint
    from crossvit_edge.crossvit import CrossViT

    torch.manual_seed(0)
    state = CrossViT(micro_configs()[MICRO_MODEL]).state_dict()
    for key in state:
        if key.startswith("head.") and key.endswith("bias"):
            state[key] = torch.full_like(state[key], 1e5)
    path = tmp_path_factory.mktemp("overflow") / "overflow.safetensors"
    save_checkpoint(state, path, {"model": MICRO_MODEL})
    return path


def test_fp16_non_finite_logits_are_a_failed_check(tmp_path, overflowing_checkpoint):
    """Before: exit 2 'refusing to write a non-finite number' after the whole conversion, no bundle.
    Now: the warning, the bundle kept (passed: false, the count of non-finite images), exit 0; with
    --fail-on-check exit 3 and the bundle kept."""
    from crossvit_edge.bundle import open_bundle

    argv = ["crossvit_edge.convert", "--target", "onnx", "--precision", "fp16", "--checkpoint", overflowing_checkpoint]
    r = run_cli(*argv, "--output", tmp_path / "b", micro=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "check FAILED" in r.stderr and "non-finite logits" in r.stderr and "crossvit_edge.debug" in r.stderr
    check = open_bundle(tmp_path / "b").manifest["accuracy_check"]
    assert check["passed"] is False and check["non_finite_images"] == check["images"] == 8
    r = run_cli(*argv, "--output", tmp_path / "c", "--fail-on-check", micro=True)
    assert r.returncode == 3, r.stderr[-3000:]
    assert open_bundle(tmp_path / "c").manifest["accuracy_check"]["passed"] is False


# --------------------------------------------------------------------------------------------------
# Item 5: outputs whole or absent; a previous run's files never beside a new report


def test_debug_output_is_replaced_as_a_whole(tmp_path, int8_bundle):
    """A previous debug output with a float_layers.txt (another bundle's layers): the new report
    replaces the folder, so no stale file names layers the report does not; a folder holding
    someone else's file is refused before any work, and a refused debug leaves no --output."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "float_layers.txt").write_text("# from another bundle\nblocks.9.nothing\n")
    (out / "layerwise.md").write_text("old\n")
    r = run_cli("crossvit_edge.debug", int8_bundle, "--data", images, "--output", out, "--samples", 2, micro=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "layerwise.json").read_text())
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["layerwise.json", "layerwise.md", "layerwise.png"] + (["float_layers.txt"] if report["float_layers"] else []))
    if report["float_layers"]:
        assert "blocks.9.nothing" not in (out / "float_layers.txt").read_text()
    assert (out / "layerwise.md").read_text() != "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no staging folder left
    (out / "notes.txt").write_text("mine")
    r = run_cli("crossvit_edge.debug", int8_bundle, "--data", images, "--output", out, micro=True)
    _one_line(r, "which crossvit_edge.debug did not write")
    assert (out / "notes.txt").read_text() == "mine"
    r = run_cli("crossvit_edge.debug", int8_bundle, "--data", images, "--output", tmp_path / "new", "--samples", 0, micro=True)
    _one_line(r, "--samples")
    r = run_cli("crossvit_edge.debug", int8_bundle, "--data", tmp_path / "nothing", "--output", tmp_path / "new", micro=True)
    assert r.returncode == 2 and not (tmp_path / "new").exists()


def _kill_at(argv, delay: float, cwd: Path) -> int:
    proc = subprocess.Popen([sys.executable, str(MICRO_CLI), *map(str, argv)], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _kill_until_done(argv, cwd: Path, whole: float, check) -> int:
    """Run ``argv`` again and again, SIGKILLed after whole/6, 2 whole/6, ... seconds, until a run
    completes (the machine may be slower or faster than when ``whole`` was measured); ``check()``
    after each. Returns how many runs were killed."""
    killed, step = 0, max(whole / 6, 0.3)
    for k in range(1, 60):
        rc = _kill_at(argv, step * k, cwd)
        check()
        if rc != -signal.SIGKILL:
            assert rc == 0
            return killed
        killed += 1
    raise AssertionError("the command never completed")


def test_convert_killed_at_any_moment_leaves_nothing_or_a_bundle(tmp_path, micro_checkpoint):
    """SIGKILL (no handler runs) at moments all through a conversion over a previous bundle: the
    output is always either the previous bundle or the new one, each verifying; the rerun into the
    same --output works and removes what the killed processes left beside it."""
    from crossvit_edge.bundle import open_bundle

    out = tmp_path / "b"
    argv = ["crossvit_edge.convert", "--target", "onnx", "--checkpoint", micro_checkpoint, "--output", out, "--overwrite"]
    t = time.time()
    assert _kill_at(argv, 600, tmp_path) == 0
    whole = time.time() - t
    first = open_bundle(out).manifest["files"]
    killed = _kill_until_done(argv, tmp_path, whole, lambda: open_bundle(out).manifest["files"].keys() == first.keys() or
                              pytest.fail("not a whole bundle"))
    assert killed >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the last run removed the killed runs' staging folders
    open_bundle(out)


def test_profile_killed_at_any_moment_leaves_one_runs_report(tmp_path, base_bundle):
    """SIGKILL all through a profile over a previous report: report.json, .md and .png are always
    all of one run (the previous or the new: all replaced or none), never a mix; the rerun works."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    out = tmp_path / "report"
    argv = ["crossvit_edge.profile", base_bundle, "--data", images, "--output", out, "--runs", 1, "--warmup", 0]
    t = time.time()
    assert _kill_at(argv, 600, tmp_path) == 0
    whole = time.time() - t
    names = ("report.json", "report.md", "report.png")
    seen = [{n: (out / n).stat().st_ino for n in names}]

    def check():
        now = {n: (out / n).stat().st_ino for n in names}
        assert all(now[n] == seen[-1][n] for n in names) or all(now[n] != seen[-1][n] for n in names), (seen[-1], now)
        json.loads((out / "report.json").read_text())
        seen.append(now)

    assert _kill_until_done(argv, tmp_path, whole, check) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "report"]


# --------------------------------------------------------------------------------------------------
# Item 7: library noise never reaches the one line


def test_calibration_sample_refused_before_torch_in_one_line(tmp_path, int8_bundle):
    """debug with a --calib-data whose sample is not the bundle's: refused before the checkpoint,
    torch and the runtime load (the sample is checked first), in exactly one stderr line."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=5)
    code = ("import sys\nfrom crossvit_edge.debug import main\nrc = main(sys.argv[1:])\n"
            "print('torch' in sys.modules)\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, str(int8_bundle), "--data", str(images), "--calib-data", str(images),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    _one_line(r, "is not the one the bundle was calibrated on")
    assert r.stdout.strip().splitlines()[-1] == "False"
