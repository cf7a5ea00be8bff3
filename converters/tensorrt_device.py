"""Device side of the TensorRT target (runs on the Jetson): build the engine from a bundle's ONNX,
run it on a folder of images, time it, and write the results file the profiling harness merges.

    python -m converters.tensorrt_device BUNDLE --data DIR [--build] [--runs N] --output results.json

Torch-free by construction: it imports tensorrt, numpy, pycuda or cuda-python, PIL (through
``crossvit_edge.data``/``preprocess``) and the torch-free modules ``crossvit_edge.bundle``,
``data``, ``errors``, ``metrics``, ``preprocess``, ``converters.base`` and ``calibration.trt_cache``
(``tests/test_tensorrt.py`` imports it, and runs its folder/results path, in a subprocess whose
meta-path finder refuses any import of torch).

Every TensorRT call below was checked against the Python bindings (``python/src/infer/pyCore.cpp``,
``pyGraph.cpp``, ``pyInt8.cpp``, ``python/src/parsers/pyOnnx.cpp``, ``python/packaging/**/tensorrt/
__init__.py``) of NVIDIA/TensorRT release/8.5, 8.6, 10.0, 10.3, 10.7, 10.13, 10.16, 11.0 and 11.1
(the release branches of github.com/NVIDIA/TensorRT); each comment names the versions that have the
call, "all" meaning every one of those. ``docs/tensorrt_api.md`` has the whole table. Version
differences handled here:

* network: 8.x ``create_network(1 << EXPLICIT_BATCH)`` (the 8.x ONNX parser refuses implicit batch
  networks); 10.x ``create_network(0)`` or ``1 << STRONGLY_TYPED``; 11.x ``create_network(0)``
  (always strongly typed; ``EXPLICIT_BATCH`` no longer exists). Flag bit positions moved between
  versions (``kSTRONGLY_TYPED = 1`` in release/10.3 include/NvInfer.h, ``= 0`` and deprecated in
  release/11.0), so they are always read from the enum.
* precision: ``BuilderFlag.FP16/INT8`` for weakly typed 8.x/10.x networks; none when strongly typed
  (the flags do not exist in 11.x).
* implicit INT8: an ``IInt8EntropyCalibrator2`` subclass that only hands TensorRT our cache (8.x,
  10.x; deprecated in 10.1, removed in 11.0).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from calibration.trt_cache import parse_version, version_int, with_header_version
from converters.base import Runner
from crossvit_edge.errors import UserError

log = logging.getLogger(__name__)

PROG = "converters.tensorrt_device"


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("the tensorrt Python package is not installed here (it comes with JetPack on the Jetson)") from None
    return trt


def installed_version() -> Tuple[int, int, int]:
    return parse_version(_import_trt().__version__)


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


def _make_calibrator(trt, cache: bytes):
    """An IInt8EntropyCalibrator2 that only reads our cache (pyInt8.cpp release/8.5 and 10.3: the
    trampoline calls get_batch_size (pure virtual), get_batch, read_calibration_cache and
    write_calibration_cache; a subclass must call the base ``__init__``). Exceptions raised in these
    callbacks are printed by TensorRT, not propagated, so failures are recorded on the object."""

    class CacheOnlyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.cache = cache
            self.batches_requested = 0

        def get_batch_size(self):
            # 1 for explicit-batch networks (the batch is in the input shape): what trtexec's
            # calibrator passes (RndInt8Calibrator(1, ...), sampleEngines.cpp release/8.5, 10.3) and
            # Polygraphy's default (calibrator.py release/8.5: batch_size "[DEPRECATED]", default 1).
            return 1

        def get_batch(self, names):
            # Only called when TensorRT rejected the cache (version or algorithm mismatch): end
            # calibration at once instead of calibrating on nothing.
            self.batches_requested += 1
            return None

        def read_calibration_cache(self):
            return self.cache

        def write_calibration_cache(self, cache):
            return None

    return CacheOnlyCalibrator()


def _resolve(options: Dict[str, Any], key: str, base: Path) -> Optional[Path]:
    value = options.get(key)
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def build_engine(onnx_path, options: Dict[str, Any]) -> Tuple[bytes, str]:
    """Build the serialized engine for ``onnx_path`` with the bundle's TensorRT options (the
    manifest's ``tensorrt`` section); returns (engine bytes, engine-inspector JSON).

    Relative files in ``options`` (calibration cache, timing cache) are resolved against
    ``options['bundle_dir']`` or the ONNX file's folder."""
    trt = _import_trt()
    onnx_path = Path(onnx_path)
    base = Path(options.get("bundle_dir") or onnx_path.parent)
    installed = parse_version(trt.__version__)
    major = installed[0]
    wanted = parse_version(str(options.get("version", trt.__version__)))
    if wanted[:2] != installed[:2]:
        raise UserError(f"this bundle was made for TensorRT {options.get('version')}, this device has {trt.__version__}: reconvert with the matching profile")
    mode = options.get("mode", "strongly-typed" if major >= 11 else "explicit")
    precision = options.get("precision", "fp32")
    strongly = mode == "strongly-typed"
    if major < 10 and strongly:
        raise UserError(f"TensorRT {trt.__version__} has no strongly typed networks")
    if major >= 11 and not strongly:
        raise UserError(f"TensorRT {trt.__version__} networks are always strongly typed; mode {mode!r} cannot be built")

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

    config = builder.create_builder_config()
    # set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes): all (max_workspace_size: 8.x only)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.get("workspace_mib", 1024)) << 20)
    if not strongly:
        if precision in ("fp16", "int8") or options.get("dla"):
            config.set_flag(trt.BuilderFlag.FP16)  # set_flag: all; BuilderFlag.FP16: 8.5-10.16, gone in 11.0
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # 8.5-10.16, gone in 11.0; weakly typed Q/DQ networks need it too

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
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)  # 8.5-10.16, gone in 11.0
        log.info("pinned %d layers named %s* to fp32", pinned, prefix)

    calibrator = None
    if mode == "implicit" and precision == "int8":
        if major >= 11:
            raise UserError("implicit INT8 calibration does not exist in TensorRT 11 (IInt8EntropyCalibrator2 was removed)")
        cache_path = _resolve(options, "calibration_cache", base)
        if cache_path is None or not cache_path.is_file():
            raise UserError(f"implicit INT8 needs the bundle's calibration cache ({options.get('calibration_cache')}); it is missing")
        text = cache_path.read_bytes()
        if version_int(installed) != options.get("version_int"):
            log.warning("rewriting the calibration cache header for TensorRT %s (the bundle names %s)", trt.__version__, options.get("version"))
        calibrator = _make_calibrator(trt, with_header_version(text, installed))
        config.int8_calibrator = calibrator  # IBuilderConfig.int8_calibrator: 8.5-10.16 (deprecated 10.1), gone in 11.0

    dla = options.get("dla")
    if dla:
        core = int(dla["core"])
        available = builder.num_DLA_cores  # Builder.num_DLA_cores: all
        if core >= available:
            raise UserError(f"DLA core {core} requested, this device has {available} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA  # IBuilderConfig.default_device_type, DeviceType.DLA: all
        config.DLA_core = core  # IBuilderConfig.DLA_core: all
        if dla.get("gpu_fallback", True):
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # all (what trtexec --allowGPUFallback sets)
        else:
            config.set_flag(trt.BuilderFlag.DIRECT_IO)  # all; trtexec on DLA without fallback (sampleEngines.cpp 8.5, 10.3, 11.1)

    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # all; the inspector's per-layer detail needs it
    timing_path = _resolve(options, "timing_cache", base)
    previous = timing_path.read_bytes() if timing_path and timing_path.is_file() else b""
    timing_cache = config.create_timing_cache(previous)  # create_timing_cache(serialized_timing_cache): all
    config.set_timing_cache(timing_cache, False)  # set_timing_cache(cache, ignore_mismatch): all

    t0 = time.time()
    plan = builder.build_serialized_network(network, config)  # all; None on failure
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    if calibrator is not None and calibrator.batches_requested:
        raise UserError(f"TensorRT {trt.__version__} did not accept the calibration cache (it asked for calibration batches)")
    log.info("built the engine in %.1f s", time.time() - t0)
    if timing_path is not None:
        timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))  # get_timing_cache(), ITimingCache.serialize(): all

    runtime = trt.Runtime(logger)
    if dla:
        runtime.DLA_core = int(dla["core"])  # Runtime(logger), Runtime.DLA_core: all
    engine = runtime.deserialize_cuda_engine(bytes(plan))
    if engine is None:
        raise UserError("TensorRT could not load the engine it just built")
    inspector = engine.create_engine_inspector()  # deserialize_cuda_engine, create_engine_inspector: all
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)  # get_engine_information(format): all
    return bytes(plan), info


