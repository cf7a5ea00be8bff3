"""``build_engine.sh``: the exact trtexec command for the profile's TensorRT, guarded so that it
cannot silently build something else than the bundle was made for. Each flag's source:
``docs/tensorrt_api.md`` ("trtexec").
"""
from __future__ import annotations

import shlex
from typing import List, Optional, Sequence

from .versions import TrtTarget, script_version_checks, trtexec_flags_basis

BUILD_SCRIPT = "build_engine.sh"
TIMING_CACHE = "timing.cache"
DEVICE_PROG = "crossvit_edge.converters.tensorrt.device"

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
    * Implicit INT8 (``--calib``): trtexec's calibrator (``RndInt8Calibrator``, an
      ``IInt8EntropyCalibrator2``, sampleEngines.cpp release/8.5-10.16) does two different things:
      when the cache file cannot be opened it fills its input buffers with uniform random numbers
      in [-1, 1] and TensorRT calibrates on those; when the file opens it allocates no buffers at
      all and only hands TensorRT the file. TensorRT uses the cache only when its header names the
      running version and the calibrator's algorithm; otherwise it asks for batches and gets null
      device pointers from that calibrator (a failed or meaningless calibration, never a correct
      one). So a missing cache stops the script, and the cache is handed over with the header of
      the trtexec found (``TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2``).
    * Implicit INT8 with trtexec ranges only the tensors the cache names: TensorRT's own tensors
      (a MatMul weight's constant and the Shuffle the 8.5 parser puts after it) get none, so those
      layers run in float. ``python -m crossvit_edge.converters.tensorrt.device BUNDLE --build`` ranges them too.
    * ``DRY_RUN=1`` prints the trtexec command instead of running it.
    """
    mm = f"{target.version[0]}.{target.version[1]}"
    lines = [
        "#!/bin/sh",
        f"# Build the TensorRT engine of this bundle ({model}, {target.precision}) ON THE DEVICE:",
        f"#   {target.device or 'Jetson'}, JetPack {target.jetpack or '?'}, TensorRT {target.version_text}, {target.network}.",
        f"# {trtexec_flags_basis(target.version)}",
        "# Engines only run on the TensorRT version and GPU that built them.",
        "#   TRTEXEC=path        the trtexec to use (default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec)",
        "#   TRT_VERSION_INT=N   its NV_TENSORRT_VERSION (default: read from its banner, '[TensorRT vN]')",
        "#   DRY_RUN=1           print the trtexec command instead of running it",
    ]
    if cache_file:
        lines += [
            "# Implicit INT8: trtexec ranges only the tensors the calibration cache names; layers fed by a constant",
            "# weight tensor (MatMul weights) then run in float. The Python builder ranges every tensor:",
            f"#   python -m {DEVICE_PROG} BUNDLE --build --data DIR --output results.json",
        ]
    lines += [
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'V="${TRT_VERSION_INT:-$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p\' | head -n 1)}"',
        f'[ -n "$V" ] || {{ echo "cannot read the TensorRT version of $TRTEXEC (this bundle is for TensorRT {target.version_text}); set TRT_VERSION_INT" >&2; exit 1; }}',
        '# NV_TENSORRT_VERSION: major*1000+minor*100+patch before 10.0, major*10000+minor*100+patch from 10.0',
        'if [ "$V" -ge 10000 ]; then MM="$((V / 10000)).$((V / 100 % 100))"; else MM="$((V / 1000)).$((V / 100 % 10))"; fi',
        f'[ "$MM" = "{mm}" ] || {{ echo "this bundle is for TensorRT {target.version_text}, $TRTEXEC is TensorRT $MM (v$V): reconvert with the matching profile" >&2; exit 1; }}',
    ]
    # versions.version_guard's patch-level rules (DLA, JetPack support), as the device builder runs them
    checks = script_version_checks(target)
    lines[-1:-1] = [f'[ "$V" {op} {n} ] || {{ echo {shlex.quote(why + " (trtexec: v")}"$V)" >&2; exit 1; }}' for op, n, why in checks if op == "-lt"]
    lines += [f'[ "$V" {op} {n} ] || {{ echo {shlex.quote(why + " (trtexec: v")}"$V)" >&2; exit 1; }}' for op, n, why in checks if op != "-lt"]
    if cache_file:
        q = shlex.quote(cache_file)
        lines += [
            f'[ -f {q} ] || {{ echo "missing {cache_file}: trtexec would calibrate on random numbers" >&2; exit 1; }}',
            f"CALIB={shlex.quote(cache_file + '.device')}",
            f'{{ echo "TRT-$V-EntropyCalibration2"; tail -n +2 {q}; }} > "$CALIB"',
        ]
    lines.append('RUN=""; [ "${DRY_RUN:-0}" = 1 ] && RUN=echo')
    lines.append('$RUN "$TRTEXEC" ' + " \\\n  ".join(_sh_flag(f, cache_file) for f in build))
    lines.append("")
    lines.append("# Then list the engine in the manifest (the runner loads only listed engines) and profile it:")
    lines.append(f"#   python -m {DEVICE_PROG} BUNDLE --adopt-engine --data DIR --output results.json")
    lines.append("# Latency on the device (GPU compute only, like the harness's device results):")
    lines.append("#   \"$TRTEXEC\" " + " ".join(shlex.quote(f) for f in latency))
    return "\n".join(lines) + "\n"


