"""Reading a ``.npz`` that came from elsewhere (``--calib-stats``, a device's intermediates file for
``debug --merge``): the one checked reader. Torch-free.

A ``.npz`` is a zip of ``.npy`` members. Everything that sizes the work is checked before the work:
the file by its size (a regular file, ``safe_io``), the members by the zip directory (how many,
what they inflate to in all: a deflate bomb is refused before a byte is inflated; zipfile then
never inflates a member past its directory size), and each member by its ``.npy`` header before its
data (format version, a number dtype of bounded item size, no object dtype, the number of
dimensions, every dimension and the element count), then read to exactly the size its header
declares. No pickles. Each member is read at most once. Every failure is one ``UserError`` that
names the file and the member.
"""
from __future__ import annotations

import zipfile
import zlib
from typing import BinaryIO, Optional, Sequence, Tuple

import numpy as np

from . import safe_io
from .errors import UserError, brief

_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)


class CheckedNpz:
    """``with CheckedNpz(path, source, ...) as z: z.array("x", ...)``. ``source`` prefixes every
    error; the bounds are the caller's (documented in docs/security.md where each caller is)."""

    def __init__(self, path, source: str, *, max_file_bytes: int, max_inflated_bytes: int, max_members: int):
        self.path, self.source = path, source
        self.max_file_bytes, self.max_inflated_bytes, self.max_members = max_file_bytes, max_inflated_bytes, max_members
        self._file: Optional[BinaryIO] = None
        self._zip: Optional[zipfile.ZipFile] = None
        self._used: set = set()

    def fail(self, where: str, message: str):
        raise UserError(f"{self.source}: {where}: {message}")

    def __enter__(self) -> "CheckedNpz":
        self._file = safe_io.open_regular(self.path, self.source, max_bytes=self.max_file_bytes)
        try:
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
            if len(infos) > self.max_members:
                raise UserError(f"{self.source}: {len(infos)} arrays, more than {self.max_members}")
            inflated = sum(i.file_size for i in infos)
            if inflated > self.max_inflated_bytes:  # the directory says what the members inflate to; reads stop there
                raise UserError(f"{self.source}: its arrays inflate to {inflated} bytes, more than {self.max_inflated_bytes}")
        except UserError:
            self.close()
            raise
        except _READ_ERRORS as e:
            self.close()
            raise UserError(f"{self.source}: not a .npz file ({_why(e)})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def names(self) -> Sequence[str]:
        """The array names (members ``<name>.npy``)."""
        return [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]

    def array(self, key: str, where: str, *, kinds: str = "iuf", max_itemsize: int = 8, ndims: Tuple[int, int] = (1, 1),
              max_values: int, min_values: int = 1, first_dim: Optional[int] = None) -> np.ndarray:
        """Member ``key`` as an array (read-only, the file's dtype), after its header passed: dtype
        kind in ``kinds`` of at most ``max_itemsize`` bytes, ``ndims[0] <= ndim <= ndims[1]``,
        ``min_values <= elements <= max_values``, the first dimension ``first_dim`` if given."""
        name = f"{key}.npy"
        if name in self._used:  # each member read once: metadata cannot make us inflate one a million times
            self.fail(where, f"array {key!r} is named twice")
        self._used.add(name)
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            self.fail(where, f"array {brief(key, 80)} is missing")
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    self.fail(where, f"unsupported .npy format version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                # dtype and size from the header, before the data: '|V2000000000' is one "value" of 2 GB
                count = 1
                for d in shape:
                    count *= d if isinstance(d, int) and d >= 0 else -1
                ok = (dtype.kind in kinds and not dtype.hasobject and dtype.fields is None and dtype.itemsize <= max_itemsize
                      and ndims[0] <= len(shape) <= ndims[1] and min_values <= count <= max_values
                      and (first_dim is None or (len(shape) > 0 and shape[0] == first_dim)))
                if not ok:
                    what = f"{ndims[0]}-D" if ndims[0] == ndims[1] else f"{ndims[0]}- to {ndims[1]}-D"
                    rows = f" with {first_dim} rows" if first_dim is not None else ""
                    self.fail(where, f"expected a {'non-empty ' if min_values else ''}{what} numeric array{rows} of at most "
                                     f"{max_values} values, got {brief(str(dtype), 40)} of shape {brief(str(shape), 40)}")
                nbytes = count * dtype.itemsize
                data = f.read(nbytes + 1)
        except UserError:
            raise
        except _READ_ERRORS as e:
            self.fail(where, f"unreadable array {brief(key, 80)} ({_why(e)})")
        if len(data) != nbytes:
            self.fail(where, f"array data of {len(data)} bytes does not match its header ({nbytes} bytes)")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _why(e: BaseException) -> str:
    return brief(str(e).splitlines()[0] if str(e) else type(e).__name__, 120)
