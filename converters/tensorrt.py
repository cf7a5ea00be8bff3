"""TensorRT target (NVIDIA Jetson): the TensorRT-ready ONNX, its calibration cache, the exact
``trtexec`` command, a static check against the TensorRT version's ONNX parser, and, when TensorRT
and a matching GPU are present, the engine itself (built by ``converters.tensorrt_device``).

TensorRT engines are specific to the TensorRT version and the GPU they were built on, so a bundle
made on a workstation carries everything the Jetson needs to build the engine there: the ONNX, the
calibration cache (implicit INT8), ``build_engine.sh`` (trtexec) and the options the Python builder
reads from the manifest (``python -m converters.tensorrt_device BUNDLE --build ...``).

What the device profile's ``tensorrt`` section selects (``profiles/jetson-*.yaml``):

* ``version``: the device's TensorRT (JetPack 5.1 = 8.5.2, JetPack 6 = 10.3, Thor JetPack 7.0 =
  10.13, JetPack 7.2.2 = 11.4.1). It picks the parser's operator set and opset range, the network
  flags, the builder flags, the trtexec flags and the calibration cache header.
* ``mode``:
  - ``implicit``: the fp32 graph without Q/DQ plus a calibration cache written from our own
    statistics (``calibration.trt_cache``), built with the INT8 + FP16 builder flags. TensorRT
    <= 10.x only (the calibrator API is deprecated since 10.1 and removed in 11.0).
  - ``explicit``: the plan's Q/DQ graph (fp32 tensors), built weakly typed with INT8 + FP16
    flags: TensorRT keeps int8 where the Q/DQ nodes say and picks fp16/fp32 elsewhere.
  - ``strongly-typed``: types come from the graph (TensorRT >= 10.0 with the STRONGLY_TYPED flag;
    the only mode in 11.x). fp16 needs fp16 tensors in the ONNX, so int8 exports the fp16 model
    with fp16 Q/DQ scales, which ONNX allows only from opset 19 (QuantizeLinear-19 /
    DequantizeLinear-19 add float16 scales; at opset 17 the export fails ONNX's own type check).
    Every TensorRT that has strongly typed networks parses opset >= 19 (10.0: opset 9-20,
    onnx-tensorrt docs/operators.md @10.0-GA), so the converter raises the opset to 19 for
    strongly typed int8 and records both numbers; the parser (onnx-tensorrt @10.1-GA
    ``QuantDequantLinearHelper``) then types each DequantizeLinear output by its scale (fp16).
    Keeping fp32 Q/DQ at opset 17 instead would leave every non-quantized layer in fp32.
  Default: ``explicit`` for 8.x and for DLA on 10.x, ``strongly-typed`` otherwise.
* ``dla_core`` / ``gpu_fallback``: DLA (trtexec ``--useDLACore=N --allowGPUFallback``).
* ``workspace_mib``, ``opset``.

TensorRT 8.5 has no ``LayerNormalization`` importer (onnx-tensorrt docs/operators.md @8.5-GA: N),
so for 8.5 every LayerNormalization becomes ReduceMean / Sub / Mul(d, d) / ReduceMean / Add(eps)
/ Sqrt / Div / Mul(gamma) / Add(beta) (Mul(d, d), never Pow: the Pow form overflows in fp16) with
node names starting ``fp32_layernorm_``; the onnx-tensorrt 8.5 importer names every TensorRT layer
after its ONNX node (``ImporterContext::registerLayer`` with ``getNodeName(node)``), so both the
Python builder (prefix match) and trtexec (``--layerPrecisions``/``--layerOutputTypes`` with exact
names plus ``--precisionConstraints=obey``, all in 8.5's sampleOptions.cpp) pin them to fp32.

``build_engine.sh`` reads the TensorRT version of the device's trtexec from its banner, refuses a
bundle made for another major.minor, and hands trtexec the calibration cache with that exact version
in its header (TensorRT ignores a cache of another version and trtexec's ``--calib`` calibrator then
calibrates on random data); ``DRY_RUN=1`` prints the command instead of running it.

Without a profile the converter refuses (one line): an engine is specific to the TensorRT version
and GPU, and a silent default could hand a JetPack 5 device an engine plan for TensorRT 10. A
Python caller may instead pass at least ``options={"version": ...}``.
"""
from __future__ import annotations

import importlib.util
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crossvit_edge.errors import UserError

from .base import Artifact, Converter

log = logging.getLogger(__name__)

RUNNER = "converters.tensorrt_device:TensorRTRunner"
FP32_PREFIX = "fp32_layernorm_"
BUILD_SCRIPT = "build_engine.sh"
TIMING_CACHE = "timing.cache"
DEFAULT_OPSET = 17
STRONGLY_TYPED_INT8_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear take float16 scales
MODES = ("implicit", "explicit", "strongly-typed")


class TensorRTCheckError(UserError):
    """The ONNX would not import into the profile's TensorRT (names the node)."""


# --------------------------------------------------------------------------------------------------
# What each TensorRT version's ONNX parser supports: the "Y" rows of onnx-tensorrt docs/operators.md


_OPS_8_5 = frozenset(
    # onnx/onnx-tensorrt docs/operators.md @ 8.5-GA (fdeeaca8; same table at fd119fec, the submodule
    # commit NVIDIA/TensorRT release/8.5 pins): "TensorRT 8.5 supports operators up to Opset 17".
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
    GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsNaN LRN LSTM
    LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad
    ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
    Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)
# @ 8.6-GA (ee0b139b = tag release/8.6-GA, the commit NVIDIA/TensorRT release/8.6 pins): 8.5 + 3.
_OPS_8_6 = _OPS_8_5 | {"GroupNormalization", "IsInf", "LayerNormalization"}
# @ 10.0-GA (73f629e0): "inclusive range of opset 9 to opset 20"; 8.6 + 4.
_OPS_10_0 = _OPS_8_6 | {"CastLike", "Gelu", "Hardmax", "Mish"}
# @ 10.1-GA (96e78110): 10.0 + DeformConv; same opset range.
_OPS_10_1 = _OPS_10_0 | {"DeformConv"}
# docs/operators.md whose header reads "TensorRT 10.15 supports operators in the inclusive range of
# opset 9 to opset 24" (stored copy of onnx/onnx-tensorrt; commit not recorded).
_OPS_10_15 = _OPS_10_1 | {"Attention", "BlackmanWindow", "HammingWindow", "HannWindow", "RMSNormalization", "RotaryEmbedding", "STFT", "TensorScatter"}
# Between the tables, from NVIDIA/TensorRT CHANGELOG.md (release/11.1): 10.4 adds the three window
# ops, 10.5 real-valued STFT, 10.14 Attention, 10.15 RotaryEmbedding/RMSNormalization/TensorScatter,
# 10.16 DistCollective, 11.0 Swish.
_OPS_10_4 = _OPS_10_1 | {"BlackmanWindow", "HammingWindow", "HannWindow"}
_OPS_10_5 = _OPS_10_4 | {"STFT"}
_OPS_10_14 = _OPS_10_5 | {"Attention"}
_OPS_10_16 = _OPS_10_15 | {"DistCollective"}
_OPS_11 = _OPS_10_16 | {"Swish"}


