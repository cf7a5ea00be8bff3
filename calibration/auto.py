"""``--calib-method auto``: each int8 tensor's range chosen, among the estimators' candidates, by
what it costs the network's output.

One statistics pass (``collect.collect_statistics``) gives every tensor's |x| histogram, from which
each estimator proposes a clipping value (``AUTO_CANDIDATES``). A second, short pass over the
first ``AUTO_EVAL_IMAGES`` calibration images weights that histogram by how much the network's
output depends on each value, and each candidate is judged by its Fisher-weighted expected error:

    cost(a) = sum over histogram bins b of  F_b * E[(Q_a(x) - x)^2 | x in b]

with ``Q_a`` the plan's symmetric per-tensor int8 quantization at clipping value ``a`` (scale
a / 127, [-127, 127] in use: what every target computes), the expectation taken in closed form
with the values spread uniformly within the bin (it holds both the rounding noise inside the range
and the clipping error past it), and ``F_b`` the diagonal Fisher information of the model's output
distribution with respect to that tensor, as the layer reads it, summed over the elements whose
|x| falls in bin b. To second order the KL divergence from the fp32 output that a small
perturbation d of a tensor causes is d^T F d / 2: the cost is that KL with F's diagonal (the
perturbations of different elements taken as uncorrelated), so each tensor is judged by the loss
it causes at the logits, not by its local squared error. The diagonal is estimated without labels:
with p the softmax, F = J^T (diag(p) - p p^T) J, and for a Rademacher vector r the probe
u = sqrt(p) * r - p (r . sqrt(p)) has E[u u^T] = diag(p) - p p^T, so the squared gradient of
u . logits is an unbiased estimate of F's diagonal (``AUTO_FISHER_PROBES`` backward passes per
batch, seeded). Each tensor is judged alone, at the fp32 network's own values, so one forward
pass per batch serves all of them; a tensor read by several layers is weighted by each reader.

Why not the local squared error: on the demo model the layer-output MSE picked ``mse`` or a
percentile for every tensor (it prefers clipping the rare large values) and lost 2 dB of logit SNR
to plain min/max (docs/measurements.md); those clipped values are few but the network's output
depends on them, which only a criterion weighted by the output's sensitivity sees.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .estimators import QMAX, AbsHistogram, compute_amax

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
AUTO_EVAL_IMAGES = 64  # the first calibration images (in the sample's order) that weight the histograms (docs/measurements.md)
AUTO_FISHER_PROBES = 2  # Rademacher probes of the Fisher per batch (a backward pass each)
AUTO_SEED = 0
CRITERION = ("expected int8 quantization error of each tensor's values (rounding and clipping, from its histogram), "
             "weighted by the diagonal Fisher of the model's softmax w.r.t. that tensor (Rademacher probes): the "
             "second-order KL from fp32 the range causes")


def candidate_label(method: str, percentile: Optional[float]) -> str:
    return method if percentile is None else f"percentile {percentile:g}"


def candidate_ranges(h: AbsHistogram) -> Dict[str, float]:
    """label -> clipping value of every candidate estimator for one tensor's histogram."""
    return {candidate_label(m, p): compute_amax(h, m, p if p is not None else 99.99) for m, p in AUTO_CANDIDATES}


def _error_integral(x: np.ndarray, s: float) -> np.ndarray:
    """G(x) = the integral over [0, x] of (Q(t) - t)^2 dt, ``Q`` the symmetric int8 grid of step
    ``s`` clipped at 127 s (x >= 0): cell 0 ([0, s/2], rounds to 0) holds s^3/24, each further full
    cell s^3/12, the cell k that holds x the part from (k - 1/2) s; past 127.5 s the last cell's form
    (t - 127 s)^2 goes on, which is the clipping error."""
    k = np.minimum(np.floor(x / s + 0.5), QMAX)
    full = np.where(k >= 1, s ** 3 / 24.0 + (k - 1) * s ** 3 / 12.0, 0.0)
    part = np.where(k >= 1, ((x - k * s) ** 3 + (s / 2.0) ** 3) / 3.0, x ** 3 / 3.0)
    return full + part


def expected_errors(h: AbsHistogram, weights: np.ndarray, values: Sequence[float]) -> Tuple[np.ndarray, float]:
    """(cost of each clipping value, energy): the ``weights``-weighted (per |x| bin of ``h``) expected
    squared error of the plan's symmetric int8 quantization at each value of ``values``, the values
    spread uniformly within each bin; and the weighted energy, the same sum of x^2."""
    lo = np.arange(len(weights), dtype=np.float64) * h.width
    hi = lo + h.width
    used = weights > 0
    lo, hi, w = lo[used], hi[used], weights[used]
    energy = float(np.sum(w * (hi ** 3 - lo ** 3) / (3.0 * h.width)))
    costs = np.array([float(np.sum(w * (_error_integral(hi, a / QMAX) - _error_integral(lo, a / QMAX)) / h.width)) for a in values])
    return costs, energy


