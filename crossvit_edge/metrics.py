"""Accuracy and latency metrics of an artifact against its fp32 reference (numpy only)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

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
    in nats, the logit SNR in dB (``logit_snr_db``) and the largest absolute logit difference. KL and
    SNR are continuous: they resolve a change that a few hundred images' top-1 agreement (one image
    = 0.28 points at 360) cannot."""
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
        "snr_db": logit_snr_db(logits, reference),
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


SNR_CAP_DB = 200.0  # identical logits (no error at all) are reported at this SNR


def logit_snr_db(logits: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(sum reference^2 / sum (logits - reference)^2) over every logit of every image, in
    dB; identical logits give SNR_CAP_DB."""
    r = np.asarray(reference, np.float64)
    noise = float(np.sum((np.asarray(logits, np.float64) - r) ** 2))
    signal = float(np.sum(r * r))
    if noise == 0.0:
        return SNR_CAP_DB
    if signal == 0.0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * np.log10(signal / noise)))


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


# INT8 against FP16 on the same device (docs/measurements.md, "Does INT8 pay?"). INT8 pays when its
# p50 latency is at most INT8_PAYS_RATIO of FP16's: a gain under 10% is within what a Jetson's
# clocks and a loaded host move between runs, and not worth INT8's calibration and accuracy risk.
# INT8 is disqualified when its top-1 agreement with fp32 is more than INT8_MAX_AGREEMENT_LOSS
# (fraction, 0.01 = 1 point) below FP16's on the same images, however fast it is.
INT8_PAYS_RATIO = 0.90
INT8_MAX_AGREEMENT_LOSS = 0.01


def latency_ratio(int8_latency: Optional[Dict[str, Any]], fp16_latency: Optional[Dict[str, Any]]) -> Optional[float]:
    """INT8 p50 / FP16 p50 (same batch size expected), None when either is missing or zero."""
    a = (int8_latency or {}).get("p50_ms")
    b = (fp16_latency or {}).get("p50_ms")
    if a is None or not b:
        return None
    return float(a) / float(b)


def int8_verdict(int8_latency, fp16_latency, int8_agreement: Optional[float], fp16_agreement: Optional[float]) -> Dict[str, Any]:
    """Whether INT8 pays against FP16 on the device both ran on: the p50 ratio, the agreement gap
    (top-1 agreement with fp32, FP16's minus INT8's), and a one-line verdict. One function for
    every target (TensorRT engines, ExecuTorch programs)."""
    ratio = latency_ratio(int8_latency, fp16_latency)
    loss = None if int8_agreement is None or fp16_agreement is None else float(fp16_agreement) - float(int8_agreement)
    if ratio is None:
        return {"ratio": None, "agreement_loss": loss, "pays": None, "verdict": "no verdict: latency of both is needed"}
    if loss is not None and loss > INT8_MAX_AGREEMENT_LOSS:
        pays, text = False, (f"INT8 does not pay here: {ratio:.2f}x FP16 but top-1 agreement {100 * loss:.1f} points below FP16's, ship FP16")
    elif ratio <= INT8_PAYS_RATIO:
        pays, text = True, f"INT8 pays here: {ratio:.2f}x FP16"
    else:
        pays, text = False, f"INT8 does not pay here: {ratio:.2f}x FP16, ship FP16"
    return {"ratio": ratio, "agreement_loss": loss, "pays": pays, "verdict": text}
