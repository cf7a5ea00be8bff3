"""The post-conversion check's verdict: precision-dependent thresholds, the warning on stderr, in
the manifest and in the CLI's summary, and ``--fail-on-check`` making it fatal (exit 3, bundle kept)."""
from __future__ import annotations

import json
import math

import pytest

from crossvit_edge.pipeline import CHECK_THRESHOLDS, judge_check

from .conftest import run_cli


def test_thresholds_depend_on_the_precision():
    check = {"top1_agreement": 0.97, "cosine": 0.995, "images": 32, "images_source": "eval images"}
    assert judge_check(check, "int8")["passed"] is True
    assert judge_check(check, "int8-weights")["passed"] is True
    fp16 = judge_check(check, "fp16")
    assert fp16["passed"] is False and fp16["thresholds"] == {"top1_agreement": 0.98, "cosine": 0.999}
    (warning,) = fp16["warnings"]
    assert "top1_agreement 0.9700 < 0.98" in warning and "cosine 0.9950 < 0.999" in warning and "fp32_ops" in warning
    assert judge_check(check, "fp32")["passed"] is False
    assert all(CHECK_THRESHOLDS["fp32"][k] >= CHECK_THRESHOLDS["fp16"][k] >= CHECK_THRESHOLDS["int8"][k] for k in ("top1_agreement", "cosine"))


def test_top1_drop_is_judged_with_labels_and_max_drop_is_the_budget():
    check = {"top1_agreement": 0.99, "cosine": 0.999, "top1_drop": 0.02}
    assert judge_check(check, "int8")["passed"] is True  # 2 points <= 3
    tight = judge_check(check, "int8", max_drop=1.0)
    assert tight["passed"] is False and tight["thresholds"]["top1_drop_points"] == 1.0
    assert "top-1 drop 2.00 points > 1" in tight["warnings"][0] and "--max-drop" in tight["warnings"][0]
    assert tight["failures"] == ["top-1 drop 2.00 points > 1"] and judge_check(check, "int8")["failures"] == []
    assert "top1_drop_points" not in judge_check({"top1_agreement": 1.0, "cosine": 1.0}, "int8")["thresholds"]


def test_nan_fails():
    assert judge_check({"top1_agreement": 1.0, "cosine": math.nan}, "fp32")["passed"] is False


@pytest.fixture(scope="module")
def clipped_int8(tmp_path_factory, micro_checkpoint, digits_dir):
    """An ONNX int8 conversion calibrated to clip almost everything (each layer's input range set
    to the 1st percentile of |x|): a real, badly quantized artifact."""

    def build(*flags):
        out = tmp_path_factory.mktemp("check") / "bundle"
        r = run_cli("crossvit_edge.convert", "--target", "onnx", "--precision", "int8", "--checkpoint", micro_checkpoint,
                    "--calib-data", digits_dir / "train", "--calib-samples", "8", "--calib-method", "percentile",
                    "--calib-percentile", "1", "--eval-data", digits_dir / "val", "--eval-samples", "8",
                    "--output", out, *flags, micro=True)
        return r, out

    return build


def test_failed_check_warns_and_is_recorded(clipped_int8):
    r, out = clipped_int8()
    assert r.returncode == 0, r.stderr
    assert "WARNING: post-conversion check FAILED for int8" in r.stderr and "--calib-method" in r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["check"] == "FAILED" and summary["cosine"] < CHECK_THRESHOLDS["int8"]["cosine"]
    check = json.loads((out / "manifest.json").read_text())["accuracy_check"]
    assert check["passed"] is False and check["warnings"] and check["thresholds"]["cosine"] == 0.98
    # the continuous measures are recorded too: a clipped int8 build is far below a healthy one's ~30-40 dB
    assert check["snr_db"] < 20 and check["kl"] > 0 and summary["snr_db"] == check["snr_db"]
    assert json.loads((out / "accuracy_check.json").read_text())["passed"] is False


def test_fail_on_check_exits_3_and_keeps_the_bundle(clipped_int8):
    r, out = clipped_int8("--fail-on-check")
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("crossvit_edge.convert: error: the post-conversion check failed")
    assert json.loads((out / "manifest.json").read_text())["accuracy_check"]["passed"] is False
