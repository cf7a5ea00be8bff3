"""The app-facing runtime (``crossvit_edge.runtime``) and ``python -m crossvit_edge.classify``: any
number of images through the bundle's static batch in order, the three image kinds, labels, the
same top-1 as the harness's way of running a bundle, a torch-free import and classification in a
subprocess where torch cannot be imported, and one-line refusals of bad input.

Fast tests use the micro model; the slow test is the done-criterion on the demo's four ONNX and
ExecuTorch bundles over the 360 digits val images."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossvit_edge.bundle import open_bundle
from crossvit_edge.data import open_image_set
from crossvit_edge.errors import UserError
from crossvit_edge.metrics import softmax
from crossvit_edge.pipeline import run_batched
from crossvit_edge.runtime import load

from .conftest import REPO, build_bundle, run_cli


def _build(out: Path, checkpoint, digits_dir: Path, target: str = "onnx", precision: str = "fp32", **kw) -> Path:
    return build_bundle(out, checkpoint, digits_dir, target, precision, **kw)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, micro_checkpoint, digits_dir) -> Path:
    """An fp32 ONNX bundle with a static batch of 2, so that odd counts need padding."""
    return _build(tmp_path_factory.mktemp("rt") / "onnx-fp32-b2", micro_checkpoint, digits_dir, batch_size=2)


def _val(digits_dir, n):
    return open_image_set(digits_dir / "val").sample(n, seed=0)


def test_classify_keeps_order_through_the_static_batch(onnx_bundle, digits_dir):
    images = _val(digits_dir, 7)  # 3 full batches of 2 and one padded
    with load(onnx_bundle, threads=2) as model:
        assert model.batch_size == 2
        x = model.preprocess(images.paths)
        assert x.shape == (7, 3, 240, 240) and x.dtype == np.float32
        # each image alone (padded on its own) is the reference for that image's row
        one_by_one = np.concatenate([model.logits(x[i : i + 1]) for i in range(len(x))])
        together = model.logits(x)
        assert together.shape == (7, 10)
        np.testing.assert_allclose(together, one_by_one, atol=1e-5)
        assert model.logits(x[:0]).shape == (0, 10)
        top = model.classify(images.paths, top_k=3)
        assert len(top) == 7 and all(len(t) == 3 for t in top)
        probabilities = softmax(together)
        for row, p in zip(top, probabilities):
            assert [label for label, _ in row] == [str(c) for c in np.argsort(-p, kind="stable")[:3]]
            np.testing.assert_allclose([q for _, q in row], np.sort(p)[::-1][:3], rtol=1e-6)
        reversed_top = model.classify(list(reversed(images.paths)), top_k=3)
        assert [r[0][0] for r in reversed_top] == [r[0][0] for r in reversed(top)]
        assert model.classify(images.paths[0]) == [top[0][:1]]  # one image, not in a list
        assert len(model.classify(images.paths, top_k=100)[0]) == 10  # at most num_classes


def test_paths_pil_images_and_arrays_are_the_same_input(onnx_bundle, digits_dir, tmp_path):
    path = _val(digits_dir, 1).paths[0]
    grey = Image.open(path)
    rgb = grey.convert("RGB")
    rgba = rgb.convert("RGBA")
    rgb.save(tmp_path / "rgb.jpg", quality=100)
    with load(onnx_bundle) as model:
        x = model.preprocess([path, grey, rgb, np.asarray(rgb), np.asarray(grey), np.asarray(grey)[:, :, None], np.asarray(rgba)])
        for i in range(1, len(x)):
            np.testing.assert_array_equal(x[i], x[0])
        # a 4-d uint8 array is a stack of HWC images
        assert model.preprocess(np.stack([np.asarray(rgb)] * 3)).shape == (3, 3, 240, 240)
        assert model.preprocess(tmp_path / "rgb.jpg").shape == (1, 3, 240, 240)


def test_labels_from_the_manifest_or_class_indices(onnx_bundle, tmp_path):
    with load(onnx_bundle) as model:
        assert model.labels == [str(i) for i in range(10)]
    named = tmp_path / "named"
    shutil.copytree(onnx_bundle, named)
    manifest = json.loads((named / "manifest.json").read_text())
    manifest["labels"] = [f"digit {i}" for i in range(10)]
    (named / "manifest.json").write_text(json.dumps(manifest))
    image = np.zeros((32, 32, 3), np.uint8)
    with load(named) as plain, load(open_bundle(onnx_bundle)) as indexed:
        assert plain.labels[3] == "digit 3"
        got, want = plain.classify(image, top_k=2)[0], indexed.classify(image, top_k=2)[0]
        assert [label for label, _ in got] == [f"digit {label}" for label, _ in want]


def test_runtime_top1_equals_the_harness_runner(onnx_bundle, digits_dir):
    """What python -m crossvit_edge.profile scores (the bundle's Runner over the preprocessed
    image set, run_batched) has the same top-1 as classify() on every val image."""
    images = open_image_set(digits_dir / "val")
    bundle = open_bundle(onnx_bundle)
    runner = bundle.runner(threads=2)
    harness = run_batched(runner, images.load(bundle.preprocessing).astype(np.float32)).argmax(1)
    with load(onnx_bundle, threads=2) as model:
        runtime = [int(top[0][0]) for top in model.classify(images.paths)]
    assert runtime == harness.tolist()


def test_bad_input_is_a_user_error(onnx_bundle, digits_dir, tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with load(onnx_bundle) as model:
        for bad in (tmp_path / "missing.png", tmp_path / "text.png", np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8),
                    np.zeros((2, 8000), np.uint8), 42):
            with pytest.raises(UserError):
                model.classify([bad])
        with pytest.raises(UserError):
            model.classify([tmp_path / "missing.png"], top_k=0)
        with pytest.raises(UserError, match="expected preprocessed images"):
            model.logits(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(UserError):
        load(onnx_bundle, threads=0)
    tampered = tmp_path / "tampered"
    shutil.copytree(onnx_bundle, tampered)
    onnx_file = next(tampered.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 1
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(UserError):
        load(tampered)


def test_every_pil_mode_converts_or_is_one_line(onnx_bundle):
    """Every mode Pillow can make (Image.MODES: "La", premultiplied grey + alpha, raised ValueError
    before) reaches the runtime API: preprocessed like its RGB conversion ("La" through "LA", as
    Pillow un-premultiplies "RGBa"), or a one-line UserError; never another exception."""
    from PIL import ImageMode

    rng = np.random.default_rng(0)
    converted = []
    with load(onnx_bundle) as model:
        for mode in sorted(Image.MODES):
            bands = ImageMode.getmode(mode).bands
            size = (37, 29)
            raw = rng.integers(0, 256, size[0] * size[1] * len(bands) * 4, dtype=np.uint8).tobytes()
            if mode in ("F", "I"):  # 32-bit values in a sane range
                image = Image.fromarray(rng.uniform(-20, 300, (size[1], size[0])).astype(np.float32 if mode == "F" else np.int32), mode)
            else:
                image = Image.frombytes(mode, size, raw[: len(Image.new(mode, size).tobytes())])
            try:
                x = model.preprocess([image])
            except UserError as e:
                assert "\n" not in str(e) and "PIL mode" in str(e), (mode, str(e))
                continue
            reference = image.convert("LA") if mode == "La" else image
            expected = model.preprocess([np.asarray(reference.convert("RGB"))])
            assert x.shape == expected.shape and np.array_equal(x, expected), mode
            converted.append(mode)
    assert {"La", "RGBa", "P", "PA", "I;16", "CMYK", "YCbCr", "1", "LA"} <= set(converted), converted


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML predicts on macOS")
def test_coreml_bundle_off_macos_names_the_checker(onnx_bundle, tmp_path):
    coreml = tmp_path / "coreml"
    shutil.copytree(onnx_bundle, coreml)
    manifest = json.loads((coreml / "manifest.json").read_text())
    manifest["target"], manifest["artifact"]["kind"] = "coreml", "mlpackage"
    (coreml / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="macOS only.*checker") as e:
        load(coreml)
    assert "\n" not in str(e.value)


TORCH_FREE = textwrap.dedent("""
    import sys
    # the conversion stack is absent: any import of it fails, as in a `pip install crossvit-edge[onnx]`
    for name in ("torch", "torchvision", "yaml", "onnx", "onnxscript", "safetensors", "matplotlib", "sklearn", "timm", "executorch", "coremltools"):
        sys.modules[name] = None
    sys.path.insert(0, {repo!r})
    from crossvit_edge.runtime import load
    from crossvit_edge.classify import main
    from crossvit_edge.converters.base import runner_class
    runner_class("engine")  # the TensorRT device runner imports without the conversion stack too (runs on a Jetson)
    model = load({bundle!r}, threads=1)
    print(model.classify([{image!r}], top_k=2))
    sys.exit(main([{bundle!r}, {image!r}]))
