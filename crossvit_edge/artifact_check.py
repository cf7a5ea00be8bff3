"""What an artifact points at and what it declares, read from its bytes before any runtime sees it.

``open_bundle`` verifies that every listed file has its recorded size and sha256. That says nothing
about the files an artifact makes its runtime open (ONNX external data, the parts of a Core ML
package) or about whether the artifact takes the input the manifest describes. This module reads
artifacts as data, never through their runtime, and refuses (one-line ``UserError``):

* a file an artifact refers to that is not a plain relative name inside the bundle, that passes
  through a symlink, or that the manifest does not list (so it was not verified);
* an artifact whose own input or output signature differs from the manifest's (name, shape,
  dtype, number of classes): callers split images by the manifest's static batch and label the
  outputs with its classes.

Torch-, onnx- and yaml-free (the TensorRT device runner uses it on a Jetson): ONNX files are read
with a small protobuf wire-format reader (``ProtoMessage``) that walks every tensor of the model,
subgraphs and functions included, without loading any weights. The per-target checks are each
Runner's ``check_artifact`` (``crossvit_edge.converters.base``); this module holds what they share.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import safe_io
from .bundle import check_relative_name
from .errors import UserError, brief

MAX_SUBGRAPH_DEPTH = 64  # nested graphs (If/Loop bodies) walked; deeper is refused
ONNX_FLOAT = 1  # TensorProto.DataType.FLOAT
ONNX_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


# --------------------------------------------------------------------------------------------------
# Signatures


@dataclass(frozen=True)
class TensorSignature:
    name: str
    shape: Tuple[Any, ...]  # ints; anything else (a symbolic dimension) is reported as found
    dtype: str  # "float32", or the format's own name for anything else


def check_signature(inputs: Sequence[TensorSignature], outputs: Sequence[TensorSignature], manifest: Dict[str, Any],
                    source: str) -> None:
    """The artifact's one input and one output are the manifest's ``input`` and ``output``: same
    name, same static shape (``[batch, 3, size, size]`` and ``[batch, num_classes]``), float32."""
    for role, found, want in (("input", inputs, manifest["input"]), ("output", outputs, manifest["output"])):
        if len(found) != 1:
            raise UserError(f"{source}: the artifact has {len(found)} {role}s ({brief(', '.join(t.name for t in found), 120)}); "
                            f"the manifest describes one, {brief(want['name'])}")
        t = found[0]
        shape = list(want["shape"])
        if t.name != want["name"]:
            raise UserError(f"{source}: the artifact's {role} is named {brief(t.name)}, the manifest says {brief(want['name'])}")
        if list(t.shape) != shape:
            what = "number of classes" if role == "output" and len(t.shape) == 2 and t.shape[0] == shape[0] else "shape"
            raise UserError(f"{source}: the artifact's {role} {brief(t.name)} has shape {_dims(t.shape)}, the manifest says "
                            f"{_dims(shape)} (its {what} differs)")
        if t.dtype != want["dtype"]:
            raise UserError(f"{source}: the artifact's {role} {brief(t.name)} is {brief(t.dtype)}, the manifest says {want['dtype']}")


def _dims(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else brief(d, 20) for d in list(shape)[:8]) + (", ...]" if len(shape) > 8 else "]")


# --------------------------------------------------------------------------------------------------
# Files an artifact refers to


def contained_path(top: Path, base: Path, rel: Any, what: str) -> Path:
    """``base / rel`` for a name an artifact holds (``base``: the folder it resolves names against,
    inside ``top``): a plain relative name (no '..', not absolute), no symlink between ``top`` and
    the file, inside ``top``. UserError naming ``what`` otherwise."""
    check_relative_name(rel, what)
    top = Path(top).resolve()
    path = Path(base) / rel
    try:
        inside = path.relative_to(top)
    except ValueError:
        raise UserError(f"{what}: {brief(rel)} leads outside {brief(top.name)}") from None
    probe = top
    for part in inside.parts:
        probe = probe / part
        if probe.is_symlink():
            raise UserError(f"{what}: {brief(rel)} goes through a symlink ({brief(probe.name)}); a bundle holds its files themselves")
    return path


def check_referenced_file(root: Path, base: Path, rel: Any, manifest: Dict[str, Any], source: str, what: str) -> Path:
    """``contained_path`` inside the bundle ``root``, and listed in ``files`` (so verified by
    ``open_bundle``). Returns the path."""
    try:
        path = contained_path(root, base, rel, what)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if path.relative_to(Path(root).resolve()).as_posix() not in manifest["files"]:
        raise UserError(f"{source}: {what}: {brief(rel)} is not listed in the manifest's 'files' (with its sha256 and size), "
                        "so it cannot be verified")
    if not path.is_file():
        raise UserError(f"{source}: {what}: {brief(rel)} is not a file")
    return path


# --------------------------------------------------------------------------------------------------
# Protobuf wire format (only what reading ONNX needs)


class ProtoMessage:
    """One protobuf message as ``field number -> [value]``: ints for varint and fixed fields,
    memoryviews (no copy) for length-delimited ones. Malformed bytes raise ``ValueError``."""

    def __init__(self, data: memoryview):
        self.fields: Dict[int, List[Any]] = {}
        pos, end = 0, len(data)
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise ValueError("field number 0")
            if wire == 0:
                value, pos = _varint(data, pos)
            elif wire == 1:
                value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
            elif wire == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos : pos + size], pos + size
            elif wire == 5:
                value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
            else:
                raise ValueError(f"wire type {wire}")
            if pos > end:
                raise ValueError("truncated")
            self.fields.setdefault(number, []).append(value)

    def messages(self, number: int) -> Iterator["ProtoMessage"]:
        for value in self.fields.get(number, []):
            if not isinstance(value, memoryview):
                raise ValueError(f"field {number} is not a message")
            yield ProtoMessage(value)

    def message(self, number: int) -> Optional["ProtoMessage"]:
        return next(self.messages(number), None)

    def text(self, number: int, default: str = "") -> str:
        values = self.fields.get(number)
        if not values:
            return default
        if not isinstance(values[-1], memoryview):
            raise ValueError(f"field {number} is not a string")
        return bytes(values[-1]).decode("utf-8", errors="replace")

    def integer(self, number: int, default: int = 0) -> int:
        values = self.fields.get(number)
        if not values:
            return default
        if isinstance(values[-1], memoryview):  # a packed repeated field: its last value
            raise ValueError(f"field {number} is not a number")
        return values[-1]


def _varint(data: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


# --------------------------------------------------------------------------------------------------
# ONNX

# field numbers from onnx/onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
# TensorProto, SparseTensorProto, FunctionProto, TrainingInfoProto, ValueInfoProto, TypeProto)
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 15, 11, 12
_NODE_OP, _NODE_DOMAIN, _NODE_ATTRIBUTE = 4, 7, 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_FUNCTION_NODE = 7
_TRAINING_GRAPHS = (1, 2)


@dataclass(frozen=True)
class ExternalData:
    tensor: str  # the tensor's name
    entries: Dict[str, str]  # location, offset, length, checksum


@dataclass
class OnnxSummary:
    inputs: List[TensorSignature]
    outputs: List[TensorSignature]
    external: List[ExternalData]
    op_types: Dict[str, int]  # "domain::op" -> count, every graph and function


def read_onnx(path: Path, source: str) -> OnnxSummary:
    """The graph inputs/outputs and every external-data reference of an ONNX file, read from its
    bytes (memory-mapped; no tensor is loaded). UserError for a file that is not a readable model."""
    error = None
    with safe_io.open_regular(path, source) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise UserError(f"{source}: empty file, not an ONNX model")
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise UserError(f"{source}: cannot read ({e.strerror or type(e).__name__})") from None
        try:
            summary = _summarise(ProtoMessage(memoryview(mapped)))
        except (ValueError, IndexError) as e:
            error = str(e)  # raised below, once no view into the mapping is left (close() refuses otherwise)
        mapped.close()
    if error is not None:
        raise UserError(f"{source}: not a readable ONNX model ({brief(error, 80)})")
    return summary


def _summarise(model: ProtoMessage) -> OnnxSummary:
    graph = model.message(_MODEL_GRAPH)
    if graph is None:
        raise ValueError("no graph")
    external: List[ExternalData] = []
    ops: Dict[str, int] = {}
    # every graph (main, subgraphs of If/Loop/Scan, training graphs) and every function body
    stack: List[Tuple[ProtoMessage, int]] = [(graph, 0)]
    stack += [(g, 1) for t in model.messages(_MODEL_TRAINING) for n in _TRAINING_GRAPHS for g in t.messages(n)]
    nodes: List[Tuple[ProtoMessage, int]] = [(n, 1) for f in model.messages(_MODEL_FUNCTIONS) for n in f.messages(_FUNCTION_NODE)]
    while stack or nodes:
        if stack:
            g, depth = stack.pop()
            if depth > MAX_SUBGRAPH_DEPTH:
                raise ValueError(f"graphs nested more than {MAX_SUBGRAPH_DEPTH} deep")
            external += _external(g.messages(_GRAPH_INITIALIZER))
            for sparse in g.messages(_GRAPH_SPARSE):
                external += _external(m for n in (1, 2) for m in sparse.messages(n))
            nodes += [(n, depth) for n in g.messages(_GRAPH_NODE)]
            continue
        node, depth = nodes.pop()
        key = f"{node.text(_NODE_DOMAIN) or 'ai.onnx'}::{node.text(_NODE_OP)}"
        ops[key] = ops.get(key, 0) + 1
        for attr in node.messages(_NODE_ATTRIBUTE):
            external += _external(list(attr.messages(_ATTR_T)) + list(attr.messages(_ATTR_TENSORS)))
            for number in (_ATTR_SPARSE, _ATTR_SPARSES):
                for sparse in attr.messages(number):
                    external += _external(m for n in (1, 2) for m in sparse.messages(n))
            stack += [(sub, depth + 1) for number in (_ATTR_G, _ATTR_GRAPHS) for sub in attr.messages(number)]
    initializers = {t.text(_TENSOR_NAME) for t in graph.messages(_GRAPH_INITIALIZER)}
    inputs = [_value_info(v) for v in graph.messages(_GRAPH_INPUT)]
    return OnnxSummary(inputs=[i for i in inputs if i.name not in initializers],
                       outputs=[_value_info(v) for v in graph.messages(_GRAPH_OUTPUT)], external=external, op_types=ops)


def _external(tensors) -> List[ExternalData]:
    out = []
    for t in tensors:
        entries = {e.text(1): e.text(2) for e in t.messages(_TENSOR_EXTERNAL)}
        if entries or t.integer(_TENSOR_LOCATION) == ONNX_EXTERNAL:
            out.append(ExternalData(t.text(_TENSOR_NAME), entries))
    return out


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 16: "bfloat16"}


def _value_info(v: ProtoMessage) -> TensorSignature:
    tensor = (v.message(2) or ProtoMessage(memoryview(b""))).message(1)  # TypeProto.tensor_type
    if tensor is None:
        return TensorSignature(v.text(1), (), "not a tensor")
    elem = tensor.integer(1)
    shape = tensor.message(2)
    dims: List[Any] = []
    for d in (shape.messages(1) if shape is not None else ()):
        dims.append(d.integer(1) if 1 in d.fields else (d.text(2) or "?"))
    return TensorSignature(v.text(1), tuple(dims), _ONNX_DTYPES.get(elem, f"ONNX type {elem}"))


def check_onnx(root: Path, manifest: Dict[str, Any], rel: str, source: str) -> OnnxSummary:
    """An ONNX file of the bundle: its signature is the manifest's and every external-data file it
    names is listed and inside the bundle (``check_referenced_file``), with offset and length
    inside that file. Nodes that make ONNX Runtime open other files (EPContext) are refused."""
    root = Path(root).resolve()
    path = root / rel
    where = f"{source}: {rel}"
    summary = read_onnx(path, where)
    for op in summary.op_types:
        if op.endswith("::EPContext"):
            raise UserError(f"{where}: holds an EPContext node (a precompiled blob that names its own files); not accepted in a bundle")
    for ext in summary.external:
        what = f"external data of tensor {brief(ext.tensor, 60)}"
        if "location" not in ext.entries:
            raise UserError(f"{where}: {what} has no location")
        data = check_referenced_file(root, path.parent, ext.entries["location"], manifest, where, what)
        size = manifest["files"][data.relative_to(root).as_posix()]["bytes"]
        offset, length = (_decimal(ext.entries.get(k), k, where, what) for k in ("offset", "length"))
        if (offset or 0) > size or (length is not None and (offset or 0) + length > size):
            raise UserError(f"{where}: {what}: offset {offset} and length {length} run past the end of "
                            f"{brief(ext.entries['location'])} ({size} bytes)")
    check_signature(summary.inputs, summary.outputs, manifest, where)
    return summary


def _decimal(value: Optional[str], key: str, where: str, what: str) -> Optional[int]:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 20:
        raise UserError(f"{where}: {what}: {key} {brief(value)} is not a whole number")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Reading listed files


def read_listed_file(root: Path, manifest: Dict[str, Any], path: Path, source: str) -> bytes:
    """The bytes of a file the manifest lists, read once and checked against its listed size and
    sha256 here: a runtime handed these bytes loads exactly what was verified, even if the file
    changes after ``open_bundle`` looked at it."""
    import hashlib

    root = Path(root).resolve()
    rel = Path(path).resolve().relative_to(root).as_posix()
    entry = manifest["files"].get(rel)
    if entry is None:
        raise UserError(f"{source}: not listed in the manifest's 'files', so it cannot be verified")
    data = safe_io.read_bytes(path, source, max_bytes=entry["bytes"])
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{source}: changed since the bundle was verified (its size or sha256 differs from the manifest's)")
    return data


def check_file_identifier(path: Path, offset: int, identifier: bytes, source: str, what: str) -> None:
    """The file holds ``identifier`` at ``offset`` (a flatbuffer's file identifier, a format's magic)."""
    with safe_io.open_regular(path, source) as f:
        head = f.read(offset + len(identifier))
    if head[offset:] != identifier:
        raise UserError(f"{source}: not {what} (no {identifier!r} identifier at byte {offset})")
