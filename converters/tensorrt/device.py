"""Device side of the TensorRT target (runs on the Jetson): build the engine from a bundle's ONNX,
run it on a folder of images, time it, and write the results file the profiling harness merges.

    python -m crossvit_edge.converters.tensorrt.device BUNDLE --data DIR [--build] [--runs N] --output results.json

Torch-free by construction: it imports tensorrt, numpy, pycuda or cuda-python, PIL (through
``crossvit_edge.data``/``preprocess``) and the torch-free modules ``crossvit_edge.bundle``,
``data``, ``errors``, ``metrics``, ``preprocess``, ``crossvit_edge.converters.base``, ``crossvit_edge.converters.tensorrt.versions``,
``crossvit_edge.converters.tensorrt.implicit`` and ``crossvit_edge.calibration.trt_cache`` (``tests/test_tensorrt.py`` imports it, and runs its folder/results
path, in a subprocess whose meta-path finder refuses any import of torch and PyYAML).

Every file the manifest names (ONNX, engine, layer information, timing cache, calibration cache) is
resolved inside the bundle folder (``bundle_file``): a manifest cannot make this program read or
write outside the bundle; the results go to the user's ``--output``.

Every TensorRT call below was checked against the Python bindings (``python/src/infer/pyCore.cpp``,
``pyGraph.cpp``, ``python/src/parsers/pyOnnx.cpp``, ``python/packaging/**/tensorrt/
__init__.py``) of NVIDIA/TensorRT release/8.5, 8.6, 10.0, 10.3, 10.7, 10.13, 10.16, 11.0 and 11.1
(the release branches of github.com/NVIDIA/TensorRT); each comment names the versions that have the
call, "all" meaning every one of those. ``docs/tensorrt_api.md`` has the whole table. Version
differences handled here:

* network: 8.x ``create_network(1 << EXPLICIT_BATCH)`` (the 8.x ONNX parser refuses implicit batch
  networks); 10.x ``create_network(0)`` or ``1 << STRONGLY_TYPED``; 11.x ``create_network(0)``
  (always strongly typed; ``EXPLICIT_BATCH`` no longer exists). Flag bit positions moved between
  versions (``kSTRONGLY_TYPED = 1`` in release/10.3 include/NvInfer.h, ``= 0`` and deprecated in
  release/11.0), so they are always read from the enum.
* builder flags: ``crossvit_edge.converters.tensorrt.versions.builder_flags`` (the converter records the same
  answer in the manifest): ``FP16/INT8`` for weakly typed 8.x/10.x networks, none when strongly
  typed (the flags do not exist in 11.x); ``PREFER_PRECISION_CONSTRAINTS`` with DLA below 11.0, as
  trtexec sets it.
* implicit INT8: no calibrator. The bundle's cache gives a range for every activation tensor of
  the ONNX graph; ``ITensor.set_dynamic_range`` (8.5-10.x, deprecated in 10.1, gone in 11.0) puts
  them on the parsed network, and the tensors TensorRT made itself get theirs here: a constant's
  from its values, a Shuffle's from its input (``dynamic_ranges``). What stays unranged is reported.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from crossvit_edge import safe_io
from crossvit_edge.calibration.trt_cache import parse_cache, parse_version
from crossvit_edge.converters.base import Runner
from crossvit_edge.errors import UserError

from .implicit import NetLayer, dynamic_ranges
from .versions import builder_flags, check_version_guard, is_jetson

log = logging.getLogger(__name__)

PROG = "crossvit_edge.converters.tensorrt.device"


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("the tensorrt Python package is not installed here (it comes with JetPack on the Jetson)") from None
    return trt


def installed_version() -> Tuple[int, int, int]:
    return parse_version(_import_trt().__version__)


def check_installed_version(options: Dict[str, Any], installed: Optional[Tuple[int, int, int]] = None) -> None:
    """The bundle's TensorRT (``manifest['tensorrt']``) against this device's, by ``version_guard``
    (patch where DLA or JetPack support changes): one line, before anything else is done."""
    installed = installed_version() if installed is None else installed
    jetson = is_jetson(options) or Path("/etc/nv_tegra_release").is_file()  # the L4T release file every Jetson has
    check_version_guard(str(options.get("version") or ".".join(map(str, installed))), installed,
                        dla=bool(options.get("dla")), jetson=jetson)


def device_status() -> Tuple[bool, str]:
    """(True, '') when TensorRT is importable and can create a Builder (which needs a CUDA GPU)."""
    try:
        trt = _import_trt()
    except UserError as e:
        return False, str(e)
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))  # Builder(logger), Logger.ERROR: all
    except Exception as e:  # no GPU / driver: the binding raises instead of returning a builder
        return False, f"TensorRT cannot create a builder here (no usable CUDA GPU: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if builder is None:
        return False, "TensorRT cannot create a builder here (no usable CUDA GPU)"
    del builder
    return True, ""


def compute_capability() -> Optional[str]:
    """'8.7' for the first GPU, through pycuda or cuda-python; None when neither can tell."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        major, minor = cuda.Device(0).compute_capability()  # pycuda Device.compute_capability()
        return f"{major}.{minor}"
    except Exception:
        pass
    try:
        cudart = _cudart()
        err, prop = cudart.cudaGetDeviceProperties(0)
        if _ok(cudart, err):
            return f"{prop.major}.{prop.minor}"
    except Exception:
        pass
    return None


# --------------------------------------------------------------------------------------------------
# Build


def bundle_file(base: Path, options: Dict[str, Any], key: str) -> Optional[Path]:
    """The file the manifest's ``tensorrt.<key>`` names, inside ``base`` (the bundle folder): a plain
    relative name, no absolute path, no ``..``, no symlink out (``crossvit_edge.bundle``'s check, the
    one ``Bundle.path`` makes). None when the manifest names none."""
    from crossvit_edge.bundle import resolve_in_bundle

    value = options.get(key)
    if not value:
        return None
    return resolve_in_bundle(base, value, f"tensorrt.{key}")