def layer_precision_summary(info: str) -> Dict[str, Any]:
    """Best-effort count of the engine's layers and of those with Int8 tensors, from the inspector
    JSON (``{"Layers": [...], "Bindings": [...]}`` in 8.x/10.x; the layer entries are strings when the
    engine was built without DETAILED verbosity)."""
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
        import pycuda.autoinit  # noqa: F401  (creates and activates a context on device 0)
        import pycuda.driver as cuda

        self.cuda = cuda
        self.device = pycuda.autoinit.device
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
        array = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype))), (count,))
        return array.reshape(tuple(shape))

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

    def __init__(self, bundle_dir, manifest, artifact=None, threads=None):
        super().__init__(bundle_dir, manifest, artifact, threads)
        trt_options = manifest.get("tensorrt", {}) or {}
        engine_path = self.artifact_path
        if engine_path.suffix != ".engine":
            engine_path = self.bundle_dir / trt_options.get("engine", engine_path.with_suffix(".engine").name)
        if not engine_path.is_file():
            raise UserError(
                f"no TensorRT engine in {self.bundle_dir} ({engine_path.name}): build it on the device "
                f"(sh {trt_options.get('build_script', 'build_engine.sh')}, or python -m {PROG} {self.bundle_dir} --build ...)"
            )
        trt = _import_trt()
        self.trt = trt
        self.engine_path = engine_path
        self.cuda = _cuda_backend()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # Runtime(logger): all
        dla = trt_options.get("dla")
        if dla:
            self.runtime.DLA_core = int(dla["core"])  # Runtime.DLA_core: all
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())  # all; None on failure
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
        if len(self.inputs) != 1 or not self.outputs:
            raise UserError(f"{engine_path.name}: expected one input and at least one output, got {list(self.inputs)} / {list(self.outputs)}")
        self.input_name = next(iter(self.inputs))
        self.output_name = manifest.get("output", {}).get("name") if manifest.get("output", {}).get("name") in self.outputs else next(iter(self.outputs))
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


