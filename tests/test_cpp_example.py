"""The C++ example (examples/executorch_cpp, ``crossvit_classify``), built by the project's own script
against the installed executorch package and run on an ExecuTorch int8 bundle (and an fp16 one): the same
preprocessing as the Python runtime (bit for bit), logits within 1e-3 on the same preprocessed
input, the same top-1, a results file that ``profile --merge`` scores like the executorch row, and
one-line refusals of bad input and hostile bundles.

Fast tests use the micro model; the slow test is the done-criterion on the demo model's
executorch-int8 bundle over the 360 digits val images."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

pytest.importorskip("executorch")

from crossvit_edge.data import open_image_set  # noqa: E402

from .conftest import REPO, build_bundle  # noqa: E402
from .cpp_app import build_app, merged_agreement_matches, run_app, runpath_entries  # noqa: E402

BUILD_DIR = REPO / "build" / "executorch_cpp"  # kept between runs: rebuilds are incremental

if shutil.which("cmake") is None or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
    pytest.skip("the C++ example needs CMake and a C++17 compiler, and this machine has no "
                f"{'cmake' if shutil.which('cmake') is None else 'C++ compiler'}", allow_module_level=True)


@pytest.fixture(scope="module")
def app() -> Path:
    """The example built exactly as a user builds it (scripts/build_cpp_example.sh)."""
    return build_app(BUILD_DIR)


def _build(out: Path, checkpoint, digits_dir: Path, precision: str = "int8", **kw) -> Path:
    return build_bundle(out, checkpoint, digits_dir, "executorch", precision, **kw)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory, micro_checkpoint, digits_dir) -> Path:
    return _build(tmp_path_factory.mktemp("cpp") / "executorch-int8", micro_checkpoint, digits_dir)


def compare_with_python_runtime(app: Path, bundle: Path, val_dir: Path, tmp: Path) -> dict:
    """Run the app over ``val_dir`` and the Python runtime over the same images; assert the
    done-criteria and return the numbers."""
    from crossvit_edge.runtime import load

    images = open_image_set(val_dir)
    keys = [p.relative_to(val_dir).as_posix() for p in images.paths]
    results = tmp / "results.json"
    done = run_app(app, bundle, val_dir, "--dump-input", tmp / "cpp_input.npy", "--results", results, "--bench", 5, "--warmup", 1)

    lines = done.stdout.splitlines()
    assert len(lines) == len(images), "one line per image"
    cpp_top1 = {}
    with load(bundle, threads=2) as model:
        for line in lines:
            path, label, probability = line.split("\t")
            assert label in model.labels and 0.0 < float(probability) <= 1.0
            cpp_top1[Path(path).resolve().relative_to(val_dir.resolve()).as_posix()] = label
        # the same preprocessing: the app's tensors against crossvit_edge.preprocess (Pillow + numpy)
        x = model.preprocess(images.paths)
        report = json.loads(results.read_text())
        order = [report["images"].index(k) for k in keys]
        cpp_x = np.load(tmp / "cpp_input.npy")[order]
        preprocess_diff = float(np.abs(cpp_x - x).max())
        assert preprocess_diff <= 1e-6, preprocess_diff

        # the same program on the same preprocessed input: the app's logits against the Python runtime's
        np.save(tmp / "x.npy", x)
        run_app(app, bundle, "--input-npy", tmp / "x.npy", "--logits-npy", tmp / "cpp_logits.npy")
        py_logits = model.logits(x)
        logit_diff = float(np.abs(np.load(tmp / "cpp_logits.npy") - py_logits).max())
        assert logit_diff <= 1e-3, logit_diff

        # top-1 from the app's own decoding and preprocessing, against the runtime's classify()
        py_top1 = [top[0][0] for top in model.classify(images.paths)]
        agreement = float(np.mean([cpp_top1[k] == t for k, t in zip(keys, py_top1)]))
        assert agreement >= 0.99, agreement
        # and the results file carries the same logits, keyed like the harness's images
        results_diff = float(np.abs(np.asarray(report["logits"], np.float32)[order] - py_logits).max())
        assert results_diff <= 1e-3, results_diff
    numbers = {"images": len(images), "top1_agreement_cpp_vs_python": agreement, "max_logit_diff_same_input": logit_diff,
               "max_logit_diff_own_preprocessing": results_diff, "max_preprocess_diff": preprocess_diff,
               "cpp_latency": report["latency"], "device": report["device"]}
    print(numbers)
    return numbers


def test_cpp_app_matches_the_python_runtime(app, int8_bundle, digits_dir, tmp_path):
    compare_with_python_runtime(app, int8_bundle, digits_dir / "val", tmp_path)


def test_cpp_app_runs_the_fp16_program(app, micro_checkpoint, digits_dir, tmp_path):
    """The fp16 program keeps the float32 forward() the app checks for (fp16 inside, casts at the
    boundary): the app runs it as it runs the int8 one, with the Python runtime's numbers."""
    bundle = _build(tmp_path / "executorch-fp16", micro_checkpoint, digits_dir, precision="fp16", eval_samples=4)
    assert json.loads((bundle / "manifest.json").read_text())["executorch"]["compute_dtype"] == "float16"
    compare_with_python_runtime(app, bundle, digits_dir / "val", tmp_path)