def describe_network(trt, network) -> Tuple[List[NetLayer], Dict[str, Any]]:
    """The parsed network as plain ``NetLayer`` records (for ``dynamic_ranges``) and the ITensor
    objects by name. Layer and tensor calls: ``INetworkDefinition.num_layers/get_layer/num_inputs/
    get_input``, ``ILayer.name/type/num_inputs/get_input/num_outputs/get_output``, ``ITensor.name/
    dtype``, ``IConstantLayer.weights`` (a numpy array): all versions listed in docs/tensorrt_api.md.
    A layer from ``get_layer`` is typed ``ILayer``; like Polygraphy (``backend/trt/util.py``), the
    class is set to ``IConstantLayer`` to read a constant's weights."""
    tensors: Dict[str, Any] = {}
    floats = {trt.DataType.FLOAT, trt.DataType.HALF}

    def names(getter, count) -> List[str]:
        out = []
        for j in range(count):
            t = getter(j)
            if t is None:  # an omitted optional input
                continue
            tensors[t.name] = t
            if t.dtype in floats:
                out.append(t.name)
        return out

    for i in range(network.num_inputs):
        t = network.get_input(i)
        tensors[t.name] = t
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        amax = None
        if layer.type == trt.LayerType.CONSTANT:
            layer.__class__ = trt.IConstantLayer
            values = np.asarray(layer.weights)
            if values.size and values.dtype.kind == "f":
                amax = float(np.abs(values.astype(np.float32)).max())
        layers.append(NetLayer(layer.name, layer.type.name, names(layer.get_input, layer.num_inputs),
                               names(layer.get_output, layer.num_outputs), amax))
    return layers, tensors


def mark_network_outputs(network, names) -> Dict[str, str]:
    """Mark the tensors named ``names`` as network outputs (the layer-wise comparison's points):
    ``INetworkDefinition.mark_output(tensor)`` (all versions, pyGraph.cpp), tensors found through
    ``num_layers/get_layer``, ``ILayer.num_outputs/get_output``, ``ITensor.name/is_network_output``
    (all). Returns each name's status: a tensor the ONNX parser did not create (folded into a
    constant, or fused at import) cannot be marked and is reported as such."""
    tensors: Dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            if t is not None:
                tensors[t.name] = t
    status: Dict[str, str] = {}
    for name in names:
        t = tensors.get(name)
        if t is None:
            status[name] = "not in the parsed network (folded or fused by TensorRT's ONNX parser)"
        elif t.is_network_output:
            status[name] = "marked"
        else:
            network.mark_output(t)
            status[name] = "marked"
    return status


def build_engine(onnx_path, options: Dict[str, Any], mark_outputs: Sequence[str] = ()) -> Tuple[bytes, str, Dict[str, Any]]:
    """Build the serialized engine for ``onnx_path`` with the bundle's TensorRT options (the
    manifest's ``tensorrt`` section); returns (engine bytes, engine-inspector JSON, build report).
    ``mark_outputs``: tensors to make engine outputs too (``mark_network_outputs``; the report's
    ``marked_outputs`` says which could be); a marked tensor is kept, not fused through.

    Files the options name (calibration cache, timing cache) are resolved inside
    ``options['bundle_dir']`` (default: the ONNX file's folder) by ``bundle_file``."""
    trt = _import_trt()
    onnx_path = Path(onnx_path)
    base = Path(options.get("bundle_dir") or onnx_path.parent)
    installed = parse_version(trt.__version__)
    major = installed[0]
    check_installed_version(options, installed)
    mode = options.get("mode", "strongly-typed" if major >= 11 else "explicit")
    precision = options.get("precision", "fp32")
    strongly = mode == "strongly-typed"
    if major < 10 and strongly:
        raise UserError(f"TensorRT {trt.__version__} has no strongly typed networks")
    if major >= 11 and not strongly:
        raise UserError(f"TensorRT {trt.__version__} networks are always strongly typed; mode {mode!r} cannot be built")
    implicit_int8 = mode == "implicit" and precision == "int8"
    cache_path = bundle_file(base, options, "calibration_cache") if implicit_int8 else None
    if implicit_int8 and (cache_path is None or not cache_path.is_file()):
        raise UserError(f"implicit INT8 needs the bundle's calibration cache ({options.get('calibration_cache')}); it is missing")
    timing_path = bundle_file(base, options, "timing_cache")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    flags = 0
    if major < 10:
        # 8.5/8.6: the ONNX parser asserts an explicit-batch network (onnx-tensorrt 8.5-GA
        # ModelImporter.cpp). EXPLICIT_BATCH: 8.5-10.16 (ignored from 10.0), gone in 11.0.
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    elif major == 10 and strongly:
        flags |= 1 << int(creation.STRONGLY_TYPED)  # STRONGLY_TYPED: 10.0+ (not in 8.5/8.6); bit read from the enum
    # 11.x: 0 (release/11.0 pyCore.cpp: STRONGLY_TYPED "Deprecated: always enabled"; no EXPLICIT_BATCH).
    network = builder.create_network(flags)  # create_network(flags=0) -> createNetworkV2: all
    parser = trt.OnnxParser(network, logger)  # OnnxParser(network, logger): all
    if not parser.parse_from_file(str(onnx_path)):  # parse_from_file(path): all
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)  # num_errors, get_error(i), IParserError.desc()/node(): all
            errors.append(f"node {e.node()}: {e.desc()}")
        raise UserError(f"TensorRT {trt.__version__} could not parse {onnx_path.name}: {'; '.join(errors[:3]) or 'unknown error'}")

    report: Dict[str, Any] = {}
    if mark_outputs:
        report["marked_outputs"] = mark_network_outputs(network, mark_outputs)
    config = builder.create_builder_config()
    # set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes): all (max_workspace_size: 8.x only)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.get("workspace_mib", 1024)) << 20)

    pinned = 0
    prefix = options.get("fp32_layer_prefix")
    if prefix and not strongly:
        for i in range(network.num_layers):  # INetworkDefinition.num_layers, get_layer(i): all
            layer = network.get_layer(i)
            if layer.name.startswith(prefix):
                layer.precision = trt.DataType.FLOAT  # ILayer.precision: 8.5-10.16, gone in 11.0 (never reached there)
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.DataType.FLOAT)  # ILayer.num_outputs: all; set_output_type: 8.5-10.16
                pinned += 1
        log.info("pinned %d layers named %s* to fp32", pinned, prefix)
    dla = options.get("dla")
    # The flag set: the same function the converter used for the manifest, with this device's version.
    flag_names = builder_flags(installed, mode, precision, bool(dla), bool((dla or {}).get("gpu_fallback", True)), pinned > 0)
    for name in flag_names:
        # set_flag: all; FP16, INT8, OBEY_/PREFER_PRECISION_CONSTRAINTS: 8.5-10.16 (gone in 11.0, where
        # builder_flags never names them); GPU_FALLBACK, DIRECT_IO: all
        config.set_flag(getattr(trt.BuilderFlag, name))
    report["builder_flags"] = flag_names
    if options.get("builder_flags") is not None and list(options["builder_flags"]) != flag_names:
        log.warning("builder flags %s differ from the bundle's %s (TensorRT %s here)", flag_names, options["builder_flags"], trt.__version__)

    if implicit_int8:
        if major >= 11:
            raise UserError("implicit INT8 does not exist in TensorRT 11 (dynamic ranges and calibrators were removed)")
        _, _, scales = parse_cache(cache_path.read_bytes())
        layers, tensors = describe_network(trt, network)
        plan = dynamic_ranges(layers, [network.get_input(i).name for i in range(network.num_inputs)],
                              {name: scale * 127.0 for name, scale in scales.items()}, fp32_prefix=prefix if pinned else None)
        for name, (amax, _) in plan.ranges.items():
            # ITensor.set_dynamic_range(min, max): 8.5-10.16 (deprecated in 10.1), gone in 11.0
            if not tensors[name].set_dynamic_range(-amax, amax):
                raise UserError(f"TensorRT rejected the dynamic range {amax} of tensor {name!r}")
        report["int8_ranges"] = plan.summary()
        for line in plan.warnings():
            log.warning("%s", line)

    if dla:
        core = int(dla["core"])
        available = builder.num_DLA_cores  # Builder.num_DLA_cores: all
        if core >= available:
            raise UserError(f"DLA core {core} requested, this device has {available} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA  # IBuilderConfig.default_device_type, DeviceType.DLA: all
        config.DLA_core = core  # IBuilderConfig.DLA_core: all

    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # all; the inspector's per-layer detail needs it
    # a timing cache is reused only when the manifest lists it (build_bundle_engine says so): one
    # that came unlisted with a bundle is never handed to TensorRT (the build replaces it)
    reuse = options.get("reuse_timing_cache", True)
    previous = timing_path.read_bytes() if reuse and timing_path and timing_path.is_file() else b""
    timing_cache = config.create_timing_cache(previous)  # create_timing_cache(serialized_timing_cache): all
    config.set_timing_cache(timing_cache, False)  # set_timing_cache(cache, ignore_mismatch): all

    t0 = time.time()
    plan_bytes = builder.build_serialized_network(network, config)  # all; None on failure
    if plan_bytes is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    log.info("built the engine in %.1f s", time.time() - t0)
    if timing_path is not None:
        # get_timing_cache(), ITimingCache.serialize(): all; a new file renamed into place (never through a planted symlink)
        safe_io.write_bytes(timing_path, bytes(config.get_timing_cache().serialize()))

    runtime = trt.Runtime(logger)
    if dla:
        runtime.DLA_core = int(dla["core"])  # Runtime(logger), Runtime.DLA_core: all
    engine = runtime.deserialize_cuda_engine(bytes(plan_bytes))
    if engine is None:
        raise UserError("TensorRT could not load the engine it just built")
    inspector = engine.create_engine_inspector()  # deserialize_cuda_engine, create_engine_inspector: all
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)  # get_engine_information(format): all
    report.update(layer_precision_summary(info))
    return bytes(plan_bytes), info, report


