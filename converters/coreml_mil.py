"""A numpy interpreter for Core ML ML Programs: the check that runs an ``.mlpackage`` off macOS.

Core ML's own runtime exists only on Apple platforms, so on Linux nothing executes an ``.mlpackage``.
This module reads the saved package back, as an app would receive it, and executes its ``main``
function with numpy:

* the program is the package's spec protobuf (``Data/com.apple.CoreML/model.mlmodel``, found
  through ``Manifest.json``): ``mlProgram.functions["main"]``, its block for the function's opset,
  the operations in order, each with named inputs (bindings to earlier values or inline values)
  and attributes;
* weights live in ``weights/weight.bin`` (MIL blob storage, version 2) and are referenced by
  ``BlobFileValue`` (file name relative to ``@model_path``, the folder holding ``model.mlmodel``,
  and the byte offset of the blob's 64-byte metadata record). The format is parsed here directly:
  a 64-byte file header (``uint32`` blob count, ``uint32`` version = 2), then per blob a metadata
  record (``uint32`` sentinel ``0xDEADBEEF``, ``uint32`` storage dtype, ``uint64`` size in bytes,
  ``uint64`` offset of the data) followed by the data. The storage dtype is checked against the
  tensor type the program declares.
* every operation is executed with its documented MIL semantics, and its result is stored in the
  dtype the program declares for that output: fp16 tensors are rounded to ``np.float16`` after
  every op (inputs are widened to fp32 for the arithmetic itself, so the interpreter models fp16
  *storage* between ops, not a particular accelerator's accumulator width); fp32 ops run in
  float32. Declared output shapes are checked against the computed ones.

Only the operations that CrossViT's programs contain (fp32, fp16, weight-only int8 and W8A8, iOS16
to iOS18 opsets, tensor or image input) are implemented, plus a few that the family's variants
need (``relu`` for the dagger stems). Any other operation raises ``UnsupportedMILOp`` naming it:
the checker never guesses.
"""
from __future__ import annotations

import logging
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crossvit_edge.errors import UserError

log = logging.getLogger(__name__)


class MILCheckerError(UserError):
    """The package cannot be read or is inconsistent with what it declares."""


class UnsupportedMILOp(MILCheckerError):
    """The program contains an operation (or an op variant) that the checker does not implement."""

    def __init__(self, op_type: str, detail: str = "", op_name: str = ""):
        self.op_type = op_type
        where = f" ({op_name!r})" if op_name else ""
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"the Core ML checker does not implement MIL op {op_type!r}{where}{extra}; "
            f"implemented: {', '.join(sorted(OPS))}"
        )


# --------------------------------------------------------------------------------------------------
# Data types


_PROTO_PACKAGE = "_crossvit_edge_coreml_proto"


def _proto():
    """coremltools' generated protobuf modules (``coremltools/proto/*_pb2.py``), loaded as a package
    of their own: ``import coremltools.proto`` runs ``coremltools/__init__``, which imports torch
    and the converters (seconds to a minute, hundreds of MB, warnings on stderr) before a single
    path of a package has been checked. The generated modules need only protobuf; they register
    the same descriptors, so their messages are coremltools' own classes."""
    import importlib
    import importlib.util
    import sys
    import types

    if _PROTO_PACKAGE not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise MILCheckerError("reading a Core ML package needs coremltools (its protobuf definitions)")
        package = types.ModuleType(_PROTO_PACKAGE)
        package.__path__ = [str(Path(p) / "proto") for p in spec.submodule_search_locations]
        package.__package__ = _PROTO_PACKAGE
        sys.modules[_PROTO_PACKAGE] = package
    return (importlib.import_module(f"{_PROTO_PACKAGE}.MIL_pb2"), importlib.import_module(f"{_PROTO_PACKAGE}.Model_pb2"))


# A splatted constant (one value for a whole declared shape) is the one value the checker expands
# itself: a few bytes of spec could otherwise ask for terabytes. No constant of a CrossViT program
# comes near it; it equals the largest input batch a manifest may declare (bundle.MAX_BATCH_INPUT_BYTES).
MAX_SPLAT_BYTES = 256 << 20

# MIL DataType enum name -> numpy dtype (None: no numpy storage type)
_NP_DTYPES: Dict[str, Any] = {
    "BOOL": np.bool_,
    "STRING": object,
    "FLOAT16": np.float16,
    "FLOAT32": np.float32,
    "FLOAT64": np.float64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}
