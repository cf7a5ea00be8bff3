"""Activation range estimators over streamed |x| histograms: min/max, percentile, entropy, MSE.

All four read the same statistics, so one pass over the calibration images serves every method and a
saved statistics file can be re-planned with another method without running images again.

The histogram covers [0, range) in equal bins; when a batch exceeds the range, bins of the same width
are appended (and pairs merged once there are too many), as TensorRT's and pytorch-quantization's
histogram calibrators do. Updates are in the order the batches come, so the same images in the same
batches give bit-identical statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

NUM_BINS = 2048
MAX_BINS = 8192
QMAX = 127  # symmetric int8: scale = amax / 127


@dataclass
class AbsHistogram:
    counts: Optional[np.ndarray] = None  # float64 counts of |x|
    width: float = 0.0  # bin width
    amax: float = 0.0  # exact running max of |x|

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        batch_max = float(a.max()) if a.numel() else 0.0
        self.amax = max(self.amax, batch_max)
        if self.counts is None:
            self.width = (batch_max if batch_max > 0 else 1e-8) / NUM_BINS
            self.counts = np.zeros(NUM_BINS, np.float64)
        needed = max(1, math.ceil(batch_max / self.width)) if batch_max > 0 else 1
        if needed > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(needed - len(self.counts))])
        while len(self.counts) > MAX_BINS:  # keep memory bounded: merge pairs, double the width
            c = self.counts
            if len(c) % 2:
                c = np.concatenate([c, [0.0]])
            self.counts = c.reshape(-1, 2).sum(1)
            self.width *= 2
        n = len(self.counts)
        hist = torch.histc(a, bins=n, min=0.0, max=n * self.width).double().numpy()
        self.counts += hist

    def bin_index(self, x: torch.Tensor) -> torch.Tensor:
        """The bin of each |x| (flattened), as ``update`` counts it; values past the last bin's edge
        (rounding) in the last bin."""
        return torch.clamp((x.detach().abs() / self.width).long(), 0, len(self.counts) - 1).flatten()

    @property
    def edges(self) -> np.ndarray:
        return np.arange(len(self.counts) + 1) * self.width


def amax_minmax(h: AbsHistogram) -> float:
    return float(h.amax)


def amax_percentile(h: AbsHistogram, percentile: float) -> float:
    """Smallest bin edge below which ``percentile`` % of |x| falls."""
    cdf = np.cumsum(h.counts) / max(h.counts.sum(), 1.0)
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return float(min((i + 1) * h.width, h.amax))


def amax_entropy(h: AbsHistogram, num_quant_bins: int = 128, max_candidates: int = 512) -> float:
    """TensorRT's KL-divergence threshold search (IInt8EntropyCalibrator2's method): for each
    candidate threshold i, compare the clipped distribution P (outliers folded into the last bin)
    with its 128-level quantisation Q expanded back; keep the i with the smallest KL(P||Q).

    The first bin's count is replaced by the second's, as NVIDIA's pytorch-quantization does: after a
    ReLU (the dagger stems) half or more of |x| is exactly 0, a spike that otherwise dominates the
    divergence and drives the threshold down to a fraction of the range (measured: amax 0.17 of
    1.3 on the last stem conv of a random-weight dagger model, logit cosine 0.91 instead of 0.9999).
    Exact zeros are represented exactly at any scale, so they carry no information about the clip."""
    counts = h.counts.copy()
    n = len(counts)
    if n > 1:
        counts[0] = counts[1]
    if n <= num_quant_bins or counts.sum() == 0:
        return amax_minmax(h)
    start = num_quant_bins
    stride = max(1, (n - start) // max_candidates)
    best_i, best_kl = n, math.inf
    for i in range(start, n + 1, stride):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        nonzero = counts[:i] != 0
        # merge the i bins into num_quant_bins levels, then spread each level over its non-zero
        # bins (i >= num_quant_bins, so every level spans at least one bin)
        bounds = np.linspace(0, i, num_quant_bins + 1).astype(np.int64)
        level_sum = np.add.reduceat(counts[:i], bounds[:-1])
        level_nonzero = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
        per_bin = np.where(level_nonzero > 0, level_sum / np.maximum(level_nonzero, 1), 0.0)
        q = np.repeat(per_bin, np.diff(bounds)) * nonzero
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        pn, qn = p / ps, q / qs
        mask = pn > 0
        with np.errstate(divide="ignore"):
            kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.where(qn[mask] > 0, qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(min(best_i * h.width, h.amax))


def amax_mse(h: AbsHistogram, max_candidates: int = 512) -> float:
    """Clipping value that minimises the expected squared error of symmetric int8 quantisation of
    the histogram (bin centres stand in for their values)."""
    counts = h.counts
    n = len(counts)
    if counts.sum() == 0:
        return amax_minmax(h)
    centers = (np.arange(n) + 0.5) * h.width
    nz = counts > 0
    centers, weights = centers[nz], counts[nz]
    first = max(1, n // 20)
    candidates = np.unique(np.linspace(first, n, min(max_candidates, n - first + 1)).astype(np.int64)) * h.width
    best_c, best_err = h.amax, math.inf
    for c in candidates:
        s = c / QMAX
        q = np.clip(np.round(centers / s), -QMAX, QMAX) * s
        err = float(np.sum(weights * (centers - q) ** 2))
        if err < best_err:
            best_err, best_c = err, c
    return float(min(best_c, h.amax))


def compute_amax(h: AbsHistogram, method: str, percentile: float = 99.99) -> float:
    if method == "minmax":
        amax = amax_minmax(h)
    elif method == "percentile":
        amax = amax_percentile(h, percentile)
    elif method == "entropy":
        amax = amax_entropy(h)
    elif method == "mse":
        amax = amax_mse(h)
    else:
        raise ValueError(f"unknown calibration method {method!r}")
    # TensorRT wants strictly positive finite scales; an all-zero input still gets a tiny range.
    return amax if math.isfinite(amax) and amax > 0 else 1e-8