def run_folder(runner: Runner, images, preprocessing) -> np.ndarray:
    """Logits for every image of ``images`` (an ``ImageSet``), in its order, through ``runner``'s
    fixed batch size (the last batch is padded by repeating its last image). Preprocessing is the
    manifest's, in PIL + numpy (``crossvit_edge.preprocess``): no torch."""
    b = runner.batch_size
    outs: List[np.ndarray] = []
    pending: List[np.ndarray] = []
    for x in images.batches(preprocessing, b):
        pending.extend(list(x))
        while len(pending) >= b:
            chunk, pending = np.stack(pending[:b]), pending[b:]
            outs.append(np.asarray(runner.run(chunk), np.float32))
    if pending:
        n = len(pending)
        chunk = np.stack(pending + [pending[-1]] * (b - n))
        outs.append(np.asarray(runner.run(chunk), np.float32)[:n])
    logits = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    if len(logits) != len(images):
        raise UserError(f"got {len(logits)} results for {len(images)} images")
    return logits


def folder_results(bundle: Path, manifest: Dict[str, Any], runner: Runner, images, logits: np.ndarray, seconds: List[float],
                   device: str, timing: str, **extra: Any) -> Dict[str, Any]:
    """The results file ``python -m crossvit_edge.profile --merge`` reads (``harness._merged_row``):
    ``images`` relative to the image folder (the harness matches them to its own images by path),
    ``logits`` in that order, ``latency`` (``metrics.latency_summary``), ``engine_bytes`` (size
    column), ``device_memory_bytes``, ``bundle``/``target``/``precision``/``runner``/``device``."""
    from crossvit_edge.metrics import latency_summary

    artifact = Path(getattr(runner, "engine_path", runner.artifact_path))
    return {
        "bundle": Path(bundle).resolve().name,
        "target": manifest.get("target", "tensorrt"),
        "precision": manifest.get("precision"),
        "runner": runner.description,
        "device": device,
        "images": [str(p.relative_to(images.root)) for p in images.paths],  # the harness's own key
        "logits": np.asarray(logits, np.float32).tolist(),
        "latency": latency_summary(seconds, runner.batch_size),
        "timing": timing,
        "engine_bytes": artifact.stat().st_size if artifact.is_file() else None,
        "device_memory_bytes": runner.memory_bytes(),
        **extra,
    }


