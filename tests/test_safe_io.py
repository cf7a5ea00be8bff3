"""crossvit_edge.safe_io on real files: FIFOs, device nodes, folders, symlinks, sparse files and
planted output links, each refused in one line without blocking; outputs only as new files."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from crossvit_edge import safe_io
from crossvit_edge.errors import UserError

from .conftest import REPO


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("reader", ["open_regular", "check_regular", "read_bytes", "sha256"])
def test_non_regular_paths_are_refused_without_blocking(tmp_path, reader):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fn = getattr(safe_io, reader)
    kwargs = {"max_bytes": 1 << 20} if reader in ("read_bytes", "sha256") else {}
    start = time.monotonic()
    assert "FIFO" in one_line_error(fn, fifo, "the fifo", **kwargs)  # would block forever in open()
    assert "character device" in one_line_error(fn, "/dev/zero", **kwargs)  # would never end
    assert "folder" in one_line_error(fn, tmp_path, **kwargs)
    assert "not found" in one_line_error(fn, tmp_path / "missing", **kwargs)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    assert "FIFO" in one_line_error(fn, link, **kwargs)
    assert time.monotonic() - start < 5


def test_symlinks_refused_on_request(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"abc")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert safe_io.read_bytes(link, max_bytes=10) == b"abc"
    assert "symbolic link" in one_line_error(safe_io.read_bytes, link, max_bytes=10, follow_symlinks=False)
    assert safe_io.read_bytes(real, max_bytes=10, follow_symlinks=False) == b"abc"


def test_byte_bound_refuses_before_reading(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, a few blocks on disk
    start = time.monotonic()
    for fn in (safe_io.read_bytes, safe_io.sha256):
        assert f"{1 << 40} bytes, more than the 1024" in one_line_error(fn, sparse, "listed file", max_bytes=1024)
    assert "more than" in one_line_error(safe_io.open_regular, sparse, max_bytes=1024)
    assert time.monotonic() - start < 2
    small = tmp_path / "small"
    small.write_bytes(b"x" * 1024)
    assert safe_io.read_bytes(small, max_bytes=1024) == b"x" * 1024
    assert safe_io.sha256(small, max_bytes=1024) == hashlib.sha256(b"x" * 1024).hexdigest()
    assert safe_io.check_regular(small, max_bytes=1024) == 1024


def test_sha256_streams_large_files(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert safe_io.sha256(p, max_bytes=len(data)) == hashlib.sha256(data).hexdigest()


def test_writer_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep")
    (out / "report.md").symlink_to(victim)
    safe_io.write_bytes(out / "report.md", "# report\n", root=out)
    assert victim.read_text() == "keep"
    assert not (out / "report.md").is_symlink() and (out / "report.md").read_text() == "# report\n"
    # a planted folder link is refused, and a path out of the root
    (out / "figures").symlink_to(outside)
    assert "symbolic link" in one_line_error(safe_io.write_bytes, out / "figures" / "a.png", b"x", root=out)
    assert "outside the output folder" in one_line_error(safe_io.write_bytes, out / ".." / "outside" / "b", b"x", root=out)
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_writer_new_files_only(tmp_path):
    p = tmp_path / "f"
    safe_io.write_bytes(p, b"1", overwrite=False)
    assert "exists" in one_line_error(safe_io.write_bytes, p, b"2", overwrite=False)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "exists" in one_line_error(safe_io.write_bytes, tmp_path / "dangling", b"2", overwrite=False)
    assert not (tmp_path / "nowhere").exists() and p.read_bytes() == b"1"
    assert oct(p.stat().st_mode & 0o777) == oct(0o644)


def test_writer_leaves_nothing_on_error(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with safe_io.atomic_writer(p) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["f"]


def test_writer_on_a_full_disk_is_one_line(tmp_path):
    """RLIMIT_FSIZE makes a write past the limit fail with EFBIG (Python ignores SIGXFSZ), as a
    full disk makes it fail with ENOSPC: one line, the old file kept, no temporary left."""
    code = (
        "import resource, sys\n"
        "from crossvit_edge import safe_io\n"
        "from crossvit_edge.errors import UserError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    safe_io.write_bytes({str(tmp_path / 'f')!r}, b'x' * 100000)\n"
        "except UserError as e:\n"
        "    print(e, file=sys.stderr); sys.exit(2)\n"
    )
    (tmp_path / "f").write_bytes(b"old")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "File too large" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "f").read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["f"]