# MIL blob storage dtype codes (MILBlob BlobDataType) for the byte-aligned types.
_BLOB_DTYPES = {1: np.float16, 2: np.float32, 3: np.uint8, 4: np.int8, 6: np.int16, 7: np.uint16, 14: np.int32, 15: np.uint32}
_BLOB_SENTINEL = 0xDEADBEEF
# ``cast``'s dtype strings
_CAST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
                "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_}


@dataclass(frozen=True)
class TensorType:
    dtype_name: str  # MIL DataType enum name
    shape: Optional[Tuple[Optional[int], ...]]  # None entries: unknown dims; None: not a tensor

    @property
    def np_dtype(self):
        if self.dtype_name not in _NP_DTYPES:
            raise MILCheckerError(f"tensor dtype {self.dtype_name} has no numpy equivalent in the checker")
        return _NP_DTYPES[self.dtype_name]

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype_name.lower()}[{dims}]"


def _tensor_type(value_type) -> TensorType:
    MIL_pb2, _ = _proto()
    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise MILCheckerError(f"the checker handles tensor values only, got a {kind}")
    t = value_type.tensorType
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions)
    return TensorType(MIL_pb2.DataType.Name(t.dataType), dims)


# --------------------------------------------------------------------------------------------------
# Weights


class BlobFile:
    """Read-only view of one MIL blob storage file (``weight.bin``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise MILCheckerError(f"cannot read weights {self.path}: {e}") from None
        if len(self._data) < 64:
            raise MILCheckerError(f"{self.path}: too short for a MIL blob file")
        self.count, self.version = struct.unpack_from("<II", self._data, 0)
        if self.version != 2:
            raise MILCheckerError(f"{self.path}: MIL blob storage version {self.version}, the checker reads version 2")

    def read(self, offset: int, ttype: TensorType) -> np.ndarray:
        if offset + 64 > len(self._data):
            raise MILCheckerError(f"{self.path}: blob offset {offset} is past the end of the file")
        sentinel, code, size, data_offset = struct.unpack_from("<IIQQ", self._data, offset)
        if sentinel != _BLOB_SENTINEL:
            raise MILCheckerError(f"{self.path}: no blob metadata at offset {offset}")
        if code not in _BLOB_DTYPES:
            raise MILCheckerError(f"{self.path}: blob at {offset} has storage type {code} (sub-byte or unknown), not read by the checker")
        dtype = np.dtype(_BLOB_DTYPES[code])
        declared = np.dtype(ttype.np_dtype)
        if dtype != declared:
            raise MILCheckerError(f"{self.path}: blob at {offset} stores {dtype}, the program declares {declared}")
        if data_offset + size > len(self._data):
            raise MILCheckerError(f"{self.path}: blob at {offset} runs past the end of the file")
        arr = np.frombuffer(self._data[data_offset : data_offset + size].tobytes(), dtype=dtype)
        shape = ttype.shape or ()
        if any(d is None for d in shape) or int(np.prod(shape, dtype=np.int64)) != arr.size:
            raise MILCheckerError(f"{self.path}: blob at {offset} holds {arr.size} values, declared {ttype.describe()}")
        return arr.reshape(shape)


# --------------------------------------------------------------------------------------------------
# The program


@dataclass
class _Op:
    type: str
    name: str
    inputs: Dict[str, List[Tuple[str, Any]]]  # param -> [("name", var) | ("value", array)]
    attributes: Dict[str, Any]  # decoded attribute values (except "name")
    outputs: List[Tuple[str, TensorType]]
    raw: Any


def _decode_value(value, blobs: Callable[[str], BlobFile]) -> Any:
    """A MIL ``Value`` (immediate or blob) as a numpy array (strings: a str or an object array)."""
    kind = value.WhichOneof("value")
    ttype = _tensor_type(value.type)
    if kind == "blobFileValue":
        return blobs(value.blobFileValue.fileName).read(value.blobFileValue.offset, ttype)
    if kind != "immediateValue":
        raise MILCheckerError(f"value of kind {kind} is not read by the checker")
    imm = value.immediateValue
    if imm.WhichOneof("value") != "tensor":
        raise MILCheckerError(f"immediate {imm.WhichOneof('value')} values are not read by the checker")
    tv = imm.tensor
    field = tv.WhichOneof("value")
    shape = ttype.shape or ()
    if any(d is None for d in shape):
        raise MILCheckerError(f"constant of unknown shape {ttype.describe()}")
    if ttype.dtype_name == "STRING":
        vals = list(tv.strings.values)
        return vals[0] if not shape else np.array(vals, dtype=object).reshape(shape)
    dtype = ttype.np_dtype
    if field == "bytes":
        arr = np.frombuffer(tv.bytes.values, dtype=dtype)
    elif field is None:
        arr = np.zeros(0, dtype=dtype)
    else:
        arr = np.asarray(list(getattr(tv, field).values)).astype(dtype)
    n = math.prod(int(d) for d in shape)  # Python ints: a hostile shape cannot wrap around int64
    if arr.size == 1 and n != 1:  # a splatted constant: one value stands for the declared shape
        if n * np.dtype(dtype).itemsize > MAX_SPLAT_BYTES:
            raise MILCheckerError(f"a splatted constant declares {ttype.describe()} ({n * np.dtype(dtype).itemsize} bytes), "
                                  f"more than the checker's {MAX_SPLAT_BYTES} (refused before allocating)")
        arr = np.full(n, arr.reshape(()), dtype=dtype)
    if arr.size != n:
        raise MILCheckerError(f"immediate value holds {arr.size} values, declared {ttype.describe()}")
    return arr.reshape(shape)


def _package_manifest(package: Path) -> Dict[str, Any]:
    """``Manifest.json`` of an ``.mlpackage``, read with the bounds of any untrusted JSON."""
    from crossvit_edge.bundle import load_json_file

    manifest = Path(package) / "Manifest.json"
    if manifest.is_symlink() or not manifest.is_file():
        raise MILCheckerError(f"not an .mlpackage (no Manifest.json): {package}")
    info = load_json_file(manifest, f"{Path(package).name}/Manifest.json")
    entries = info.get("itemInfoEntries") if isinstance(info, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise MILCheckerError(f"{Path(package).name}/Manifest.json: unreadable package manifest (no itemInfoEntries)")
    return info


def _inside_package(package: Path, base: Path, rel: Any, what: str) -> Path:
    """``base / rel`` for a name the package itself holds: a plain relative name (no '..', not
    absolute), no symlink on the way, inside the package folder."""
    from crossvit_edge.artifact_check import contained_path

    try:
        return contained_path(package, base, rel, what)
    except UserError as e:
        raise MILCheckerError(f"{Path(package).name}: {e}") from None


def find_model_spec(package: Path) -> Path:
    """Path of the spec (``model.mlmodel``) inside an ``.mlpackage``, via its ``Manifest.json``: a
    plain relative name under the package's ``Data`` folder (never ``..``, absolute or a symlink)."""
    package = Path(package).resolve()
    info = _package_manifest(package)
    root = info.get("rootModelIdentifier")
    entry = info["itemInfoEntries"].get(root) if isinstance(root, str) else None
    if entry is None:
        raise MILCheckerError(f"{package.name}/Manifest.json: rootModelIdentifier names no entry of itemInfoEntries")
    path = _inside_package(package, package / "Data", entry.get("path"), "the model spec named by Manifest.json")
    if not path.is_file():
        raise MILCheckerError(f"{package}: the model spec {entry.get('path')} named by Manifest.json is missing")
    return path


