"""The package as users install it: the sdist and wheel `python -m build` makes, checked by twine,
installed into a fresh venv with only the ``[onnx]`` extra (no torch), and used from a folder
outside the repository: the classify command (module and console script), the runtime API, and the
torch-free Jetson runner's entry point. One import name in site-packages: ``crossvit_edge``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, build_bundle, make_micro_checkpoint

# what a copy of the checkout leaves out: local builds, venvs and run outputs are not sources
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "demo_data", "*.egg-info",
                                      "__pycache__", ".pytest_cache", "out")


def _run(cmd, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """A clean copy of the sources (links kept as links, as git has them)."""
    src = tmp_path_factory.mktemp("wheel") / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_NOT_SOURCES)
    return src


@pytest.fixture(scope="module")
def dist(source_copy) -> Path:
    """sdist and wheel, as `python -m build` makes them (the wheel is built from the sdist)."""
    out = source_copy.parent / "dist"
    r = _run([sys.executable, "-m", "build", "--outdir", out, source_copy], cwd=source_copy.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob("crossvit_edge-*.whl")
    return wheel


def test_twine_accepts_the_sdist_and_the_wheel(dist):
    files = sorted(dist.iterdir())
    assert {f.suffix for f in files} == {".whl", ".gz"}, files
    r = _run([sys.executable, "-m", "twine", "check", "--strict", *files], cwd=dist)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("PASSED") == 2, r.stdout


def test_the_wheel_has_one_top_level_name_and_its_data(dist):
    names = zipfile.ZipFile(_wheel(dist)).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"crossvit_edge"}, top
    # the top-level folders of the checkout, inside the one package
    for module in ("converters/base.py", "converters/tensorrt/device.py", "calibration/plan.py", "profiles/__init__.py"):
        assert f"crossvit_edge/{module}" in names, module
    shipped_profiles = {Path(n).name for n in names if n.startswith("crossvit_edge/profiles/") and n.endswith(".yaml")}
    assert shipped_profiles == {p.name for p in (REPO / "profiles").glob("*.yaml")}
    from crossvit_edge.spec import DEMO_CHECKPOINT

    weights = f"crossvit_edge/weights/{DEMO_CHECKPOINT.name}"
    assert weights in names
    assert zipfile.ZipFile(_wheel(dist)).getinfo(weights).file_size == DEMO_CHECKPOINT.stat().st_size
    assert not any("/tests/" in n or n.startswith("tests/") for n in names)


@pytest.fixture(scope="module")
def onnx_venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and its ``[onnx]`` extra only."""
    venv = tmp_path_factory.mktemp("venv") / "onnx"
    r = _run([sys.executable, "-m", "venv", venv], cwd=venv.parent)
    assert r.returncode == 0, r.stderr
    r = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", f"{_wheel(dist)}[onnx]"], cwd=venv.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def labelled_checkpoint(tmp_path_factory, micro_model_registered) -> Path:
    """The micro model with the digits folders' names as its labels (so the bundle carries labels)."""
    labels = [str(i) for i in range(10)]
    return make_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro.safetensors", labels=json.dumps(labels))


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, labelled_checkpoint, digits_dir) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / "onnx-fp32", labelled_checkpoint, digits_dir, "onnx", "fp32")


def test_the_installed_package_adds_one_import_name_and_no_torch(onnx_venv):
    py = onnx_venv / "bin" / "python"
    code = ("import importlib.metadata as m, json, sys\n"
            "top = m.distribution('crossvit-edge').read_text('top_level.txt')\n"
            "files = m.files('crossvit-edge')\n"
            "roots = sorted({f.parts[0] for f in files if f.parts[0] != '..' and not f.parts[0].endswith('.dist-info')})\n"
            "import importlib.util as u\n"
            "print(json.dumps({'roots': roots, 'torch': u.find_spec('torch') is not None,"
            " 'converters': u.find_spec('converters') is not None, 'calibration': u.find_spec('calibration') is not None}))\n")
    r = _run([py, "-P", "-c", code], cwd=onnx_venv)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    # only the package (console scripts live in ../../bin, outside site-packages)
    assert found["roots"] == ["crossvit_edge"], found
    assert not found["torch"] and not found["converters"] and not found["calibration"], found