def layer_precision_summary(info: str) -> Dict[str, Any]:
    """Best-effort count of the engine's layers and of those with Int8 tensors, from the inspector
    JSON: ``{"Layers": [...], "Bindings": [...]}`` in 8.x/10.x, ``{"Layers": [...], "I/O Tensors":
    [...], ...}`` from 11.0 (docs/tensorrt_api.md); only ``"Layers"`` is read, so both count. The
    layer entries are strings when the engine was built without DETAILED verbosity."""
    try:
        data = json.loads(info)
    except ValueError:
        return {}
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    int8 = [l for l in layers if "int8" in json.dumps(l).lower()]
    return {"layers": len(layers), "layers_with_int8_tensors": len(int8)}


# --------------------------------------------------------------------------------------------------
# CUDA memory, streams and events: pycuda, else cuda-python


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (the only path in 13.x)
    except ImportError:
        from cuda import cudart  # cuda-python 12.x before the cuda.bindings layout
    return cudart


def _ok(cudart, err) -> bool:
    return err == cudart.cudaError_t.cudaSuccess


def _native_handle(obj) -> int:
    """The address inside a cuda-python handle object (``int(obj)`` is deprecated from 12.9)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle

        return int(get_cuda_native_handle(obj))
    except ImportError:
        return int(obj)


class _PyCuda:
    name = "pycuda"

    def __init__(self):
        # The device's primary context, the one the CUDA runtime (and so TensorRT's builder and
        # runtime) uses: ``pycuda.autoinit`` would create a second context beside it, with its own
        # memory, which an 8 GB Orin Nano cannot spare (pycuda >= 2021.1).
        import pycuda.autoprimaryctx  # noqa: F401  (retains and pushes device 0's primary context)
        import pycuda.driver as cuda

        self.cuda = cuda
        self.device = pycuda.autoprimaryctx.device
        self.stream = cuda.Stream()
        self._allocs: List[Any] = []

    def device_name(self) -> str:
        return self.device.name()

    def host(self, shape, dtype) -> np.ndarray:
        return self.cuda.pagelocked_empty(tuple(shape), dtype)  # pinned, so async copies are async

    def alloc(self, nbytes: int):
        a = self.cuda.mem_alloc(max(int(nbytes), 1))
        self._allocs.append(a)
        return a

    @staticmethod
    def address(buf) -> int:
        return int(buf)  # DeviceAllocation.__int__

    def stream_handle(self) -> int:
        return self.stream.handle

    def h2d(self, dev, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dev, host, self.stream)  # (dest, src, stream)

    def d2h(self, host: np.ndarray, dev) -> None:
        self.cuda.memcpy_dtoh_async(host, dev, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def time_ms(self, enqueue) -> float:
        start, end = self.cuda.Event(), self.cuda.Event()
        start.record(self.stream)
        enqueue()
        end.record(self.stream)
        end.synchronize()
        return start.time_till(end)  # cuEventElapsedTime(start, end), ms

    def close(self) -> None:
        for a in self._allocs:
            a.free()
        self._allocs = []


class _CudaPython:
    name = "cuda-python"

    def __init__(self):
        self.rt = _cudart()
        self.stream = self._call(self.rt.cudaStreamCreate())
        self._device: List[int] = []
        self._host: List[int] = []

    def _call(self, result):
        err, rest = result[0], result[1:]
        if not _ok(self.rt, err):
            raise UserError(f"CUDA runtime error: {err}")
        return rest[0] if len(rest) == 1 else rest

    def device_name(self) -> str:
        prop = self._call(self.rt.cudaGetDeviceProperties(0))
        name = prop.name
        return name.decode(errors="replace").rstrip("\0") if isinstance(name, bytes) else str(name)

    def host(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape)) if len(shape) else 1
        ptr = self._call(self.rt.cudaMallocHost(max(count * dtype.itemsize, 1)))
        self._host.append(ptr)
        return host_array(int(ptr), shape, dtype)

    def alloc(self, nbytes: int) -> int:
        ptr = self._call(self.rt.cudaMalloc(max(int(nbytes), 1)))
        self._device.append(ptr)
        return ptr

    @staticmethod
    def address(buf) -> int:
        return int(buf)

    def stream_handle(self) -> int:
        return _native_handle(self.stream)

    def h2d(self, dev: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes, kind, self.stream))

    def d2h(self, host: np.ndarray, dev: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream))

    def time_ms(self, enqueue) -> float:
        start = self._call(self.rt.cudaEventCreate())
        end = self._call(self.rt.cudaEventCreate())
        try:
            self._call(self.rt.cudaEventRecord(start, self.stream))
            enqueue()
            self._call(self.rt.cudaEventRecord(end, self.stream))
            self._call(self.rt.cudaEventSynchronize(end))
            return float(self._call(self.rt.cudaEventElapsedTime(start, end)))
        finally:
            self.rt.cudaEventDestroy(start)
            self.rt.cudaEventDestroy(end)

    def close(self) -> None:
        for p in self._device:
            self.rt.cudaFree(p)
        for p in self._host:
            self.rt.cudaFreeHost(p)
        self._device, self._host = [], []
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


def host_array(address: int, shape, dtype) -> np.ndarray:
    """A numpy view of ``prod(shape)`` elements of ``dtype`` at host ``address`` (cuda-python's
    pinned ``cudaMallocHost`` memory), writable, without copying. The bytes are wrapped and viewed
    with the dtype, so every dtype an engine's I/O can have works (float16 included: numpy has no
    ctypes type for it, ``np.ctypeslib.as_ctypes_type(np.float16)`` raises NotImplementedError)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape)) if shape else 1
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(int(address))
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def _cuda_backend():
    errors = []
    for cls in (_PyCuda, _CudaPython):
        try:
            return cls()
        except ImportError as e:
            errors.append(f"{cls.name}: {e}")
    raise UserError("neither pycuda nor cuda-python is installed (pip install pycuda, or cuda-python): " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------
# Runner


class TensorRTRunner(Runner):
    """A serialized TensorRT engine, run with name-based tensor bindings (``num_io_tensors``,
    ``get_tensor_name/mode/shape/dtype``, ``set_tensor_address``, ``execute_async_v3``: all from 8.5
    on, the only I/O API in 10.x and 11.x)."""

    target = "tensorrt"
    timing_meaningful = True

    @classmethod
    def check_artifact(cls, root, manifest, rel, source) -> None:
        """The ONNX an engine is built from (``tensorrt.onnx``, and the artifact itself while the
        engine is still to be built) is checked as any ONNX (``check_onnx``: external data listed
        and inside, signature). An engine and a timing cache are device build products: the runner
        loads an engine and a build reuses a timing cache only when listed (a build on the device
        lists what it writes), so one that came unlisted with the bundle is never read."""
        from crossvit_edge.artifact_check import check_onnx

        options = manifest.get("tensorrt") or {}
        onnx_files = {options["onnx"]} if options.get("onnx") else set()
        baseline = options.get("fp16_baseline")
        if isinstance(baseline, dict) and isinstance(baseline.get("onnx"), str):
            onnx_files.add(baseline["onnx"])
        if not rel.endswith(".engine"):
            onnx_files.add(rel)
        for name in sorted(onnx_files):
            check_onnx(root, manifest, name, source)

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None, engine_bytes: Optional[bytes] = None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        trt_options = manifest.get("tensorrt", {}) or {}
        engine_path = self.artifact_path
        if engine_path.suffix != ".engine":  # the engine is still to be built on the device: the artifact is the ONNX
            engine_path = bundle_file(self.bundle_dir, trt_options, "engine") or engine_path.with_suffix(".engine")
        if engine_bytes is None and not engine_path.is_file():
            raise UserError(
                f"no TensorRT engine in {self.bundle_dir} ({engine_path.name}): build it on the device "
                f"(sh {trt_options.get('build_script', 'build_engine.sh')}, or python -m {PROG} {self.bundle_dir} --build ...)"
            )
        from crossvit_edge.artifact_check import read_listed_file

        if engine_bytes is not None:  # an engine built here in memory (the layer-wise comparison's, with extra outputs)
            plan = engine_bytes
        elif "files" in manifest:  # a bundle (the pipeline checks the engine it has just built before any manifest exists)
            if engine_path.resolve().relative_to(self.bundle_dir.resolve()).as_posix() not in manifest["files"]:
                raise UserError(f"{engine_path.name} is in the bundle but not listed in its manifest's files (an engine from elsewhere is "
                                f"not loaded unverified): build it here with python -m {PROG} {self.bundle_dir} --build, which lists it, or, "
                                f"if you built it on this device with build_engine.sh, add --adopt-engine")
            plan = read_listed_file(self.bundle_dir, manifest, engine_path, engine_path.name)  # the verified bytes, once
        else:
            plan = engine_path.read_bytes()
        trt = _import_trt()
        self.trt = trt
        self.engine_path = engine_path
        self.cuda = _cuda_backend()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # Runtime(logger): all
        dla = trt_options.get("dla")
        if dla:
            self.runtime.DLA_core = int(dla["core"])  # Runtime.DLA_core: all
        self.engine = self.runtime.deserialize_cuda_engine(plan)  # all; None on failure
        if self.engine is None:
            raise UserError(f"TensorRT {trt.__version__} could not load {engine_path.name} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()  # all
        self.inputs: Dict[str, Tuple[np.ndarray, Any]] = {}
        self.outputs: Dict[str, Tuple[np.ndarray, Any]] = {}
        self.io_bytes = 0
        # Name-based I/O (num_io_tensors, get_tensor_name/shape/dtype/mode, TensorIOMode,
        # set_tensor_address): 8.5+ in every version checked, the only I/O API from 10.0 (the
        # binding-index API is gone there).
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UserError(f"{engine_path.name}: tensor {name!r} has a dynamic shape {shape}; this runner expects a fixed-shape engine")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))  # trt.nptype (tensorrt/__init__.py): all
            host = self.cuda.host(shape, dtype)
            dev = self.cuda.alloc(host.nbytes)
            self.io_bytes += host.nbytes
            self.context.set_tensor_address(name, self.cuda.address(dev))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = (host, dev)
            else:
                self.outputs[name] = (host, dev)
        from crossvit_edge.artifact_check import TensorSignature, check_signature

        # the engine's own I/O tensors against the manifest (name, static shape, float32)
        check_signature([TensorSignature(n, tuple(h.shape), str(h.dtype)) for n, (h, _) in self.inputs.items()],
                        [TensorSignature(n, tuple(h.shape), str(h.dtype)) for n, (h, _) in self.outputs.items()],
                        manifest, engine_path.name)
        self.input_name = next(iter(self.inputs))
        self.output_name = next(iter(self.outputs))
        self.batch_size = int(self.inputs[self.input_name][0].shape[0])

    @property
    def description(self) -> str:
        return f"TensorRT {self.trt.__version__} ({self.cuda.name}) on {self.device}"

    @property
    def device(self) -> str:
        try:
            return self.cuda.device_name()
        except Exception:
            return "unknown GPU"

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle()):  # execute_async_v3(stream_handle): all
            raise UserError("TensorRT execute_async_v3 failed")

    def run(self, images: np.ndarray) -> np.ndarray:
        host, dev = self.inputs[self.input_name]
        if images.shape != host.shape:
            raise UserError(f"the engine takes input of shape {host.shape}, got {images.shape}")
        np.copyto(host, images.astype(host.dtype, copy=False))
        self.cuda.h2d(dev, host)
        self._enqueue()
        out_host, out_dev = self.outputs[self.output_name]
        self.cuda.d2h(out_host, out_dev)
        self.cuda.synchronize()
        return np.array(out_host, dtype=np.float32, copy=True)

    def run_all(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """Every output of the engine (the logits and any marked tensors) by tensor name."""
        self.run(images)
        for host, dev in self.outputs.values():
            self.cuda.d2h(host, dev)
        self.cuda.synchronize()
        return {name: np.array(host, dtype=np.float32, copy=True) for name, (host, _) in self.outputs.items()}

    def time(self, images: np.ndarray, warmup: int = 10, runs: int = 100) -> List[float]:
        """Seconds per inference from CUDA events around ``execute_async_v3`` (inputs already on the
        GPU, no host transfers: what trtexec --noDataTransfers reports), after ``warmup`` runs."""
        self.run(images)
        for _ in range(warmup):
            self._enqueue()
        self.cuda.synchronize()
        return [self.cuda.time_ms(self._enqueue) / 1e3 for _ in range(runs)]

    def memory_bytes(self) -> Optional[int]:
        size = getattr(self.engine, "device_memory_size_v2", None)  # 10.1+ (not in 8.5/8.6/10.0)
        if size is None:
            size = getattr(self.engine, "device_memory_size", None)  # 8.5-10.16 (deprecated 10.1), gone in 11.0
        return int(size or 0) + self.io_bytes

    def close(self) -> None:
        for attr in ("context", "engine"):
            if hasattr(self, attr):
                setattr(self, attr, None)
        if hasattr(self, "cuda"):
            self.cuda.close()


# --------------------------------------------------------------------------------------------------
# CLI


def run_folder(runner: Runner, images, preprocessing, fetch=None):
    """Logits for every image of ``images`` (an ``ImageSet``), in its order, through ``runner``'s
    fixed batch size (the last batch is padded by repeating its last image). Preprocessing is the
    manifest's, in PIL + numpy (``crossvit_edge.preprocess``): no torch. ``fetch`` (e.g.
    ``TensorRTRunner.run_all``) returns several arrays by name per batch: then a dict of arrays."""
    b = runner.batch_size
    run = fetch or (lambda chunk: {"": runner.run(chunk)})
    outs: Dict[str, List[np.ndarray]] = {}

    def keep(chunk, n):
        for name, value in run(chunk).items():
            outs.setdefault(name, []).append(np.asarray(value, np.float32)[:n])

    pending: List[np.ndarray] = []
    for x in images.batches(preprocessing, b):
        pending.extend(list(x))
        while len(pending) >= b:
            chunk, pending = np.stack(pending[:b]), pending[b:]
            keep(chunk, b)
    if pending:
        n = len(pending)
        keep(np.stack(pending + [pending[-1]] * (b - n)), n)
    arrays = {name: np.concatenate(parts) for name, parts in outs.items()}
    if any(len(a) != len(images) for a in arrays.values()) or not arrays:
        raise UserError(f"got {min((len(a) for a in arrays.values()), default=0)} results for {len(images)} images")
    return arrays if fetch else arrays[""]


MAX_POINTS_BYTES = 64 << 20


def read_points_file(path: Path) -> Dict[str, Dict[str, Any]]:
    """The points file ``python -m crossvit_edge.debug`` writes for a TensorRT bundle: point key ->
    where it is in the engine's ONNX (``tensor`` name or null, quantization grid, note), checked
    against its schema (``bundle.validate_points_file``) before any build."""
    from crossvit_edge.bundle import load_json_file, validate_points_file
    from crossvit_edge.errors import brief

    source = f"--points {brief(str(path), 200)}"
    return validate_points_file(load_json_file(path, source, max_bytes=MAX_POINTS_BYTES), source)


def write_intermediates(output: Path, located: Dict[str, Dict[str, Any]], status: Dict[str, str], arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Write the marked tensors' values (one row per image, as the results' ``images``) beside the
    results file as ``<name>.intermediates.npz`` (numpy arrays, no pickle), atomically; returns the
    results file's ``intermediates`` entry: each point's tensor, status and array name, and the
    file's size and sha256 (``debug --merge`` refuses an intermediates file that is not the one this
    results file was written with: a run killed between the two writes, or a file swapped in)."""
    import hashlib

    output = Path(output)
    name = f"{output.stem}.intermediates.npz"
    saved: Dict[str, np.ndarray] = {}
    points: Dict[str, Any] = {}
    for i, (key, entry) in enumerate(located.items()):
        tensor = entry.get("tensor")
        point = {**entry, "status": status.get(tensor, "not located in the ONNX") if tensor else "not located in the ONNX"}
        if tensor is not None and tensor in arrays:
            point["array"] = f"p{i}"
            saved[f"p{i}"] = np.asarray(arrays[tensor], np.float32)
        points[key] = point
    with safe_io.atomic_writer(output.parent / name) as f:
        np.savez(f, **saved)
    digest = hashlib.sha256()
    for chunk in safe_io.read_chunks(output.parent / name, max_bytes=1 << 62):
        digest.update(chunk)
    return {"file": name, "points": points, "bytes": (output.parent / name).stat().st_size, "sha256": digest.hexdigest()}


def folder_results(bundle: Path, manifest: Dict[str, Any], runner: Runner, images, logits: np.ndarray, seconds: List[float],
                   device: str, timing: str, **extra: Any) -> Dict[str, Any]:
    """The results file ``python -m crossvit_edge.profile --merge`` reads (``harness._merged_row``):
    ``images`` relative to the image folder (the harness matches them to its own images by path),
    ``logits`` in that order, ``latency`` (``metrics.latency_summary``), ``engine_bytes`` (size
    column), ``device_memory_bytes``, ``bundle``/``target``/``precision``/``runner``/``device`` and
    ``architecture`` (this machine's: the report's "ran on" column)."""
    from crossvit_edge.metrics import latency_summary

    artifact = Path(getattr(runner, "engine_path", runner.artifact_path))
    return {
        "bundle": Path(bundle).resolve().name,
        "target": manifest.get("target", "tensorrt"),
        "precision": manifest.get("precision"),
        "runner": runner.description,
        "device": device,
        "architecture": platform.machine(),
        "images": [p.relative_to(images.root).as_posix() for p in images.paths],  # the harness's own key
        "logits": np.asarray(logits, np.float32).tolist(),
        "latency": latency_summary(seconds, runner.batch_size),
        "timing": timing,
        "engine_bytes": artifact.stat().st_size if artifact.is_file() else None,
        "device_memory_bytes": runner.memory_bytes(),
        **extra,
    }


BASELINE_KEYS = ("precision", "mode", "onnx", "engine", "layer_info", "builder_flags", "fp32_layer_prefix", "fp32_layers")


def engine_options(manifest: Dict[str, Any], fp16_baseline: bool = False) -> Dict[str, Any]:
    """The build options of the bundle's engine (its manifest's ``tensorrt`` section), or with
    ``fp16_baseline`` those of the FP16 engine of the same model (``tensorrt.fp16_baseline``
    overrides the precision, mode, files and flags; no calibration cache). The same TensorRT,
    device, DLA, workspace and timing cache either way."""
    options = dict(manifest.get("tensorrt") or {})
    if not options:
        raise UserError("not a TensorRT bundle (no 'tensorrt' section in its manifest)")
    if not fp16_baseline:
        return options
    baseline = options.get("fp16_baseline")
    if not isinstance(baseline, dict):
        raise UserError("this bundle carries no FP16 baseline (converted with --fp16-baseline off, or before it existed)")
    for key in BASELINE_KEYS:
        options[key] = baseline.get(key)
    if options["precision"] != "fp16" or not all(isinstance(options[k], str) for k in ("onnx", "engine", "mode")):
        raise UserError("tensorrt.fp16_baseline: needs precision fp16 and onnx, engine and mode names")
    options["calibration_cache"] = None
    options["fp16_baseline"] = None
    return options


def baseline_manifest(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest as the FP16 baseline's runner reads it: the same bundle (files, signature,
    preprocessing), with the baseline's engine as the artifact and its options as ``tensorrt``."""
    options = engine_options(manifest, fp16_baseline=True)
    return {**manifest, "precision": "fp16", "tensorrt": options,
            "artifact": {**manifest["artifact"], "file": options["engine"]}}