def read_model_spec(package: Path):
    """The package's model spec (``Model_pb2.Model``) and its folder (what ``@model_path`` means)."""
    _, Model_pb2 = _proto()
    path = find_model_spec(Path(package))
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise MILCheckerError(f"{path}: not a Core ML model spec ({e})") from None
    return spec, path.parent


def weight_file(package: Path, model_dir: Path, file_name: Any, source: str) -> Path:
    """The file a ``BlobFileValue`` names (``@model_path/<plain relative name>``), inside the package."""
    prefix = "@model_path/"
    if not isinstance(file_name, str) or not file_name.startswith(prefix):
        raise MILCheckerError(f"{source}: weight file {file_name!r} is not relative to @model_path")
    return _inside_package(package, model_dir, file_name[len(prefix):], f"weight file {file_name[:200]!r}")


def blob_file_names(message) -> List[str]:
    """Every weight file name a spec references (``blob_file_values``), sorted, once each."""
    return sorted({v.fileName for v in blob_file_values(message)})


def blob_file_values(message) -> List[Any]:
    """Every ``BlobFileValue`` anywhere in a spec (functions, blocks, nested blocks, attributes,
    inputs), found by walking the protobuf rather than by knowing where they sit."""
    MIL_pb2, _ = _proto()
    values, stack = [], [message]
    while stack:
        m = stack.pop()
        if isinstance(m, MIL_pb2.Value.BlobFileValue):
            values.append(m)
            continue
        for field, value in m.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if field.message_type.GetOptions().map_entry:  # a map<string, Message>
                stack.extend(v for v in value.values() if hasattr(v, "ListFields"))
            elif hasattr(value, "ListFields"):  # one message
                stack.append(value)
            else:  # a repeated message field
                stack.extend(value)
    return values