def fisher_histograms(model: nn.Module, histograms: Dict[str, AbsHistogram], names: Sequence[str], batches: Iterable[np.ndarray],
                      total_batches: Optional[int] = None, probes: Optional[int] = None) -> Dict[str, np.ndarray]:
    """name -> per-bin sum (on that tensor's histogram bins, by |x|) of the diagonal Fisher
    information of the model's output distribution with respect to that tensor as the layer reads
    it, estimated by ``probes`` seeded Rademacher probes per batch (module docstring; their mean,
    unbiased), binned by the value it weights. Each layer's input is taken through a view of its
    own, so a tensor read by several layers gets each reader's gradient, not their sum."""
    probes = AUTO_FISHER_PROBES if probes is None else probes
    modules = dict(model.named_modules())
    names = list(names)
    weighted = {n: np.zeros(len(histograms[n].counts), np.float64) for n in names}
    seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name):
        def hook(_module, args):
            x = args[0].view_as(args[0])
            x.retain_grad()
            seen[name].append(x)
            return (x,) + tuple(args[1:])
        return hook

    generator = torch.Generator().manual_seed(AUTO_SEED)
    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients w.r.t. the activations only
        p.requires_grad_(False)
    model.eval()
    try:
        for batch in tqdm(batches, total=total_batches, desc="judging ranges", unit="batch", leave=False):
            for v in seen.values():
                v.clear()
            with torch.enable_grad():  # one forward; a backward per probe
                image = torch.from_numpy(np.ascontiguousarray(batch)).requires_grad_(True)
                logits = model(image)
                root = torch.softmax(logits.detach().double(), 1).sqrt()
                squared: Dict[str, List[torch.Tensor]] = {n: [None] * len(seen[n]) for n in names}
                for probe_index in range(probes):
                    signs = torch.randint(0, 2, root.shape, generator=generator, dtype=torch.float64) * 2 - 1
                    probe = signs * root - root ** 2 * (signs * root).sum(1, keepdim=True)  # E[probe probe^T] = diag(p) - p p^T
                    logits.backward(probe.to(logits.dtype), retain_graph=probe_index + 1 < probes)
                    for n in names:
                        for i, x in enumerate(seen[n]):
                            if x.grad is None:
                                raise ValueError(f"auto calibration: no gradient reached {n}")
                            g2 = x.grad.detach().double() ** 2
                            squared[n][i] = g2 if squared[n][i] is None else squared[n][i] + g2
                            x.grad = None
            for n in names:  # the judging images are calibration images: |x| lies within the histogram
                bins = len(weighted[n])
                for x, g2 in zip(seen[n], squared[n]):
                    idx = histograms[n].bin_index(x)
                    weighted[n] += torch.bincount(idx, weights=g2.flatten(), minlength=bins).numpy() / probes
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
        for v in seen.values():
            v.clear()
    return weighted


def select_ranges(model: nn.Module, histograms: Dict[str, AbsHistogram], names: Iterable[str],
                  batches: Iterable[np.ndarray], total_batches: Optional[int] = None,
                  probes: Optional[int] = None) -> Tuple[Dict[str, float], Dict[str, Dict]]:
    """``choose_ranges`` with the Fisher weights measured on ``batches`` (``fisher_histograms``)."""
    names = list(names)
    return choose_ranges(histograms, fisher_histograms(model, histograms, names, batches, total_batches, probes), names)


def choose_ranges(histograms: Dict[str, AbsHistogram], weighted: Dict[str, np.ndarray],
                  names: Iterable[str]) -> Tuple[Dict[str, float], Dict[str, Dict]]:
    """For each tensor of ``names``, the candidate range with the smallest Fisher-weighted expected
    quantization error (``weighted``: its Fisher weights per histogram bin). Returns (name -> amax,
    name -> choice), a choice being ``{"estimator", "snr_db", "margin_db", "candidates": {label:
    (amax, snr_db)}}``: the winner's Fisher-weighted SNR and its lead over the best other candidate
    value (dB)."""
    names = list(names)
    amax: Dict[str, float] = {}
    choices: Dict[str, Dict] = {}
    for n in names:
        values: List[float] = []
        groups: List[List[str]] = []
        for label, a in candidate_ranges(histograms[n]).items():  # candidates that propose the same value are judged once
            if a in values:
                groups[values.index(a)].append(label)
            else:
                values.append(a)
                groups.append([label])
        costs, energy = expected_errors(histograms[n], weighted[n], values)
        if energy == 0.0:
            raise ValueError(f"auto calibration: {n} saw no input (or no gradient) on the evaluation images")
        snrs = [snr_db(c, energy) for c in costs]
        best = int(np.argmin(costs))  # argmin keeps the first of equals: AUTO_CANDIDATES' order
        others = [s for i, s in enumerate(snrs) if i != best]
        amax[n] = float(values[best])
        choices[n] = {
            "estimator": groups[best][0],
            "snr_db": snrs[best],
            "margin_db": (snrs[best] - max(others)) if others else 0.0,
            "candidates": {label: (float(values[i]), snrs[i]) for i, group in enumerate(groups) for label in group},
        }
    return amax, choices


def snr_db(error: float, energy: float) -> float:
    if error <= 0:
        return math.inf
    return 10.0 * math.log10(max(energy, 1e-300) / error)


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