def build_bundle_engine(bundle: Path, manifest: Dict[str, Any], fp16_baseline: bool = False) -> Dict[str, Any]:
    """Build the bundle's engine in place (engine, layer information, timing cache); with
    ``fp16_baseline`` the FP16 engine of the same model (``engine_options``)."""
    try:
        options = engine_options(manifest, fp16_baseline)
    except UserError as e:
        raise UserError(f"{bundle}: {e}") from None
    bundle = Path(bundle)
    options["bundle_dir"] = str(bundle)
    onnx_path, engine_path = bundle_file(bundle, options, "onnx"), bundle_file(bundle, options, "engine")
    if onnx_path is None or engine_path is None:
        raise UserError(f"{bundle}: the manifest's tensorrt section names no onnx or engine file")
    layer_info = bundle_file(bundle, options, "layer_info")
    timing = bundle_file(bundle, options, "timing_cache")
    options["reuse_timing_cache"] = timing is not None and timing.resolve().relative_to(bundle.resolve()).as_posix() in manifest["files"]
    _refuse_overwriting_inputs(bundle, manifest, options, [engine_path, layer_info, bundle_file(bundle, options, "timing_cache")])
    t0 = time.time()
    engine, info, report = build_engine(onnx_path, options)
    safe_io.write_bytes(engine_path, engine)  # new files renamed into place: a symlink there is replaced, not followed
    if layer_info is not None:
        safe_io.write_bytes(layer_info, info)
    _refresh_listed_files(bundle, manifest, [engine_path, layer_info, bundle_file(bundle, options, "timing_cache")])
    return {"build_seconds": round(time.time() - t0, 1), "layer_info": options.get("layer_info"), **report}