@dataclass(frozen=True)
class ParserSupport:
    ops: frozenset
    opset_min: int
    opset_max: int
    source: str
    derived: Optional[str] = None  # why the table is inferred rather than read for this version


def parser_support(major: int, minor: int) -> ParserSupport:
    """The ONNX parser of TensorRT ``major.minor``: operators, opset range and where that comes from."""
    if (major, minor) == (8, 5):
        return ParserSupport(_OPS_8_5, 7, 17, "onnx-tensorrt docs/operators.md @8.5-GA")
    if (major, minor) == (8, 6):
        return ParserSupport(_OPS_8_6, 7, 17, "onnx-tensorrt docs/operators.md @8.6-GA")
    if major == 10:
        if minor == 0:
            return ParserSupport(_OPS_10_0, 9, 20, "onnx-tensorrt docs/operators.md @10.0-GA")
        if minor == 1:
            return ParserSupport(_OPS_10_1, 9, 20, "onnx-tensorrt docs/operators.md @10.1-GA")
        if minor <= 3:
            return ParserSupport(_OPS_10_1, 9, 20, "onnx-tensorrt docs/operators.md @10.1-GA",
                                 "10.2/10.3 CHANGELOG adds no operator or opset: the 10.1 table")
        if minor < 15:
            ops = _OPS_10_14 if minor >= 14 else _OPS_10_5 if minor >= 5 else _OPS_10_4
            return ParserSupport(ops, 9, 20, "onnx-tensorrt docs/operators.md @10.1-GA + TensorRT CHANGELOG",
                                 "no operators.md for this version: the 10.1 table plus CHANGELOG additions; opset capped at the last documented 20")
        if minor == 15:
            return ParserSupport(_OPS_10_15, 9, 24, "onnx-tensorrt docs/operators.md (TensorRT 10.15)")
        return ParserSupport(_OPS_10_16, 9, 24, "onnx-tensorrt docs/operators.md (TensorRT 10.15) + CHANGELOG 10.16",
                             "no operators.md for 10.16+: the 10.15 table plus DistCollective")
    if major == 11:
        # NVIDIA/TensorRT v11.5 release: "Added support for ONNX opset 25", so 11.0-11.4 stop at 24.
        return ParserSupport(_OPS_11, 9, 24, "onnx-tensorrt docs/operators.md (TensorRT 10.15) + CHANGELOG 10.16/11.0",
                             "no operators.md for 11.x: the 10.15 table plus DistCollective and Swish")
    raise UserError(f"unknown TensorRT version {major}.{minor}")


# ONNX elem types the parser's convertDtype maps (onnx-tensorrt onnx2trt_utils.cpp @8.5-GA,
# importerUtils.cpp @10.1-GA); anything else fails the parse with "Unsupported ONNX data type".
_ONNX_DTYPE = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL",
               10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16",
               17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1"}
_DTYPES_8 = {1, 2, 3, 6, 7, 9, 10, 11}  # INT64 cast down to INT32 (clamped), DOUBLE cast down to FLOAT
_DTYPES_10 = {1, 2, 3, 6, 7, 9, 10, 11, 16, 17, 22}  # + BFLOAT16, native INT64, FP8 (E4M3FN), INT4


def accepted_dtypes(major: int, minor: int) -> set:
    if major < 10:
        return set(_DTYPES_8)
    return set(_DTYPES_10) | ({23} if (major, minor) >= (10, 8) else set())  # FLOAT4E2M1: CHANGELOG 10.8


# --------------------------------------------------------------------------------------------------
# Versions, devices and DLA


def parse_trt_version(text: str) -> Tuple[int, int, int]:
    from calibration.trt_cache import parse_version

    return parse_version(text)


KNOWN_RELEASES = "8.5, 8.6, 10.0-10.16, 11.0-11.5"


def check_known_version(text: str) -> Tuple[int, int, int]:
    try:
        major, minor, patch = parse_trt_version(text)
    except UserError:
        raise UserError(f"unknown TensorRT version {text!r} in the profile; known: {KNOWN_RELEASES}") from None
    known = (major == 8 and minor in (5, 6)) or (major == 10 and 0 <= minor <= 16) or (major == 11 and 0 <= minor <= 5)
    if not known:
        raise UserError(f"unknown TensorRT version {text!r} in the profile; known: {KNOWN_RELEASES} (JetPack ships 8.5, 10.x, 11.x)")
    return major, minor, patch


# DLA cores per Jetson module. Orin Nano has none (its DLAs are fused off; NVIDIA's module table
# lists DLA only for AGX Orin and Orin NX), Thor has none (TensorRT 11.4.1 "Working with DLA": "Not
# supported: NVIDIA Jetson Thor, which has no DLA"). AGX Orin and the Xaviers have 2; Orin NX 8GB 1.
_DLA_CORES = (
    ("orin nano", 0),
    ("thor", 0),
    ("agx orin", 2),
    ("orin nx 16", 2),
    ("orin nx 8", 1),
    ("orin nx", 1),
    ("xavier nx", 2),
    ("agx xavier", 2),
)


def dla_cores_of(device: Optional[str]) -> Optional[int]:
    if not device:
        return None
    d = " ".join(str(device).lower().replace("-", " ").split())
    for key, n in _DLA_CORES:
        if key in d:
            return n
    return None


