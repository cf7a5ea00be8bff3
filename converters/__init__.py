"""One module per deployment target, each with a ``Converter`` and a ``Runner`` (see ``base``).

A new target is one new module plus one line in each table here. These tables are code, never
data: a bundle's manifest names an artifact ``kind`` from the closed list ``RUNNERS``, and only
these fixed module paths are ever imported (``crossvit_edge.converters.base.runner_class``).
"""
CONVERTERS = {
    "onnx": "crossvit_edge.converters.onnx:OnnxConverter",
    "tensorrt": "crossvit_edge.converters.tensorrt:TensorRTConverter",
    "coreml": "crossvit_edge.converters.coreml:CoreMLConverter",
    "executorch": "crossvit_edge.converters.executorch:ExecuTorchConverter",
    "coreai": "crossvit_edge.converters.coreai:CoreAIConverter",
}

# artifact kind (manifest["artifact"]["kind"], ["stand_in"]["kind"]) -> the Runner that executes it
RUNNERS = {
    "onnx": "crossvit_edge.converters.onnx:OnnxRuntimeRunner",
    "pte": "crossvit_edge.converters.executorch:ExecuTorchRunner",
    "mlpackage": "crossvit_edge.converters.coreml:CoreMLRunner",
    "engine": "crossvit_edge.converters.tensorrt.device:TensorRTRunner",
    "aimodel": "crossvit_edge.converters.coreai:CoreAIRunner",
}

# target -> the kind of its artifact (a TensorRT bundle whose engine is still to be built on the
# device names its ONNX as the file but is still run by the TensorRT runner)
ARTIFACT_KINDS = {"onnx": "onnx", "tensorrt": "engine", "coreml": "mlpackage", "executorch": "pte", "coreai": "aimodel"}
