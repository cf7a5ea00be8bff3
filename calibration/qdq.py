"""Apply a quantization plan to a PyTorch model as explicit Q/DQ (TensorRT's explicit quantization).

Each int8 layer of the plan becomes a module that fake-quantizes its input with the plan's
per-tensor scale (symmetric, zero point 0, [-128, 127]) and dequantizes an int8 weight stored with
per-output-channel scales ([-127, 127]). Two custom ops carry the semantics:

* ``crossvit_edge::quantize_dequantize(x, scale, zero_point)``  -> QuantizeLinear + DequantizeLinear
* ``crossvit_edge::dequantize(w_int8, scale, zero_point, axis)`` -> DequantizeLinear(axis)

In PyTorch they compute exactly what ONNX Runtime computes for the Q/DQ graph (round half to even,
saturate), so the same quantized model serves for sensitivity analysis in PyTorch and for the ONNX
export, where ``crossvit_edge.converters.onnx`` translates the two ops to ONNX nodes. Weights are stored
transposed for Linear layers, (in, out) with the channel axis 1, so the exported graph is
``DQ(W) -> MatMul`` with no Transpose between them.

With the plan's int8 attention option, each self-attention matmul operand point
(``crossvit.TensorPoint``) becomes a ``QDQActivation`` (Q/DQ with the plan's per-tensor scale), and
the copy's self-attention runs the explicit matmul-softmax-matmul that carries the points.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .plan import QuantPlan


def fp16_scale_holding(amax: float) -> float:
    """The smallest float16 scale whose int8 grid (127 * scale) holds ``amax``. fp16 programs (Core
    ML, Core AI) store each activation scale in fp16; rounding amax / 127 to the nearest fp16 can
    land below it (measured: 0.020782470703125 for the image bound 2.6400, 127 * scale = 2.6394,
    which clipped 0.81% of the demo images' values), so a range that must hold, the image's exact
    one above all, takes the next fp16 up."""
    import numpy as np

    scale = np.float16(amax / 127.0)
    while float(scale) * 127.0 < amax:
        scale = np.nextafter(scale, np.float16(np.inf))
    return float(scale)


@torch.library.custom_op("crossvit_edge::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    s = scale.to(x.dtype)
    return torch.clamp(torch.round(x / s), -128, 127) * s


@quantize_dequantize.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x)


@torch.library.custom_op("crossvit_edge::dequantize", mutates_args=())
def dequantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * w.dim()
    shape[axis] = -1
    return w.to(scale.dtype) * scale.reshape(shape)


@dequantize.register_fake
def _(w, scale, zero_point, axis):
    return torch.empty(w.shape, dtype=scale.dtype, device=w.device)


def quantize_weight(w: torch.Tensor, axis: int):
    """Symmetric per-channel int8 along ``axis`` ([-127, 127]); returns (int8 weight, scales)."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.full_like(amax, 1e-8))
    shape = [1] * w.dim()
    shape[axis] = -1
    q = torch.clamp(torch.round(w.detach().float() / scale.reshape(shape)), -127, 127).to(torch.int8)
    return q, scale


class _QDQBase(nn.Module):
    def _register_quant(self, weight: torch.Tensor, axis: int, input_amax: float) -> None:
        q, s = quantize_weight(weight, axis)
        self.axis = axis
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", s)
        self.register_buffer("weight_zero_point", torch.zeros(s.shape, dtype=torch.int8))
        self.register_buffer("input_scale", torch.tensor(float(input_amax) / 127.0, dtype=torch.float32))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int8))

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_int8, self.weight_scale, self.weight_zero_point, self.axis)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.input_scale.to(x.dtype), self.input_zero_point)


class QDQLinear(_QDQBase):
    def __init__(self, linear: nn.Linear, input_amax: float):
        super().__init__()
        self._register_quant(linear.weight.detach().t().contiguous(), axis=1, input_amax=input_amax)
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        y = torch.matmul(self.quantized_input(x), w)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class QDQActivation(nn.Module):
    """Fake-quantizes a tensor that is no layer's input (an attention matmul operand): symmetric
    int8, per-tensor, the plan's scale."""

    def __init__(self, amax: float):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(amax) / 127.0, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_dequantize(x, self.scale.to(x.dtype), self.zero_point)


class QDQConv2d(_QDQBase):
    def __init__(self, conv: nn.Conv2d, input_amax: float):
        super().__init__()
        self._register_quant(conv.weight.detach(), axis=0, input_amax=input_amax)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(self.quantized_input(x), w, b, self.stride, self.padding, self.dilation, self.groups)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_qdq(model: nn.Module, plan: QuantPlan, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` whose int8 layers (per ``plan``) are Q/DQ modules."""
    model = model if inplace else copy.deepcopy(model)
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    for layer in plan.int8_layers():
        m = modules[layer.name]
        if isinstance(m, nn.Linear):
            _set_module(model, layer.name, QDQLinear(m, layer.input_amax))
        elif isinstance(m, nn.Conv2d):
            _set_module(model, layer.name, QDQConv2d(m, layer.input_amax))
        else:
            raise TypeError(f"{layer.name}: cannot quantize a {type(m).__name__}")
    if plan.attention is not None:
        from crossvit_edge.crossvit import Attention, TensorPoint

        for point in plan.attention:
            if not isinstance(modules.get(point.name), TensorPoint):
                raise TypeError(f"{point.name}: not an attention operand point of this model")
            _set_module(model, point.name, QDQActivation(point.amax))
        for m in model.modules():
            if isinstance(m, Attention):
                m.fused_attn = False  # the explicit attention carries the points (same function)
    return model.eval()