def test_cpp_results_file_merges_into_a_profile(app, int8_bundle, digits_dir, micro_checkpoint, tmp_path):
    import platform

    from crossvit_edge.harness import markdown_report, md_text

    val = digits_dir / "val" / "3"  # one class folder: a quick profile
    run_app(app, int8_bundle, val, "--results", tmp_path / "results.json", "--bench", 5, "--warmup", 1)
    merged = merged_agreement_matches(int8_bundle, tmp_path / "results.json", val, micro_checkpoint)
    # the row says where it ran: the program's own architecture (this machine's), no emulator
    assert merged["cpp_row"]["architecture"] == platform.machine() and merged["cpp_row"]["emulator"] is None
    assert all(r["architecture"] == platform.machine() for r in merged["report"]["rows"])
    assert f"| int8 | {md_text(platform.machine())} |" in markdown_report(merged["report"])


def test_cpp_build_tree_run_path_has_no_empty_entries(app):
    """An empty (or relative) run-path entry is the current directory: the program would load
    libexecutorch*.so from wherever it is started. The build tree's is the install one ($ORIGIN,
    $ORIGIN/../lib, the wheel's lib folder)."""
    entries = runpath_entries(app)
    assert entries and all(e.startswith(("/", "$ORIGIN")) for e in entries), entries