_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}


def spec_signature(spec) -> Tuple[List[Any], List[Any]]:
    """The model description's inputs and outputs as ``TensorSignature``: multi-arrays by shape
    and data type; an RGB image input as the [1, 3, height, width] float32 tensor it replaces."""
    from crossvit_edge.artifact_check import TensorSignature

    def one(feature):
        kind = feature.type.WhichOneof("Type")
        if kind == "multiArrayType":
            t = feature.type.multiArrayType
            return TensorSignature(feature.name, tuple(int(d) for d in t.shape), _ARRAY_DTYPES.get(t.dataType, f"Core ML type {t.dataType}"))
        if kind == "imageType":
            t = feature.type.imageType
            rgb = t.colorSpace == t.RGB
            return TensorSignature(feature.name, (1, 3, int(t.height), int(t.width)), "float32" if rgb else "a non-RGB image")
        return TensorSignature(feature.name, (), f"a {kind or 'untyped'} feature")

    return [one(f) for f in spec.description.input], [one(f) for f in spec.description.output]


def check_package(root: Path, manifest: Dict[str, Any], rel: str, source: str) -> None:
    """An ``.mlpackage`` of a verified bundle: every path its ``Manifest.json`` names and every
    weight file its spec references stay inside the package and are listed (verified) files or
    folders; the model description is the manifest's signature (an image input counts as the
    [1, 3, size, size] tensor it replaces, the model then takes one image per prediction)."""
    from crossvit_edge.artifact_check import check_referenced_file, check_signature

    root = Path(root).resolve()
    package = root / rel
    where = f"{source}: {rel}"
    try:
        for key, entry in sorted(_package_manifest(package)["itemInfoEntries"].items()):
            path = _inside_package(package, package / "Data", entry.get("path"), f"Manifest.json entry {key[:60]!r}")
            if not path.is_dir():
                check_referenced_file(root, package / "Data", entry["path"], manifest, where, f"Manifest.json entry {key[:60]!r}")
        spec, model_dir = read_model_spec(package)
        for name in blob_file_names(spec):
            weight_file(package, model_dir, name, where)  # @model_path/<plain name>, inside the package
            check_referenced_file(root, model_dir, name[len("@model_path/"):], manifest, where, f"weight file {name[:200]!r}")
    except MILCheckerError as e:
        raise UserError(f"{source}: {e}") from None
    inputs, outputs = spec_signature(spec)
    if manifest.get("coreml", {}).get("image_input") and len(inputs) == 1 and inputs[0].shape[:1] == (1,):
        inputs = [type(inputs[0])(inputs[0].name, (manifest["input"]["shape"][0],) + inputs[0].shape[1:], inputs[0].dtype)]
    check_signature(inputs, outputs, manifest, where)


