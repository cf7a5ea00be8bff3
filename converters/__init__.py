"""One module per deployment target, each with a ``Converter`` and a ``Runner`` (see ``base``).

A new target is one new module plus one line in each table here. These tables are code, never
data: a bundle's manifest names an artifact ``kind`` from the closed list ``RUNNERS``, and only
these fixed module paths are ever imported (``converters.base.runner_class``).
"""
CONVERTERS = {
    "onnx": "converters.onnx:OnnxConverter",
    "tensorrt": "converters.tensorrt:TensorRTConverter",
    "coreml": "converters.coreml:CoreMLConverter",
    "executorch": "converters.executorch:ExecuTorchConverter",
}

# artifact kind (manifest["artifact"]["kind"], ["stand_in"]["kind"]) -> the Runner that executes it
RUNNERS = {
    "onnx": "converters.onnx:OnnxRuntimeRunner",
    "pte": "converters.executorch:ExecuTorchRunner",
    "mlpackage": "converters.coreml:CoreMLRunner",
    "engine": "converters.tensorrt.device:TensorRTRunner",
}

# target -> the kind of its artifact (a TensorRT bundle whose engine is still to be built on the
# device names its ONNX as the file but is still run by the TensorRT runner)
ARTIFACT_KINDS = {"onnx": "onnx", "tensorrt": "engine", "coreml": "mlpackage", "executorch": "pte"}