def dla_support(version: Tuple[int, int, int]) -> Optional[str]:
    """None when this TensorRT can build for DLA on a Jetson, else why not."""
    major, minor, patch = version
    if major == 8 or (major == 10 and minor <= 7):
        return None
    if major == 10:
        return "TensorRT 10.7 was the last 10.x release that supported DLA (TensorRT 11.4.1 'Working with DLA')"
    if major == 11 and (minor, patch) >= (4, 1):
        return None
    return "DLA was unavailable in TensorRT 11.0 through 11.4.0 (from 11.4.1 on AGX Orin with JetPack 7.2.2+)"


@dataclass
class TrtTarget:
    """The profile's TensorRT section, resolved and checked."""

    version_text: str
    version: Tuple[int, int, int]
    mode: str
    precision: str
    opset: int
    opset_requested: int
    dla_core: Optional[int]
    gpu_fallback: bool
    workspace_mib: int
    device: Optional[str]
    jetpack: Optional[str]
    sm: Optional[str]
    parser: ParserSupport
    notes: List[str] = field(default_factory=list)

    @property
    def major(self) -> int:
        return self.version[0]

    @property
    def strongly_typed(self) -> bool:
        return self.mode == "strongly-typed"

    @property
    def decompose_layernorm(self) -> bool:
        return self.version[:2] == (8, 5)

    @property
    def builder_flags(self) -> List[str]:
        """BuilderFlag names for weakly typed networks (8.x, 10.x); none when strongly typed."""
        if self.strongly_typed:
            return []
        flags = []
        if self.precision in ("fp16", "int8") or self.dla_core is not None:
            flags.append("FP16")
        if self.precision == "int8":
            flags.append("INT8")
        return flags

    @property
    def network(self) -> str:
        if self.major >= 11:
            return "strongly typed (TensorRT 11: always)"
        if self.strongly_typed:
            return "strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED)"
        return "weakly typed (precision from builder flags" + (", explicit batch)" if self.major < 10 else ")")


