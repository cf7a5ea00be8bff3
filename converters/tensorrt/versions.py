"""TensorRT versions: what each release's ONNX parser accepts, which Jetson modules have DLA, and the
profile's ``tensorrt`` section resolved into a ``TrtTarget`` (checked before any work).

``builder_flags`` is the one place that decides the ``BuilderFlag`` set for a build; the converter
records its answer in the manifest and the device-side builder (``crossvit_edge.converters.tensorrt.device``)
calls it again with the installed version. Torch-, onnx- and PyYAML-free: the device imports it.
Sources for every table: ``docs/tensorrt_api.md`` and ``docs/tensorrt_int8.md``.

What the device profile's ``tensorrt`` section selects (``profiles/jetson-*.yaml``):

* ``version``: the device's TensorRT, as each JetPack ships it (``JETPACK_RELEASES`` below: 5.1.x =
  8.5.2, 6.0 = 8.6.2, 6.1/6.2 = 10.3, Thor 7.0/7.1 = 10.13, 7.2.0/7.2.1 = 10.16, 7.2.2+ = 11.4.1).
  It picks the parser's operator set and opset range, the network flags, the builder flags, the
  trtexec flags and the calibration cache header; ``version_guard`` is the one check of an
  installed TensorRT against a bundle's, on the host (converter) and on the device.
* ``mode``:
  - ``explicit``: the plan's Q/DQ graph (fp32 tensors), built weakly typed with INT8 + FP16 flags:
    TensorRT keeps int8 where the Q/DQ nodes say and picks fp16/fp32 elsewhere (8.x, 10.x).
  - ``strongly-typed``: types come from the graph (TensorRT >= 10.0 with the STRONGLY_TYPED flag;
    the only mode in 11.x). fp16 needs fp16 tensors in the ONNX, so int8 exports the fp16 model
    with fp16 Q/DQ scales, which ONNX allows only from opset 19 (QuantizeLinear-19 /
    DequantizeLinear-19 add float16 scales); every TensorRT with strongly typed networks parses
    opset >= 19 (10.0: opset 9-20), so the opset is raised to 19 for strongly typed int8 and both
    numbers are recorded. The parser types each DequantizeLinear output by its scale (fp16).
  - ``implicit`` (an option, 8.x-10.x): the fp32 graph without Q/DQ plus a range for every tensor
    (``crossvit_edge.converters.tensorrt.implicit``).
  Default: ``explicit`` for 8.x and for DLA on 10.x, ``strongly-typed`` otherwise.
* ``dla_core`` / ``gpu_fallback``: DLA (trtexec ``--useDLACore=N --allowGPUFallback``).
* ``workspace_mib``, ``opset``, and the descriptive ``device``, ``jetpack``, ``sm``.

Without a profile the converter refuses (one line): an engine is specific to the TensorRT version
and GPU, and a silent default could hand a JetPack 5 device an engine plan for TensorRT 10. A
Python caller may instead pass at least ``options={"version": ...}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from crossvit_edge.errors import UserError

FP32_PREFIX = "fp32_layernorm_"
DEFAULT_OPSET = 17
STRONGLY_TYPED_INT8_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear take float16 scales
MODES = ("implicit", "explicit", "strongly-typed")

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
    from crossvit_edge.calibration.trt_cache import parse_version

    return parse_version(text)


KNOWN_RELEASES = "8.5, 8.6, 10.0-10.16, 11.0-11.5"


@dataclass(frozen=True)
class JetPackRelease:
    """One JetPack line and the TensorRT it installs. ``seen`` says where that pairing was read:
    ``source`` (a recipe or file in a repository) or ``release notes`` (NVIDIA's documentation)."""

    jetpack: str
    l4t: str
    tensorrt: Tuple[int, int, int]
    boards: Tuple[str, ...]
    profiles: Tuple[str, ...]
    seen: str
    source: str


# Every JetPack this toolchain deploys to, newest last. The TensorRT package versions are those of
# the L4T apt feed as OE4T/meta-tegra packages it (recipes-devtools/gie/tensorrt-core_<version>-1.bb,
# each fetching libnvinfer*_<version>+cuda<X>_arm64.deb from the L4T feed); JetPack-to-L4T names
# and 11.4.1 come from NVIDIA's notes (docs/tensorrt_api.md, "Which TensorRT each JetPack ships").
JETPACK_RELEASES: Tuple[JetPackRelease, ...] = (
    JetPackRelease("5.1.x", "35.x", (8, 5, 2), ("Jetson Xavier NX", "Jetson AGX Xavier", "Jetson Orin"),
                   ("jetson-xavier-nx-jp5",), "source", "meta-tegra tensorrt-core_8.5.2-1.bb"),
    JetPackRelease("6.0", "36.2/36.3", (8, 6, 2), ("Jetson Orin Nano", "Jetson Orin NX", "Jetson AGX Orin"),
                   ("jetson-orin-nano-jp60", "jetson-agx-orin-jp60-dla"), "source",
                   "meta-tegra tensorrt-core_8.6.2.3-1.bb (libnvinfer8_8.6.2.3+cuda12.2 debs)"),
    JetPackRelease("6.1/6.2", "36.4.x", (10, 3, 0), ("Jetson Orin Nano", "Jetson Orin NX", "Jetson AGX Orin"),
                   ("jetson-orin-nano-jp6", "jetson-agx-orin-jp6-dla"), "source",
                   "meta-tegra tensorrt-core_10.3.0.30-1.bb; Torch-TensorRT 'JetPack 6.1/6.2: TensorRT 10.3'"),
    JetPackRelease("7.0/7.1", "38.x", (10, 13, 2), ("Jetson AGX Thor",), ("jetson-thor-jp7",), "source",
                   "meta-tegra tensorrt-core_10.13.2.6-1.bb and tensorrt-core_10.13.3.9-1.bb"),
    JetPackRelease("7.2.0/7.2.1", "39.x", (10, 16, 2), ("Jetson AGX Orin", "Jetson AGX Thor"),
                   ("jetson-agx-orin-jp720", "jetson-thor-jp720"), "source",
                   "meta-tegra tensorrt-core_10.16.2.10-1.bb (+cuda13.2 debs; DEPENDS:append:tegra234 = Orin too)"),
    JetPackRelease("7.2.2+", "39.x", (11, 4, 1), ("Jetson AGX Orin", "Jetson AGX Thor"),
                   ("jetson-agx-orin-jp722", "jetson-agx-orin-jp722-dla", "jetson-thor-jp722"), "release notes",
                   "TensorRT 11.4.1 'Working with DLA' (AGX Orin with JetPack 7.2.2+); no meta-tegra recipe stored"),
)

# NVIDIA's TensorRT 11.5.0 release notes: JetPack is not supported, and DLA on Orin ends at 11.4.1.
JETSON_CEILING = (11, 5, 0)
JETSON_CEILING_WHY = ("TensorRT 11.5 and later support no JetPack (NVIDIA's 11.5.0 release notes: JetPack not supported; "
                      "Orin DLA ends at 11.4.1); use the TensorRT of the board's JetPack (7.2.2+: 11.4.1)")


def jetpack_of(version: Sequence[int]) -> Optional[JetPackRelease]:
    """The JetPack that ships this TensorRT, or None. Major.minor decides for 8.x/10.x (JetPack
    updates change only the build number there); 11.x needs 11.4.1 or a later 11.4 patch, since
    11.4.0 supports no JetPack."""
    v = tuple(int(x) for x in version[:3])
    for row in JETPACK_RELEASES:
        if v[:2] == row.tensorrt[:2] and (v[0] < 11 or v >= row.tensorrt):
            return row
    return None


def jetson_support(version: Sequence[int]) -> Optional[str]:
    """None when a Jetson can run this TensorRT as a JetPack ships it (or at least not known not
    to), else why not (one line). 10.x releases no JetPack ships pass: the desktop-only ones
    exist, and nothing known changes behaviour between them."""
    v = tuple(int(x) for x in version[:3])
    if v >= JETSON_CEILING:
        return JETSON_CEILING_WHY
    if v[0] == 11 and jetpack_of(v) is None:
        return f"no JetPack ships TensorRT {'.'.join(map(str, v))} (the first 11.x on a Jetson is 11.4.1, JetPack 7.2.2+)"
    return None


def is_jetson(options) -> bool:
    """Whether a profile's (or manifest's) ``tensorrt`` section targets a Jetson."""
    options = options or {}
    return bool(options.get("jetpack")) or "jetson" in str(options.get("device") or "").lower()


def version_guard(bundle_version, installed, dla: bool, jetson: bool) -> Optional[str]:
    """Why an engine for a bundle made for TensorRT ``bundle_version`` cannot be built with the
    ``installed`` TensorRT, or None: the one check the host converter, the device builder and
    runner use (``build_engine.sh`` runs the same rules in sh, ``script_version_checks``).

    Patch matters where behaviour changes: DLA (11.4.0 has none, 11.4.1 has it on AGX Orin) and
    JetPack support (11.5+ none). Otherwise major.minor: engines and parsers change there."""
    b = parse_trt_version(bundle_version) if isinstance(bundle_version, str) else tuple(bundle_version)
    i = parse_trt_version(installed) if isinstance(installed, str) else tuple(installed)
    b_text, i_text = ".".join(map(str, b)), ".".join(map(str, i))
    if jetson:
        why = jetson_support(i)
        if why and i >= JETSON_CEILING:
            return f"this device has TensorRT {i_text}: {why}"
    if b[:2] != i[:2]:
        return f"this bundle was made for TensorRT {b_text}, this device has {i_text}: reconvert with the matching profile"
    if dla:
        why = dla_support(i)
        if why:
            return f"this bundle builds for DLA with TensorRT {b_text}, this device has {i_text}: {why}"
    if jetson:
        why = jetson_support(i)
        if why:
            return f"this device has TensorRT {i_text}: {why}"
    return None


def check_version_guard(bundle_version, installed, dla: bool, jetson: bool) -> None:
    why = version_guard(bundle_version, installed, dla, jetson)
    if why:
        raise UserError(why)


def script_version_checks(target: "TrtTarget") -> List[Tuple[str, int, str]]:
    """``version_guard``'s patch-level rules as (test, NV_TENSORRT_VERSION, message) for
    ``build_engine.sh``: each line refuses the trtexec found unless ``$V <test> <number>`` holds."""
    checks: List[Tuple[str, int, str]] = []
    jetson = is_jetson({"jetpack": target.jetpack, "device": target.device})
    if jetson:
        checks.append(("-lt", 110500, JETSON_CEILING_WHY))
    if target.dla_core is not None and target.major == 11:
        checks.append(("-ge", 110401, f"this bundle builds for DLA with TensorRT {target.version_text}: {dla_support((11, 4, 0))}"))
    elif jetson and target.major == 11:
        checks.append(("-ge", 110401, "no JetPack ships TensorRT 11.0-11.4.0 (the first 11.x on a Jetson is 11.4.1, JetPack 7.2.2+)"))
    return checks


# The release branches of NVIDIA/TensorRT whose samples/common/sampleOptions.cpp the trtexec flags
# of build_engine.sh were read in: the columns of docs/tensorrt_api.md's trtexec table.
TRTEXEC_FLAGS_READ = ((8, 5), (8, 6), (10, 3), (10, 7), (10, 13), (10, 16), (11, 0), (11, 1))


def trtexec_flags_basis(version: Sequence[int]) -> str:
    """What the trtexec flags for ``version`` were checked against, for the build script's header:
    the branch itself when it was read, else the read branches around it and that the rest is
    inferred (for 11.4: from NVIDIA's 11.4.1 release notes, the only 11.4 source this project has)."""
    mm = (int(version[0]), int(version[1]))
    text = f"{mm[0]}.{mm[1]}"
    if mm in TRTEXEC_FLAGS_READ:
        return f"trtexec flags checked against NVIDIA/TensorRT release/{text} samples/common/sampleOptions.cpp."
    below = [v for v in TRTEXEC_FLAGS_READ if v[0] == mm[0] and v < mm]
    above = [v for v in TRTEXEC_FLAGS_READ if v[0] == mm[0] and v > mm]
    read = " and ".join(f"release/{v[0]}.{v[1]}" for v in ([max(below)] if below else []) + ([min(above)] if above else []))
    read = read or "no branch of this major"
    return (f"trtexec flags checked against NVIDIA/TensorRT {read} samples/common/sampleOptions.cpp; release/{text} was not read: "
            f"that {text}'s trtexec takes the same flags is inferred (NVIDIA's release notes), not checked in source.")


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
        # meta-tegra's 10.16.2.10 recipe still depends on the DLA compiler for tegra234 (Orin); NVIDIA's
        # DLA page is the stronger statement about what TensorRT builds, so 10.8-10.16 stay refused.
        return "TensorRT 10.7 was the last 10.x release that supported DLA (TensorRT 11.4.1 'Working with DLA')"
    if major == 11 and (minor, patch) >= (4, 1):
        return None
    return "DLA was unavailable in TensorRT 11.0 through 11.4.0 (from 11.4.1 on AGX Orin with JetPack 7.2.2+)"


def builder_flags(version: Sequence[int], mode: str, precision: str, dla: bool, gpu_fallback: bool, fp32_pins: bool) -> List[str]:
    """The ``BuilderFlag`` names a build sets, in order: the single source for the manifest and for
    the device-side builder (which calls it with the installed version), chosen as trtexec chooses
    them for the flags ``build_engine.sh`` passes (``samples/common/sampleEngines.cpp``
    ``setupNetworkAndConfig``, NVIDIA/TensorRT release/8.5, 10.3, 11.1).

    * ``FP16`` / ``INT8``: weakly typed networks only (the names are gone in 11.0); ``FP16`` also for
      DLA, which runs fp16 and int8 only; ``INT8`` for Q/DQ networks too (8.x/10.x weakly typed).
    * ``OBEY_PRECISION_CONSTRAINTS``: with the fp32 pins (trtexec ``--precisionConstraints=obey``).
    * DLA: ``PREFER_PRECISION_CONSTRAINTS`` below 11.0 (trtexec sets it whenever ``--useDLACore`` is
      given, 8.5 and 10.3; 11.0 removed the flag), then ``GPU_FALLBACK`` (``--allowGPUFallback``)
      or else ``DIRECT_IO``.
    """
    major = int(version[0])
    weak = mode != "strongly-typed" and major < 11
    flags: List[str] = []
    if weak:
        if precision in ("fp16", "int8") or dla:
            flags.append("FP16")
        if precision == "int8":
            flags.append("INT8")
        if fp32_pins:
            flags.append("OBEY_PRECISION_CONSTRAINTS")
    if dla:
        if major < 11:
            flags.append("PREFER_PRECISION_CONSTRAINTS")
        flags.append("GPU_FALLBACK" if gpu_fallback else "DIRECT_IO")
    return flags


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
    def fp32_pins(self) -> bool:
        """Layers pinned to fp32 by name (the decomposed LayerNorm of 8.5) in a weakly typed network."""
        return self.decompose_layernorm and not self.strongly_typed

    @property
    def builder_flags(self) -> List[str]:
        """The BuilderFlag names of this build (``builder_flags`` below, as the device builder calls it)."""
        return builder_flags(self.version, self.mode, self.precision, self.dla_core is not None, self.gpu_fallback, self.fp32_pins)

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
    if is_jetson(opts):
        why_not_jetson = jetson_support(version)
        if why_not_jetson:
            raise UserError(f"{where}: TensorRT {version_text} on a Jetson: {why_not_jetson}")
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