def _refuse_overwriting_inputs(bundle: Path, manifest: Dict[str, Any], options: Dict[str, Any], outputs: List[Optional[Path]]) -> None:
    """The build writes the engine, layer information and timing cache; a manifest must not point
    them at what the build reads or what vouches for the bundle (the manifest, the ONNX, the
    calibration cache, the artifact): the next open would then verify a replaced file."""
    from crossvit_edge.bundle import MANIFEST

    root = Path(bundle).resolve()
    protected = {root / MANIFEST, (root / manifest["artifact"]["file"]).resolve()}
    protected |= {p.resolve() for p in (bundle_file(bundle, options, k) for k in ("onnx", "calibration_cache")) if p is not None}
    baseline = (manifest.get("tensorrt") or {}).get("fp16_baseline")
    for tensorrt in (manifest.get("tensorrt") or {}, baseline if isinstance(baseline, dict) else {}):
        path = bundle_file(bundle, tensorrt, "onnx")  # the INT8 build's ONNX and the baseline's: both are build inputs
        if path is not None:
            protected.add(path.resolve())
    for path in outputs:
        if path is not None and (path.resolve() in protected or path.is_dir()):
            raise UserError(f"{bundle}: the manifest's tensorrt section points a build output at {path.name}, "
                            "which the build reads or which is not a file: refusing to overwrite it")