def build_bundle_engine(bundle: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Build the bundle's engine in place (engine, layer information, timing cache)."""
    options = dict(manifest.get("tensorrt") or {})
    if not options:
        raise UserError(f"{bundle} is not a TensorRT bundle (no 'tensorrt' section in its manifest)")
    options["bundle_dir"] = str(bundle)
    t0 = time.time()
    engine, info = build_engine(bundle / options["onnx"], options)
    (bundle / options["engine"]).write_bytes(engine)
    (bundle / options["layer_info"]).write_text(info)
    return {"build_seconds": round(time.time() - t0, 1), "layer_info": options["layer_info"], **layer_precision_summary(info)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description="Build (optionally) and run a TensorRT bundle on the device; write a results JSON for the profiling harness (--merge).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="folder of images (ImageFolder or plain)")
    p.add_argument("--build", action="store_true", help="build the engine here from the bundle's ONNX first")
    p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        from crossvit_edge.bundle import read_manifest, write_json
        from crossvit_edge.data import open_image_set
        from crossvit_edge.preprocess import Preprocessing

        if args.runs < 1:
            raise UserError("--runs must be at least 1")
        bundle = args.bundle
        manifest = read_manifest(bundle)
        if manifest.get("target") != "tensorrt":
            raise UserError(f"{bundle} is a {manifest.get('target')} bundle, not tensorrt")
        build = build_bundle_engine(bundle, manifest) if args.build else None
        images = open_image_set(args.data)
        if len(images) == 0:
            raise UserError(f"no images in {args.data}")
        pre = Preprocessing.from_dict(manifest["preprocessing"])
        runner = TensorRTRunner(bundle, manifest)
        try:
            logits = run_folder(runner, images, pre)
            first = np.stack([pre(images.paths[i % len(images)]) for i in range(runner.batch_size)]).astype(np.float32)
            seconds = runner.time(first, warmup=args.warmup, runs=args.runs)
            result = folder_results(
                bundle, manifest, runner, images, logits, seconds,
                device=f"{runner.device}, TensorRT {runner.trt.__version__}",
                timing=f"CUDA events around execute_async_v3 (inputs resident on the GPU, no host copies), {args.runs} runs after {args.warmup} warm-up runs",
                tensorrt_version=runner.trt.__version__,
                built_here=build,
            )
        finally:
            runner.close()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, result)
        lat = result["latency"]
        print(f"{len(images)} images, p50 {lat['p50_ms']:.3f} ms per batch of {runner.batch_size}; wrote {args.output}")
        return 0
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