class MILProgram:
    """The ``main`` function of a saved ML Program, ready to run with numpy."""

    def __init__(self, spec, model_dir: Path, source: str = "<spec>", package: Optional[Path] = None):
        self.spec = spec
        self.model_dir = Path(model_dir)
        self.package = Path(package).resolve() if package is not None else self.model_dir.resolve()  # weights stay inside it
        self.source = source
        if spec.WhichOneof("Type") != "mlProgram":
            raise MILCheckerError(f"{source}: not an ML Program (model type {spec.WhichOneof('Type')})")
        functions = spec.mlProgram.functions
        if "main" not in functions:
            raise MILCheckerError(f"{source}: the ML Program has no 'main' function")
        fn = functions["main"]
        self.opset = fn.opset
        if fn.opset not in fn.block_specializations:
            raise MILCheckerError(f"{source}: 'main' has no block for its opset {fn.opset}")
        block = fn.block_specializations[fn.opset]
        self.inputs: List[Tuple[str, TensorType]] = [(i.name, _tensor_type(i.type)) for i in fn.inputs]
        self.output_names: List[str] = list(block.outputs)
        self._blob_files: Dict[str, BlobFile] = {}
        self.ops: List[_Op] = [self._parse_op(op) for op in block.operations]
        self._consts: Dict[str, np.ndarray] = {}
        self._consts_ready = False

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, package) -> "MILProgram":
        spec, model_dir = read_model_spec(Path(package))
        return cls(spec, model_dir, str(package), package=Path(package))

    def _blob(self, file_name: str) -> BlobFile:
        if file_name not in self._blob_files:
            path = weight_file(self.package, self.model_dir, file_name, self.source)
            if not path.is_file():
                raise MILCheckerError(f"{self.source}: weight file {file_name} is missing from the package")
            self._blob_files[file_name] = BlobFile(path)
        return self._blob_files[file_name]

    def _parse_op(self, op) -> _Op:
        name = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
        if len(op.blocks):
            raise UnsupportedMILOp(op.type, "operations with nested blocks (control flow)", name)
        inputs: Dict[str, List[Tuple[str, Any]]] = {}
        for key, arg in op.inputs.items():
            inputs[key] = [
                ("name", b.name) if b.WhichOneof("binding") == "name" else ("value", b.value) for b in arg.arguments
            ]
        attributes = {k: v for k, v in op.attributes.items() if k != "name"}
        outputs = [(o.name, _tensor_type(o.type)) for o in op.outputs]
        return _Op(op.type, name, inputs, attributes, outputs, op)

    # -- inspection ----------------------------------------------------------------------------

    def op_counts(self) -> Dict[str, int]:
        return dict(sorted(Counter(op.type for op in self.ops).items()))

    def output_dtype_counts(self) -> Dict[str, int]:
        """How many non-const ops produce each dtype (fp16 / fp32 / int8 ...)."""
        c = Counter(op.outputs[0][1].dtype_name.lower() for op in self.ops if op.type != "const" and op.outputs)
        return dict(sorted(c.items()))

    def int8_ops(self) -> Dict[str, int]:
        """Ops that carry 8-bit integer data: produce it, consume it, or hold it as a constant."""
        var_types: Dict[str, TensorType] = dict(self.inputs)
        for op in self.ops:
            for n, t in op.outputs:
                var_types[n] = t
        c: Counter = Counter()
        int8 = ("INT8", "UINT8")
        for op in self.ops:
            if op.type == "const":
                continue
            carried = any(t.dtype_name in int8 for _, t in op.outputs)
            for bindings in op.inputs.values():
                for kind, ref in bindings:
                    t = var_types.get(ref) if kind == "name" else _tensor_type(ref.type)
                    carried |= t is not None and t.dtype_name in int8
            for v in op.attributes.values():
                carried |= v.type.WhichOneof("type") == "tensorType" and _tensor_type(v.type).dtype_name in int8
            if carried:
                c[op.type] += 1
        return dict(sorted(c.items()))

    # -- execution -----------------------------------------------------------------------------

    def check_supported(self) -> None:
        """Raise ``UnsupportedMILOp`` for the first op the checker cannot execute."""
        for op in self.ops:
            if op.type not in OPS:
                raise UnsupportedMILOp(op.type, op_name=op.name)

    def _prepare_consts(self) -> None:
        """Evaluate const and constexpr ops once (they do not depend on inputs)."""
        if self._consts_ready:
            return
        self.check_supported()
        env: Dict[str, Any] = {}
        for op in self.ops:
            if op.type == "const" or op.type.startswith("constexpr_"):
                self._execute(op, env)
        self._consts = env
        self._consts_ready = True

    def run(self, feeds: Dict[str, np.ndarray], threads: Optional[int] = 1, keep: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Execute ``main`` on ``feeds`` (input name -> array); returns every program output, and
        the values of the variables named in ``keep`` (intermediate values, for the layer-wise
        comparison).

        ``threads`` caps the BLAS thread pool while it runs (the default 1 is the fastest for these
        small matrices, many times faster than a contended multi-threaded BLAS); None leaves it."""
        with _blas_threads(threads):
            return self._run(feeds, keep)

    def _run(self, feeds: Dict[str, np.ndarray], keep: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        self._prepare_consts()
        env: Dict[str, Any] = dict(self._consts)
        for name, ttype in self.inputs:
            if name not in feeds:
                raise MILCheckerError(f"missing input {name!r} ({ttype.describe()})")
            x = np.asarray(feeds[name]).astype(ttype.np_dtype)
            _check_shape(x, ttype, f"input {name!r}")
            env[name] = x
        for op in self.ops:
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue
            self._execute(op, env)
        missing = [n for n in keep if n not in env]
        if missing:
            raise MILCheckerError(f"{self.source}: no variable {missing[0]!r} in the program")
        return {n: env[n] for n in (*self.output_names, *keep)}

    def _execute(self, op: _Op, env: Dict[str, Any]) -> None:
        impl = OPS.get(op.type)
        if impl is None:
            raise UnsupportedMILOp(op.type, op_name=op.name)
        args = _Args(op, env, self._blob)
        try:
            result = impl(args)
        except (UnsupportedMILOp, MILCheckerError):
            raise
        except Exception as e:
            raise MILCheckerError(f"MIL op {op.type} {op.name!r} failed in the checker: {type(e).__name__}: {e}") from e
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise MILCheckerError(f"MIL op {op.type} {op.name!r}: {len(results)} results for {len(op.outputs)} outputs")
        for (name, ttype), value in zip(op.outputs, results):
            if ttype.dtype_name == "STRING":
                env[name] = value
                continue
            value = np.asarray(value)
            if value.dtype != ttype.np_dtype:
                value = value.astype(ttype.np_dtype)
            _check_shape(value, ttype, f"MIL op {op.type} {op.name!r} output {name!r}")
            env[name] = value


def _blas_threads(threads: Optional[int]):
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn / scipy stacks
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _check_shape(x: np.ndarray, ttype: TensorType, where: str) -> None:
    if ttype.shape is None:
        return
    if len(x.shape) != len(ttype.shape) or any(d is not None and d != s for d, s in zip(ttype.shape, x.shape)):
        raise MILCheckerError(f"{where}: computed shape {list(x.shape)}, the program declares {ttype.describe()}")


class _Args:
    """Typed access to one op's inputs and attributes."""

    def __init__(self, op: _Op, env: Dict[str, Any], blobs):
        self.op, self.env, self._blobs = op, env, blobs

    def _resolve(self, binding) -> Any:
        kind, ref = binding
        if kind == "name":
            if ref not in self.env:
                raise MILCheckerError(f"MIL op {self.op.type} {self.op.name!r}: input {ref!r} is not defined before use")
            return self.env[ref]
        return _decode_value(ref, self._blobs)

    def has(self, key: str) -> bool:
        return key in self.op.inputs or key in self.op.attributes

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.op.inputs:
            bindings = self.op.inputs[key]
            if len(bindings) != 1:
                raise MILCheckerError(f"MIL op {self.op.type} {self.op.name!r}: {key} has {len(bindings)} bindings, expected 1")
            return self._resolve(bindings[0])
        if key in self.op.attributes:
            return _decode_value(self.op.attributes[key], self._blobs)
        return default

    def many(self, key: str) -> List[Any]:
        return [self._resolve(b) for b in self.op.inputs.get(key, [])]

    def float(self, key: str, default: Any = None) -> np.ndarray:
        """A floating input widened to float32 for the arithmetic (fp16 storage is kept on output)."""
        v = self.get(key, default)
        return None if v is None else np.asarray(v).astype(np.float32)

    def ints(self, key: str, default: Any = None) -> Optional[List[int]]:
        v = self.get(key, default)
        return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

    def int(self, key: str, default: Any = None) -> Optional[int]:
        v = self.get(key, default)
        return None if v is None else int(np.asarray(v).reshape(()))

    def bools(self, key: str, n: int, default: bool = False) -> List[bool]:
        v = self.get(key)
        return [default] * n if v is None else [bool(b) for b in np.asarray(v).reshape(-1)]

    def str(self, key: str, default: Optional[str] = None) -> Optional[str]:
        v = self.get(key, default)
        if isinstance(v, np.ndarray):
            v = v.reshape(-1)[0]
        return v

    def out_dtype(self, i: int = 0):
        return self.op.outputs[i][1].np_dtype

    def unsupported(self, detail: str):
        return UnsupportedMILOp(self.op.type, detail, self.op.name)


# --------------------------------------------------------------------------------------------------
# Operations (MIL semantics, coremltools' op reference)

OPS: Dict[str, Callable[[_Args], Any]] = {}


def _op(*names: str):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


@_op("const")
def _const(a: _Args):
    return a.get("val")


@_op("cast")
def _cast(a: _Args):
    dtype = a.str("dtype")
    if dtype not in _CAST_DTYPES:
        raise a.unsupported(f"cast to {dtype}")
    x = np.asarray(a.get("x"))
    target = _CAST_DTYPES[dtype]
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)  # MIL cast truncates towards zero, as C does
    return x.astype(target)