def _refresh_listed_files(bundle: Path, manifest: Dict[str, Any], written: List[Optional[Path]]) -> None:
    """A build on the device writes the engine, layer information and timing cache (or
    ``--adopt-engine`` lists what build_engine.sh wrote): record their sizes and sha256 in ``files``
    (new entries, or the entries of files the conversion host had built, which the next open would
    otherwise refuse as modified). The runner and the next build read an engine or timing cache
    only when listed. Bounded and verified before anything is replaced: each file is a regular file
    whose size keeps the listed total within ``bundle.MAX_BUNDLE_BYTES`` (checked before a byte is
    hashed: a sparse terabyte is refused by its size), each hash reads no more than that size, and
    the new manifest must pass ``validate_manifest`` before it is renamed over the old one."""
    import copy
    import os
    import stat

    from crossvit_edge.bundle import MANIFEST, MAX_BUNDLE_BYTES, validate_manifest, write_json
    from crossvit_edge.errors import brief

    root = Path(bundle).resolve()
    new = copy.deepcopy(manifest)
    files = new.setdefault("files", {})
    sizes: Dict[str, Tuple[Path, int]] = {}
    for path in written:
        if path is None or not os.path.lexists(path):
            continue
        rel = path.resolve().relative_to(root).as_posix()
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{bundle}: {brief(rel)} is not a regular file (a link, folder or device): not listing it")
        sizes[rel] = (path, st.st_size)
    if not sizes:
        return
    total = sum(e["bytes"] for rel, e in files.items() if rel not in sizes) + sum(size for _, size in sizes.values())
    if total > MAX_BUNDLE_BYTES:
        raise UserError(f"{bundle}: listing {', '.join(brief(r) for r in sizes)} ({sum(s for _, s in sizes.values())} bytes) would make the "
                        f"bundle list {total} bytes, more than the {MAX_BUNDLE_BYTES >> 30} GiB a bundle may (the manifest is unchanged)")
    for rel, (path, size) in sizes.items():
        files[rel] = {"sha256": safe_io.sha256(path, f"{bundle}: {brief(rel)}", max_bytes=size, follow_symlinks=False), "bytes": size}
    validate_manifest(json.loads(json.dumps(new)), f"{bundle}: the manifest with {', '.join(brief(r) for r in sizes)} listed")
    write_json(root / MANIFEST, new)  # a new file renamed over the old one
    manifest.clear()
    manifest.update(new)


