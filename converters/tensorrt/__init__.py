"""TensorRT target (NVIDIA Jetson): the TensorRT-ready ONNX, the exact ``trtexec`` command, a static
check against the TensorRT version's ONNX parser, and, when TensorRT and a matching GPU are present,
the engine itself.

TensorRT engines are specific to the TensorRT version and the GPU they were built on, so a bundle
made on a workstation carries everything the Jetson needs to build the engine there: the ONNX,
``build_engine.sh`` (trtexec), the options the Python builder reads from the manifest
(``python -m crossvit_edge.converters.tensorrt.device BUNDLE --build ...``) and, for the implicit-INT8 option,
the calibration cache.

One module per concern:

* ``versions``: parser tables per TensorRT version, DLA, the profile's section -> ``TrtTarget``,
  ``builder_flags`` (shared by the converter and the device builder);
* ``onnx_surgery``: LayerNorm decomposition (8.5), Q/DQ stripping (implicit INT8);
* ``static_check``: would the ONNX import into the profile's TensorRT;
* ``implicit``: ranges for every tensor and the INT8 report of the implicit option;
* ``build_script``: trtexec flags and ``build_engine.sh``;
* ``converter``: ``TensorRTConverter``;
* ``device``: the Jetson side (builder, runner, CLI), torch-, onnx- and PyYAML-free.

This file imports nothing: ``crossvit_edge.converters.tensorrt.device`` is imported on a Jetson without torch or
onnx, and importing a submodule runs this file first. ``TensorRTConverter`` (the name
``crossvit_edge.converters.CONVERTERS`` gives) and the converter-side helpers are loaded on first access.
The profile keys and the choice between modes: ``docs/tensorrt_int8.md``.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "TensorRTConverter": "converter",
    "resolve_target": "versions",
    "TrtTarget": "versions",
    "builder_flags": "versions",
    "FP32_PREFIX": "versions",
    "static_check": "static_check",
    "TensorRTCheckError": "static_check",
    "decompose_layernorm": "onnx_surgery",
    "build_script": "build_script",
    "trtexec_flags": "build_script",
    "latency_flags": "build_script",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