def _binary(fn):
    def impl(a: _Args):
        x, y = a.get("x"), a.get("y")
        if np.issubdtype(np.asarray(x).dtype, np.floating) or np.issubdtype(np.asarray(y).dtype, np.floating):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        return fn(x, y)

    return impl


_op("add")(_binary(np.add))
_op("sub")(_binary(np.subtract))
_op("mul")(_binary(np.multiply))
_op("real_div")(_binary(np.divide))


@_op("relu")
def _relu(a: _Args):
    return np.maximum(a.float("x"), 0.0)


try:  # exact erf, vectorised
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover - scipy is a dependency of the environments we ship to
    _erf = np.vectorize(math.erf, otypes=[np.float64])


@_op("gelu")
def _gelu(a: _Args):
    x = a.float("x")
    mode = a.str("mode", "EXACT")
    if mode == "EXACT":
        return (0.5 * x.astype(np.float64) * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise a.unsupported(f"gelu mode {mode}")


@_op("softmax")
def _softmax(a: _Args):
    x = a.float("x")
    axis = a.int("axis", -1)
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


@_op("layer_norm")
def _layer_norm(a: _Args):
    x = a.float("x")
    axes = a.ints("axes")
    axes = tuple(range(x.ndim)) if axes is None else tuple(_axis(i, x.ndim) for i in axes)
    eps = float(a.get("epsilon", 1e-5))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    gamma, beta = a.float("gamma"), a.float("beta")
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


@_op("reduce_mean")
def _reduce_mean(a: _Args):
    x = a.float("x")
    axes = a.ints("axes")
    axes = None if axes is None else tuple(_axis(i, x.ndim) for i in axes)
    return x.mean(axis=axes, keepdims=bool(a.get("keep_dims", False)))


@_op("linear")
def _linear(a: _Args):
    x, w = a.float("x"), a.float("weight")
    y = (np.ascontiguousarray(x).reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
    b = a.float("bias")
    return y if b is None else y + b


@_op("matmul")
def _matmul(a: _Args):
    x, y = a.float("x"), a.float("y")
    if bool(a.get("transpose_x", False)):
        x = np.swapaxes(x, -1, -2) if x.ndim > 1 else x
    if bool(a.get("transpose_y", False)):
        y = np.swapaxes(y, -1, -2) if y.ndim > 1 else y
    # contiguous operands: numpy only uses BLAS for stacked matmuls of contiguous arrays
    return np.matmul(np.ascontiguousarray(x), np.ascontiguousarray(y))


def _conv_padding(a: _Args, spatial: Sequence[int], kernel: Sequence[int], strides, dilations) -> List[Tuple[int, int]]:
    pad_type = a.str("pad_type", "valid")
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = a.ints("pad", [0] * (2 * n))
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            eff = (k - 1) * d + 1
            total = max((math.ceil(size / s) - 1) * s + eff - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise a.unsupported(f"conv pad_type {pad_type}")


@_op("conv")
def _conv(a: _Args):
    x, w = a.float("x"), a.float("weight")
    if x.ndim != 4:
        raise a.unsupported(f"conv of rank {x.ndim} (the checker implements 2-D convolution)")
    n, c, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    groups = a.int("groups", 1)
    strides = a.ints("strides", [1, 1])
    dilations = a.ints("dilations", [1, 1])
    (pt, pb), (pl, pr) = _conv_padding(a, (h, wd), (kh, kw), strides, dilations)
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    sh, sw = strides
    dh, dw = dilations
    hp, wp = x.shape[2:]
    oh = (hp - ((kh - 1) * dh + 1)) // sh + 1
    ow = (wp - ((kw - 1) * dw + 1)) // sw + 1
    if cin_g * groups != c or cout % groups:
        raise MILCheckerError(f"conv {a.op.name!r}: weight {list(w.shape)} does not fit input {list((n, c, h, wd))} with groups={groups}")
    if kh == sh and kw == sw and dh == dw == 1 and hp == oh * kh and wp == ow * kw:
        # non-overlapping patches (the ViT patch embedding): a reshape, no copies
        cols = x.reshape(n, c, oh, kh, ow, kw).transpose(0, 2, 4, 1, 3, 5)  # n, oh, ow, c, kh, kw
    else:
        win = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
        win = win[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :oh, :ow]  # n, c, oh, ow, kh, kw
        cols = win.transpose(0, 2, 3, 1, 4, 5)
    cols = cols.reshape(n, oh, ow, groups, cin_g * kh * kw)
    wg = w.reshape(groups, cout // groups, cin_g * kh * kw)
    y = np.einsum("nhwgk,gok->nghwo", cols, wg, optimize=True).reshape(n, groups, oh, ow, cout // groups)
    y = y.transpose(0, 1, 4, 2, 3).reshape(n, cout, oh, ow)
    b = a.float("bias")
    return y if b is None else y + b.reshape(1, -1, 1, 1)


@_op("reshape")
def _reshape(a: _Args):
    x = np.asarray(a.get("x"))
    shape = a.ints("shape")
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("transpose")
def _transpose(a: _Args):
    return np.transpose(np.asarray(a.get("x")), a.ints("perm"))


@_op("expand_dims")
def _expand_dims(a: _Args):
    x = np.asarray(a.get("x"))
    rank = x.ndim + len(a.ints("axes"))
    for ax in sorted(_axis(i, rank) for i in a.ints("axes")):
        x = np.expand_dims(x, ax)
    return x


@_op("squeeze")
def _squeeze(a: _Args):
    x = np.asarray(a.get("x"))
    axes = a.ints("axes")
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_axis(i, x.ndim) for i in axes))


@_op("concat")
def _concat(a: _Args):
    values = [np.asarray(v) for v in a.many("values")]
    if bool(a.get("interleave", False)):
        raise a.unsupported("concat with interleave=True")
    if any(np.issubdtype(v.dtype, np.floating) for v in values):
        values = [v.astype(np.float32) for v in values]
    return np.concatenate(values, axis=a.int("axis"))


@_op("slice_by_index")
def _slice_by_index(a: _Args):
    x = np.asarray(a.get("x"))
    r = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * r)
    begin_mask, end_mask = a.bools("begin_mask", r), a.bools("end_mask", r)
    squeeze = a.bools("squeeze_mask", r)
    index = []
    for i in range(r):
        if squeeze[i]:
            b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
            index.append(b)
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return x[tuple(index)]


@_op("gather")
def _gather(a: _Args):
    x = np.asarray(a.get("x"))
    indices = np.asarray(a.get("indices")).astype(np.int64)
    axis = _axis(a.int("axis", 0), x.ndim)
    if a.int("batch_dims", 0):
        raise a.unsupported("gather with batch_dims > 0")
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take(x, indices, axis=axis)


# -- quantization ---------------------------------------------------------------------------------


def _broadcast_param(p: Optional[np.ndarray], rank: int, axis: Optional[int]) -> Optional[np.ndarray]:
    """Per-tensor (scalar) or per-axis (vector) quantization parameter, broadcastable to the data."""
    if p is None:
        return None
    p = np.asarray(p)
    if p.ndim == 0 or p.size == 1:
        return p.reshape(())
    if axis is None:
        raise MILCheckerError("vector quantization parameter without an axis")
    shape = [1] * rank
    shape[_axis(axis, rank)] = p.size
    return p.reshape(shape)


_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


@_op("quantize")
def _quantize(a: _Args):
    x = a.float("input")
    out = np.dtype(a.out_dtype())
    declared = a.str("output_dtype")
    if declared not in ("int8", "uint8") or np.dtype(declared) != out:
        raise a.unsupported(f"quantize to {declared}")
    axis = a.int("axis")
    scale = _broadcast_param(a.float("scale"), x.ndim, axis)
    zp = _broadcast_param(a.get("zero_point"), x.ndim, axis)
    q = np.round(x / scale)  # round half to even, as torch.quantize_per_tensor does
    if zp is not None:
        q = q + zp.astype(np.float32)
    lo, hi = _QRANGE[out]
    return np.clip(q, lo, hi).astype(out)


def _affine_dequantize(a: _Args, data_key: str, default_axis: Optional[int]) -> np.ndarray:
    """(q - zero_point) * scale, the parameters broadcast along ``axis`` (both dequantize forms)."""
    q = np.asarray(a.get(data_key))
    axis = a.int("axis", default_axis)
    scale = _broadcast_param(a.float("scale"), q.ndim, axis)
    zp = _broadcast_param(a.get("zero_point"), q.ndim, axis)
    x = q.astype(np.float32)
    if zp is not None:
        x = x - zp.astype(np.float32)
    return x * scale


@_op("dequantize")
def _dequantize(a: _Args):
    return _affine_dequantize(a, "input", None)


@_op("constexpr_affine_dequantize")
def _constexpr_affine_dequantize(a: _Args):
    return _affine_dequantize(a, "quantized_data", 0)


@_op("constexpr_blockwise_shift_scale")
def _constexpr_blockwise_shift_scale(a: _Args):
    data = np.asarray(a.get("data"))
    scale = a.float("scale")
    offset = a.get("offset")
    if scale.ndim != data.ndim:
        raise MILCheckerError(f"{a.op.name}: scale rank {scale.ndim} != data rank {data.ndim}")
    x = data.astype(np.float32)
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if d % s:
            raise MILCheckerError(f"{a.op.name}: {s} scales do not divide axis {axis} of size {d}")
        if d // s > 1:
            scale = np.repeat(scale, d // s, axis)
            if offset is not None:
                offset = np.repeat(np.asarray(offset), d // s, axis)
    if offset is not None:
        x = x - np.asarray(offset).astype(np.float32)
    return x * scale

