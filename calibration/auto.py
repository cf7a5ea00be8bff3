"""``--calib-method auto``: each int8 tensor's range chosen, among the estimators' candidates, by
what it costs the network's output.

One statistics pass (``collect.collect_statistics``) gives every tensor's |x| histogram, from which
each estimator proposes a clipping value (``AUTO_CANDIDATES``). A second, short pass over the
first ``AUTO_EVAL_IMAGES`` calibration images then judges, at every int8 layer of the fp32 model,
each candidate by the Fisher-weighted error it puts on that layer's output:

    cost(a) = sum over outputs i of  F_ii * (Q_a(x) Wq^T - x W^T)_i^2

with ``Q_a`` the plan's symmetric per-tensor int8 fake quantization of the layer's input at
clipping value ``a`` (round half to even, [-128, 127], scale a / 127: what every target computes),
``Wq`` the int8 per-output-channel weight the artifact carries, and ``F_ii`` the diagonal of the
Fisher information of the model's output distribution with respect to that layer's output,
estimated as the squared gradient of the log-likelihood of labels drawn from the model's own
softmax (``AUTO_FISHER_DRAWS`` per image, seeded). To second order, the KL divergence from the fp32
output that a small perturbation d of a layer's output causes is d^T F d / 2: the cost is that KL
with F's diagonal, so each tensor is judged by the loss it causes at the logits, not by its local
squared error. Each layer is judged alone, on the fp32 network's own input to it, so one pass
judges all of them. A tensor that feeds no weighted layer (an attention matmul operand, with the
int8 attention option) is judged the same way with the identity for the layer.

Why not the local squared error: on the demo model the layer-output MSE picked ``mse`` or a
percentile for every tensor (it prefers clipping the rare large values) and lost 2 dB of logit SNR
to plain min/max (docs/measurements.md); those clipped values are few but the network's output
depends on them, which only a criterion measured at the output sees.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .estimators import AbsHistogram, compute_amax
from .qdq import dequantize, quantize_dequantize, quantize_weight

log = logging.getLogger(__name__)

# (method, percentile) of each candidate, in the order ties are broken (the first wins)
AUTO_CANDIDATES: Tuple[Tuple[str, Optional[float]], ...] = (
    ("minmax", None),
    ("percentile", 99.999),
    ("percentile", 99.99),
    ("percentile", 99.9),
    ("mse", None),
    ("entropy", None),
)
AUTO_EVAL_IMAGES = 128  # the first calibration images (in the sample's order) the candidates are judged on (32 lost 0.8 dB to 128 on the demo model)
AUTO_FISHER_DRAWS = 2  # labels drawn from the model's softmax per image (a backward pass each)
AUTO_SEED = 0
CRITERION = ("Fisher-weighted squared error of each int8 layer's output alone (fp32 input, int8 per-channel weight; "
             "the diagonal Fisher of the model's softmax w.r.t. that output, from labels drawn from it): the "
             "second-order KL from fp32 the range causes")


def candidate_label(method: str, percentile: Optional[float]) -> str:
    return method if percentile is None else f"percentile {percentile:g}"


def candidate_ranges(h: AbsHistogram) -> Dict[str, float]:
    """label -> clipping value of every candidate estimator for one tensor's histogram."""
    return {candidate_label(m, p): compute_amax(h, m, p if p is not None else 99.99) for m, p in AUTO_CANDIDATES}


def _fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    """The plan's per-tensor Q/DQ (``qdq.quantize_dequantize``) at clipping value ``amax``."""
    return quantize_dequantize(x, torch.tensor(amax / 127.0, dtype=x.dtype), torch.tensor(0, dtype=torch.int8))


class _Judge:
    """Accumulates, for one tensor, the Fisher-weighted squared error each distinct candidate value
    causes at the output of the layer it feeds (the identity for a tensor that feeds no weighted
    layer) and the reference output's Fisher-weighted energy."""

    def __init__(self, module: nn.Module, values: Sequence[float]):
        self.values = list(values)
        self.error = np.zeros(len(self.values), np.float64)
        self.energy = 0.0
        self.module = module
        self.weight = self.weight_q = None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            q, s = quantize_weight(module.weight, axis=0)
            self.weight = module.weight.detach().float()
            self.weight_q = dequantize(q, s, torch.zeros(s.shape, dtype=torch.int8), 0)  # the artifact's int8 weight

    def _layer(self, x: torch.Tensor, w: Optional[torch.Tensor]) -> torch.Tensor:
        m = self.module
        if w is None:
            return x
        if isinstance(m, nn.Linear):
            return F.linear(x, w)  # the bias cancels in the difference
        return F.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)

    def update(self, x: torch.Tensor, fisher: torch.Tensor) -> None:
        """``x``: the layer's fp32 input; ``fisher``: the squared log-likelihood gradient at its
        output (same shape as the output), summed over the draws."""
        x = x.detach().float()
        w = fisher.detach().double()
        ref = self._layer(x, self.weight)
        self.energy += float((w * ref.double() ** 2).sum())
        for i, a in enumerate(self.values):
            self.error[i] += float((w * (self._layer(_fake_quant(x, a), self.weight_q) - ref).double() ** 2).sum())


