"""LayerNorm -> Linear outlier folding (SmoothQuant / RepQ-ViT style).

Post-LayerNorm activations of ViTs carry a few channels with 10-100x larger ranges, which a
per-tensor int8 scale cannot serve. For each LayerNorm whose output feeds only Linear layers, divide
channel j of the LayerNorm's affine (gamma, beta) by s_j and multiply column j of every consumer's
weight by s_j: the float function is unchanged, the activation ranges are flattened, and the graph
stays plain Q/DQ (per-tensor activations, per-channel weights)::

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

Pairs in CrossViT: block norm1 -> qkv, norm2 -> fc1, cross-attention norm1 -> wq/wk/wv (wq stays
float but shares the input, so it is scaled too). The final norm -> head pair is skipped: the heads
stay float, so there is nothing to gain.
"""
from __future__ import annotations

import copy
import re
from typing import Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import nn


def smoothing_pairs(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """(LayerNorm name, [consumer Linear names]) for every foldable pair of a CrossViT."""
    pairs = []
    for name, module in model.named_modules():
        if re.match(r"^blocks\.\d+\.blocks\.\d+\.\d+$", name):
            pairs.append((f"{name}.norm1", [f"{name}.attn.qkv"]))
            pairs.append((f"{name}.norm2", [f"{name}.mlp.fc1"]))
        elif re.match(r"^blocks\.\d+\.fusion\.\d+$", name):
            pairs.append((f"{name}.norm1", [f"{name}.attn.wq", f"{name}.attn.wk", f"{name}.attn.wv"]))
    return pairs


def smoothing_factors(
    model: nn.Module, channel_amax: Mapping[str, np.ndarray], alpha: float
) -> Dict[str, np.ndarray]:
    """LayerNorm name -> per-channel factor s (from the consumers' input channel ranges)."""
    modules = dict(model.named_modules())
    factors = {}
    for norm_name, consumers in smoothing_pairs(model):
        x_amax = np.max([channel_amax[c] for c in consumers if c in channel_amax], axis=0)
        w_amax = np.max([modules[c].weight.detach().abs().amax(0).double().numpy() for c in consumers], axis=0)
        s = np.power(np.maximum(x_amax, 1e-5), alpha) / np.power(np.maximum(w_amax, 1e-5), 1.0 - alpha)
        factors[norm_name] = np.clip(s, 1e-4, 1e4)
    return factors


@torch.no_grad()
def apply_smoothing(model: nn.Module, factors: Mapping[str, np.ndarray]) -> nn.Module:
    """A copy of ``model`` with each factor folded into its LayerNorm and consumers."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    pairs = dict(smoothing_pairs(model))
    for norm_name, s in factors.items():
        s_t = torch.from_numpy(np.asarray(s)).to(torch.float64)
        norm = modules[norm_name]
        norm.weight.copy_((norm.weight.double() / s_t).float())
        norm.bias.copy_((norm.bias.double() / s_t).float())
        for c in pairs[norm_name]:
            lin = modules[c]
            lin.weight.copy_((lin.weight.double() * s_t[None, :]).float())
    return model