# 1: one engine per file; 2: adds ``format`` and ``fp16_baseline`` (the FP16 engine of the same
# model, a results record of the same shape, without ``fp16_baseline`` of its own)
RESULTS_FORMAT = 2
TIMING = "CUDA events around execute_async_v3 (inputs resident on the GPU, no host copies), {runs} runs after {warmup} warm-up runs"


def run_fp16_baseline(bundle: Path, manifest: Dict[str, Any], images, pre, rebuild: bool, warmup: int, runs: int) -> Dict[str, Any]:
    """Build (unless listed already and no ``--build``) and run the bundle's FP16 engine of the
    same model: the same images, the same first batch timed with the same protocol as the INT8
    engine. Returns its results record (``folder_results``)."""
    from crossvit_edge.bundle import open_bundle
    from crossvit_edge.isolation import in_child

    options = engine_options(manifest, fp16_baseline=True)
    engine = bundle_file(bundle, options, "engine")
    listed = engine is not None and engine.resolve().relative_to(Path(bundle).resolve()).as_posix() in manifest.get("files", {})
    build = None
    if rebuild or not listed:
        build = in_child(f"bundle {bundle.name}: building its FP16 baseline engine", lambda: build_bundle_engine(bundle, manifest, fp16_baseline=True))
        manifest = open_bundle(bundle).manifest
    fp16 = baseline_manifest(manifest)
    in_child(f"bundle {bundle.name}: its FP16 baseline engine", lambda: _load_and_run_once(bundle, fp16))
    runner = TensorRTRunner(bundle, fp16)
    try:
        logits = run_folder(runner, images, pre)
        first = np.stack([pre(images.paths[i % len(images)]) for i in range(runner.batch_size)]).astype(np.float32)
        seconds = runner.time(first, warmup=warmup, runs=runs)
        return folder_results(bundle, fp16, runner, images, logits, seconds,
                              device=f"{runner.device}, TensorRT {runner.trt.__version__}",
                              timing=TIMING.format(runs=runs, warmup=warmup), tensorrt_version=runner.trt.__version__, built_here=build)
    finally:
        runner.close()


