"""Reading and writing files named by untrusted input, without surprises. Torch-free (the device
runner uses it too).

Reading: a path given on the command line or named by a bundle may be a FIFO (opening it blocks
until someone writes), a device node (``/dev/zero`` never ends, ``/dev/tty`` waits for a key), a
folder, a symlink or a sparse file of a terabyte. ``open_regular`` accepts a regular file only:
the path is stat-ed first (nothing but a regular file is ever opened), then opened with
``O_NONBLOCK`` (a FIFO swapped in between cannot block) and checked again with ``fstat`` on the
open descriptor (the file checked is the file read). A byte bound refuses a larger file before a
byte is read, and the readers below never read more than the bound even if the file grows.

Writing: outputs are created as new files (``O_CREAT | O_EXCL | O_NOFOLLOW``, temporary name) and
renamed over the destination when complete. A rename replaces a symlink that was already there; it
never writes through it, so a link planted in an ``--output`` folder cannot send a write elsewhere,
and a failed write (a full disk) leaves the destination as it was.

Every failure is a one-line ``UserError`` that names the file (``what``, or the path cut short).
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from .errors import UserError, brief

PathLike = Union[str, os.PathLike]

_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_CHUNK = 1 << 20


def _label(path: PathLike, what: Optional[str]) -> str:
    return what if what is not None else brief(os.fsdecode(path), 200)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _os_error(label: str, e: OSError, doing: str = "cannot read") -> UserError:
    return UserError(f"{label}: {doing} ({e.strerror or type(e).__name__})")


def _check_size(label: str, size: int, max_bytes: Optional[int]) -> None:
    if max_bytes is not None and size > max_bytes:
        raise UserError(f"{label}: {size} bytes, more than the {max_bytes} this tool reads")


def open_regular(path: PathLike, what: Optional[str] = None, *, max_bytes: Optional[int] = None,
                 follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file of at most ``max_bytes`` bytes
    (None: no bound); with ``follow_symlinks=False`` a symlink is refused too. FIFOs, devices,
    sockets and folders are refused without blocking. The caller closes the returned file (use
    ``with``) and must not read past the bound: ``read_bytes`` and ``sha256`` do that for you."""
    label = _label(path, what)
    try:
        before = os.stat(path) if follow_symlinks else os.lstat(path)
    except FileNotFoundError:
        raise UserError(f"{label}: not found") from None
    except OSError as e:
        raise _os_error(label, e) from None
    if not stat.S_ISREG(before.st_mode):
        raise UserError(f"{label}: {_kind(before.st_mode)}, not a regular file")
    _check_size(label, before.st_size, max_bytes)
    flags = os.O_RDONLY | _O_NONBLOCK | _O_BINARY | (0 if follow_symlinks else _O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(label, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise UserError(f"{label}: replaced while being opened ({_kind(st.st_mode)})")
        _check_size(label, st.st_size, max_bytes)
        if _O_NONBLOCK:
            import fcntl  # POSIX only, like O_NONBLOCK itself

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: PathLike, what: Optional[str] = None, *, max_bytes: Optional[int] = None,
                  follow_symlinks: bool = True) -> int:
    """``open_regular``'s checks for a path that a library will open by name (torch.load,
    onnxruntime): returns the size in bytes. Prefer handing the library the open file instead."""
    with open_regular(path, what, max_bytes=max_bytes, follow_symlinks=follow_symlinks) as f:
        return os.fstat(f.fileno()).st_size


def read_bytes(path: PathLike, what: Optional[str] = None, *, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The content of a regular file of at most ``max_bytes`` bytes; never reads more (a file that
    grows past the bound while read is refused)."""
    label = _label(path, what)
    with open_regular(path, what, max_bytes=max_bytes, follow_symlinks=follow_symlinks) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise _os_error(label, e) from None
    if len(data) > max_bytes:
        raise UserError(f"{label}: more than the {max_bytes} bytes this tool reads")
    return data


def read_chunks(path: PathLike, what: Optional[str] = None, *, max_bytes: int, follow_symlinks: bool = True) -> Iterator[bytes]:
    """The bytes of a regular file of at most ``max_bytes`` bytes, in 1 MiB chunks, never reading
    past ``max_bytes`` (a listed size: a sparse terabyte behind a small size is refused by its
    size, not read)."""
    label = _label(path, what)
    with open_regular(path, what, max_bytes=max_bytes, follow_symlinks=follow_symlinks) as f:
        left = max_bytes + 1  # one byte more than allowed tells a file that grew
        try:
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                if left <= 0:
                    raise UserError(f"{label}: more than the {max_bytes} bytes this tool reads (it grew while being read)")
                yield chunk
        except OSError as e:
            raise _os_error(label, e) from None


def sha256(path: PathLike, what: Optional[str] = None, *, max_bytes: int, follow_symlinks: bool = True) -> str:
    """sha256 of a regular file of at most ``max_bytes`` bytes, streamed (``read_chunks``)."""
    h = hashlib.sha256()
    for chunk in read_chunks(path, what, max_bytes=max_bytes, follow_symlinks=follow_symlinks):
        h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Writing


def check_inside(path: PathLike, root: PathLike, what: Optional[str] = None) -> Path:
    """``path`` (which need not exist) resolved, required to lie inside ``root`` (resolved) with no
    symlink on the way: a folder link planted under an output folder cannot redirect a write."""
    label = _label(path, what)
    base = Path(root).resolve()
    target = Path(os.path.abspath(path))  # lexical: '..' cannot climb out unseen
    for anchor in (Path(os.path.abspath(root)), base):  # the root as given (a link of the user's own) or resolved
        try:
            rel = target.relative_to(anchor)
            break
        except ValueError:
            continue
    else:
        raise UserError(f"{label}: outside the output folder {brief(str(base), 200)}")
    walk = base
    for part in rel.parts[:-1]:
        walk = walk / part
        if walk.is_symlink():
            raise UserError(f"{label}: {brief(str(walk), 200)} is a symbolic link; outputs are written only inside the output folder")
    return base / rel


@contextmanager
def atomic_writer(path: PathLike, what: Optional[str] = None, *, text: bool = False, root: Optional[PathLike] = None,
                  overwrite: bool = True, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a new temporary file beside ``path`` (created with O_CREAT|O_EXCL|O_NOFOLLOW); when the
    ``with`` block ends without error it is flushed, fsync-ed and renamed onto ``path`` (replacing
    a file or symlink there, never writing through it). On any error the temporary file is removed
    and ``path`` is untouched. ``root``: ``path`` must lie inside it (``check_inside``).
    ``overwrite=False``: refuse an existing ``path``. OSError (a full disk) becomes UserError."""
    label = _label(path, what)
    dest = check_inside(path, root, what) if root is not None else Path(path)
    if not overwrite and os.path.lexists(dest):
        raise UserError(f"{label}: exists; refusing to replace it")
    try:
        # mkstemp opens with O_CREAT | O_EXCL | O_NOFOLLOW under a random name
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name[:100]}.", suffix=".tmp")
    except OSError as e:
        raise _os_error(label, e, "cannot write") from None
    try:
        os.fchmod(fd, mode) if hasattr(os, "fchmod") else os.chmod(tmp, mode)
        with os.fdopen(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": "\n"} if text else {})) as f:
            fd = -1
            yield f
            f.flush()
            os.fsync(f.fileno())
        if not overwrite:
            os.link(tmp, dest)  # fails if dest appeared meanwhile: a new file only
            os.unlink(tmp)
        else:
            os.replace(tmp, dest)
    except OSError as e:
        raise _os_error(label, e, "cannot write") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes(path: PathLike, data: Union[bytes, str], what: Optional[str] = None, *, root: Optional[PathLike] = None,
                overwrite: bool = True, mode: int = 0o644) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` through ``atomic_writer``."""
    with atomic_writer(path, what, text=isinstance(data, str), root=root, overwrite=overwrite, mode=mode) as f:
        f.write(data)