def resolve_target(spec) -> TrtTarget:
    """Everything the profile asks of TensorRT, checked against what that TensorRT can do. Raises a
    one-line UserError before any work for a request the version or device cannot honour."""
    opts = dict(spec.options or {})
    profile = getattr(spec, "profile", None)
    if profile is None and "version" not in opts:
        from crossvit_edge.device_profiles import list_profiles

        jetsons = ", ".join(p for p in list_profiles() if p.startswith("jetson"))
        raise UserError(f"--target tensorrt needs --profile (the device's TensorRT version decides the graph and the engine): one of {jetsons}")
    where = f"profile {profile.name!r}" if profile is not None else "tensorrt options"
    version_text = str(opts.get("version", "")).strip()
    if not version_text:
        raise UserError(f"{where} has no tensorrt.version")
    version = check_known_version(version_text)
    major, minor, _ = version
    parser = parser_support(major, minor)
    precision = spec.precision

    mode = opts.get("mode")
    dla_core = opts.get("dla_core")
    if mode is None:
        mode = "strongly-typed" if major >= 11 or (major == 10 and dla_core is None) else "explicit"
    if mode not in MODES:
        raise UserError(f"{where}: tensorrt.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if major < 10 and mode == "strongly-typed":
        raise UserError(f"{where}: TensorRT {version_text} has no strongly typed networks (added in 9.0); use mode explicit or implicit")
    if major >= 11 and mode == "implicit" and precision == "int8":
        raise UserError(f"{where}: implicit INT8 (calibrator + cache) does not exist in TensorRT {version_text}: the calibrator API was removed in 11.0; use mode strongly-typed (Q/DQ)")
    if major >= 11 and mode != "strongly-typed":
        raise UserError(f"{where}: TensorRT {version_text} networks are always strongly typed (precision builder flags were removed in 11.0); use mode strongly-typed")

    device = opts.get("device")
    gpu_fallback = bool(opts.get("gpu_fallback", True))
    if dla_core is not None:
        if isinstance(dla_core, bool) or not isinstance(dla_core, int) or dla_core < 0:
            raise UserError(f"{where}: tensorrt.dla_core must be a core number (0, 1) or null, got {dla_core!r}")
        cores = dla_cores_of(device)
        if cores == 0:
            raise UserError(f"{where} asks for DLA core {dla_core}, but {device} has no DLA; set dla_core: null")
        if cores is not None and dla_core >= cores:
            raise UserError(f"{where} asks for DLA core {dla_core}, but {device} has {cores} DLA core(s)")
        why_not = dla_support(version)
        if why_not:
            raise UserError(f"{where} asks for DLA with TensorRT {version_text}: {why_not}")
        if major < 11 and mode == "strongly-typed":
            raise UserError(
                f"{where} asks for DLA with a strongly typed network on TensorRT {version_text}: DLA builds there need the FP16/INT8 "
                "builder flags, which strongly typed networks reject; use mode explicit (or implicit)"
            )
        if precision == "fp32":
            # DLA computes in fp16/int8 only (8.x/10.x: trtexec forces --fp16; 11.4.1: fp16 tensor types).
            raise UserError(f"{where} asks for DLA at fp32: DLA runs fp16 and int8 only; use --precision fp16 or int8")

    requested = opts.get("opset", DEFAULT_OPSET)
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise UserError(f"{where}: opset must be a number, got {requested!r}")
    if requested > parser.opset_max:
        raise UserError(f"{where}: opset {requested} is above what the ONNX parser of TensorRT {version_text} supports ({parser.opset_min}-{parser.opset_max}, {parser.source})")
    if requested < max(parser.opset_min, 13):
        raise UserError(f"{where}: opset {requested} is below what this converter exports for TensorRT {version_text} (13-{parser.opset_max})")
    opset = requested
    notes: List[str] = []
    if mode == "strongly-typed" and precision == "int8" and requested < STRONGLY_TYPED_INT8_OPSET:
        if parser.opset_max < STRONGLY_TYPED_INT8_OPSET:  # pragma: no cover - no such version is known
            raise UserError(f"{where}: strongly typed fp16+int8 needs opset {STRONGLY_TYPED_INT8_OPSET} (fp16 Q/DQ scales), above TensorRT {version_text}'s {parser.opset_max}")
        opset = STRONGLY_TYPED_INT8_OPSET
        notes.append(f"opset raised from {requested} to {opset}: fp16 Q/DQ scales (strongly typed fp16+int8) need QuantizeLinear-19")
    workspace = opts.get("workspace_mib", 1024)
    if isinstance(workspace, bool) or not isinstance(workspace, int) or workspace <= 0:
        raise UserError(f"{where}: workspace_mib must be a positive number of MiB, got {workspace!r}")
    if dla_core is not None and precision == "int8" and mode == "explicit":
        notes.append(
            "DLA with explicit Q/DQ: TensorRT 8.x documented that DLA does not support explicit quantization; layers DLA cannot run "
            + ("fall back to the GPU (gpu_fallback)" if gpu_fallback else "fail the build (gpu_fallback is off)")
            + "; check the engine's layer information, or compare with mode implicit"
        )
    if mode == "implicit" and precision == "int8" and major == 10 and minor >= 1:
        notes.append(f"implicit INT8 calibration is deprecated since TensorRT 10.1 (explicit Q/DQ supersedes it)")
    return TrtTarget(
        version_text=version_text, version=version, mode=mode, precision=precision, opset=opset, opset_requested=requested,
        dla_core=dla_core, gpu_fallback=gpu_fallback, workspace_mib=workspace, device=device, jetpack=opts.get("jetpack"),
        sm=opts.get("sm"), parser=parser, notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# Graph transforms


def _const_array(graph, name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def decompose_layernorm(model, prefix: str = FP32_PREFIX) -> List[str]:
    """Replace every LayerNormalization (in place) with an fp32 subgraph whose node names start with
    ``prefix``; returns the new node names (the TensorRT layer names to pin to fp32).

    mean = ReduceMean(x); d = x - mean; var = ReduceMean(d * d); y = d / Sqrt(var + eps) * g + b.
    Scale, bias and epsilon become initializers of the input's rank, so no broadcast Shuffle layer is
    inserted between them and the pinned layers. ReduceMean takes ``axes`` as an attribute (opset
    <= 17, the range TensorRT 8.5 parses)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 18:
        raise UserError(f"LayerNorm decomposition is written for opset <= 17 (ReduceMean axes attribute), got {opset}")
    lns = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "LayerNormalization"]
    if not lns:
        return []
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
             if vi.type.tensor_type.HasField("shape")}
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    pinned: List[str] = []
    new_inits = []
    replacements: Dict[int, List[Any]] = {}
    for k, (position, ln) in enumerate(lns):
        where = f"LayerNormalization node {ln.name or ln.output[0]!r}"
        if any(o and o in used for o in list(ln.output)[1:]):
            raise UserError(f"{where}: its Mean/InvStdDev outputs are used; TensorRT only supports the first output")
        x = ln.input[0]
        rank = ranks.get(x)
        if rank is None:
            raise UserError(f"{where}: the rank of its input is unknown (shape inference failed)")
        attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
        axis = int(attrs.get("axis", -1)) % rank
        eps = float(attrs.get("epsilon", 1e-5))
        axes = list(range(axis, rank))
        p = f"{prefix}{k}_"

        def const(suffix: str, value: np.ndarray) -> str:
            name = p + suffix
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
            return name

        def affine(src: Optional[str], suffix: str) -> Optional[str]:
            if not src:
                return None
            arr = _const_array(graph, src)
            if arr is None:
                raise UserError(f"{where}: its {suffix} is not an initializer")
            shape = [1] * axis + list(arr.shape) if arr.ndim == rank - axis else list(arr.shape)
            return const(suffix, arr.reshape(shape))

        gamma = affine(ln.input[1] if len(ln.input) > 1 else None, "gamma")
        beta = affine(ln.input[2] if len(ln.input) > 2 else None, "beta")
        eps_name = const("eps", np.full([1] * rank, eps, dtype=np.float32))
        y = ln.output[0]
        t = {s: p + s + "_out" for s in ("mean", "d", "sq", "var", "ve", "std", "norm", "scaled")}
        nodes = [
            helper.make_node("ReduceMean", [x], [t["mean"]], name=p + "mean", axes=axes, keepdims=1),
            helper.make_node("Sub", [x, t["mean"]], [t["d"]], name=p + "sub"),
            helper.make_node("Mul", [t["d"], t["d"]], [t["sq"]], name=p + "square"),
            helper.make_node("ReduceMean", [t["sq"]], [t["var"]], name=p + "var", axes=axes, keepdims=1),
            helper.make_node("Add", [t["var"], eps_name], [t["ve"]], name=p + "add_eps"),
            helper.make_node("Sqrt", [t["ve"]], [t["std"]], name=p + "sqrt"),
        ]
        last_in = t["norm"]
        nodes.append(helper.make_node("Div", [t["d"], t["std"]], [t["norm"] if (gamma or beta) else y], name=p + "div"))
        if gamma and beta:
            nodes.append(helper.make_node("Mul", [last_in, gamma], [t["scaled"]], name=p + "mul_gamma"))
            nodes.append(helper.make_node("Add", [t["scaled"], beta], [y], name=p + "add_beta"))
        elif gamma:
            nodes.append(helper.make_node("Mul", [last_in, gamma], [y], name=p + "mul_gamma"))
        elif beta:
            nodes.append(helper.make_node("Add", [last_in, beta], [y], name=p + "add_beta"))
        replacements[position] = nodes
        pinned.extend(n.name for n in nodes)
    rebuilt = []
    for i, node in enumerate(graph.node):
        rebuilt.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    return pinned


def _drop_unused_initializers(model) -> None:
    graph = model.graph
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    vis = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vis)


@dataclass
class Int8LayerIO:
    """Where one int8 layer of the plan sits in the exported Q/DQ graph."""

    layer: str
    op_type: str  # MatMul / Conv / Gemm
    node: str  # the weighted node
    activation: str  # the tensor the layer quantizes (input of its QuantizeLinear)
    weight_int8: str  # initializer of the int8 weight
    weight_dq: str  # output of the weight's DequantizeLinear
    act_q: str  # QuantizeLinear node name
    act_dq_out: str  # output of the activation DequantizeLinear


def int8_layer_io(model, plan) -> List[Int8LayerIO]:
    """Map each int8 layer of ``plan`` to its nodes in the Q/DQ export: the int8 weight initializer
    (``<layer>.weight_int8``, a buffer name the exporter keeps) -> its DequantizeLinear -> the
    weighted node -> that node's other input, a DequantizeLinear of a QuantizeLinear whose input is
    the activation tensor. Names (not scales) tie them, so equal scales cannot be confused."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inits = {i.name for i in graph.initializer}
    out: List[Int8LayerIO] = []
    for layer in plan.int8_layers():
        wname = next((i for i in inits if i == f"{layer.name}.weight_int8" or i.endswith(f".{layer.name}.weight_int8")), None)
        if wname is None:
            raise UserError(f"int8 layer {layer.name}: no initializer {layer.name}.weight_int8 in the exported Q/DQ graph")
        wdq = next((n for n in consumers.get(wname, []) if n.op_type == "DequantizeLinear"), None)
        if wdq is None:
            raise UserError(f"int8 layer {layer.name}: its int8 weight has no DequantizeLinear")
        users = [n for n in consumers.get(wdq.output[0], []) if n.op_type in ("MatMul", "Conv", "Gemm")]
        if len(users) != 1:
            raise UserError(f"int8 layer {layer.name}: expected one MatMul/Conv/Gemm after the weight DequantizeLinear, found {len(users)}")
        node = users[0]
        act_in = next(i for i in node.input[:2] if i != wdq.output[0])
        adq = producers.get(act_in)
        aq = producers.get(adq.input[0]) if adq is not None and adq.op_type == "DequantizeLinear" else None
        if aq is None or aq.op_type != "QuantizeLinear":
            raise UserError(f"int8 layer {layer.name}: node {node.name!r} has no QuantizeLinear/DequantizeLinear on its activation input")
        out.append(Int8LayerIO(layer.name, node.op_type, node.name, aq.input[0], wname, wdq.output[0], aq.name, adq.output[0]))
    return out


def strip_qdq(model, ios: Sequence[Int8LayerIO], float_weights: Dict[str, np.ndarray]) -> Dict[str, str]:
    """Turn the Q/DQ graph (in place) into the plain float graph TensorRT's implicit mode wants:
    activation Q->DQ pairs are removed (consumers read the activation again) and each int8 weight
    with its DequantizeLinear becomes the layer's original float weight ``float_weights[layer]``
    (Linear: (in, out); Conv: (out, in, kh, kw)). Tensor names of the activations are unchanged, so
    the calibration cache can name them. Returns layer -> float weight initializer name."""
    from onnx import numpy_helper

    graph = model.graph
    producers = {n.output[0]: n for n in graph.node if n.output}
    rename: Dict[str, str] = {}  # tensor produced by a removed node -> the tensor to read instead
    removed = set()  # first outputs (unique in SSA) of the nodes to remove
    weight_names: Dict[str, str] = {}
    taken = {i.name for i in graph.initializer}
    for io in ios:
        w = np.ascontiguousarray(float_weights[io.layer], dtype=np.float32)
        name = f"{io.layer}.weight"
        while name in taken:
            name += "_fp32"
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(w, name))
        rename[io.weight_dq] = name
        removed.add(io.weight_dq)
        weight_names[io.layer] = name
    # Every activation DequantizeLinear(QuantizeLinear(x)) goes, whichever layers share x.
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = producers.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                rename[n.output[0]] = q.input[0]
                removed.update((n.output[0], q.output[0]))
    keep = [n for n in graph.node if not (n.output and n.output[0] in removed)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(model)
    left = [n.name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if left:
        raise UserError(f"Q/DQ nodes outside the plan's layers remain in the graph: {', '.join(left[:3])}")
    return weight_names


# --------------------------------------------------------------------------------------------------
# Static check: would this ONNX import into the profile's TensorRT?

# Inputs that the parser needs as build-time constants (operators.md restrictions).
_CONST_INPUTS = {
    "Slice": ([1, 2, 3, 4], lambda v: v < (10, 3)),  # "axes must be an initializer" (starts/ends too in 8.x), tensor axes from 10.3
    "ReduceMean": ([1], lambda v: True),  # opset 18 axes input: "`axes` must be an initializer"
    "ReduceSum": ([1], lambda v: True),
    "ReduceMax": ([1], lambda v: True),
    "Squeeze": ([1], lambda v: v < (10, 7)),
    "Unsqueeze": ([1], lambda v: v < (10, 7)),
}


def static_check(model, target: TrtTarget) -> Dict[str, Any]:
    """Check ``model`` against the ONNX parser of ``target``'s TensorRT; raises TensorRTCheckError
    naming the first offending node (and how many more there are), else returns a report."""
    import onnx

    from .onnx import QDQRuleError, check_qdq_rules, op_counts

    v = target.version
    label = f"TensorRT {target.version_text}"
    parser = target.parser
    violations: List[str] = []
    warnings: List[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if not parser.opset_min <= opset <= parser.opset_max:
        violations.append(f"model opset {opset} is outside {parser.opset_min}-{parser.opset_max}, the range the ONNX parser of {label} supports ({parser.source})")
    graph = model.graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        where = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            violations.append(f"{where}: op of domain {node.domain!r} needs a TensorRT plugin; {label}'s ONNX parser has no importer for it")
            continue
        if node.op_type not in parser.ops:
            violations.append(f"{where}: {node.op_type} is not supported by the ONNX parser of {label} ({parser.source})")
            continue
        rule = _CONST_INPUTS.get(node.op_type)
        if rule and rule[1](v[:2]):
            for idx in rule[0]:
                if idx < len(node.input) and node.input[idx] and node.input[idx] not in consts:
                    violations.append(f"{where}: input {idx} ({node.input[idx]!r}) must be a build-time constant for {label}")
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode not in ("nearest", "linear"):
                warnings.append(f"{where}: Resize mode {mode!r} is not documented for {label} (imported, but check accuracy)")
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            violations.append(f"{where}: only the first output of LayerNormalization is supported")
    try:
        qdq_nodes = check_qdq_rules(model)
    except QDQRuleError as e:
        violations.append(f"{e} ({label} explicit quantization rules)")
        qdq_nodes = None
    # Shapes: static everywhere (no optimisation profiles are built for this fixed-batch model).
    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception as e:  # e.g. a custom-domain op without a schema: check what the graph declares
        g = model.graph
        warnings.append(f"ONNX shape inference failed ({str(e).splitlines()[0][:120]}); only declared shapes and types were checked")
    accepted = accepted_dtypes(*v[:2])
    io_names = {t.name for t in list(g.input) + list(g.output)}
    tensors = [("input", vi) for vi in g.input] + [("output", vi) for vi in g.output] + [("tensor", vi) for vi in g.value_info]
    for kind, vi in tensors:
        tt = vi.type.tensor_type
        if kind != "tensor" and not tt.HasField("shape"):
            violations.append(f"graph {kind} {vi.name!r}: no shape (TensorRT needs static shapes here)")
            continue
        if tt.HasField("shape"):
            dims = list(tt.shape.dim)
            if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
                shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                violations.append(f"{kind} {vi.name!r}: dynamic shape {shown} (the bundle is built for fixed shapes)")
        et = tt.elem_type
        if et and et not in accepted:
            violations.append(f"{kind} {vi.name!r}: data type {_ONNX_DTYPE.get(et, et)} is rejected by {label}'s ONNX parser ('Unsupported ONNX data type')")
        elif et == 2 and v[0] >= 10 and vi.name not in io_names:
            violations.append(f"tensor {vi.name!r}: UINT8 is only supported as a network input or output in {label}")
        elif et == 11:
            warnings.append(f"{kind} {vi.name!r}: DOUBLE is cast down to FLOAT by {label}")
        elif et == 7 and v[0] < 10:
            warnings.append(f"{kind} {vi.name!r}: INT64 is cast down to INT32 by {label}")
    for init in graph.initializer:
        if init.data_type not in accepted:
            violations.append(f"initializer {init.name!r}: data type {_ONNX_DTYPE.get(init.data_type, init.data_type)} is rejected by {label}'s ONNX parser")
        elif init.data_type == 11:
            warnings.append(f"initializer {init.name!r}: DOUBLE is cast down to FLOAT by {label}")
        elif init.data_type == 7 and v[0] < 10:
            from onnx import numpy_helper

            values = numpy_helper.to_array(init)
            if values.size and (values.max() > np.iinfo(np.int32).max or values.min() < np.iinfo(np.int32).min):
                warnings.append(f"initializer {init.name!r}: INT64 values outside int32 are clamped by {label} (fine for Slice ends)")
            else:
                warnings.append(f"initializer {init.name!r}: INT64 is cast down to INT32 by {label}")
    for node in graph.node:
        if node.op_type == "Constant":
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            if t is not None and t.data_type not in accepted:
                violations.append(f"node {node.name!r} (Constant): data type {_ONNX_DTYPE.get(t.data_type, t.data_type)} is rejected by {label}'s ONNX parser")
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and to not in accepted:
                violations.append(f"node {node.name!r} (Cast): casts to {_ONNX_DTYPE.get(to, to)}, which {label} rejects")
    if violations:
        more = f" (+{len(violations) - 1} more)" if len(violations) > 1 else ""
        raise TensorRTCheckError(f"{label} static check failed: {violations[0]}{more}")
    plain = [w for w in warnings if w.endswith(f"INT64 is cast down to INT32 by {label}") or w.endswith(f"INT64 is cast down to INT32 (clamped) by {label}")]
    warnings = [w for w in warnings if w not in plain] + ([f"{len(plain)} INT64 tensors/initializers are cast down to INT32 by {label}"] if plain else [])
    return {
        "passed": True,
        "tensorrt_version": target.version_text,
        "parser": parser.source,
        "parser_table_derived": parser.derived,
        "opset": opset,
        "opset_range": [parser.opset_min, parser.opset_max],
        "nodes": len(graph.node),
        "op_counts": op_counts(model),
        "qdq_nodes": qdq_nodes,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------------
# trtexec


def trtexec_flags(target: TrtTarget, onnx_file: str, engine_file: str, layer_info: str, cache_file: Optional[str], fp32_layers: Sequence[str]) -> List[str]:
    """trtexec's build flags for ``target``, each checked against samples/common/sampleOptions.cpp of
    the NVIDIA/TensorRT branch named in the comment."""
    major = target.major
    flags = [f"--onnx={onnx_file}", f"--saveEngine={engine_file}"]
    if target.strongly_typed:
        flags.append("--stronglyTyped")  # release/10.3+ ("Create a strongly typed network"); 11.x accepts it as a no-op
    else:
        if target.precision == "int8":
            flags.append("--int8")  # release/8.5, 8.6, 10.3 (removed from the build options in 11.0)
        if "FP16" in target.builder_flags:
            flags.append("--fp16")  # release/8.5, 8.6, 10.3 (removed in 11.0)
        if target.mode == "implicit" and target.precision == "int8" and cache_file:
            flags.append(f"--calib={cache_file}")  # release/8.5-10.16 "Read INT8 calibration cache file"
    if target.dla_core is not None:
        flags.append(f"--useDLACore={target.dla_core}")  # release/8.5 ... 11.1
        if target.gpu_fallback:
            flags.append("--allowGPUFallback")  # release/8.5 ... 11.1
    flags.append(f"--memPoolSize=workspace:{target.workspace_mib}")  # MiB without a suffix: release/8.5 (plain number) and 10.3+ (default unit MiB)
    flags.append(f"--timingCacheFile={TIMING_CACHE}")  # release/8.5 ... 11.1
    flags.append("--profilingVerbosity=detailed")  # release/8.5 ... 11.1
    flags.append(f"--exportLayerInfo={layer_info}")  # release/8.5 ... 11.1 (printed after the build, --buildOnly included)
    if fp32_layers:
        # release/8.5 sampleOptions.cpp getLayerPrecisions/getLayerOutputTypes: comma-separated
        # exact layer names ("*" is the only wildcard), values fp32|fp16|int8|int32; no effect
        # unless --precisionConstraints is obey or prefer.
        flags.append("--precisionConstraints=obey")
        flags.append("--layerPrecisions=" + ",".join(f"{n}:fp32" for n in fp32_layers))
        flags.append("--layerOutputTypes=" + ",".join(f"{n}:fp32" for n in fp32_layers))
    # Build only: 8.5 knows --buildOnly; 8.6 renamed it --skipInference (keeping --buildOnly as an
    # alias); release/10.3+ only has --skipInference.
    flags.append("--buildOnly" if target.version[:2] == (8, 5) else "--skipInference")
    return flags


def latency_flags(target: TrtTarget, engine_file: str) -> List[str]:
    flags = [f"--loadEngine={engine_file}"]
    if target.dla_core is not None:
        flags.append(f"--useDLACore={target.dla_core}")
    if target.major < 11:
        flags += ["--useCudaGraph", "--noDataTransfers", "--separateProfileRun"]  # defaults (deprecated flags) in 11.0
    flags += ["--warmUp=500", "--duration=10"]
    return flags


def _sh_flag(flag: str, cache_file: Optional[str]) -> str:
    if cache_file and flag == f"--calib={cache_file}":
        return '"--calib=$CALIB"'
    return shlex.quote(flag)


def build_script(target: TrtTarget, build: List[str], latency: List[str], cache_file: Optional[str], model: str) -> str:
    """``build_engine.sh``: the trtexec build for ``target``, guarded so that it cannot silently build
    something else than the bundle was made for.

    * The TensorRT version of the trtexec that runs is read from its banner: every trtexec prints
      ``&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # ...`` first, ``NV_TENSORRT_VERSION``
      (samples/common/logging.h ``defineTest``, NVIDIA/TensorRT release/8.5, 8.6, 10.3, 11.1);
      ``TRT_VERSION_INT`` overrides it. A different major.minor than the profile's stops the build.
    * Implicit INT8: TensorRT ignores a calibration cache whose header names another version, and
      trtexec's ``RndInt8Calibrator`` (sampleEngines.cpp, release/8.5-10.16) then calibrates on
      random data without an error. So the cache is copied with the header of the trtexec found
      (``TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2``, the algorithm of that calibrator, an
      ``IInt8EntropyCalibrator2``), and a missing cache stops the build.
    * ``DRY_RUN=1`` prints the trtexec command instead of running it.
    """
    branch = f"release/{target.version[0]}.{target.version[1]}"
    mm = f"{target.version[0]}.{target.version[1]}"
    lines = [
        "#!/bin/sh",
        f"# Build the TensorRT engine of this bundle ({model}, {target.precision}) ON THE DEVICE:",
        f"#   {target.device or 'Jetson'}, JetPack {target.jetpack or '?'}, TensorRT {target.version_text}, {target.network}.",
        f"# trtexec flags checked against NVIDIA/TensorRT {branch} samples/common/sampleOptions.cpp.",
        "# Engines only run on the TensorRT version and GPU that built them.",
        "#   TRTEXEC=path        the trtexec to use (default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec)",
        "#   TRT_VERSION_INT=N   its NV_TENSORRT_VERSION (default: read from its banner, '[TensorRT vN]')",
        "#   DRY_RUN=1           print the trtexec command instead of running it",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'V="${TRT_VERSION_INT:-$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p\' | head -n 1)}"',
        f'[ -n "$V" ] || {{ echo "cannot read the TensorRT version of $TRTEXEC (this bundle is for TensorRT {target.version_text}); set TRT_VERSION_INT" >&2; exit 1; }}',
        '# NV_TENSORRT_VERSION: major*1000+minor*100+patch before 10.0, major*10000+minor*100+patch from 10.0',
        'if [ "$V" -ge 10000 ]; then MM="$((V / 10000)).$((V / 100 % 100))"; else MM="$((V / 1000)).$((V / 100 % 10))"; fi',
        f'[ "$MM" = "{mm}" ] || {{ echo "this bundle is for TensorRT {target.version_text}, $TRTEXEC is TensorRT $MM (v$V): reconvert with the matching profile" >&2; exit 1; }}',
    ]
    if cache_file:
        q = shlex.quote(cache_file)
        lines += [
            f'[ -f {q} ] || {{ echo "missing {cache_file}: trtexec would calibrate on random data" >&2; exit 1; }}',
            f"CALIB={shlex.quote(cache_file + '.device')}",
            f'{{ echo "TRT-$V-EntropyCalibration2"; tail -n +2 {q}; }} > "$CALIB"',
        ]
    lines.append('RUN=""; [ "${DRY_RUN:-0}" = 1 ] && RUN=echo')
    lines.append('$RUN "$TRTEXEC" ' + " \\\n  ".join(_sh_flag(f, cache_file) for f in build))
    lines.append("")
    lines.append("# Latency on the device (GPU compute only, like the harness's device results):")
    lines.append("#   \"$TRTEXEC\" " + " ".join(shlex.quote(f) for f in latency))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The converter


def _engine_possible(target: TrtTarget) -> Tuple[bool, str]:
    """(True, '') when this host can build the engine for ``target``: tensorrt importable, a GPU
    TensorRT can use, and the same TensorRT major.minor as the profile."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed here"
    from . import tensorrt_device

    ok, why = tensorrt_device.device_status()
    if not ok:
        return False, why
    installed = tensorrt_device.installed_version()
    if installed[:2] != target.version[:2]:
        return False, f"TensorRT {'.'.join(map(str, installed))} is installed here, the profile targets {target.version_text}"
    sm = tensorrt_device.compute_capability()
    if target.sm and sm and sm != target.sm:
        return False, f"this GPU is sm {sm}, the profile targets sm {target.sm}"
    return True, ""


class TensorRTConverter(Converter):
    target = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    requires = ("onnx", "onnxruntime")

    def validate(self, spec) -> None:
        super().validate(spec)
        target = resolve_target(spec)
        if spec.option("require_engine"):
            ok, why = _engine_possible(target)
            if not ok:
                raise UserError(f"--require-engine: the TensorRT engine cannot be built here ({why}); build it on the device with build_engine.sh")

    def needs_calibration(self, spec) -> bool:
        return spec.precision == "int8"

    def convert(self, ctx, out_dir: Path) -> Artifact:
        import onnx

        from calibration.trt_cache import amax_to_scale, format_cache

        from .onnx import export_for_precision

        spec = ctx.spec
        target = resolve_target(spec)
        out_dir = Path(out_dir)
        precision = spec.precision
        stem = f"{ctx.model_name}_{precision}"
        files: List[str] = []
        cache_file: Optional[str] = None
        cache_info: Dict[str, Any] = {}
        reference: Optional[str] = None
        if precision == "int8":
            if ctx.calibration is None:
                raise UserError("--precision int8 needs calibration (--calib-data DIR or --calib-stats FILE)")
            fp16_qdq = target.strongly_typed
            qdq_name = f"{stem}_qdq.onnx" if target.mode == "implicit" or target.decompose_layernorm else f"{stem}.onnx"
            proto = export_for_precision(ctx, out_dir / qdq_name, target.opset, "int8", fp16_with_int8=fp16_qdq)
            ios = int8_layer_io(proto, ctx.calibration.plan)
            if target.mode == "implicit":
                reference = qdq_name  # what the int8 engine should compute, runnable in ONNX Runtime
                weights = {}
                for io in ios:
                    module = ctx.calibration.model.get_submodule(io.layer)
                    w = module.weight.detach().float().cpu().numpy()
                    weights[io.layer] = w.T if io.op_type in ("MatMul",) else w
                build_proto = onnx.ModelProto()
                build_proto.CopyFrom(proto)
                weight_names = strip_qdq(build_proto, ios, weights)
                scales: Dict[str, float] = {}
                sources: Dict[str, List[str]] = {}
                amax_by_layer = {l.name: l.input_amax for l in ctx.calibration.plan.int8_layers()}
                for io in ios:
                    a = float(amax_by_layer[io.layer])
                    prev = scales.get(io.activation)
                    scales[io.activation] = max(prev, amax_to_scale(a)) if prev is not None else amax_to_scale(a)
                    sources.setdefault(io.activation, []).append(io.layer)
                    if io.op_type == "MatMul":
                        # A MatMul weight is a constant *tensor* in TensorRT (IConstantLayer output), so
                        # implicit mode needs its range too; Conv kernels are layer weights TensorRT scales itself.
                        wmax = float(np.abs(weights[io.layer]).max()) or 1e-8
                        scales[weight_names[io.layer]] = amax_to_scale(wmax)
                        sources.setdefault(weight_names[io.layer], []).append(io.layer + " (weight, per-tensor)")
                cache_file = f"{stem}.calib.cache"
                (out_dir / cache_file).write_text(format_cache(target.version, scales))
                files.append(cache_file)
                cache_info = {"file": cache_file, "header": f"TRT-{_version_int(target)}-EntropyCalibration2", "tensors": len(scales),
                              "keyed_by": {k: v for k, v in sources.items()}}
                onnx_name = f"{stem}_implicit.onnx"
            else:
                build_proto = proto
                onnx_name = f"{stem}.onnx"
                if target.decompose_layernorm:
                    (out_dir / qdq_name).unlink()
        else:
            fp16_graph = precision == "fp16" and target.strongly_typed
            onnx_name = f"{stem}.onnx"
            build_proto = export_for_precision(ctx, out_dir / onnx_name, target.opset, "fp16" if fp16_graph else "fp32")
        fp32_layers: List[str] = []
        if target.decompose_layernorm:
            fp32_layers = decompose_layernorm(build_proto)
        if build_proto is not None and (target.mode == "implicit" and precision == "int8" or target.decompose_layernorm):
            onnx.checker.check_model(build_proto, full_check=True)
            onnx.save(build_proto, str(out_dir / onnx_name))
        report = static_check(build_proto, target)
        if reference:
            from .onnx import check_qdq_rules

            files.append(reference)
            # The stand-in is for ONNX Runtime only (TensorRT never reads it; for 8.5 it keeps the
            # LayerNormalization op the 8.5 parser lacks), so it gets the Q/DQ rules, not the parser check.
            report["reference_onnx"] = {"file": reference, "qdq_nodes": check_qdq_rules(proto),
                                        "parser_check": "not applicable: ONNX Runtime stand-in, not given to TensorRT"}
        report["fp32_pinned_layers"] = len(fp32_layers)
        if cache_info:
            report["calibration_cache"] = cache_info

        engine_name = f"{stem}.engine"
        layer_info = f"{stem}.layers.json"
        build = trtexec_flags(target, onnx_name, engine_name, layer_info, cache_file, fp32_layers)
        script = build_script(target, build, latency_flags(target, engine_name), cache_file, ctx.model_name)
        (out_dir / BUILD_SCRIPT).write_text(script)
        (out_dir / BUILD_SCRIPT).chmod(0o755)
        files.append(BUILD_SCRIPT)

        trt_manifest: Dict[str, Any] = {
            "version": target.version_text,
            "version_int": _version_int(target),
            "jetpack": target.jetpack,
            "device": target.device,
            "sm": target.sm,
            "mode": target.mode,
            "precision": precision,
            "network": target.network,
            "builder_flags": target.builder_flags,
            "dla": {"core": target.dla_core, "gpu_fallback": target.gpu_fallback} if target.dla_core is not None else None,
            "workspace_mib": target.workspace_mib,
            "opset": target.opset,
            "opset_requested": target.opset_requested,
            "onnx": onnx_name,
            "engine": engine_name,
            "engine_built": False,
            "calibration_cache": cache_file,
            "calibration_batch_size": spec.calibration.batch_size if cache_file else None,
            "fp32_layer_prefix": FP32_PREFIX if fp32_layers else None,
            "fp32_layers": len(fp32_layers),
            "timing_cache": TIMING_CACHE,
            "layer_info": layer_info,
            "build_script": BUILD_SCRIPT,
            "trtexec": "trtexec " + " ".join(shlex.quote(f) for f in build if not f.startswith("--layer")),
            "reference_onnx": reference or onnx_name,
            "parser": {"source": target.parser.source, "derived": target.parser.derived, "opset_range": [target.parser.opset_min, target.parser.opset_max]},
            "files": {"onnx": onnx_name, "calibration_cache": cache_file, "build_script": BUILD_SCRIPT, "reference_onnx": reference},
        }
        notes = list(target.notes)
        primary, runnable = onnx_name, False
        ok, why = _engine_possible(target)
        if ok:
            from .tensorrt_device import build_engine

            options = dict(trt_manifest, bundle_dir=str(out_dir))
            engine_bytes, info = build_engine(out_dir / onnx_name, options)
            (out_dir / engine_name).write_bytes(engine_bytes)
            (out_dir / layer_info).write_text(info)
            files += [layer_info] + ([TIMING_CACHE] if (out_dir / TIMING_CACHE).exists() else [])
            trt_manifest["engine_built"] = True
            primary, runnable = engine_name, True
            files.append(onnx_name)
        else:
            if spec.option("require_engine"):
                raise UserError(f"--require-engine: the TensorRT engine cannot be built here ({why})")
            notes.insert(0, f"engine must be built on the device: run sh {BUILD_SCRIPT} in the bundle on the {target.device or 'Jetson'} "
                            f"(TensorRT {target.version_text}), or python -m converters.tensorrt_device BUNDLE --build --data DIR --output results.json "
                            f"(not built here: {why})")
        report["engine"] = {"built": trt_manifest["engine_built"], "reason": None if ok else why}
        return Artifact(
            primary=primary,
            runner=RUNNER,
            files=files,
            manifest={"opset": target.opset, "tensorrt": trt_manifest, "notes": notes},
            report=report,
            runnable_here=runnable,
            check_with=reference or onnx_name,
        )


def _version_int(target: TrtTarget) -> int:
    from calibration.trt_cache import version_int

    return version_int(target.version)