""")


def test_runtime_and_classify_need_no_torch_for_onnx_bundles(onnx_bundle, digits_dir):
    image = str(_val(digits_dir, 1).paths[0])
    code = TORCH_FREE.format(repo=str(REPO), bundle=str(onnx_bundle), image=image)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.strip().splitlines()
    with load(onnx_bundle) as model:
        expected = model.classify([image], top_k=2)[0]
    assert first == str([expected])
    assert second == f"{image}\t{expected[0][0]}\t{expected[0][1]:.6f}"


def test_classify_cli(onnx_bundle, digits_dir, tmp_path):
    folder = digits_dir / "val" / "3"
    n = len(list(folder.glob("*.png")))
    done = run_cli("crossvit_edge.classify", onnx_bundle, folder)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == n and all(len(line.split("\t")) == 3 for line in lines)
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in sorted(folder.glob("*.png"))]
    done = run_cli("crossvit_edge.classify", onnx_bundle, folder, "--top-k", "3", "--json", "--threads", "1")
    assert done.returncode == 0, done.stderr
    predictions = json.loads(done.stdout)["predictions"]
    assert len(predictions) == n and all(len(p["top_k"]) == 3 for p in predictions)
    assert [p["top_k"][0]["label"] for p in predictions] == [line.split("\t")[1] for line in lines]
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.png").write_text("no")
    for args in ([tmp_path / "missing"], [tmp_path / "empty"], [tmp_path / "text.png"], [folder, "--top-k", "0"]):
        done = run_cli("crossvit_edge.classify", onnx_bundle, *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
        assert done.stderr.startswith("crossvit_edge.classify: error:")
    done = run_cli("crossvit_edge.classify", tmp_path, folder)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_demo_bundles_classify_like_the_profile_on_the_val_split(demo_checkpoint, digits_dir, tmp_path):
    """The done-criterion: the demo's onnx-fp32, onnx-int8, executorch-fp32 and executorch-int8
    bundles (built as the demo builds them; the ExecuTorch int8 one takes ~6 min here) give the same
    top-1 through load().classify() as the profile's runners on all 360 val images, and the profile
    report's top-1 equals the runtime's."""
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.harness import ProfileSettings, profile_bundles

    pytest.importorskip("executorch")
    images = open_image_set(digits_dir / "val")
    labels = np.asarray(images.labels)
    bundles = [_build(tmp_path / f"{target}-{precision}", demo_checkpoint, digits_dir, target, precision, calib_samples=256, eval_samples=100)
               for target, precision in (("onnx", "fp32"), ("onnx", "int8"), ("executorch", "fp32"), ("executorch", "int8"))]
    model = load_checkpoint(str(demo_checkpoint)).model
    pre = open_bundle(bundles[0]).preprocessing
    report = profile_bundles(bundles, images, pre, model, ProfileSettings(runs=2, warmup=0, threads=2))
    rows = {r["name"]: r for r in report["rows"]}
    for bundle in bundles:
        opened = open_bundle(bundle)
        harness = run_batched(opened.runner(threads=2), images.load(opened.preprocessing).astype(np.float32)).argmax(1)
        with load(bundle, threads=2) as runtime:
            top1 = np.asarray([int(top[0][0]) for top in runtime.classify(images.paths)])
        print(bundle.name, float((top1 == labels).mean()), rows[bundle.name]["accuracy"]["top1"])
        assert (top1 == harness).all(), bundle.name
        assert float((top1 == labels).mean()) == pytest.approx(rows[bundle.name]["accuracy"]["top1"], abs=1e-12), bundle.name


def test_conversion_clis_name_the_missing_extra():
    """Without the conversion stack (a runtime-only install), convert, profile and demo say in one
    line which extra to install."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = sys.modules["yaml"] = None
        sys.path.insert(0, {str(REPO)!r})
        import importlib
        module = importlib.import_module(sys.argv[1])
        sys.exit(module.main(sys.argv[2:]))
    """)
    for module, args in (("crossvit_edge.convert", ["--target", "onnx", "--output", "/tmp/unused-bundle"]),
                         ("crossvit_edge.profile", ["--data", ".", "--output", "/tmp/unused-report"]),
                         ("crossvit_edge.demo", [])):
        done = subprocess.run([sys.executable, "-c", code, module, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (module, done.stderr)
        assert "pip install 'crossvit-edge[convert]'" in lines[0] and "torch" in lines[0] and "pyyaml" in lines[0], lines


# --------------------------------------------------------------------------------------------------
# close(): the runtime's memory goes back, and a closed model refuses work

CLOSE_CYCLES = textwrap.dedent("""
    import gc, json, sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from crossvit_edge.runtime import load

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    image = np.zeros((240, 240, 3), np.uint8)
    kept = []  # an app that keeps its closed models (an attribute, a list of versions) must not keep their runtime
    def cycle(close):
        model = load({bundle!r})
        model.classify([image])
        if close:
            model.close()
        kept.append(model)

    cycle(True)  # the first load pays the runtime's one-time initialisation (libraries, thread pool)
    gc.collect()
    before = rss_mib()
    for _ in range(20):
        cycle(True)
    closed = rss_mib() - before
    for _ in range(5):  # the control: the same loads not closed hold their runtime
        cycle(False)
    print(json.dumps({{"closed_growth_mib": closed, "open_growth_mib": rss_mib() - before - closed}}))