def test_cpp_preprocessing_of_other_image_kinds_matches_pillow(app, int8_bundle, tmp_path):
    """PNG colour types (RGBA, palette, grey, 16-bit grey, 1-bit), JPEG (colour and grey), odd sizes
    in both directions: the app's tensors against crossvit_edge.preprocess."""
    from PIL import Image

    from crossvit_edge.runtime import load

    rng = np.random.default_rng(0)
    folder = tmp_path / "kinds"
    folder.mkdir()
    rgb = rng.integers(0, 256, (91, 37, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a_rgb_tall.png")
    Image.fromarray(rng.integers(0, 256, (300, 420, 4), dtype=np.uint8), "RGBA").save(folder / "b_rgba_wide.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=17).save(folder / "c_palette.png")
    Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L").save(folder / "d_grey.png")
    Image.fromarray(rng.integers(0, 600, (33, 40), dtype=np.uint16)).save(folder / "e_grey16.png")
    Image.fromarray(rng.integers(0, 2, (20, 24), dtype=np.uint8) * 255, "L").convert("1").save(folder / "f_bilevel.png")
    Image.fromarray(rng.integers(0, 256, (275, 274, 3), dtype=np.uint8)).save(folder / "g_colour.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (64, 80), dtype=np.uint8), "L").save(folder / "h_grey.jpeg", quality=85)
    paths = sorted(folder.iterdir())
    run_app(app, int8_bundle, *paths, "--dump-input", tmp_path / "x.npy")
    with load(int8_bundle) as model:
        expected = model.preprocess(paths)
    got = np.load(tmp_path / "x.npy")
    for path, e, g in zip(paths, expected, got):
        diff = float(np.abs(e - g).max())
        # PNG: the same pixels; JPEG: libjpeg-turbo here and in Pillow's wheel may differ by a level
        limit = 1e-6 if path.suffix == ".png" else 1.01 / 255 / 0.224
        assert diff <= limit, (path.name, diff)


def test_cpp_static_batch_keeps_order_and_pads(app, micro_checkpoint, digits_dir, tmp_path):
    """A program with a static batch of 2 and an odd number of images: the last batch is padded and
    every image's logits are its own, in order (against the Python runtime)."""
    from crossvit_edge.runtime import load

    bundle = _build(tmp_path / "executorch-fp32-b2", micro_checkpoint, digits_dir, precision="fp32", batch_size=2, eval_samples=4)
    paths = open_image_set(digits_dir / "val").sample(5, seed=3).paths
    run_app(app, bundle, *paths, "--dump-input", tmp_path / "x.npy")
    run_app(app, bundle, "--input-npy", tmp_path / "x.npy", "--logits-npy", tmp_path / "y.npy")
    with load(bundle) as model:
        assert model.batch_size == 2
        one_by_one = np.concatenate([model.logits(model.preprocess(p)) for p in paths])
    got = np.load(tmp_path / "y.npy")
    assert got.shape == (5, 10) and float(np.abs(got - one_by_one).max()) <= 1e-4


def _copy_bundle(bundle: Path, tmp: Path, edit=None) -> Path:
    out = tmp / f"bundle{len(list(tmp.iterdir()))}"
    shutil.copytree(bundle, out)
    if edit:
        manifest = json.loads((out / "manifest.json").read_text())
        edit(manifest, out)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_cpp_bad_input_is_one_line_and_exit_2(app, int8_bundle, digits_dir, tmp_path):
    image = next((digits_dir / "val" / "3").iterdir())
    not_image = tmp_path / "text.png"
    not_image.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:60])
    from PIL import Image

    jpeg = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    art = json.loads((int8_bundle / "manifest.json").read_text())["artifact"]["file"]
    outside = tmp_path / "outside.pte"
    shutil.copy(int8_bundle / art, outside)

    def flip_a_byte(m, out):
        data = bytearray((out / art).read_bytes())
        data[len(data) // 2] ^= 1
        (out / art).write_bytes(bytes(data))

    def symlink_out(m, out):
        (out / art).unlink()
        (out / art).symlink_to(outside)

    def not_a_program(m, out):  # a hostile bundle can list the right sha256 for any bytes
        junk = b"\0\0\0\0ET12" + bytes(range(256)) * 64
        (out / art).write_bytes(junk)
        m["files"][art] = {"sha256": hashlib.sha256(junk).hexdigest(), "bytes": len(junk)}

    def deep(m, out):
        m["labels"] = json.loads("[" * 200 + "]" * 200)

    cases = {
        "no such image": (int8_bundle, [tmp_path / "missing.png"]),
        "not an image": (int8_bundle, [not_image]),
        "truncated PNG": (int8_bundle, [truncated]),
        "truncated JPEG": (int8_bundle, [jpeg]),
        "not a bundle": (tmp_path, [image]),
        "modified program": (_copy_bundle(int8_bundle, bundles, flip_a_byte), [image]),
        "not a program, listed with its sha256": (_copy_bundle(int8_bundle, bundles, not_a_program), [image]),
        "path out of the bundle": (_copy_bundle(int8_bundle, bundles, lambda m, o: m["artifact"].update(file="../" + art)), [image]),
        "absolute path": (_copy_bundle(int8_bundle, bundles, lambda m, o: m["artifact"].update(file=str(outside))), [image]),
        "symlink out of the bundle": (_copy_bundle(int8_bundle, bundles, symlink_out), [image]),
        "not listed in files": (_copy_bundle(int8_bundle, bundles, lambda m, o: m["files"].pop(art)), [image]),
        "label with a tab": (_copy_bundle(int8_bundle, bundles, lambda m, o: m.update(labels=["a\tb"] + [str(i) for i in range(1, 10)])), [image]),
        "labels of the wrong count": (_copy_bundle(int8_bundle, bundles, lambda m, o: m.update(labels=["a"])), [image]),
        "nested too deep": (_copy_bundle(int8_bundle, bundles, deep), [image]),
        "huge batch": (_copy_bundle(int8_bundle, bundles, lambda m, o: m["input"].update(shape=[10**9, 3, 240, 240])), [image]),
        "wrong preprocessing": (_copy_bundle(int8_bundle, bundles, lambda m, o: m["preprocessing"].update(std=[0.2, 0.0, 0.2])), [image]),
        "other schema": (_copy_bundle(int8_bundle, bundles, lambda m, o: m.update(schema_version=99)), [image]),
        "manifest batch differs from the program": (
            _copy_bundle(int8_bundle, bundles, lambda m, o: (m["input"].update(shape=[2, 3, 240, 240]), m["output"].update(shape=[2, 10]))), [image]),
    }
    for name, (bundle, args) in cases.items():
        done = run_app(app, bundle, *args, check=False)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("crossvit_classify: error:"), (name, done.returncode, done.stderr)
        assert done.stdout == "", name
    for flags in (["--top-k", "0"], ["--bench", "3"], ["--frobnicate"], ["--input-npy", image]):
        done = run_app(app, int8_bundle, image, *flags, check=False)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (flags, done.stderr)


def _one_line_refusal(done, name: str, expect: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("crossvit_classify: error:"), (name, done.returncode, done.stderr)
    assert expect in lines[0], (name, lines[0])
    assert done.stdout == "", name


def test_cpp_bounds_labels_and_files(app, int8_bundle, digits_dir, tmp_path):
    """The second round of untrusted-input cases (docs/security.md) reach the C++ example too: the
    batch x input bound, the listed total, labels with C1 controls, separators or bidi controls,
    FIFOs and sparse giants as images or manifests. One line, exit 2, never a block."""
    image = next((digits_dir / "val" / "3").iterdir())
    bundles = tmp_path / "bundles"
    bundles.mkdir()

    def labels(bad):
        return lambda m, o: m.update(labels=[bad] + [str(i) for i in range(1, 10)])

    def batch(b, size):
        def edit(m, o):
            m["input"]["shape"] = [b, 3, size, size]
            m["output"]["shape"] = [b, 10]
            m["preprocessing"].update(input_size=size, crop_pct=1.0, resize_short_side=size)
        return edit

    def terabyte(m, o):
        with open(o / "big.bin", "wb") as f:
            f.truncate(1 << 40)
        m["files"]["big.bin"] = {"sha256": "0" * 64, "bytes": 1 << 40}

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    giant = tmp_path / "giant.png"
    with open(giant, "wb") as f:
        f.write(image.read_bytes())
        f.truncate(1 << 40)

    fifo_bundle = _copy_bundle(int8_bundle, bundles, None)
    (fifo_bundle / "manifest.json").unlink()
    os.mkfifo(fifo_bundle / "manifest.json")
    cases = {
        "batch 256 at 512 x 512": (_copy_bundle(int8_bundle, bundles, batch(256, 512)), [image], "768 MiB of input a call"),
        "batch 4096 at 4096 x 4096": (_copy_bundle(int8_bundle, bundles, batch(4096, 4096)), [image], "786432 MiB of input a call"),
        "a listed terabyte": (_copy_bundle(int8_bundle, bundles, terabyte), [image], "lists more than 8 GiB in all"),
        "label with CSI": (_copy_bundle(int8_bundle, bundles, labels("a\u009b31m")), [image], "labels[0]: contains U+009B"),
        "label with NEL": (_copy_bundle(int8_bundle, bundles, labels("a\x85")), [image], "U+0085"),
        "label with U+2028": (_copy_bundle(int8_bundle, bundles, labels("a\u2028b")), [image], "U+2028"),
        "label with RLO": (_copy_bundle(int8_bundle, bundles, labels("a\u202eb")), [image], "U+202E"),
        "label with DEL": (_copy_bundle(int8_bundle, bundles, labels("a\x7f")), [image], "U+007F"),
        "image that is a FIFO": (int8_bundle, [fifo], "pipe.png"),
        "image that is a sparse terabyte": (int8_bundle, [giant], "bytes, more than the 268435456"),
        "manifest that is a FIFO": (fifo_bundle, [image], "no manifest.json"),
    }
    for name, (bundle, args, expect) in cases.items():
        t = time.time()
        _one_line_refusal(run_app(app, bundle, *args, check=False), name, expect)
        assert time.time() - t < 30, name
    # a label with a backslash or printable Unicode is fine (and printed escaped)
    ok = _copy_bundle(int8_bundle, bundles, labels("caf\u00e9\\x"))
    assert run_app(app, ok, image).stdout.count("\t") == 2


def test_cpp_tsv_lines_match_python_byte_for_byte(app, int8_bundle, tmp_path):
    """The same escaped path fields as ``python -m crossvit_edge.classify`` for names with a
    newline and tabs, ESC, C1 controls, U+2028, bidi controls, a backslash and bytes that are not
    UTF-8: one line per image, three fields each."""
    from .test_security_bounds import hostile_folder

    expected = hostile_folder(tmp_path)
    cpp = subprocess.run([str(app), str(int8_bundle), str(tmp_path / "imgs")], capture_output=True, timeout=600)
    assert cpp.returncode == 0, cpp.stderr[-2000:]
    py = subprocess.run([sys.executable, "-m", "crossvit_edge.classify", str(int8_bundle), str(tmp_path / "imgs")], capture_output=True,
                        timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert py.returncode == 0, py.stderr[-2000:]
    for out in (cpp.stdout, py.stdout):
        lines = out.split(b"\n")
        assert lines[-1] == b"" and len(lines) - 1 == len(expected)
        assert all(len(line.split(b"\t")) == 3 for line in lines[:-1])
    paths = lambda out: sorted(line.split(b"\t")[0] for line in out.split(b"\n")[:-1])  # noqa: E731
    assert paths(cpp.stdout) == paths(py.stdout) == sorted(v.encode() for v in expected.values())


def test_cpp_results_file_replaces_a_planted_symlink(app, int8_bundle, digits_dir, tmp_path):
    """--results naming a symlink to a file elsewhere: the link is replaced by the results file (a
    new file renamed onto it), the file it pointed at is untouched, no temporary file is left."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(victim)
    folder = digits_dir / "val" / "3"
    run_app(app, int8_bundle, folder, "--results", out / "results.json")
    assert victim.read_text() == "keep"
    assert not (out / "results.json").is_symlink() and json.loads((out / "results.json").read_text())["images"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


@pytest.mark.slow
def test_cpp_app_on_the_demo_int8_bundle_over_the_digits_val_split(app, demo_checkpoint, digits_dir, tmp_path):
    """The done-criterion: the demo model's executorch-int8 bundle (converted as the demo does, ~6
    min here), all 360 val images."""
    bundle = _build(tmp_path / "executorch-int8", demo_checkpoint, digits_dir, calib_samples=256, eval_samples=100)
    compare_with_python_runtime(app, bundle, digits_dir / "val", tmp_path)
    merged_agreement_matches(bundle, tmp_path / "results.json", digits_dir / "val", demo_checkpoint)


def test_cpp_exif_orientation_is_never_applied(app, int8_bundle, tmp_path):
    """JPEG (APP1 Exif) and PNG (eXIf) carrying orientations 3, 6 and 8: the app decodes the stored
    pixels, as crossvit_edge.preprocess does: its tensor for a tagged file equals its tensor for the
    same pixels untagged, and the Python runtime's. TIFF and WebP, the other formats that carry an
    orientation, the app does not decode: it refuses them in one line rather than guess."""
    from crossvit_edge.runtime import load

    from .test_preprocess_data import encode_with_orientation

    pixels = np.random.default_rng(0).integers(0, 256, (120, 260, 3), dtype=np.uint8)  # wide: a rotation would show
    folder = tmp_path / "oriented"
    folder.mkdir()
    formats = {".jpg": ("JPEG", {"quality": 95, "subsampling": 0}), ".png": ("PNG", {})}
    tagged, plain = [], []
    for suffix, (fmt, options) in formats.items():
        for orientation in (3, 6, 8):
            path = folder / f"o{orientation}{suffix}"
            path.write_bytes(encode_with_orientation(pixels, fmt, options, orientation))
            tagged.append(path)
            plain_path = folder / f"plain{orientation}{suffix}"
            plain_path.write_bytes(encode_with_orientation(pixels, fmt, options, None))
            plain.append(plain_path)
    run_app(app, int8_bundle, *tagged, "--dump-input", tmp_path / "tagged.npy")
    run_app(app, int8_bundle, *plain, "--dump-input", tmp_path / "plain.npy")
    got, untagged = np.load(tmp_path / "tagged.npy"), np.load(tmp_path / "plain.npy")
    with load(int8_bundle) as model:
        python = model.preprocess(tagged)
    for path, g, u, p in zip(tagged, got, untagged, python):
        assert np.array_equal(g, u), path.name  # the tag changes nothing in the app
        limit = 1e-6 if path.suffix == ".png" else 1.01 / 255 / 0.224  # two libjpeg-turbo builds may differ by a level
        assert float(np.abs(g - p).max()) <= limit, path.name
    for fmt, options in (("TIFF", {}), ("WEBP", {"lossless": True})):
        path = folder / f"o6.{fmt.lower()}"
        path.write_bytes(encode_with_orientation(pixels, fmt, options, 6))
        _one_line_refusal(run_app(app, int8_bundle, path, check=False), fmt, "not a PNG or JPEG image")


def _png(path: Path, width: int, height: int, color_type: int, bit_depth: int, samples: np.ndarray,
         palette: Optional[np.ndarray] = None, trns: Optional[bytes] = None) -> None:
    """A PNG written chunk by chunk (Pillow writes only some colour type / bit depth pairs):
    ``samples`` (height, width, channels) of values below 2**bit_depth, rows packed MSB first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = []
    for row in samples.reshape(height, -1):
        if bit_depth == 16:
            packed = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            packed = row.astype(np.uint8).tobytes()
        else:
            bits = np.unpackbits(row.astype(np.uint8)[:, None], axis=1)[:, 8 - bit_depth:].reshape(-1)
            packed = np.packbits(bits).tobytes()
        rows.append(b"\0" + packed)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if trns is not None:
        out += chunk(b"tRNS", trns)
    path.write_bytes(out + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_cpp_png_of_every_colour_type_and_depth_decodes_as_pillow(app, int8_bundle, tmp_path):
    """Every PNG colour type and bit depth (grey 1/2/4/8/16, RGB 8/16, palette 1/2/4/8, grey+alpha
    and RGBA 8/16), with and without tRNS where PNG allows it: the app's tensors equal the Python
    runtime's (Pillow's mode, then its RGB conversion). Before: a palette PNG with tRNS was read
    as 3 channels of its 4 (max input difference 4.46)."""
    from crossvit_edge.runtime import load

    rng = np.random.default_rng(7)
    width, height = 45, 31
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
    depths = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
    folder = tmp_path / "pngs"
    folder.mkdir()
    for color_type, bit_depths in depths.items():
        for bit_depth in bit_depths:
            for with_trns in ((False, True) if color_type in (0, 2, 3) else (False,)):
                top = 1 << bit_depth
                samples = rng.integers(0, top, (height, width, channels[color_type]), dtype=np.int64)
                palette = trns = None
                if color_type == 3:
                    entries = min(top, 256)
                    palette = rng.integers(0, 256, (entries, 3))
                    if with_trns:
                        trns = rng.integers(0, 256, max(1, entries - 1), dtype=np.uint8).tobytes()
                elif with_trns:  # the transparent colour is one that pixels have
                    key = samples[0, 0]
                    trns = b"".join(int(v).to_bytes(2, "big") for v in key)
                    samples[: height // 2, : width // 3] = key
                _png(folder / f"t{color_type}_d{bit_depth:02d}{'_trns' if with_trns else ''}.png", width, height,
                     color_type, bit_depth, samples, palette, trns)
    paths = sorted(folder.iterdir())
    assert len(paths) == 26
    run_app(app, int8_bundle, *paths, "--dump-input", tmp_path / "x.npy")
    with load(int8_bundle) as model:
        expected = model.preprocess(paths)
    got = np.load(tmp_path / "x.npy")
    differences = {p.name: float(np.abs(e - g).max()) for p, e, g in zip(paths, expected, got)}
    assert all(d <= 1e-6 for d in differences.values()), differences


def test_cpp_manifest_number_out_of_range_is_exit_2(app, int8_bundle, digits_dir, tmp_path):
    """A number JSON can write but a double cannot hold (1e400; Python reads infinity and refuses
    it): one line and exit 2, as every bad manifest (before: exit 1, 'failed')."""
    image = next((digits_dir / "val" / "3").iterdir())
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    for number in ("1e400", "-1e400"):
        bundle = _copy_bundle(int8_bundle, bundles)
        text = (bundle / "manifest.json").read_text()
        (bundle / "manifest.json").write_text(text.replace('"crop_pct": ', f'"crop_pct": {number}, "was": ', 1))
        assert number in (bundle / "manifest.json").read_text()
        _one_line_refusal(run_app(app, bundle, image, check=False), number, "manifest.json")

