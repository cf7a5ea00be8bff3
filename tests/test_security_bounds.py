"""Untrusted inputs, second round (docs/security.md, "Bounds on work and memory" and "Files"): a few
bytes that ask for gigabytes or an hour, file names that forge output or block a reader, outputs
sent elsewhere by a planted symlink, YAML that cannot be constructed, signals and a full disk.

Each case is crafted on real files (a real converted bundle, real sparse files, real FIFOs, real
deflate bombs) and asserts one stderr line, exit code 2 (or the documented signal code), no
traceback, bounded time and, where memory is the point, bounded peak memory (ru_maxrss of the
process), and that nothing was written outside the output.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from crossvit_edge.errors import UserError

from .conftest import MICRO_CLI, REPO
from .test_security import Case, _assert_one_line, _quick, base_bundle, make_image_folder, write_png  # noqa: F401 (fixture)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


def measured(cmd, cwd, timeout=300, limit_fsize=None):
    """Run ``cmd``; (returncode, stdout, stderr, peak RSS in bytes, seconds). The peak is the
    child's own ru_maxrss (os.wait4), not this process's."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        def limit():
            if limit_fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

        t = time.time()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, cwd=cwd, env=ENV, preexec_fn=limit)
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                raise AssertionError(f"{cmd[:4]} ran past {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), usage.ru_maxrss * 1024, time.time() - t


def growth(cwd: Path, prelude: str, body: str, *args):
    """Run ``body`` (after ``prelude``'s imports) in a fresh interpreter with ``sys.argv[1:]`` =
    ``args``; (returncode, stderr, bytes the peak RSS grew by during ``body``, seconds). A
    UserError raised by ``body`` is printed on stderr in one line."""
    code = ("import resource, sys\nfrom crossvit_edge.errors import UserError\n" + prelude +
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n" + "".join(f"    {line}\n" for line in body.splitlines()) +
            "except UserError as e:\n    print(str(e).replace(chr(10), ' '), file=sys.stderr)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
    rc, out, err, _, seconds = measured([sys.executable, "-c", code, *args], cwd=cwd)
    return rc, err, int(out.strip().splitlines()[-1]) if rc == 0 else None, seconds


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --------------------------------------------------------------------------------------------------
# Bundles that ask for gigabytes (issue 20, item 5)


def _batch(batch: int, size: int):
    def fn(m):
        m["input"]["shape"] = [batch, 3, size, size]
        m["output"]["shape"] = [batch, m["num_classes"]]
        pre = m["preprocessing"]
        pre["input_size"] = size
        pre["crop_pct"] = 1.0
        pre["resize_short_side"] = size
    return fn


@pytest.mark.parametrize("batch,size,mib", [(256, 512, 768), (4096, 4096, 786432), (8, 4096, 1536)])
def test_batch_input_bytes_capped(tmp_path, base_bundle, batch, size, mib):
    """A manifest within the schema's bounds (batch <= 4096, input <= 4096^2) whose batch of input
    is larger than MAX_BATCH_INPUT_BYTES: classify would pad every call to it (768 MiB for batch
    256 at 512 x 512; 768 GiB for 4096 x 4096^2). Refused at open by every command, in seconds."""
    case = Case(tmp_path, base_bundle)
    case.edit(_batch(batch, size))
    t = time.time()
    case.assert_all_refused(f"is {mib} MiB of input a call, more than the 256 MiB allowed")
    assert time.time() - t < 60


def test_batch_input_cap_in_process_and_at_convert(tmp_path, base_bundle, micro_checkpoint):
    from crossvit_edge.bundle import MAX_BATCH_INPUT_BYTES, batch_input_bytes, open_bundle
    from crossvit_edge.runtime import load

    case = Case(tmp_path, base_bundle)
    case.edit(_batch(256, 512))
    with pytest.raises(UserError, match="768 MiB of input a call"):
        load(case.bundle)
    # the largest batch that fits at 240 x 240 (the demo model) is allowed
    largest = MAX_BATCH_INPUT_BYTES // batch_input_bytes(1, 240)
    assert largest == 388
    case.edit(_batch(largest, 240))
    # past the cap check; then the artifact's own signature (batch 1) disagrees with the manifest
    with pytest.raises(UserError, match=r"the manifest says \[388, 3, 240, 240\]"):
        open_bundle(case.bundle)
    # convert refuses a --batch-size the bundle could not be opened with, before any conversion work
    rc, _, err, _, seconds = measured([sys.executable, MICRO_CLI, "crossvit_edge.convert", "--target", "onnx", "--checkpoint",
                                       micro_checkpoint, "--batch-size", 4096, "--output", tmp_path / "b"], cwd=tmp_path)
    _assert_one_line(subprocess.CompletedProcess([], rc, "", err), "--batch-size: batch 4096 of 3 x 240 x 240 float32 is 2700 MiB")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_listed_terabyte_is_refused_by_its_size_not_hashed(tmp_path, base_bundle):
    """A listed 1 TiB sparse file (a few KB on disk) with a wrong hash was hashed in full before it
    was refused: now the listed total is bounded (MAX_BUNDLE_BYTES), and a file whose size on disk
    differs from the listed one is refused before any file is hashed."""
    case = Case(tmp_path, base_bundle)
    tib = 1 << 40
    sparse(case.bundle / "big.bin", tib)

    def list_big(listed):
        def fn(m):
            m["files"]["big.bin"] = {"sha256": "0" * 64, "bytes": listed}
        return fn

    case.edit(list_big(tib), resign=False)
    t = time.time()
    case.assert_all_refused("lists more than 8 GiB in all")
    # listed small, huge on disk: the size check refuses it, nothing is read
    case.edit(list_big(100), resign=False)
    case.assert_all_refused(f"files['big.bin']: {tib} bytes, the manifest says 100")
    assert time.time() - t < 60


def test_sizes_are_checked_before_any_hash(tmp_path, base_bundle):
    """verify_files compares every size before it hashes anything: a wrong size anywhere is found
    without reading the (possibly large) files listed before it; each hash reads at most the listed
    size."""
    from crossvit_edge import safe_io
    from crossvit_edge.bundle import open_bundle

    case = Case(tmp_path, base_bundle)
    (case.bundle / "z_last.bin").write_bytes(b"12345")
    m = case.manifest()
    case.write_manifest(m)  # resigned: every entry right
    m = case.manifest()
    first = sorted(m["files"])[0]
    m["files"][first]["sha256"] = "0" * 64  # the first listed file: wrong hash
    m["files"]["z_last.bin"]["bytes"] = 4  # the last: wrong size
    case.write_manifest(m, resign=False)
    hashed = []
    real = safe_io.sha256

    def spy(path, what=None, **kw):
        hashed.append(Path(path).name)
        return real(path, what, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(safe_io, "sha256", spy)
        with pytest.raises(UserError, match=r"files\['z_last.bin'\]: 5 bytes, the manifest says 4"):
            open_bundle(case.bundle)
    assert hashed == []


def test_fifo_and_device_in_a_bundle_never_block(tmp_path, base_bundle):
    """A listed file that is a FIFO (open() would wait for a writer forever) is refused without
    being opened; one that links to a device is outside the bundle."""
    case = Case(tmp_path, base_bundle)
    os.mkfifo(case.bundle / "pipe.bin")
    case.edit(lambda m: m["files"].update({"pipe.bin": {"sha256": "0" * 64, "bytes": 0}}), resign=False)
    t = time.time()
    case.assert_all_refused("files['pipe.bin']: listed in the manifest but not a regular file")
    os.unlink(case.bundle / "pipe.bin")
    (case.bundle / "pipe.bin").symlink_to("/dev/zero")
    case.assert_all_refused("leads outside the bundle")
    assert time.time() - t < 60


def test_package_folder_with_a_fifo_is_refused(tmp_path):
    """A package-folder artifact (an .mlpackage) holds only folders and listed regular files: a
    FIFO inside it, which a runtime walking the package would block on, is refused."""
    from crossvit_edge.bundle import verify_files

    root = tmp_path / "b"
    (root / "m.mlpackage" / "Data").mkdir(parents=True)
    (root / "m.mlpackage" / "Manifest.json").write_text("{}")
    os.mkfifo(root / "m.mlpackage" / "Data" / "weights.bin")
    import hashlib

    manifest = {"files": {"m.mlpackage/Manifest.json": {"sha256": hashlib.sha256(b"{}").hexdigest(), "bytes": 2}},
                "artifact": {"file": "m.mlpackage", "kind": "mlpackage"}}
    with pytest.raises(UserError, match="m.mlpackage/Data/weights.bin' in the package is a symlink, FIFO or device"):
        verify_files(root, manifest, "bundle b")


# --------------------------------------------------------------------------------------------------
# --calib-stats: deflate bombs and huge item sizes (item 5)


def _stats(path: Path) -> Path:
    from crossvit_edge.calibration.collect import CalibrationStatistics
    from crossvit_edge.calibration.estimators import AbsHistogram

    CalibrationStatistics("m", "0" * 64, {"a": AbsHistogram(counts=np.arange(1.0, 9.0), width=0.5, amax=4.0)},
                          {"a": np.ones(4)}, {"images": 3}).save(path)
    return path


def _npy_header(descr: str, shape) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def _rewrite(src: Path, dst: Path, replace: dict) -> Path:
    """``src``'s members with some replaced by (name -> bytes), stored."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, replace.pop(info.filename, zin.read(info)))
        for name, data in replace.items():
            zout.writestr(name, data)
    return dst


def _deflate_bomb(path: Path, members: dict, bomb_name: str, header: bytes, zeros: int) -> Path:
    """A valid zip whose member ``bomb_name`` is ``header`` and ``zeros`` zero bytes, deflated
    (a 2 GB member is a few MB here: one full-flushed deflate block of 16 MiB of zeros, repeated),
    after the stored ``members``."""
    block_size = 1 << 24
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(block_size)) + c.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(zeros, block_size)
    tail = c.compress(bytes(rest)) + c.flush()
    crc = zlib.crc32(header)
    zero_block = bytes(block_size)
    for _ in range(count):
        crc = zlib.crc32(zero_block, crc)
    crc = zlib.crc32(bytes(rest), crc)
    data_len = len(head) + len(block) * count + len(tail)
    size = len(header) + zeros
    assert size < 1 << 32 and data_len < 1 << 32  # no zip64 needed
    with open(path, "wb") as f:
        central = b""
        entries = [(name, data) for name, data in members.items()] + [(bomb_name, None)]
        for name, data in entries:
            offset = f.tell()
            n = name.encode()
            if data is None:  # the bomb, deflated
                fields = (20, 0, 8, 0, 0, crc, data_len, size)
                f.write(struct.pack("<4sHHHHHIII", b"PK\x03\x04", *fields[:5], *fields[5:]) + struct.pack("<HH", len(n), 0) + n)
                f.write(head)
                for _ in range(count):
                    f.write(block)
                f.write(tail)
            else:
                fields = (20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data))
                f.write(struct.pack("<4sHHHHHIII", b"PK\x03\x04", *fields[:5], *fields[5:]) + struct.pack("<HH", len(n), 0) + n + data)
            central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, *fields, len(n), 0, 0, 0, 0, 0, offset) + n
        start = f.tell()
        f.write(central)
        f.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), start, 0))
    return path


def _members(npz: Path) -> dict:
    with zipfile.ZipFile(npz) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def test_calib_stats_meta_deflating_to_2_gb_is_refused_before_inflating(tmp_path):
    """``meta`` of 2 GB deflated to a few MB: refused from the zip directory, nothing inflated; peak
    memory of the process that reads it stays where it was."""
    good = _stats(tmp_path / "good.npz")
    others = {k: v for k, v in _members(good).items() if k != "meta.npy"}
    bomb = _deflate_bomb(tmp_path / "bomb.npz", others, "meta.npy", _npy_header("|u1", (2_000_000_000,)), 2_000_000_000)
    assert bomb.stat().st_size < 8 << 20
    with zipfile.ZipFile(bomb) as z, z.open("meta.npy") as f:  # a real, valid zip: the member really inflates to 2 GB
        assert z.getinfo("meta.npy").file_size == 2_000_000_000 + len(_npy_header("|u1", (2_000_000_000,)))
        assert f.read(1 << 24)[:6] == b"\x93NUMPY"
    rc, err, grew, seconds = growth(tmp_path, "from crossvit_edge.calibration.collect import CalibrationStatistics\n",
                                    "CalibrationStatistics.load(sys.argv[1])", bomb)
    assert rc == 0, err
    assert "inflate to" in err and "more than 268435456" in err and err.count("\n") == 1, err
    assert grew < 32 << 20, f"peak memory grew by {grew >> 20} MiB"
    assert seconds < 60


def _load_stats_error(path) -> str:
    from crossvit_edge.calibration.collect import CalibrationStatistics

    with pytest.raises(UserError) as e:
        CalibrationStatistics.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_calib_stats_item_size_and_shape_checked_before_reading(tmp_path):
    good = _stats(tmp_path / "good.npz")
    from crossvit_edge.calibration.collect import CalibrationStatistics

    assert CalibrationStatistics.load(good).layers["a"].counts.tolist() == list(np.arange(1.0, 9.0))
    # a histogram of one "value" of 2 GB: shape (1,) passes a value count; its item size does not
    void = _rewrite(good, tmp_path / "void.npz", {"hist_0.npy": _npy_header("|V2000000000", (1,)) + b"x" * 64})
    assert "|V2000000000' of shape '(1,)'" in _load_stats_error(void)
    for descr in ("|O", "<U4", "<c16", "|b1"):  # objects, text, complex, booleans: not counts
        bad = _rewrite(good, tmp_path / f"d{descr[1:]}.npz", {"hist_0.npy": _npy_header(descr, (8,)) + bytes(128)})
        assert "expected a non-empty 1-D numeric array" in _load_stats_error(bad)
    # a header that claims more than the data holds, and one with more bins than allowed
    short = _rewrite(good, tmp_path / "short.npz", {"hist_0.npy": _npy_header("<f8", (1000,)) + bytes(80)})
    assert "does not match its header" in _load_stats_error(short)
    wide = _rewrite(good, tmp_path / "wide.npz", {"hist_0.npy": _npy_header("<f8", (8193,)) + bytes(8 * 8193)})
    assert "at most 8192 values" in _load_stats_error(wide)
    twod = _rewrite(good, tmp_path / "twod.npz", {"hist_0.npy": _npy_header("<f8", (2, 4)) + bytes(64)})
    assert "1-D" in _load_stats_error(twod)
    # a metadata file naming one array for a million layers: each array is read once
    with np.load(good) as z:
        meta = json.loads(z["meta"].tobytes())
    meta["layers"] = {f"l{i}": {"index": 0, "width": 0.5, "amax": 4.0} for i in range(1000)}
    raw = json.dumps(meta).encode()
    repeat = _rewrite(good, tmp_path / "repeat.npz", {"meta.npy": _npy_header("|u1", (len(raw),)) + raw})
    assert "named twice" in _load_stats_error(repeat)


def test_calib_stats_member_count_fifo_and_device(tmp_path):
    from crossvit_edge.calibration import collect

    good = _stats(tmp_path / "good.npz")
    many = _rewrite(good, tmp_path / "many.npz", {f"x{i}.npy": b"" for i in range(collect.MAX_STATS_MEMBERS)})
    assert f"more than {collect.MAX_STATS_MEMBERS}" in _load_stats_error(many)
    os.mkfifo(tmp_path / "pipe.npz")
    t = time.time()
    assert "FIFO" in _load_stats_error(tmp_path / "pipe.npz")
    assert "character device" in _load_stats_error("/dev/zero")
    assert time.time() - t < 5
    assert f"more than the {collect.MAX_STATS_BYTES}" in _load_stats_error(sparse(tmp_path / "huge.npz", 1 << 40))


def test_convert_with_a_calib_stats_bomb_is_one_line(tmp_path, micro_checkpoint):
    good = _stats(tmp_path / "good.npz")
    others = {k: v for k, v in _members(good).items() if k != "meta.npy"}
    bomb = _deflate_bomb(tmp_path / "bomb.npz", others, "meta.npy", _npy_header("|u1", (2_000_000_000,)), 2_000_000_000)
    rc, _, err, peak, _ = measured([sys.executable, MICRO_CLI, "crossvit_edge.convert", "--target", "onnx", "--precision", "int8",
                                    "--checkpoint", micro_checkpoint, "--calib-stats", bomb, "--output", tmp_path / "b"], cwd=tmp_path)
    _assert_one_line(subprocess.CompletedProcess([], rc, "", err), "inflate to")
    assert peak < 1500 << 20, f"peak RSS {peak >> 20} MiB"  # torch and the model; the 2 GB are never allocated
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


# --------------------------------------------------------------------------------------------------
# --merge results files: parsed within a memory bound (item 5)


def _names(n):
    return [f"c/{i}.png" for i in range(n)]


def test_results_file_parsed_within_a_memory_bound(tmp_path):
    """A results file of 32 MiB of small numbers: as JSON lists it would be ~16 bytes of Python
    objects per byte of file (a 256 MiB file: several GiB). Parsed here row by row into float32:
    the peak grows by about the file's size plus 4 bytes a logit."""
    rows, classes = 8192, 1000  # 8.2 M logits written as "0.5," : 4 bytes each
    path = tmp_path / "results.json"
    with open(path, "w") as f:
        f.write('{"images": ' + json.dumps(_names(rows)) + ', "logits": [')
        row = "[" + ",".join(["0.5"] * classes) + "]"
        f.write(",".join([row] * rows))
        f.write("]}")
    size = path.stat().st_size
    assert size > 30 << 20
    rc, err, grew, seconds = growth(tmp_path, "from crossvit_edge.harness import load_results\n",
                                    "r = load_results(sys.argv[1])\nassert r['logits'].shape == (8192, 1000) and float(r['logits'].mean()) == 0.5", path)
    assert rc == 0, err
    assert grew < size + rows * classes * 4 + (48 << 20), f"peak grew by {grew >> 20} MiB for a {size >> 20} MiB file"
    assert seconds < 120


def test_results_parser_refuses_what_json_refuses(tmp_path):
    from crossvit_edge.harness import parse_results_json, validate_results

    def parse(doc: bytes):
        return validate_results(parse_results_json(doc, "r"), "r")

    ok = parse(b'{"images": ["a", "b"], "logits": [[1, -2.5e3], [0.0, 1E2]], "bundle": "[1, 2] NaN \\" [3]"}')
    assert ok["logits"].tolist() == [[1, -2500], [0, 100]] and ok["bundle"] == '[1, 2] NaN " [3]'
    for doc, expect in [
        (b'{"images": ["a"], "logits": [[1, NaN]]}', "NaN is not a JSON number"),
        (b'{"images": ["a"], "logits": [[Infinity]]}', "Infinity is not a JSON number"),
        (b'{"images": ["a"], "logits": [[1,,2]]}', "not valid JSON"),
        (b'{"images": ["a"], "logits": [[1 2]]}', "not valid JSON"),
        (b'{"images": ["a"], "logits": [[01]]}', "not valid JSON"),
        (b'{"images": ["a"], "logits": [[1e999]]}', "NaN or infinite"),
        (b'{"images": ["a"], "logits": [[1e39]]}', "beyond float32"),
        (b'{"images": ["a"], "logits": [[' + b"9" * 5000 + b']]}', "not valid JSON"),
        (b'{"images": ["a", "b"], "logits": [[1, 2], [3]]}', "equal-length"),
        (b'{"images": ["a"], "logits": [[[1]]]}', "logits"),
        (b'{"images": ["a"], "logits": [[1]]', "not valid JSON"),
        (b'{"images": ["a], "logits": [[1]]}', "not valid JSON"),
        (b'[' * 100 + b']' * 100, "nested too deeply"),
    ]:
        with pytest.raises(UserError, match=expect):
            parse(doc)


def test_results_parser_bounds_and_linear_time(tmp_path):
    from crossvit_edge import harness

    def refused(doc: bytes, expect: str) -> float:
        t = time.time()
        with pytest.raises(UserError, match=expect):
            harness.parse_results_json(doc, "r")
        return time.time() - t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "MAX_RESULTS_VALUES", 100)
        assert refused(b'{"logits": [' + b",".join([b"[1,2,3]"] * 40) + b"]}", "more than 100 logits") < 1
        mp.setattr(harness, "MAX_RESULTS_VALUES", 1 << 30)
        mp.setattr(harness, "MAX_RESULTS_ROWS", 10)
        refused(b'{"logits": [' + b",".join([b"[1]"] * 11) + b"]}", "10 rows")
        mp.setattr(harness, "MAX_RESULTS_TOKENS", 1000)
        refused(b"[" + b"[]," * 2000 + b"[]]", "more than 1000 JSON values")
        refused(b'{"images": [' + b",".join([b'"a"'] * 2000) + b"]}", "more than 1000 JSON values")
        mp.setattr(harness, "MAX_RESULTS_OTHER_BYTES", 1000)
        refused(b'{"bundle": "' + b"x" * 2000 + b'"}', "2014 bytes besides the logits")
    # what would make a backtracking tokenizer quadratic: each is refused at once
    assert refused(b'"' + b'\\"' * 2_000_000, "not valid JSON") < 10
    assert refused(b"[" + b"1" * 5_000_000, "not valid JSON") < 10
    assert refused(b"[" * 1000 + b"1," * 1_000_000, "not valid JSON|nested") < 10


def test_merge_fifo_and_device_are_refused_without_blocking(tmp_path, base_bundle):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    os.mkfifo(tmp_path / "results.json")
    for merge, expect in [(tmp_path / "results.json", "FIFO (named pipe), not a regular file"), ("/dev/zero", "character device"),
                          (sparse(tmp_path / "big.json", 1 << 40), "more than the 1073741824")]:
        r = _quick(tmp_path, "crossvit_edge.profile", base_bundle, "--data", images, "--merge", merge, "--output", tmp_path / "out")
        _assert_one_line(r, expect)
        assert r.seconds < 30
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Checkpoints (item 5, 8)


def test_checkpoint_fifo_device_and_bounds(tmp_path, micro_checkpoint):
    from crossvit_edge import checkpoint
    from crossvit_edge.checkpoint import load_checkpoint

    os.mkfifo(tmp_path / "w.safetensors")
    os.mkfifo(tmp_path / "w.pth")
    t = time.time()
    for path, expect in [(tmp_path / "w.safetensors", "FIFO"), (tmp_path / "w.pth", "FIFO"), ("/dev/zero", "character device"),
                         (sparse(tmp_path / "big.pth", 1 << 40), "more than the 2147483648")]:
        with pytest.raises(UserError, match=expect):
            load_checkpoint(path)
    assert time.time() - t < 10
    # a zip-format .pth whose records inflate past the bound: counted from the zip directory
    import torch

    torch.save({"w": torch.zeros(1 << 18)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as zin, zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert (tmp_path / "deflated.pth").stat().st_size < 64 << 10
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 1 << 20)
        with pytest.raises(UserError, match="inflating to 10"):
            load_checkpoint(tmp_path / "deflated.pth")


def _storage_bomb(tmp_path: Path, elements: int):
    """(zip-format, legacy-format) .pth files of a 4-element tensor whose pickle claims ``elements``."""
    import io

    import torch

    big = elements.to_bytes(5, "little")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(tmp_path / "zip.pth", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cpuq\x06K\x04t", b"cpuq\x06\x8a\x05" + big + b"t").replace(b"QK\x00K\x04\x85", b"QK\x00\x8a\x05" + big + b"\x85")
                assert big in data
            zout.writestr(info, data)
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue().replace(b"cpuq\x06K\x04Ntq", b"cpuq\x06\x8a\x05" + big + b"Ntq").replace(b"QK\x00K\x04\x85", b"QK\x00\x8a\x05" + big + b"\x85")
    assert big in raw
    (tmp_path / "legacy.pth").write_bytes(raw)
    return tmp_path / "zip.pth", tmp_path / "legacy.pth"


def test_checkpoint_claiming_a_terabyte_tensor(tmp_path):
    """A few hundred bytes whose pickle claims a 1 TiB storage: torch checks a zip record's size and
    a legacy storage against the file; both end in one line, in milliseconds, without the memory."""
    from crossvit_edge.checkpoint import load_checkpoint

    zipped, legacy = _storage_bomb(tmp_path, 1 << 38)
    for path in (zipped, legacy):
        rc, err, grew, seconds = growth(tmp_path, "import torch\nfrom crossvit_edge.checkpoint import load_checkpoint\n",
                                        "load_checkpoint(sys.argv[1])", path)
        assert rc == 0 and err.count("\n") == 1 and "corrupt or truncated checkpoint" in err, err
        assert grew < 64 << 20 and seconds < 60, (grew, seconds)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(zipped)


# --------------------------------------------------------------------------------------------------
# Output that a file name or a label can forge (item 6)

HOSTILE_NAMES = {
    "nl\nfake\t9\t1.000000.png": "nl\\nfake\\t9\\t1.000000.png",
    "esc\x1b[2Jclear.png": "esc\\x1b[2Jclear.png",
    "sep\u2028line\u2029para.png": "sep\\u2028line\\u2029para.png",
    "c1\x85nel\x9b31m.png": "c1\\u0085nel\\u009b31m.png",
    "bidi\u202egnp.exe.png": "bidi\\u202egnp.exe.png",
    "back\\slash\r.png": "back\\\\slash\\r.png",
    "caf\u00e9 \u65e5\u672c.png": "caf\u00e9 \u65e5\u672c.png",  # printable Unicode stays as it is
}


def hostile_folder(root: Path) -> dict:
    """A folder of PNGs with the names above and one that is not UTF-8; {path as str: expected
    escaped field}."""
    folder = root / "imgs"
    folder.mkdir()
    expected = {}
    for name, escaped in HOSTILE_NAMES.items():
        write_png(folder / name, seed=len(name))
        expected[str(folder / name)] = str(folder) + "/" + escaped
    raw = os.fsencode(folder) + b"/bad\xff\xfe.png"
    write_png(Path(os.fsdecode(raw)), seed=7)
    expected[os.fsdecode(raw)] = str(folder) + "/bad\\xff\\xfe.png"
    return expected


def test_tsv_fields_escaped_paths_and_labels(tmp_path, base_bundle):
    """classify's TSV: one line per image, three fields each, every path escaped as documented;
    --json unchanged (the raw names, JSON-escaped)."""
    case = Case(tmp_path, base_bundle)
    expected = hostile_folder(tmp_path)
    case.edit(lambda m: m.__setitem__("labels", [f"l\\{i}" for i in range(m["num_classes"])]))  # a backslash is allowed, escaped
    r = case.run("crossvit_edge.classify", case.bundle, tmp_path / "imgs")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(expected)
    fields = [line.split("\t") for line in lines[:-1]]
    assert all(len(f) == 3 for f in fields), fields
    assert sorted(f[0] for f in fields) == sorted(expected.values())
    assert all(f[1].startswith("l\\\\") for f in fields)
    assert all(ord(ch) >= 32 and not 0x7F <= ord(ch) <= 0x9F and ch not in "\u2028\u2029\u202e" for f in fields for field in f for ch in field)
    r = case.run("crossvit_edge.classify", case.bundle, tmp_path / "imgs", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(p["image"] for p in out["predictions"]) == sorted(expected)
    assert all(p["top_k"][0]["label"].startswith("l\\") for p in out["predictions"])


def test_tsv_field_rule():
    from crossvit_edge.tsv import tsv_field, unsafe_label_char

    for raw, escaped in HOSTILE_NAMES.items():
        assert tsv_field(raw) == escaped
    assert tsv_field(os.fsdecode(b"a\xc0\x80b\xed\xa0\x80")) == "a\\xc0\\x80b\\xed\\xa0\\x80"
    assert tsv_field("\x00\x7f\x9f\u200e\u200f\u2066\u2069") == "\\x00\\x7f\\u009f\\u200e\\u200f\\u2066\\u2069"
    assert tsv_field("\u00a0\u00ad\u2027\u202f\U0001F600") == "\u00a0\u00ad\u2027\u202f\U0001F600"
    assert unsafe_label_char("a\\b c\u00e9") is None
    for bad in ("\x85", "\u009b", "\u2028", "\u2029", "\u202e", "\t", "\x7f", "\ud800"):
        assert unsafe_label_char("x" + bad) is not None


@pytest.mark.parametrize("label", ["csi\u009b31m", "nel\x85x", "line\u2028sep", "para\u2029", "rlo\u202eabc", "del\x7f", "surrogate\ud800"])
def test_labels_with_c1_controls_or_separators_refused(tmp_path, base_bundle, label):
    case = Case(tmp_path, base_bundle)
    case.edit(lambda m: m.__setitem__("labels", [label] + [str(i) for i in range(1, m["num_classes"])]))
    from crossvit_edge.tsv import unsafe_label_char

    case.assert_all_refused(f"labels[0]: contains U+{ord(unsafe_label_char(label).group()):04X}")


# --------------------------------------------------------------------------------------------------
# YAML that safe_load cannot construct (item 7)


@pytest.mark.parametrize("value,expect", [
    ("9" * 5000, "ValueError: Exceeds the limit"),
    ("2023-02-30", "ValueError: day is out of range"),
    ("!!float x", "could not convert string to float"),
    ("!!int abc", "invalid literal for int()"),
    ("!!timestamp 'x'", "a value cannot be constructed"),
])
def test_profile_yaml_construction_errors(tmp_path, value, expect):
    path = tmp_path / "p.yaml"
    path.write_text(f"name: x\ntarget: onnx\nbatch_size: {value}\n")
    r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--profile", path, "--output", tmp_path / "b")
    _assert_one_line(r, expect)
    assert r.seconds < 30 and not (tmp_path / "b").exists()


def test_profile_fifo_and_device(tmp_path):
    os.mkfifo(tmp_path / "p.yaml")
    (tmp_path / "dev.yaml").symlink_to("/dev/zero")
    for path, expect in [(tmp_path / "p.yaml", "FIFO"), (tmp_path / "dev.yaml", "character device")]:
        r = _quick(tmp_path, "crossvit_edge.convert", "--target", "onnx", "--profile", path, "--output", tmp_path / "b")
        _assert_one_line(r, expect)
        assert r.seconds < 30


# --------------------------------------------------------------------------------------------------
# A full disk (item 7; SIGHUP and SIGQUIT: test_security.test_sigterm_during_conversion_cleans_up)


def test_full_disk_during_conversion(tmp_path, micro_checkpoint):
    """RLIMIT_FSIZE (portable, no root) makes every write past 256 KiB fail with EFBIG, as a full
    disk makes it fail with ENOSPC (Python ignores SIGXFSZ): the ONNX file cannot be written. One
    line, exit 2, no staging folder, no bundle."""
    rc, _, err, _, _ = measured([sys.executable, MICRO_CLI, "crossvit_edge.convert", "--target", "onnx", "--checkpoint", micro_checkpoint,
                                 "--output", tmp_path / "out" / "b"], cwd=tmp_path, limit_fsize=256 << 10)
    _assert_one_line(subprocess.CompletedProcess([], rc, "", err), "cannot write")
    assert "File too large" in err
    assert list((tmp_path / "out").iterdir()) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or sys.platform != "linux":
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_full_disk_for_real_tmpfs(tmp_path, micro_checkpoint, base_bundle):
    """A real ENOSPC: a 1 MiB tmpfs (root only; skipped where mounting is not permitted). convert
    ends in one line with nothing left on it; profile's reports are each written whole or not at
    all (what was there before stays)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        rc, _, err, _, _ = measured([sys.executable, MICRO_CLI, "crossvit_edge.convert", "--target", "onnx", "--checkpoint", micro_checkpoint,
                                     "--output", disk / "b"], cwd=tmp_path)
        _assert_one_line(subprocess.CompletedProcess([], rc, "", err), "No space left on device")
        assert list(disk.iterdir()) == []
        # profile: fill the disk but for a few KB, with an old report.md there
        out = disk / "report"
        out.mkdir()
        (out / "report.md").write_text("old report\n")
        with open(disk / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
        rc, _, err, _, _ = measured([sys.executable, MICRO_CLI, "crossvit_edge.profile", base_bundle, "--data", images, "--output", out,
                                     "--runs", 1, "--warmup", 0], cwd=tmp_path)
        # (profiling itself ran: its progress bars come before the one error line)
        assert rc == 2 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("crossvit_edge.profile: error: ") and "No space left on device" in err, err[-2000:]
        assert (out / "report.md").read_text() == "old report\n"
        assert sorted(p.name for p in out.iterdir()) in (["report.md"], ["report.json", "report.md"])
        if (out / "report.json").exists():
            json.loads((out / "report.json").read_text())  # whole, if written at all
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --------------------------------------------------------------------------------------------------
# Outputs only as new files inside --output (item 8)


def test_report_writer_does_not_follow_planted_symlinks(tmp_path, base_bundle):
    """An --output folder (shared, say) holding report.json/.md/.png symlinks to files elsewhere:
    profile replaces the links with its reports; the files they pointed at are untouched."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    for name in ("report.json", "report.md", "report.png"):
        (outside / name).write_text("victim")
        (out / name).symlink_to(outside / name)
    rc, _, err, _, _ = measured([sys.executable, MICRO_CLI, "crossvit_edge.profile", base_bundle, "--data", images, "--output", out,
                                 "--runs", 1, "--warmup", 0], cwd=tmp_path)
    assert rc == 0, err[-2000:]
    assert all((outside / n).read_text() == "victim" for n in ("report.json", "report.md", "report.png"))
    assert sorted(p.name for p in outside.iterdir()) == ["report.json", "report.md", "report.png"]
    for name in ("report.json", "report.md", "report.png"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 100
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]


def test_bundle_output_symlink_is_replaced_not_followed(tmp_path, micro_checkpoint):
    """--output naming a symlink to a folder elsewhere, with --overwrite: the link is replaced by the
    bundle; the folder it pointed at keeps its files."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (tmp_path / "b").symlink_to(elsewhere)
    rc, _, err, _, _ = measured([sys.executable, MICRO_CLI, "crossvit_edge.convert", "--target", "onnx", "--checkpoint", micro_checkpoint,
                                 "--output", tmp_path / "b", "--overwrite"], cwd=tmp_path)
    assert rc == 0, err[-2000:]
    assert not (tmp_path / "b").is_symlink() and (tmp_path / "b" / "manifest.json").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "elsewhere"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the isolated first load is Linux-only")
def test_first_load_child_is_bounded_in_memory_and_cpu_time():
    """A load that allocates without bound (native memory, written page by page, as a runtime
    does for a size read from a hostile blob) or spins: one line naming the bound (RLIMIT_DATA,
    RLIMIT_CPU in the child), and this process untouched. The bounds probe_runner passes come from
    the bundle's sizes (crossvit_edge.isolation.child_limits)."""
    import time

    from crossvit_edge import isolation

    def allocate_without_bound():
        import numpy as np

        chunks = []
        while True:  # 64 MiB at a time, touched: RSS grows until the limit refuses the next one
            chunks.append(np.ones(8 << 20))

    t = time.time()
    with pytest.raises(UserError, match=r"needed more memory than this bundle's bound \(bounded to 256 MiB of memory"):
        isolation.in_child("bundle x: y.pte", allocate_without_bound, memory=256 << 20, cpu=60)
    assert time.time() - t < 60

    def spin():
        while True:
            pass

    t = time.time()
    with pytest.raises(UserError, match=r"used more CPU time than this bundle's bound .*2 s of CPU time"):
        isolation.in_child("bundle x: y.pte", spin, memory=256 << 20, cpu=2)
    assert time.time() - t < 30
    memory, cpu = isolation.child_limits(18 << 20, 691200, threads=2)
    assert memory == (1 << 30) + 4 * (18 << 20) + 32 * 691200 and cpu == int((60 + 60 * 18 / 1024) * 2) + 1
    assert isolation.child_limits(8 << 30, 256 << 20, threads=1) == ((1 << 30) + (32 << 30) + (8 << 30), 541)
