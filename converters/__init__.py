"""One module per deployment target, each with a ``Converter`` and a ``Runner`` (see ``base``).

A new target is one new module plus one line here.
"""
CONVERTERS = {
    "onnx": "converters.onnx:OnnxConverter",
    "tensorrt": "converters.tensorrt:TensorRTConverter",
    "coreml": "converters.coreml:CoreMLConverter",
    "executorch": "converters.executorch:ExecuTorchConverter",
}