def _load_and_run_once(bundle: Path, manifest: Dict[str, Any]) -> None:
    """Deserialize the engine and run one batch of zeros (what the child of ``in_child`` does)."""
    runner = TensorRTRunner(bundle, manifest)
    try:
        host, _ = runner.inputs[runner.input_name]
        runner.run(np.zeros(host.shape, host.dtype))
    finally:
        runner.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description="Build (optionally) and run a TensorRT bundle on the device; write a results JSON for the profiling harness (--merge).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="folder of images (ImageFolder or plain)")
    p.add_argument("--build", action="store_true", help="build the engine here from the bundle's ONNX first")
    p.add_argument("--adopt-engine", action="store_true",
                   help="the engine in the bundle is one you built on this device with its build_engine.sh: list it in the manifest (sha256) and use it")
    p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--points", type=Path, help="points file from python -m crossvit_edge.debug: build an engine (in memory, the "
                   "bundle is not changed) with those tensors as extra outputs and write their values beside the results")
    p.add_argument("--fp16-baseline", choices=("on", "off"), default="on",
                   help="an INT8 bundle's FP16 engine of the same model: build it (when not built yet, or with --build) and time it "
                        "beside the INT8 one on the same images (default on)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    from crossvit_edge.cli_common import check_int, quiet_libraries, run_cli  # standard library only: fine on a Jetson

    quiet_libraries(args.verbose)

    def body() -> int:
        from crossvit_edge.bundle import open_bundle, write_json
        from crossvit_edge.data import open_image_set
        from crossvit_edge.preprocess import Preprocessing

        check_int("--runs", args.runs, 1, 1_000_000)
        check_int("--warmup", args.warmup, 0, 1_000_000)
        opened = open_bundle(args.bundle)  # validated, every listed file verified, before anything loads
        bundle, manifest = opened.root, opened.manifest
        if manifest.get("target") != "tensorrt":
            raise UserError(f"{bundle} is a {manifest.get('target')} bundle, not tensorrt")
        located = read_points_file(args.points) if args.points else None  # checked before any build
        # the image folder too: every input is read and checked before the environment (TensorRT,
        # CUDA) is asked for anything, so a bad input is one line on any machine
        images = open_image_set(args.data)
        if len(images) == 0:
            raise UserError(f"no images in {args.data}")
        from crossvit_edge.isolation import in_child

        # TensorRT parses the bundle's ONNX (build) and engine (load) in a child process first, before
        # this process touches CUDA: a parser that aborts ends in one line, not in a core dump
        if args.build and args.adopt_engine:
            raise UserError("--build and --adopt-engine exclude each other: --build makes the engine, --adopt-engine lists the one trtexec made")
        build = in_child(f"bundle {bundle.name}: building its engine", lambda: build_bundle_engine(bundle, manifest)) if args.build else None
        if args.adopt_engine:
            # the user's flag is the trust decision (an engine that came unlisted with a bundle is
            # never loaded otherwise): record what build_engine.sh wrote, as --build does
            options = manifest.get("tensorrt") or {}
            engine = bundle_file(bundle, options, "engine")
            if engine is None or not engine.is_file():
                raise UserError(f"{bundle}: no engine to adopt; run its build_engine.sh on this device first")
            adopted = [engine, bundle_file(bundle, options, "layer_info")]
            _refuse_overwriting_inputs(bundle, manifest, options, adopted)  # never list the ONNX or the manifest as "the engine"
            _refresh_listed_files(bundle, manifest, adopted)
        if build is not None or args.adopt_engine:
            manifest = open_bundle(bundle).manifest  # the build (or adoption) listed the files it wrote
        # The bundle's TensorRT against this one (version_guard: patch where DLA or JetPack support
        # changes) before any engine is loaded or CUDA touched; --build ran the same check first
        # thing in build_engine, after the bundle's own checks (which need no TensorRT).
        check_installed_version(manifest.get("tensorrt") or {})
        pre = Preprocessing.from_dict(manifest["preprocessing"])
        marked: Dict[str, str] = {}
        engine_bytes = None
        if located is not None:  # the layer-wise comparison's engine: the same build with the points as outputs
            # (built in this process: its bytes stay in memory; the bundle's ONNX passed check_onnx on open)
            options = {**(manifest.get("tensorrt") or {}), "bundle_dir": str(bundle)}
            names = [e["tensor"] for e in located.values() if e.get("tensor")]
            engine_bytes, _, report = build_engine(bundle_file(bundle, options, "onnx"), options, mark_outputs=names)
            marked = report.get("marked_outputs", {})
        else:
            in_child(f"bundle {bundle.name}: its engine", lambda: _load_and_run_once(bundle, manifest))
        runner = TensorRTRunner(bundle, manifest, engine_bytes=engine_bytes)
        intermediates = None
        try:
            if located is not None:
                arrays = run_folder(runner, images, pre, fetch=runner.run_all)
                logits = arrays[runner.output_name]
                args.output.parent.mkdir(parents=True, exist_ok=True)
                intermediates = write_intermediates(args.output, located, marked, arrays)
            else:
                logits = run_folder(runner, images, pre)
            first = np.stack([pre(images.paths[i % len(images)]) for i in range(runner.batch_size)]).astype(np.float32)
            seconds = runner.time(first, warmup=args.warmup, runs=args.runs)
            result = folder_results(
                bundle, manifest, runner, images, logits, seconds,
                device=f"{runner.device}, TensorRT {runner.trt.__version__}",
                timing=TIMING.format(runs=args.runs, warmup=args.warmup),
                tensorrt_version=runner.trt.__version__,
                built_here=build,
                **({"intermediates": intermediates} if intermediates is not None else {}),
            )
        finally:
            runner.close()
        baseline = (manifest.get("tensorrt") or {}).get("fp16_baseline")
        if baseline and args.fp16_baseline == "on" and located is None:
            result["fp16_baseline"] = run_fp16_baseline(bundle, manifest, images, pre, args.build, args.warmup, args.runs)
        result["format"] = RESULTS_FORMAT
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write {args.output}: {e.strerror or type(e).__name__}") from None
        write_json(args.output, result)
        lat = result["latency"]
        print(f"{len(images)} images, p50 {lat['p50_ms']:.3f} ms per batch of {runner.batch_size}; wrote {args.output}")
        if "fp16_baseline" in result:
            from crossvit_edge.metrics import latency_ratio

            print(f"FP16 baseline: p50 {result['fp16_baseline']['latency']['p50_ms']:.3f} ms; INT8/FP16 "
                  f"{latency_ratio(lat, result['fp16_baseline']['latency']):.2f}x (accuracy: python -m crossvit_edge.profile --merge {args.output})")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
