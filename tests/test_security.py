"""Bundles, profiles, results files and image folders are untrusted input (docs/security.md).

Every hostile input below is crafted in a temporary folder from a real converted bundle. Payloads
only create a marker file. Each case asserts: exit code 2, exactly one line on stderr and no
traceback, the marker does not exist, and nothing was written outside the output. The commands
that open bundles (``profile``, ``classify``, the TensorRT device runner's folder path, which checks
everything before it needs TensorRT) all get the same bundles. Bad input is refused before torch is
imported, so most cases cost a fraction of a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossvit_edge.bundle import file_hashes
from crossvit_edge.errors import UserError

from .conftest import MICRO_CLI, REPO

HAVE_DEVICE_RUNNER = importlib.util.find_spec("crossvit_edge.converters.tensorrt.device") is not None


# --------------------------------------------------------------------------------------------------
# Fixtures: one real bundle, one small image folder


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory, micro_checkpoint) -> Path:
    """A real fp32 ONNX bundle of the micro model, converted once for the module."""
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec

    out = tmp_path_factory.mktemp("base") / "bundle"
    convert(BuildSpec(target="onnx", output=out, checkpoint=str(micro_checkpoint)))
    return out


def write_png(path: Path, size=(32, 32), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_image_folder(root: Path, classes=10, per_class=2) -> Path:
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            write_png(root / str(c) / f"{i}.png", seed=c * 10 + i)
    return root


class Case:
    """A temporary world for one hostile input: ``root`` holds the bundle, images, output and
    marker; ``snapshot`` records every path under it so that new files can be found."""

    def __init__(self, tmp_path: Path, base: Path):
        self.root = tmp_path
        self.bundle = tmp_path / "bundle"
        shutil.copytree(base, self.bundle, symlinks=True)
        self.images = make_image_folder(tmp_path / "images")
        self.output = tmp_path / "out"
        self.marker = tmp_path / "MARKER"
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        (self.bundle / "payload.py").write_text(
            f"open({str(self.marker)!r}, 'w').write('payload ran')\n"
            "class Runner:\n    def __init__(self, *a, **k):\n        open(" + repr(str(self.marker)) + ", 'w').write('runner built')\n"
            "def system(*a):\n    open(" + repr(str(self.marker)) + ", 'w').write('system')\n"
        )
        self.resign()

    @property
    def manifest_path(self) -> Path:
        return self.bundle / "manifest.json"

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, m, resign: bool = True) -> None:
        if resign and isinstance(m, dict):  # an attacker can always make the hashes match
            m["files"] = {rel: {"sha256": d, "bytes": (self.bundle / rel).stat().st_size} for rel, d in file_hashes(self.bundle).items()}
        self.manifest_path.write_text(json.dumps(m))

    def resign(self) -> None:
        self.write_manifest(self.manifest())

    def edit(self, fn, resign: bool = True) -> None:
        m = self.manifest()
        fn(m)
        self.write_manifest(m, resign)

    def snapshot(self) -> set:
        return {p for p in self.root.rglob("*")}

    def run(self, module: str, *args, micro: bool = False) -> subprocess.CompletedProcess:
        return self.run_all([(module, *args)], micro=micro)[0]

    def run_all(self, argvs, micro: bool = False):
        """Run several commands at once (they only read the bundle); CompletedProcess each."""
        # cwd = the bundle: under "python -m" the current folder is on sys.path, so a manifest that
        # could name a module would find payload.py
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = []
        for module, *args in argvs:
            cmd = [sys.executable, str(MICRO_CLI), module] if micro else [sys.executable, "-m", module]
            cmd = [*cmd, *map(str, args)]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.bundle, env=env)))
        results = []
        for cmd, proc in procs:
            out, err = proc.communicate(timeout=600)
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
        return results

    def assert_all_refused(self, expect: str = "") -> None:
        """Every command that opens bundles refuses the bundle as it is now."""
        before = self.snapshot()
        for result in self.run_all([argv for _, argv in commands(self)]):
            self.assert_refused(result, before, expect)

    def assert_refused(self, result: subprocess.CompletedProcess, before: set, expect: str = "") -> str:
        err = result.stderr.strip()
        assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
        assert "Traceback" not in result.stderr and len(err.splitlines()) == 1, result.stderr[-3000:]
        assert not self.marker.exists(), self.marker.read_text()
        assert expect in err, err
        assert len(err) < 1500, len(err)
        new = {p for p in self.snapshot() - before if self.output not in (p, *p.parents)}
        assert not new, sorted(map(str, new))
        return err


def commands(case: Case):
    """Every command that opens a bundle, as (name, argv)."""
    image = next(case.images.rglob("*.png"))
    out = [("profile", ("crossvit_edge.profile", case.bundle, "--data", case.images, "--output", case.output)),
           ("classify", ("crossvit_edge.classify", case.bundle, image))]
    if HAVE_DEVICE_RUNNER:
        out.append(("device", ("crossvit_edge.converters.tensorrt.device", case.bundle, "--data", case.images, "--build", "--output", case.output / "results.json")))
    return out


# --------------------------------------------------------------------------------------------------
# Hostile bundles (issue cases 1-6)


def _set(path, value):
    def fn(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return fn


def _delete(path):
    def fn(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return fn


def _old_format(m):
    del m["schema_version"]
    m["manifest_version"] = 1
    m["artifact"]["runner"] = "payload:Runner"
    del m["artifact"]["kind"]


def _as_tensorrt(**paths):
    def fn(m):
        m["target"] = "tensorrt"
        m["artifact"]["kind"] = "engine"
        m["artifact"]["stand_in"] = {"file": m["artifact"]["file"], "kind": "onnx"}
        m["tensorrt"] = {"onnx": m["artifact"]["file"], "engine": "model.engine", "layer_info": "layers.json",
                         "timing_cache": "timing.cache", **paths}
    return fn


HOSTILE = {
    # 1: nothing in a manifest chooses code
    "runner-names-payload": (_set(("artifact", "runner"), "payload:Runner"), "artifact.runner"),
    "kind-names-payload": (_set(("artifact", "kind"), "payload:Runner"), "artifact.kind"),
    "kind-os-system": (_set(("artifact", "kind"), "os:system"), "artifact.kind"),
    "kind-this": (_set(("artifact", "kind"), "this:X"), "artifact.kind"),
    "stand-in-runner": (_set(("artifact", "stand_in"), {"file": "payload.py", "runner": "payload:Runner"}), "artifact.stand_in.runner"),
    "stand-in-kind-payload": (_set(("artifact", "stand_in"), {"file": "payload.py", "kind": "payload:Runner"}), "artifact.stand_in.kind"),
    "old-format-runner": (_old_format, "schema_version"),
    # 2: device-side paths (the device runner with --build would write there)
    "engine-absolute": (lambda m: _as_tensorrt(engine="/tmp/crossvit_edge_evil.engine")(m), "tensorrt.engine"),
    "layer-info-dotdot": (lambda m: _as_tensorrt(layer_info="../evil.json")(m), "tensorrt.layer_info"),
    "timing-cache-dotdot": (lambda m: _as_tensorrt(timing_cache="sub/../../evil.cache")(m), "tensorrt.timing_cache"),
    # 3: artifact paths
    "artifact-dotdot": (_set(("artifact", "file"), "../outside/model.onnx"), "artifact.file"),
    # 5: malformed manifests
    "manifest-is-a-list": (lambda m: None, "expected a JSON object"),  # replaced below
    "missing-input": (_delete(("input",)), "input: missing"),
    "missing-preprocessing": (_delete(("preprocessing",)), "preprocessing"),
    "missing-kind": (_delete(("artifact", "kind")), "artifact.kind: missing"),
    "batch-0": (_set(("input", "shape", 0), 0), "input.shape[0]"),
    "batch-1e9": (_set(("input", "shape", 0), 10**9), "input.shape[0]"),
    "crop-0": (_set(("preprocessing", "crop_pct"), 0), "preprocessing.crop_pct"),
    "crop-tiny": (_set(("preprocessing", "crop_pct"), 1e-9), "preprocessing.crop_pct"),
    "crop-subnormal": (_set(("preprocessing", "crop_pct"), 1e-320), "preprocessing.crop_pct"),  # size / crop = inf
    "labels-count": (_set(("labels",), ["a", "b", "c"]), "labels"),
    "num-classes-string": (_set(("num_classes",), "10"), "num_classes"),
    "int8-form-unknown": (_set(("onnx",), {"int8_form": "../../evil"}), "onnx.int8_form"),
    # 6: preprocessing that divides by zero
    "std-zero": (_set(("preprocessing", "std"), [0, 0, 0]), "preprocessing.std"),
    "mean-huge": (_set(("preprocessing", "mean"), [1e308, 0, 0]), "preprocessing.mean"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_manifest_refused_by_every_command(tmp_path, base_bundle, name):
    case = Case(tmp_path, base_bundle)
    mutate, expect = HOSTILE[name]
    if name == "manifest-is-a-list":
        case.manifest_path.write_text(json.dumps([case.manifest()]))
    else:
        case.edit(mutate)
    case.assert_all_refused(expect)


def test_artifact_outside_the_bundle(tmp_path, base_bundle):
    """Case 3: an absolute artifact path and a symlink out of the bundle (the outside file is a
    perfectly good ONNX model, and the manifest lists the hashes it would have)."""
    case = Case(tmp_path, base_bundle)
    artifact = case.manifest()["artifact"]["file"]
    outside = shutil.copy(case.bundle / artifact, case.outside / "model.onnx")
    case.edit(_set(("artifact", "file"), str(outside)))
    case.assert_all_refused("absolute path")
    case.edit(_set(("artifact", "file"), artifact))
    (case.bundle / artifact).unlink()
    (case.bundle / artifact).symlink_to(outside)
    case.resign()
    case.assert_all_refused("leads outside the bundle")


def test_tampered_artifact_with_files_emptied(tmp_path, base_bundle):
    """Case 4: the artifact is modified and ``files`` emptied; and (already right) modified with
    ``files`` intact."""
    case = Case(tmp_path, base_bundle)
    artifact = case.bundle / case.manifest()["artifact"]["file"]
    data = bytearray(artifact.read_bytes())
    data[-100] ^= 0xFF
    artifact.write_bytes(bytes(data))
    case.assert_all_refused("modified or corrupt")
    case.edit(_set(("files",), {}), resign=False)
    case.assert_all_refused("not listed in 'files'")


@pytest.mark.parametrize("text,expect", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"a": NaN}', "not valid JSON"),
    ("\xff\xfe{}", "not UTF-8"),
    ("{" + '"a": ' * 3, "not valid JSON"),
])
def test_unparseable_manifest(tmp_path, base_bundle, text, expect):
    """Case 5: a 200k-deep JSON (RecursionError before), NaN, bytes that are not UTF-8, truncation."""
    case = Case(tmp_path, base_bundle)
    case.manifest_path.write_bytes(text.encode("latin-1"))
    case.assert_all_refused(expect)


def test_unmodified_bundle_profiles_with_merge_odd_names_and_non_utf8_file(tmp_path, base_bundle):
    """The control for the cases above (the same world, nothing hostile, exit 0), and what must
    work: a file name that is not UTF-8 (case 13), a bundle folder and a merged results row whose
    names hold '|', a newline and HTML (case 21) stay inside their Markdown cells."""
    case = Case(tmp_path, base_bundle)
    odd = tmp_path / "b|x\n<i>y"
    case.bundle.rename(odd)
    case.bundle = odd
    raw = os.fsencode(case.images / "3") + b"/\xff\xfeimg.png"
    write_png(Path(os.fsdecode(raw)), seed=99)
    from crossvit_edge.data import open_image_set

    names = [p.relative_to(case.images).as_posix() for p in open_image_set(case.images).paths]
    assert any("\udcff" in n for n in names)
    results = {"bundle": "dev|ice\n# <b>h</b>", "target": "tensorrt", "precision": "int8", "runner": "TensorRT | x", "device": "Orin\n|",
               "images": names, "logits": np.random.default_rng(0).standard_normal((len(names), 10)).tolist(),
               "latency": {"runs": 3, "batch_size": 1, "p50_ms": 1.0, "p90_ms": 1.5, "p99_ms": 2.0, "mean_ms": 1.2, "min_ms": 0.9,
                           "throughput_ips": 1000.0}, "engine_bytes": 123, "device_memory_bytes": 456}
    merge = tmp_path / "results.json"
    merge.write_text(json.dumps(results))
    r = case.run("crossvit_edge.profile", case.bundle, "--data", case.images, "--merge", merge, "--output", case.output,
                 "--runs", 2, "--warmup", 0, micro=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not case.marker.exists()
    report = json.loads((case.output / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["fp32 reference", odd.name, results["bundle"]]
    assert report["rows"][1]["accuracy"]["images"] == len(names) == 21
    md = (case.output / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, three rows: no row broken by a newline
    unescaped = [len(line.replace("\\|", "")) - len(line.replace("\\|", "").replace("|", "")) for line in table]
    assert unescaped == [table[0].count("|")] * len(table), table  # every row has the header's columns
    assert "<i>" not in md and "<b>" not in md and "&lt;i&gt;" in md


# --------------------------------------------------------------------------------------------------
# Results files for --merge (cases 7, 8): refused before any profiling work


def _results(case: Case, **changes) -> Path:
    from crossvit_edge.data import open_image_set

    names = [p.relative_to(case.images).as_posix() for p in open_image_set(case.images).paths]
    data = {"bundle": "trt", "images": names, "logits": [[0.5] * 10 for _ in names], "latency": {"p50_ms": 1.0}}
    data.update(changes)
    path = case.root / "results.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize("changes,expect", [
    ({"logits": [[0.5] * 7] * 20}, "7 classes"),
    ({"logits": []}, "logits"),
    ({"logits": None}, "logits: missing"),
    ({"logits": [["0.5"] * 10] * 20}, "logits"),
    ({"logits": [[0.5] * 10] * 19 + [[0.5] * 9]}, "logits"),
    ({"images": []}, "images: empty"),
    ({"images": ["0/0.png"] * 20}, "more than once"),
    ({"images": ["../etc/passwd"] + [f"x{i}.png" for i in range(19)]}, "images[0]"),
    ({"latency": {"p50_ms": "fast"}}, "latency.p50_ms"),
    ({"bundle": "x" * 100_000}, "bundle"),
    ({"logits": "NAN"}, "logits"),
])
def test_bad_results_file_refused_before_profiling(tmp_path, base_bundle, changes, expect):
    case = Case(tmp_path, base_bundle)
    merge = _results(case, **changes)
    before = case.snapshot()
    case.assert_refused(case.run("crossvit_edge.profile", case.bundle, "--data", case.images, "--merge", merge, "--output", case.output), before, expect)
    assert not case.output.exists()  # refused before the output (and any profiling work)


@pytest.mark.parametrize("token,expect", [("NaN", "not valid JSON"), ("Infinity", "not valid JSON"), ("1e999", "NaN or infinite"),
                                          ("1e39", "NaN or infinite")])
def test_non_finite_logits_refused(tmp_path, base_bundle, token, expect):
    case = Case(tmp_path, base_bundle)
    merge = _results(case)
    text = merge.read_text().replace("0.5", token, 1)
    merge.write_text(text)
    case.assert_refused(case.run("crossvit_edge.profile", case.bundle, "--data", case.images, "--merge", merge, "--output", case.output),
                        case.snapshot(), expect)


def test_results_images_must_be_the_profiled_images(tmp_path, base_bundle):
    case = Case(tmp_path, base_bundle)
    merge = _results(case)
    data = json.loads(merge.read_text())
    data["images"][0] = "9/elsewhere.png"
    merge.write_text(json.dumps(data))
    case.assert_refused(case.run("crossvit_edge.profile", case.bundle, "--data", case.images, "--merge", merge, "--output", case.output),
                        case.snapshot(), "not in it")


# --------------------------------------------------------------------------------------------------
# Image folders (cases 9-13)


def _bomb_png(path: Path, side: int = 14000) -> Path:
    """A 1-bit greyscale PNG declaring side x side pixels, all zero: ~24 KB on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_image_folder_limits(tmp_path, base_bundle):
    case = Case(tmp_path, base_bundle)
    argv = ("crossvit_edge.profile", case.bundle, "--data", case.images, "--output", case.output)
    # 9: an empty class folder would shift every later label
    (case.images / "5a").mkdir()
    case.assert_refused(case.run(*argv), case.snapshot(), "holds no images")
    (case.images / "5a").rmdir()
    # 9: the bundle's labels are not the folder's class names
    case.edit(_set(("labels",), ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
    case.assert_refused(case.run(*argv), case.snapshot(), "--ignore-class-names")
    case.edit(_set(("labels",), None))
    # 10: the output inside the images
    inside = ("crossvit_edge.profile", case.bundle, "--data", case.images, "--output", case.images / "report")
    case.assert_refused(case.run(*inside), case.snapshot(), "inside --data")
    # 11: a 1 x 2000 strip (resizing it to the short side would make 274 x 548000 pixels)
    strip = write_png(case.images / "2" / "strip.png", size=(1, 2000))
    assert strip.stat().st_size < 10_000
    t = time.time()
    case.assert_refused(case.run(*argv), case.snapshot(), "aspect ratio")
    assert time.time() - t < 30
    strip.unlink()
    # 12: a decompression bomb
    bomb = _bomb_png(case.images / "4" / "bomb.png")
    assert bomb.stat().st_size < 100_000
    case.assert_refused(case.run(*argv), case.snapshot(), "decompression bomb")


def test_class_names_are_matched_to_labels(tmp_path):
    """A folder of a subset of the classes gets the labels' indices, not its sorted positions."""
    from crossvit_edge.data import open_image_set

    root = tmp_path / "imgs"
    for name in ("seven", "three"):
        (root / name).mkdir(parents=True)
        write_png(root / name / "a.png")
    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    images = open_image_set(root)
    assert images.labels == [0, 1]  # sorted folder order: seven, three
    assert images.with_class_names(labels, 10, "--x").labels == [7, 3]
    with pytest.raises(UserError, match="pass --x"):
        images.with_class_names(labels[:5] + ["x"] * 5, 10, "--x")
    assert images.with_class_names(None, 10, "--x").labels == [0, 1]
    with pytest.raises(UserError, match="2 class folders, but the model has 1"):
        images.with_class_names(None, 1, "--x")


def test_convert_eval_data_matched_to_checkpoint_labels(tmp_path, micro_model_registered):
    """convert --eval-data: folders get the checkpoint's label indices (a subset folder does not
    shift them); a folder name that is no label is refused before any work unless
    --ignore-class-names is given."""
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.pipeline import open_eval_images
    from crossvit_edge.spec import BuildSpec

    from .conftest import make_micro_checkpoint

    labels = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    ckpt_path = make_micro_checkpoint(tmp_path / "labelled.safetensors", labels=json.dumps(labels))
    root = tmp_path / "eval"
    for name in ("seven", "three"):
        (root / name).mkdir(parents=True)
        write_png(root / name / "a.png")
    spec = BuildSpec(target="onnx", output=tmp_path / "out", checkpoint=str(ckpt_path), eval_data=root)
    assert sorted(open_eval_images(spec, load_checkpoint(ckpt_path)).labels) == [3, 7]  # by name, not [0, 1]
    (root / "banana").mkdir()
    write_png(root / "banana" / "a.png")
    r = subprocess.run([sys.executable, str(MICRO_CLI), "crossvit_edge.convert", "--target", "onnx", "--checkpoint", str(ckpt_path),
                        "--eval-data", str(root), "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "banana" in r.stderr and "--ignore-class-names" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    spec.ignore_class_names = True
    assert sorted(open_eval_images(spec, load_checkpoint(ckpt_path)).labels) == [0, 1, 2]


def test_image_limits_in_process(tmp_path):
    from crossvit_edge.preprocess import MAX_IMAGE_PIXELS, Preprocessing, load_image

    for size in ((1, 2000), (51, 1)):
        with pytest.raises(UserError, match="aspect ratio"):
            load_image(write_png(tmp_path / f"{size}.png", size=size))
    ok = load_image(write_png(tmp_path / "ok.png", size=(50, 1)))  # 50:1 is the bound
    assert Preprocessing()(ok).shape == (3, 240, 240)
    with pytest.raises(UserError, match=f"more than the {MAX_IMAGE_PIXELS}"):
        load_image(_bomb_png(tmp_path / "bomb.png", side=9000))
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(_bomb_png(tmp_path / "bomb2.png", side=14000))


# --------------------------------------------------------------------------------------------------
# Flags and profiles (cases 14-19), before any heavy import


LOL = '["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
# 412 bytes of YAML whose value is 9**7 strings (a repr of ~40 MB) through anchors and aliases
BOMB_YAML = ("name: [&a " + LOL + ", " + ", ".join(f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdef", "bcdefg"))
             + "]\ntarget: onnx\n")

PROFILES = {
    "alias-bomb": (BOMB_YAML, "name: expected str, got a list of 7 items"),
    "batch-1e9": ("name: p\ntarget: onnx\nbatch_size: 1000000000\n", "batch_size must be in [1, 4096]"),
    "threads-0": ("name: p\ntarget: onnx\nthreads: 0\n", "threads must be in"),
    "opset-99": ("name: p\ntarget: onnx\nonnx: {opset: 99}\n", "opset must be in [13, 23]"),
    "precision": ("name: p\ntarget: onnx\nprecision: int4\n", "precision must be one of"),
    "deep": ("name: p\ntarget: onnx\nx: " + "[" * 5000 + "]" * 5000 + "\n", "profile"),
    "object-tag": ("name: !!python/object/apply:os.system ['touch MARKER']\ntarget: onnx\n", "not valid YAML"),
    "not-utf8": (b"name: \xff\ntarget: onnx\n", "not UTF-8"),
    "long-key": ("name: p\ntarget: onnx\n? " + "k" * 100_000 + "\n: 1\n", "unknown key"),
    "etdump-runs-0": ("name: p\ntarget: executorch\nexecutorch: {etdump_runs: 0}\n", "executorch.etdump_runs must be in [1, 1000], got 0"),
}

CONVERT_FLAGS = {
    "batch-0": (["--batch-size", "0"], "--batch-size"),
    "batch-huge": (["--batch-size", "100000"], "--batch-size"),
    "eval-samples-0": (["--eval-samples", "0"], "--eval-samples"),
    "opset-5": (["--opset", "5"], "--opset"),
    "opset-99": (["--opset", "99"], "--opset"),
    "max-drop-nan": (["--max-drop", "nan"], "--max-drop"),
    "max-drop-inf": (["--max-drop", "inf"], "--max-drop"),
    "max-drop-negative": (["--max-drop", "-1"], "--max-drop"),
    "smooth-alpha-nan": (["--smooth-alpha", "nan"], "--smooth-alpha"),
    "percentile-nan": (["--calib-percentile", "nan"], "--calib-percentile"),
    "percentile-100": (["--calib-percentile", "100"], "--calib-percentile"),
    "calib-samples-0": (["--calib-samples", "0"], "--calib-samples"),
    "calib-batch-negative": (["--calib-batch-size", "-1"], "--calib-batch-size"),
    "calib-seed-negative": (["--calib-seed", "-1"], "--calib-seed"),
    "bundled-inputs-negative": (["--bundled-inputs", "-5"], "--bundled-inputs"),
    "calib-data-missing": (["--calib-data", "/nonexistent/images"], "--calib-data: image folder not found"),
}

PROFILE_FLAGS = {
    "runs-0": (["--runs", "0"], "runs must be a whole number in [1,"),
    "threads-negative": (["--threads", "-1"], "threads must be a whole number in [1, 1024], got -1"),
    "samples-negative": (["--samples", "-5"], "--samples"),
    "warmup-negative": (["--warmup", "-1"], "warmup"),
    "checker-samples-negative": (["--checker-samples", "-1"], "checker samples"),
    "reference-device": (["--reference-device", "tpu; rm -rf /"], "reference device"),
}


def _quick(tmp_path, module, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.time()
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    r.seconds = time.time() - t
    return r


def _assert_one_line(r, expect):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1 and len(err) < 1500, r.stderr[-2000:]
    assert expect in err, err


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_bad_profile(tmp_path, name):
    text, expect = PROFILES[name]
    path = tmp_path / "p.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--profile", path, "--output", tmp_path / "b")
    _assert_one_line(r, expect)
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", sorted(CONVERT_FLAGS))
def test_bad_convert_flag(tmp_path, name):
    flags, expect = CONVERT_FLAGS[name]
    r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--output", tmp_path / "b", *flags)
    _assert_one_line(r, expect)
    assert r.seconds < 20, "refused only after heavy imports"
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("name", sorted(PROFILE_FLAGS))
def test_bad_profile_flag(tmp_path, base_bundle, name):
    flags, expect = PROFILE_FLAGS[name]
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    r = _quick(tmp_path, "crossvit_edge.profile", base_bundle, "--data", images, "--output", tmp_path / "out", *flags)
    _assert_one_line(r, expect)
    assert not (tmp_path / "out").exists()


def test_output_paths(tmp_path, base_bundle):
    """Cases 10 and 19: outputs inside the image folders, under /proc, under a file."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for output, expect in [(images / "b", "inside --eval-data"), ("/proc/crossvit_edge_test/b", "cannot write in"),
                           (a_file / "b", "is a file, not a folder")]:
        r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--eval-data", images, "--output", output)
        _assert_one_line(r, expect)
    r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--calib-data", images, "--precision", "int8", "--output", images / "2" / "b")
    _assert_one_line(r, "inside --calib-data")
    r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--calib-data", images / "0", "--precision", "int8", "--output", images,
               "--overwrite")
    _assert_one_line(r, "inside --output")
    for output, expect in [("/proc/crossvit_edge_test/report", "cannot create it"), (a_file / "report", "cannot create it")]:
        r = _quick(tmp_path, "crossvit_edge.profile", base_bundle, "--data", images, "--output", output)
        _assert_one_line(r, expect)
    assert a_file.read_text() == "x"


def test_overwrite_replaces_an_existing_file(tmp_path):
    """Case 18: --overwrite with --output an existing file is allowed (and replaces it);
    without --overwrite it is refused."""
    from crossvit_edge.bundle import staged_bundle
    from crossvit_edge.spec import BuildSpec

    out = tmp_path / "taken"
    out.write_text("old")
    with pytest.raises(UserError, match="pass --overwrite"):
        BuildSpec(target="onnx", output=out).validate()
    BuildSpec(target="onnx", output=out, overwrite=True).validate()
    with staged_bundle(out, overwrite=True) as stage:
        (stage / "new").write_text("new")
    assert (out / "new").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGQUIT"])
def test_sigterm_during_conversion_cleans_up(tmp_path, micro_checkpoint, signame):
    """Case 20: SIGTERM is handled like Ctrl-C: the staging folder is removed, exit code 143; and
    so are SIGHUP (129) and SIGQUIT (131, no core dump): 128 + the signal, one line."""
    signum = getattr(signal, signame)
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(MICRO_CLI), "crossvit_edge.convert", "--target", "onnx", "--checkpoint", str(micro_checkpoint),
                             "--output", str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".b.staging-*")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None and list(tmp_path.glob(".b.staging-*")), "the conversion never reached its staging folder"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and f"terminated ({signame})" in err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# No module named by data is ever imported


def test_runner_registry_is_fixed_code():
    """The only imports of runner modules go through ``crossvit_edge.converters.RUNNERS`` (a literal table)."""
    from crossvit_edge import converters
    from crossvit_edge.converters.base import runner_class

    assert set(converters.RUNNERS) == {"onnx", "pte", "mlpackage", "engine", "aimodel"}
    assert all(v.startswith("crossvit_edge.converters.") for v in converters.RUNNERS.values())
    assert runner_class("onnx").__name__ == "OnnxRuntimeRunner"
    for bad in ("payload:Runner", "os:system", "crossvit_edge.converters.onnx:OnnxRuntimeRunner", "converters.onnx:OnnxRuntimeRunner", None, ["onnx"]):
        with pytest.raises(UserError, match="unknown artifact kind"):
            runner_class(bad)
    import crossvit_edge.converters.base

    assert not hasattr(crossvit_edge.converters.base, "load_runner_class")
