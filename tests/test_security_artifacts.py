"""Untrusted inputs, second round (issue 20, items 1-4): what an image or an artifact makes us run
or open, whether the artifact is what the manifest says, and what kills the process.

Hostile inputs are crafted from real converted bundles with hashes that match (an author who
writes correct hashes). Each case asserts one stderr line, exit code 2, no traceback, no marker
and no new file outside the output (``test_security.Case``). An external program would show as
the marker a fake ``gs`` first on PATH writes. A file outside the bundle is a perfectly good copy
of what the artifact needs: had it been read, the command would have succeeded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossvit_edge.errors import UserError

from .conftest import REPO, tiny_onnx
from .test_security import Case, _set, base_bundle, commands, write_png  # noqa: F401  (base_bundle: a fixture)

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"


def _fake_gs(root: Path, marker: Path) -> dict:
    """An environment whose PATH starts with a ``gs`` that only records that it ran."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"gs $*\" >> {marker}\nexit 0\n")
    gs.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def _one_line(r: subprocess.CompletedProcess, expect: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1 and len(err) < 1500, r.stderr[-3000:]
    assert expect in err, err
    return err


# --------------------------------------------------------------------------------------------------
# 1. Images: an allowlist of decoders chosen by content, bounded in bytes


def test_eps_named_png_never_starts_ghostscript(tmp_path, base_bundle):
    """A file named x.png whose content is EPS: before, PIL's EPS plugin ran ``gs`` on it (the fake
    gs below proves it would be found). Every command that reads images refuses it in one line and
    no external program starts: classify, profile (the image folder), the device runner's folder
    path, and the runtime API (a path, the bytes, a lazily opened PIL image)."""
    case = Case(tmp_path, base_bundle)
    env = _fake_gs(tmp_path, case.marker)
    eps = case.images / "3" / "x.png"
    eps.write_bytes(EPS)
    argvs = [("crossvit_edge.profile", case.bundle, "--data", case.images, "--output", case.output),
             ("crossvit_edge.classify", case.bundle, eps), ("crossvit_edge.classify", case.bundle, case.images)]
    # the device runner reads its folder after open_bundle: a TensorRT view of the same bundle
    trt = tmp_path / "trt"
    shutil.copytree(case.bundle, trt)
    m = json.loads((trt / "manifest.json").read_text())
    m.update(target="tensorrt", tensorrt={"onnx": m["artifact"]["file"], "engine": "model.engine"})
    m["artifact"]["kind"] = "engine"
    (trt / "manifest.json").write_text(json.dumps(m))
    argvs.append(("crossvit_edge.converters.tensorrt.device", trt, "--data", case.images, "--output", case.output / "r.json"))
    procs = [subprocess.Popen([sys.executable, "-m", *map(str, a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path) for a in argvs]
    for a, p in zip(argvs, procs):
        out, err = p.communicate(timeout=600)
        _one_line(subprocess.CompletedProcess(a, p.returncode, out, err), "its content is EPS, which this tool does not decode")
    assert not case.marker.exists(), case.marker.read_text()

    from crossvit_edge.data import open_image_set
    from crossvit_edge.preprocess import load_image
    from crossvit_edge.runtime import load

    with pytest.raises(UserError, match="its content is EPS"):
        open_image_set(case.images)
    with pytest.raises(UserError, match="its content is EPS"):
        load_image(eps)
    with load(case.bundle, isolate=False) as model:
        with pytest.raises(UserError, match="its content is EPS"):
            model.classify(eps.read_bytes())
        lazy = Image.open(eps)  # the app's own Image.open, not yet decoded
        assert lazy.format == "EPS"
        with pytest.raises(UserError, match="format 'EPS' not yet decoded"):
            model.classify(lazy)
    assert not case.marker.exists()


@pytest.mark.parametrize("content,expect", [
    (b"DDS |" + b"\x00" * 124, "its content is DDS"),
    (b"8BPS\x00\x01" + b"\x00" * 40, "its content is PSD"),
])
def test_other_formats_refused_by_content(tmp_path, content, expect):
    from crossvit_edge.preprocess import load_image

    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expect):
        load_image(path)


def test_allowlisted_formats_decode_by_content_whatever_the_name(tmp_path):
    """PNG, JPEG, BMP, GIF (first frame), TIFF, WebP, PGM: decoded by their content, not the name."""
    from crossvit_edge.preprocess import IMAGE_FORMATS, load_image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM"):
        path = tmp_path / f"{fmt}.png"  # every one named .png
        Image.fromarray(rgb).save(path, format=fmt)
        im = load_image(path)
        assert im.size == (24, 20) and fmt in IMAGE_FORMATS
        if fmt in ("PNG", "BMP", "TIFF", "PPM"):  # lossless
            assert np.array_equal(np.asarray(im.convert("RGB")), rgb)
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(tmp_path / "anim.gif").convert("L")).max() < 50  # the first frame


def test_image_files_are_bounded_in_bytes(tmp_path):
    """An 8 x 8 PNG followed by a sparse tail past the byte bound: before, the image-set hash read
    all of it. Refused by its size, before any read (so in well under a second), everywhere an
    image file is read; a FIFO named .png never blocks."""
    import time

    from crossvit_edge.data import ImageSet, open_image_set
    from crossvit_edge.preprocess import MAX_IMAGE_BYTES, load_image

    folder = tmp_path / "imgs"
    folder.mkdir()
    big = write_png(folder / "big.png", size=(8, 8))
    with open(big, "r+b") as f:
        f.truncate((MAX_IMAGE_BYTES + 1) * 16)  # 4 GiB on paper, a few bytes on disk
    t = time.time()
    with pytest.raises(UserError, match=f"more than the {MAX_IMAGE_BYTES}"):
        load_image(big)
    with pytest.raises(UserError, match=f"more than the {MAX_IMAGE_BYTES}"):
        open_image_set(folder)
    with pytest.raises(UserError, match=f"more than the {MAX_IMAGE_BYTES}"):
        ImageSet(root=folder, paths=[big]).sha256()  # the hash, too, without the decodable check
    assert time.time() - t < 5
    os.mkfifo(folder / "fifo.png")
    with pytest.raises(UserError, match="FIFO"):
        load_image(folder / "fifo.png")


# --------------------------------------------------------------------------------------------------
# 2. Every file an artifact loads is listed, verified and inside the bundle: ONNX external data


def _external_bundle(case: Case) -> Path:
    """The bundle's ONNX rewritten with its weights as external data in weights.bin beside it,
    the manifest re-signed (an author can always make the hashes match)."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    rel = case.bundle / case.manifest()["artifact"]["file"]
    model = onnx.load(str(rel))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    onnx.save(model, str(rel))
    case.resign()
    return rel


def _set_location(model, location: str):
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    return model


def test_onnx_external_data_listed_and_inside(tmp_path, base_bundle):
    """The control first (weights in a listed weights.bin: the bundle runs); then the same model
    with weights.bin left out of 'files' (it could be swapped while the bundle opens as verified),
    a symlinked weights file, and offsets past the file's end: refused by every command."""
    case = Case(tmp_path, base_bundle)
    _external_bundle(case)
    assert "weights.bin" in case.manifest()["files"]
    r = case.run("crossvit_edge.classify", case.bundle, next(case.images.rglob("*.png")))
    assert r.returncode == 0, r.stderr[-2000:]
    # unlisted: every other file re-signed, weights.bin not
    case.edit(lambda m: m["files"].pop("weights.bin"), resign=False)
    case.assert_all_refused("weights.bin' is not listed in the manifest's 'files'")
    # a symlink inside the bundle to a listed copy (ONNX Runtime follows symlinks)
    case.resign()
    (case.bundle / "real.bin").write_bytes((case.bundle / "weights.bin").read_bytes())
    (case.bundle / "weights.bin").unlink()
    (case.bundle / "weights.bin").symlink_to("real.bin")
    m = case.manifest()
    m["files"]["weights.bin"] = m["files"]["real.bin"] = {"sha256": hashlib.sha256((case.bundle / "real.bin").read_bytes()).hexdigest(),
                                                          "bytes": (case.bundle / "real.bin").stat().st_size}
    case.write_manifest(m, resign=False)
    case.assert_all_refused("goes through a symlink")


@pytest.mark.parametrize("location,expect", [
    ("../outside/weights.bin", "not a plain relative name"),
    ("sub/../../outside/weights.bin", "not a plain relative name"),
    ("ABSOLUTE", "absolute path"),
    ("./weights.bin", "not a plain relative name"),
])
def test_onnx_external_data_outside_the_bundle(tmp_path, base_bundle, location, expect):
    """External data named by '..' or an absolute path, pointing at a perfectly good copy of the
    weights outside the bundle: refused before ONNX Runtime opens anything (and the outside copy
    is made unreadable-as-weights afterwards, so a read would show as a load error instead)."""
    case = Case(tmp_path, base_bundle)
    outside = case.outside / "weights.bin"
    if location == "ABSOLUTE":
        location = str(outside)
    import onnx

    rel = _external_bundle(case)
    shutil.move(case.bundle / "weights.bin", outside)
    rel.write_bytes(_set_location(onnx.load(str(rel), load_external_data=False), location).SerializeToString())
    case.resign()
    case.assert_all_refused(expect)


def test_onnx_external_data_offsets_and_ort_own_refusal(tmp_path, base_bundle):
    """An offset past the end of the listed file is refused by us. ONNX Runtime itself (1.32 here)
    refuses external data at '../' or an absolute path: kept as a test, so that a change in ORT is
    seen (our check stands either way)."""
    import onnx
    import onnxruntime as ort

    case = Case(tmp_path, base_bundle)
    rel_path = _external_bundle(case)
    good = rel_path.read_bytes()
    model = onnx.load(str(rel_path), load_external_data=False)
    entry = next(e for t in model.graph.initializer for e in t.external_data if e.key == "offset")
    entry.value = str(10**12)
    rel_path.write_bytes(model.SerializeToString())
    case.resign()
    case.assert_all_refused("run past the end of 'weights.bin'")

    shutil.copy(case.bundle / "weights.bin", case.outside / "weights.bin")
    for i, location in enumerate(("../outside/weights.bin", str(case.outside / "weights.bin"))):
        model = onnx.load_from_string(good)
        path = tmp_path / f"ort{i}" / "m.onnx"
        path.parent.mkdir()
        path.write_bytes(_set_location(model, location).SerializeToString())
        with pytest.raises(Exception, match="(?i)external data|outside|relative|absolute") as info:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        print(location, "->", str(info.value)[:200])


def test_onnx_reader_finds_every_external_tensor(tmp_path):
    """The wire-format reader against the onnx package: the same external tensors (initializers,
    a Constant node's value, a tensor in an If branch), the same inputs and outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from crossvit_edge.artifact_check import read_onnx

    model = tiny_onnx(batch=2, size=32, classes=5)
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(5, np.float32), "cval"))
    branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.zeros(5, np.float32), "bval"))],
                               "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [5])])
    cond = helper.make_node("If", ["flag"], ["x"], then_branch=branch, else_branch=branch)
    model.graph.node.extend([const, cond])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "flag"))
    const, cond = model.graph.node[-2], model.graph.node[-1]  # the graph's copies
    for t in [model.graph.initializer[0], const.attribute[0].t, cond.attribute[0].g.node[0].attribute[0].t]:
        onnx.external_data_helper.set_external_data(t, location=f"{t.name}.bin", offset=0, length=4)
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    summary = read_onnx(tmp_path / "m.onnx", "m.onnx")
    assert sorted(e.entries["location"] for e in summary.external) == ["bval.bin", "cval.bin", "w.bin"]
    assert [(t.name, t.shape, t.dtype) for t in summary.inputs] == [("image", (2, 3, 32, 32), "float32")]  # not the initializers
    assert [(t.name, t.shape, t.dtype) for t in summary.outputs] == [("logits", (2, 5), "float32")]
    for junk in (b"", b"\xff" * 64, b"model", model.SerializeToString()[:100]):
        (tmp_path / "j.onnx").write_bytes(junk)
        with pytest.raises(UserError):
            read_onnx(tmp_path / "j.onnx", "j.onnx")


# --------------------------------------------------------------------------------------------------
# 3. The artifact's signature is the manifest's


def _as_224(m):
    from crossvit_edge.preprocess import Preprocessing

    m["input"]["shape"] = [1, 3, 224, 224]
    m["preprocessing"] = Preprocessing(input_size=224).to_dict()


def _five_classes(m):
    m["num_classes"], m["labels"], m["output"]["shape"] = 5, None, [1, 5]


SIGNATURES = {
    "input-224-for-240": (_as_224, "has shape [1, 3, 240, 240], the manifest says [1, 3, 224, 224]"),
    "five-classes-for-ten": (_five_classes, "has shape [1, 10], the manifest says [1, 5] (its number of classes differs)"),
    "batch-4-for-1": (lambda m: (_set(("input", "shape", 0), 4)(m), _set(("output", "shape", 0), 4)(m)), "the manifest says [4, 3, 240, 240]"),
    "input-name": (_set(("input", "name"), "pixels"), "input is named 'image', the manifest says 'pixels'"),
    "output-name": (_set(("output", "name"), "scores"), "output is named 'logits', the manifest says 'scores'"),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_manifest_and_onnx_signature_disagree(tmp_path, base_bundle, name):
    """A manifest consistent with itself (224 px preprocessing for a 224 input; 5 labels for 5
    classes) but not with the artifact: before, only the batch was compared."""
    case = Case(tmp_path, base_bundle)
    mutate, expect = SIGNATURES[name]
    case.edit(mutate)
    case.assert_all_refused(expect)


def test_onnx_with_two_outputs_or_a_float16_input(tmp_path, base_bundle):
    import onnx
    from onnx import TensorProto

    case = Case(tmp_path, base_bundle)
    rel = case.bundle / case.manifest()["artifact"]["file"]
    original = rel.read_bytes()
    model = onnx.load_from_string(original)
    model.graph.output.append(onnx.helper.make_tensor_value_info(model.graph.node[-1].input[0], TensorProto.FLOAT, None))
    rel.write_bytes(model.SerializeToString())
    case.resign()
    case.assert_all_refused("the artifact has 2 outputs")
    model = onnx.load_from_string(original)
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    rel.write_bytes(model.SerializeToString())
    case.resign()
    case.assert_all_refused("is 'float16', the manifest says float32")


# --------------------------------------------------------------------------------------------------
# 4. Corrupt artifacts end in one line, never an abort (ExecuTorch), and Core ML package paths


def _converted(tmp_path_factory, checkpoint, target: str, package: str) -> Path:
    """The micro model converted to ``target`` (fp32), once per module."""
    pytest.importorskip(package)
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec

    out = tmp_path_factory.mktemp(target) / "bundle"
    convert(BuildSpec(target=target, output=out, checkpoint=str(checkpoint)))
    return out


@pytest.fixture(scope="module")
def pte_bundle(tmp_path_factory, micro_checkpoint) -> Path:
    return _converted(tmp_path_factory, micro_checkpoint, "executorch", "executorch")


def _pte_variant(root: Path, source: Path, name: str, edit) -> Path:
    bundle = root / name
    shutil.copytree(source, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    pte = bundle / m["artifact"]["file"]
    pte.write_bytes(edit(pte.read_bytes()))
    m["files"][pte.name] = {"sha256": hashlib.sha256(pte.read_bytes()).hexdigest(), "bytes": pte.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m))
    return bundle


def _aborting_byte(data: bytes) -> int:
    """An offset inside the XNNPACK delegate's flatbuffer where 0xFF makes ExecuTorch abort the
    process on load or first run (each candidate tried in a forked child, as a fuzzer would)."""
    from executorch.runtime import Runtime  # noqa: F401  (imported here once, not in every child)

    from crossvit_edge.isolation import in_child

    header = data.find(b"XH00") - 4  # XNNPACK's blob header: magic at byte 4, then the flatbuffer offset
    assert header > 0, "no XNNPACK delegate blob in the program"
    start = header + struct.unpack_from("<I", data, header + 10)[0]

    def load(blob):
        import torch
        from executorch.runtime import Runtime

        # from_numpy: a parallel torch op (torch.zeros of this size) hangs in a forked child once
        # this process has used OpenMP (libgomp is not fork-safe); the runners use none either
        Runtime.get().load_program(blob).load_method("forward").execute([torch.from_numpy(np.zeros((1, 3, 240, 240), np.float32))])

    for offset in range(start + 8, start + 4000, 97):
        blob = bytearray(data)
        blob[offset] = 0xFF
        try:
            in_child("probe", lambda: load(bytes(blob)))
        except UserError as e:
            if "SIGABRT" in str(e) or "SIGSEGV" in str(e):
                return offset
    raise AssertionError("no byte of the delegate blob made the runtime abort: the hazard this test guards against is gone?")


def test_corrupt_pte_ends_in_one_line(tmp_path, pte_bundle):
    """A truncated .pte listed with its correct hash (before: a traceback), a corrupted program
    header, and a delegate blob byte that makes XNNPACK abort the process (before: SIGABRT in
    classify and in runtime.load, an embedding app dying with it): classify ends in one line, and
    runtime.load raises UserError in this very process, which survives."""
    from crossvit_edge.runtime import load

    data = (pte_bundle / json.loads((pte_bundle / "manifest.json").read_text())["artifact"]["file"]).read_bytes()
    offset = _aborting_byte(data)
    aborts = _pte_variant(tmp_path, pte_bundle, "aborts", lambda d: d[:offset] + b"\xff" + d[offset + 1:])
    truncated = _pte_variant(tmp_path, pte_bundle, "truncated", lambda d: d[: len(d) // 2])
    header = _pte_variant(tmp_path, pte_bundle, "header", lambda d: d[:4] + b"XX12" + d[8:])
    image = write_png(tmp_path / "x.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [(aborts, "killed its process (SIGABRT)"), (truncated, "not a valid program"), (header, "no b'ET' identifier")]
    procs = [subprocess.Popen([sys.executable, "-m", "crossvit_edge.classify", str(b), str(image)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for b, _ in cases]
    for (bundle, expect), p in zip(cases, procs):
        out, err = p.communicate(timeout=600)
        _one_line(subprocess.CompletedProcess(p.args, p.returncode, out, err), expect)
    with pytest.raises(UserError, match=r"killed its process \(SIGABRT\)"):
        load(aborts)
    with pytest.raises(UserError, match="not a valid program"):
        load(truncated, isolate=False)  # in-process too: the runtime's error is a UserError
    with load(pte_bundle) as model:  # the control: the untouched bundle loads (isolated) and runs
        assert len(model.classify([image])[0]) == 1


def test_pte_signature_against_the_manifest(tmp_path, pte_bundle):
    """ExecuTorch's method metadata (no tensor names in a .pte: shapes and dtypes) against a
    manifest that says 224 px, or 5 classes."""
    from crossvit_edge.bundle import open_bundle

    for name, mutate, expect in [("224", _as_224, "the manifest says [1, 3, 224, 224]"),
                                 ("five", _five_classes, "its number of classes differs")]:
        bundle = tmp_path / name
        shutil.copytree(pte_bundle, bundle)
        m = json.loads((bundle / "manifest.json").read_text())
        mutate(m)
        (bundle / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("(", r"\(")):
            open_bundle(bundle).runner()


@pytest.fixture(scope="module")
def coreml_bundle(tmp_path_factory, micro_checkpoint) -> Path:
    return _converted(tmp_path_factory, micro_checkpoint, "coreml", "coremltools")


def _resign(bundle: Path) -> None:
    from crossvit_edge.bundle import file_hashes

    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {rel: {"sha256": d, "bytes": (bundle / rel).stat().st_size} for rel, d in file_hashes(bundle).items()}
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_coreml_package_paths_stay_inside(tmp_path, coreml_bundle):
    """Manifest.json naming the spec by '../..' or an absolute path (a good spec waits there),
    weight references '@model_path/../../../outside/weight.bin' or absolute: before, the profile
    ran a model read from outside. Refused at open, and by the checker itself."""
    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.converters.coreml_mil import MILCheckerError, MILProgram, blob_file_names, blob_file_values, read_model_spec

    outside = tmp_path / "outside"
    outside.mkdir()
    rel = json.loads((coreml_bundle / "manifest.json").read_text())["artifact"]["file"]
    shutil.copytree(coreml_bundle / rel / "Data", outside / "Data")
    open_bundle(coreml_bundle)  # the control

    def variant(name: str) -> Path:
        bundle = tmp_path / name
        shutil.copytree(coreml_bundle, bundle)
        return bundle

    for name, path in [("dotdot", "../../../outside/Data/com.apple.CoreML/model.mlmodel"),
                       ("absolute", str(outside / "Data/com.apple.CoreML/model.mlmodel"))]:
        bundle = variant(name)
        manifest_json = bundle / rel / "Manifest.json"
        info = json.loads(manifest_json.read_text())
        info["itemInfoEntries"][info["rootModelIdentifier"]]["path"] = path
        manifest_json.write_text(json.dumps(info))
        _resign(bundle)
        with pytest.raises(UserError, match="not a plain relative name|absolute path"):
            open_bundle(bundle)
        with pytest.raises(MILCheckerError, match="not a plain relative name|absolute path"):
            MILProgram.load(bundle / rel)

    for name, weight in [("weights-dotdot", "@model_path/../../../../outside/Data/com.apple.CoreML/weights/weight.bin"),
                         ("weights-absolute", "@model_path/" + str(outside / "Data/com.apple.CoreML/weights/weight.bin"))]:
        bundle = variant(name)
        spec, model_dir = read_model_spec(bundle / rel)
        for value in blob_file_values(spec):
            value.fileName = weight
        assert blob_file_names(spec) == [weight]
        (model_dir / "model.mlmodel").write_bytes(spec.SerializeToString())
        _resign(bundle)
        with pytest.raises(UserError, match="not a plain relative name|absolute path"):
            open_bundle(bundle)
        with pytest.raises(MILCheckerError, match="not a plain relative name|absolute path"):
            MILProgram.load(bundle / rel).check_supported()
            MILProgram.load(bundle / rel).run({"image": np.zeros((1, 3, 240, 240), np.float32)})


def test_coreml_paths_outside_refused_before_any_work_and_quietly(tmp_path, coreml_bundle):
    """Issue 29: a Core ML bundle whose spec references a weight file outside was refused only
    after ~75 s and 1 GB (reading the package's protobuf imported coremltools, which imports torch
    and its converters) and with a torch warning as a second stderr line. The package's protobuf
    is now read with the generated modules alone: neither torch nor coremltools is imported, and
    profile's refusal is one line."""
    from crossvit_edge.converters.coreml_mil import blob_file_values, read_model_spec

    rel = json.loads((coreml_bundle / "manifest.json").read_text())["artifact"]["file"]
    bundle = tmp_path / "weights-out"
    shutil.copytree(coreml_bundle, bundle)
    spec, model_dir = read_model_spec(bundle / rel)
    for value in blob_file_values(spec):
        value.fileName = "@model_path/../../../../outside/weight.bin"
    (model_dir / "model.mlmodel").write_bytes(spec.SerializeToString())
    _resign(bundle)
    code = ("import sys\nfrom crossvit_edge.bundle import open_bundle\nfrom crossvit_edge.errors import UserError\n"
            "try:\n    open_bundle(sys.argv[1])\nexcept UserError as e:\n    print(e)\n"
            "print(sorted(m for m in ('torch', 'coremltools') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    refusal, imported = r.stdout.strip().splitlines()
    assert "not a plain relative name" in refusal and imported == "[]", r.stdout
    (tmp_path / "images" / "0").mkdir(parents=True)
    write_png(tmp_path / "images" / "0" / "x.png")
    r = subprocess.run([sys.executable, "-m", "crossvit_edge.profile", str(bundle), "--data", str(tmp_path / "images"), "--output",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                       timeout=300)
    _one_line(r, "not a plain relative name")
    assert not (tmp_path / "out").exists()


def test_coreml_signature_against_the_manifest(tmp_path, coreml_bundle):
    from crossvit_edge.bundle import open_bundle

    bundle = tmp_path / "five"
    shutil.copytree(coreml_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    _five_classes(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"output 'logits' has shape \[1, 10\], the manifest says \[1, 5\]"):
        open_bundle(bundle)


def test_fuzz_onnx_reader(tmp_path):
    """The wire-format reader on a real model with bytes flipped, cut or inserted: a summary or a
    one-line UserError, nothing else (it reads what the runtime would be handed next)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from crossvit_edge.artifact_check import read_onnx

    good = tiny_onnx(batch=2, size=16, classes=3).SerializeToString()

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255), st.sampled_from(["set", "cut", "insert"])), max_size=4))
    def run(edits):
        data = bytearray(good)
        for pos, value, action in edits:
            pos = min(pos, len(data) - 1)
            if action == "set":
                data[pos] = value
            elif action == "cut":
                del data[pos:]
            else:
                data[pos:pos] = bytes([value]) * 9
            if not data:
                data = bytearray(b"\0")
        path = tmp_path / "f.onnx"
        path.write_bytes(bytes(data))
        try:
            read_onnx(path, "f.onnx")
        except UserError as e:
            assert "\n" not in str(e) and len(str(e)) < 500

    run()