""")


@pytest.fixture(scope="module")
def executorch_bundle(tmp_path_factory, micro_checkpoint, digits_dir) -> Path:
    pytest.importorskip("executorch")
    return _build(tmp_path_factory.mktemp("rt") / "executorch-fp32", micro_checkpoint, digits_dir, target="executorch")


@pytest.mark.skipif(platform.system() != "Linux", reason="reads VmRSS from /proc/self/status")
@pytest.mark.parametrize("kind", ["onnx", "executorch"])
def test_close_gives_the_runtime_memory_back(kind, request):
    """20 load/classify/close cycles, every closed model kept referenced: RSS within 3 MiB of before
    (after one warm-up cycle). On the micro bundles each load holds about 10 MiB (measured: 20 closed
    models held 215 MiB before close() released anything); the 5 loads left open must show it, or
    the measurement could not see a leak."""
    bundle = request.getfixturevalue(f"{kind}_bundle")
    done = subprocess.run([sys.executable, "-c", CLOSE_CYCLES.format(repo=str(REPO), bundle=str(bundle))],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(kind, result)
    assert result["open_growth_mib"] > 5 * 3, result  # the control: unclosed models hold memory
    assert result["closed_growth_mib"] < 3, result


def test_closed_model_refuses_work(onnx_bundle, digits_dir):
    image = str(_val(digits_dir, 1).paths[0])
    with load(onnx_bundle) as model:
        assert not model.closed and model.classify([image])
    assert model.closed and model.runner is None and model.description == "closed"
    for work in (lambda: model.classify([image]), lambda: model.logits(np.zeros((1, 3, 240, 240), np.float32))):
        with pytest.raises(UserError, match=r"model .* is closed: load the bundle again"):
            work()
    model.close()  # closing twice is a no-op