def snr_db(error: float, energy: float) -> float:
    if error <= 0:
        return math.inf
    return 10.0 * math.log10(max(energy, 1e-300) / error)


@torch.no_grad()
def select_ranges(model: nn.Module, histograms: Dict[str, AbsHistogram], names: Iterable[str],
                  batches: Iterable[np.ndarray], total_batches: Optional[int] = None) -> Tuple[Dict[str, float], Dict[str, Dict]]:
    """For each tensor of ``names`` (modules of ``model`` whose input is planned int8), the
    candidate range with the smallest Fisher-weighted output error on ``batches``. Returns (name ->
    amax, name -> choice), a choice being ``{"estimator", "snr_db", "margin_db", "candidates":
    {label: (amax, snr_db)}}``: the winner's Fisher-weighted output SNR and its lead over the best
    other candidate value (dB)."""
    modules = dict(model.named_modules())
    names = list(names)
    labels: Dict[str, List[List[str]]] = {}
    judges: Dict[str, _Judge] = {}
    for n in names:
        ranges = candidate_ranges(histograms[n])
        values: List[float] = []
        groups: List[List[str]] = []
        for label, a in ranges.items():  # candidates that propose the same value are judged once
            if a in values:
                groups[values.index(a)].append(label)
            else:
                values.append(a)
                groups.append([label])
        labels[n] = groups
        judges[n] = _Judge(modules[n], values)

    inputs: Dict[str, torch.Tensor] = {}
    outputs: Dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, args, output):
            inputs[name] = args[0].detach()
            output.retain_grad()
            outputs[name] = output
        return hook

    generator = torch.Generator().manual_seed(AUTO_SEED)
    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients w.r.t. the activations only
        p.requires_grad_(False)
    model.eval()
    try:
        for x in tqdm(batches, total=total_batches, desc="judging ranges", unit="batch", leave=False):
            inputs.clear()
            outputs.clear()
            fisher: Dict[str, torch.Tensor] = {}
            with torch.enable_grad():  # one forward; a backward per drawn label
                image = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
                logits = model(image)
                probs = torch.softmax(logits.detach().double(), 1)
                for draw in range(AUTO_FISHER_DRAWS):
                    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                    F.cross_entropy(logits, drawn, reduction="sum").backward(retain_graph=draw + 1 < AUTO_FISHER_DRAWS)
                    for n in names:
                        grad = outputs[n].grad
                        if grad is None:
                            raise ValueError(f"auto calibration: no gradient reached {n}")
                        fisher[n] = grad ** 2 if n not in fisher else fisher[n] + grad ** 2
                        outputs[n].grad = None
            for n in names:  # the error is linear in the weights: the draws' sum judged once
                judges[n].update(inputs[n], fisher[n])
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        inputs.clear()
        outputs.clear()

    amax: Dict[str, float] = {}
    choices: Dict[str, Dict] = {}
    for n in names:
        j = judges[n]
        if j.energy == 0.0:
            raise ValueError(f"auto calibration: {n} saw no input on the evaluation images")
        snrs = [snr_db(e, j.energy) for e in j.error]
        best = int(np.argmin(j.error))  # argmin keeps the first of equals: AUTO_CANDIDATES' order
        others = [s for i, s in enumerate(snrs) if i != best]
        amax[n] = float(j.values[best])
        choices[n] = {
            "estimator": labels[n][best][0],
            "snr_db": snrs[best],
            "margin_db": (snrs[best] - max(others)) if others else 0.0,
            "candidates": {label: (float(j.values[i]), snrs[i]) for i, group in enumerate(labels[n]) for label in group},
        }
    return amax, choices


def summary(choices: Dict[str, Dict]) -> Dict[str, object]:
    """What the plan's calibration record says of the selection: the candidates, the criterion, and
    how many tensors each estimator won."""
    wins: Dict[str, int] = {}
    for c in choices.values():
        wins[c["estimator"]] = wins.get(c["estimator"], 0) + 1
    return {
        "candidates": [candidate_label(m, p) for m, p in AUTO_CANDIDATES],
        "criterion": CRITERION,
        "wins": dict(sorted(wins.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
