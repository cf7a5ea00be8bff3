"""Accuracy-driven mixed precision: measure each int8 layer's cost alone, then return the most
sensitive layers to float, most sensitive first, until the accuracy drop is within the budget.

Everything runs in PyTorch on the Q/DQ model of ``crossvit_edge.calibration.qdq``, which computes what ONNX
Runtime computes for the exported Q/DQ graph, so the plan it returns holds for every target.
The score is top-1 against labels when the held-out images are labelled, top-1 agreement with fp32
otherwise; a layer's sensitivity is the KL divergence from fp32 when only that layer is int8 (finer
than top-1 on a few hundred images).

With the plan's int8 attention option, each attention module's two matmuls are one more candidate
(a "layer" of kind ``attention``): probed alone like a layer, returned to float as a pair.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from crossvit_edge.metrics import softmax

from .plan import QuantPlan
from .qdq import apply_qdq

log = logging.getLogger(__name__)


@torch.no_grad()
def _logits(model, images: np.ndarray, batch: int = 32) -> np.ndarray:
    out = [model(torch.from_numpy(images[s : s + batch])).float().numpy() for s in range(0, len(images), batch)]
    return np.concatenate(out)


def _score(logits: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray]) -> float:
    target = labels if labels is not None else reference.argmax(1)
    return float((logits.argmax(1) == target).mean())


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    p, q = softmax(reference), softmax(logits)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def mixed_precision(
    model: torch.nn.Module,
    plan: QuantPlan,
    images: np.ndarray,
    labels: Optional[np.ndarray],
    max_drop: float,
    sensitivity_images: int = 64,
) -> QuantPlan:
    """``plan`` with the fewest most-sensitive layers returned to float so that the score drop
    (in points, 0-100) is at most ``max_drop``; the plan's ``mixed_precision`` entry records the
    measurements."""
    metric = "top1" if labels is not None else "top1_agreement"
    reference = _logits(model, images)
    base_score = _score(reference, reference, labels)
    full_score = _score(_logits(apply_qdq(model, plan), images), reference, labels)
    record: Dict = {
        "metric": metric,
        "images": int(len(images)),
        "max_drop_points": max_drop,
        "fp32_score": base_score,
        "all_int8_score": full_score,
    }
    drop = 100.0 * (base_score - full_score)
    if drop <= max_drop:
        record.update(returned_to_float=[], final_score=full_score, final_drop_points=drop)
        log.info("mixed precision: all-int8 drop %.2f points is within %.2f; nothing returned to float", drop, max_drop)
        return _with_record(plan, record, {})

    subset = images[:sensitivity_images]
    ref_subset = reference[: len(subset)]
    layers = [l.name for l in plan.int8_layers()]
    attention = plan.attention_modules()
    sensitivities: Dict[str, float] = {}
    for unit in tqdm(layers + attention, desc="layer sensitivity", unit="layer", leave=False):
        # only this unit int8: every other layer and every other attention module in float
        single = plan.with_float([n for n in layers if n != unit], "sensitivity probe")
        single = single.with_float_attention([m for m in attention if m != unit])
        sensitivities[unit] = _kl(ref_subset, _logits(apply_qdq(model, single), subset))
    ranked = sorted(sensitivities, key=lambda n: -sensitivities[n])

    returned: List[Dict] = []
    current = plan
    score = full_score
    for name in ranked:
        if name in attention:
            current = current.with_float_attention([name])
        else:
            current = current.with_float([name], "returned to float by --max-drop (sensitive)")
        new_score = _score(_logits(apply_qdq(model, current), images), reference, labels)
        returned.append({"layer": name, "kind": "attention" if name in attention else current.get(name).kind,
                         "sensitivity_kl": sensitivities[name], "score_after": new_score, "gain_points": 100.0 * (new_score - score)})
        score = new_score
        if 100.0 * (base_score - score) <= max_drop:
            break
    record.update(
        sensitivity_images=int(len(subset)),
        returned_to_float=returned,
        final_score=score,
        final_drop_points=100.0 * (base_score - score),
    )
    if 100.0 * (base_score - score) > max_drop:
        log.warning("mixed precision: even with every layer in float the drop is %.2f points", 100.0 * (base_score - score))
    return _with_record(current, record, sensitivities)


def _with_record(plan: QuantPlan, record: Dict, sensitivities: Dict[str, float]) -> QuantPlan:
    for layer in plan.layers:
        if layer.name in sensitivities:
            layer.sensitivity = sensitivities[layer.name]
    plan.mixed_precision = record
    return plan