def _reference(checkpoint: Path, bundle: Path, image: Path) -> np.ndarray:
    """The fp32 PyTorch model's probabilities for one image, preprocessed as the bundle says."""
    import torch

    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.preprocess import Preprocessing

    b = open_bundle(bundle)
    model = load_checkpoint(checkpoint).model.eval()
    pre = Preprocessing.from_dict(b.manifest["preprocessing"])
    with torch.no_grad():
        logits = model(torch.from_numpy(pre(image)[None])).double()
    return torch.softmax(logits, 1)[0].numpy()


def test_classify_and_the_runtime_api_from_outside_the_repository(onnx_venv, onnx_bundle, labelled_checkpoint, digits_dir, tmp_path):
    image = sorted((digits_dir / "val" / "3").iterdir())[0]
    probs = _reference(labelled_checkpoint, onnx_bundle, image)
    labels = json.loads((onnx_bundle / "manifest.json").read_text())["labels"]
    best = int(probs.argmax())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_ = onnx_venv / "bin"

    # the console script and `python -P -m`: same output, the fp32 model's top-1 and probability
    script = _run([bin_ / "crossvit-edge-classify", onnx_bundle, image], cwd=elsewhere)
    module = _run([bin_ / "python", "-P", "-m", "crossvit_edge.classify", onnx_bundle, image], cwd=elsewhere)
    for r in (script, module):
        assert r.returncode == 0, r.stderr
        path, label, p = r.stdout.rstrip("\n").split("\t")
        assert label == labels[best] and abs(float(p) - probs[best]) < 1e-4, (r.stdout, probs[best])
    assert script.stdout == module.stdout

    code = ("import sys, json\n"
            "from crossvit_edge.runtime import load\n"
            "m = load(sys.argv[1])\n"
            "out = m.classify([sys.argv[2]], top_k=3)\n"
            "print(json.dumps({'top': out[0], 'torch': 'torch' in sys.modules, 'file': __import__('crossvit_edge').__file__}))\n")
    r = _run([bin_ / "python", "-P", "-c", code, onnx_bundle, image], cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert not got["torch"] and str(onnx_venv) in got["file"], got
    order = np.argsort(-probs)[:3]
    assert [label for label, _ in got["top"]] == [labels[i] for i in order]
    np.testing.assert_allclose([p for _, p in got["top"]], probs[order], atol=1e-4)


def test_the_jetson_entry_points_start_without_torch(onnx_venv, micro_checkpoint, digits_dir, tmp_path):
    """The device runner is there after a torch-free install (module and console script); on a
    TensorRT bundle, without TensorRT, it says so in one line (exit 2) and writes nothing."""
    from crossvit_edge.device_profiles import load_profile
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec

    bundle = tmp_path / "tensorrt-fp32"
    convert(BuildSpec(target="tensorrt", output=bundle, precision="fp32", checkpoint=str(micro_checkpoint),
                      profile=load_profile("jetson-orin-nano-jp6"), eval_data=digits_dir / "val", eval_samples=4))
    bin_ = onnx_venv / "bin"
    for cmd in ([bin_ / "crossvit-edge-device", "--help"],
                [bin_ / "python", "-P", "-m", "crossvit_edge.converters.tensorrt.device", "--help"]):
        r = _run(cmd, cwd=tmp_path)
        assert r.returncode == 0 and "--output" in r.stdout, r.stdout + r.stderr
    r = _run([bin_ / "crossvit-edge-device", bundle, "--data", digits_dir / "val", "--output", tmp_path / "r.json"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tensorrt" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_bare_checkout_imports_the_same_namespace(onnx_venv, source_copy):
    """Run from a checkout's root (no install of it), `python -m` finds crossvit_edge.converters and
    the profiles through the links, in the checkout itself."""
    code = ("import crossvit_edge.converters.tensorrt.device as d, crossvit_edge.calibration.trt_cache as c\n"
            "from crossvit_edge.device_profiles import list_profiles\n"
            "print(d.__file__); print(c.__file__); print(len(list_profiles()))\n")
    r = _run([onnx_venv / "bin" / "python", "-c", code], cwd=source_copy)
    assert r.returncode == 0, r.stderr
    device, cache, profiles = r.stdout.split()
    assert device.startswith(str(source_copy)) and cache.startswith(str(source_copy)), r.stdout
    assert int(profiles) == len(list((REPO / "profiles").glob("*.yaml")))
