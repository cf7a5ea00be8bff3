"""Accuracy and latency metrics of an artifact against its fp32 reference (numpy only)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def compare_logits(logits: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Accuracy of ``logits`` (and of the reference, when labels are known) and how closely they
    agree: top-1 agreement, mean cosine similarity, mean KL(reference || artifact) of the softmaxes
    in nats, and the largest absolute logit difference."""
    logits = np.asarray(logits, np.float64)
    reference = np.asarray(reference, np.float64)
    if logits.shape != reference.shape:
        raise ValueError(f"logit shapes differ: {logits.shape} vs {reference.shape}")
    p, q = softmax(reference), softmax(logits)
    eps = 1e-12
    kl = float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))
    num = np.sum(logits * reference, axis=1)
    den = np.linalg.norm(logits, axis=1) * np.linalg.norm(reference, axis=1) + eps
    out = {
        "images": int(len(logits)),
        "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "cosine": float(np.mean(num / den)),
        "kl": kl,
        "max_abs_diff": float(np.max(np.abs(logits - reference))) if len(logits) else 0.0,
    }
    if labels is not None:
        labels = np.asarray(labels)
        out.update(
            top1=topk_accuracy(logits, labels, 1),
            top5=topk_accuracy(logits, labels, 5),
            reference_top1=topk_accuracy(reference, labels, 1),
            reference_top5=topk_accuracy(reference, labels, 5),
        )
        out["top1_drop"] = out["reference_top1"] - out["top1"]
    return out


def latency_summary(seconds: Sequence[float], batch_size: int) -> Dict[str, float]:
    """p50/p90/p99 and mean in milliseconds per batch; throughput in images per second."""
    t = np.asarray(seconds, np.float64) * 1e3
    return {
        "runs": int(len(t)),
        "batch_size": int(batch_size),
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "throughput_ips": float(batch_size * 1e3 / np.median(t)),
    }
