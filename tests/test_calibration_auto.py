"""``--calib-method auto`` (issue 28 item 2): each int8 tensor takes the candidate range whose
quantized layer output costs the least Fisher-weighted error (the second-order KL from fp32 at the
logits), judged here against the plan's own Q/DQ layer (``calibration.qdq.QDQLinear``) and the exact
Fisher of a softmax, recorded per tensor in the plan, shown by the debugger."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from crossvit_edge.calibration.auto import AUTO_CANDIDATES, candidate_label, candidate_ranges, select_ranges
from crossvit_edge.calibration.estimators import AbsHistogram
from crossvit_edge.calibration.qdq import QDQLinear

from .conftest import MICRO_CLI


class _OneLinear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.fc(torch.as_tensor(x).reshape(-1, self.fc.in_features))


def _inputs(seed=0, n=4096, features=16):
    """Gaussian activations with rare large outliers, all in channel 0 (as LayerNorm outputs put them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    rows = torch.randperm(n, generator=g)[:8]
    x[rows, 0] = 40.0 * torch.sign(torch.randn(8, generator=g))
    return x


def _judge(weight):
    x = _inputs()
    model = _OneLinear(weight).eval()
    h = AbsHistogram()
    for chunk in x.split(512):
        h.update(chunk)
    amax, choices = select_ranges(model, {"fc": h}, ["fc"], [c.numpy() for c in x.split(512)])
    # the reference: the plan's own Q/DQ layer at each candidate value against the fp32 layer, each
    # logit's error weighted by the exact Fisher diagonal of a softmax at the logits, p (1 - p)
    # (auto estimates it from labels drawn from the model's softmax)
    with torch.no_grad():
        ref = model.fc(x)
        p = torch.softmax(ref.double(), 1)
        fisher = p * (1 - p)
        errors = {label: float((fisher * (QDQLinear(model.fc, a)(x) - ref).double() ** 2).sum())
                  for label, a in candidate_ranges(h).items()}
        energy = float((fisher * (ref - model.fc.bias).double() ** 2).sum())
    return amax["fc"], choices["fc"], errors, energy


@pytest.mark.parametrize("outlier_weight,expect_clip", [(0.0, True), (3.0, False)])
def test_the_winner_is_the_candidate_the_quantized_layer_errs_least_with(outlier_weight, expect_clip):
    """The same inputs, two weights: where no weight reads the outlier channel, clipping it is free
    and a tight range wins; where the outlier channel's weight is large, the full range wins. An
    input-only criterion picks the same range for both."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=g) * 0.3
    w[:, 0] = outlier_weight
    amax, choice, errors, energy = _judge(w)
    best = min(errors, key=errors.get)
    # the sampled Fisher (4096 images, 2 draws each) ranks as the exact one: the winner costs at
    # most 2% more than the exact best
    assert errors[choice["estimator"]] <= errors[best] * 1.02, (choice["estimator"], best, errors)
    assert amax == pytest.approx(choice["candidates"][choice["estimator"]][0])
    # the recorded SNR is the Q/DQ layer's own, Fisher-weighted (bias excluded: it cancels); the sampled
    # Fisher puts it within 1.5 dB of the exact one (measured 0.82 dB apart in the minmax case)
    assert choice["snr_db"] == pytest.approx(10 * math.log10(energy / errors[choice["estimator"]]), abs=1.5)
    assert set(choice["candidates"]) == {candidate_label(m, p) for m, p in AUTO_CANDIDATES}
    if expect_clip:
        assert amax < 10.0 and choice["estimator"] != "minmax"
    else:
        assert amax == pytest.approx(40.0, rel=1e-6) and choice["estimator"] == "minmax"
    others = [s for label, (_, s) in choice["candidates"].items() if choice["candidates"][label][0] != amax]
    assert choice["margin_db"] == pytest.approx(choice["snr_db"] - max(others))


# --------------------------------------------------------------------------------------------------
# Through the pipeline: the micro model to ONNX


def test_auto_plan_records_each_tensors_estimator_and_the_bundle_matches_fp32(tmp_path, micro_checkpoint, digits_dir):
    from crossvit_edge.calibration.plan import IMAGE_BOUNDS, QuantPlan
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.layerwise import estimator_of
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    out = tmp_path / "bundle"
    spec = BuildSpec(target="onnx", output=out, precision="int8", checkpoint=str(micro_checkpoint), batch_size=1,
                     calibration=CalibrationSettings(data=digits_dir / "train", samples=16, method="auto"),
                     eval_data=digits_dir / "val", eval_samples=8, overwrite=True)
    convert(spec)
    manifest = json.loads((out / "manifest.json").read_text())
    plan_dict = manifest["quantization_plan"]
    record = plan_dict["calibration"]
    assert record["method"] == "auto" and record["auto"]["evaluation_images"] == 16
    judged = [l for l in plan_dict["layers"] if l["precision"] == "int8" and "input_range" not in l]
    fixed = [l for l in plan_dict["layers"] if l.get("input_range") == IMAGE_BOUNDS]
    assert len(judged) > 5 and len(fixed) == 2
    assert sum(record["auto"]["wins"].values()) == len(judged)
    labels = {candidate_label(m, p) for m, p in AUTO_CANDIDATES}
    for l in judged:
        assert l["estimator"] in labels and l["estimator_snr_db"] > 10 and l["estimator_margin_db"] >= 0, l
    for l in fixed:
        assert "estimator" not in l  # never calibrated
    plan = QuantPlan.from_dict(plan_dict)
    assert [estimator_of(l) for l in plan.layers] == [l.get("estimator") for l in plan_dict["layers"]]
    # the plan's ranges are the winners' candidate values: each is one of the estimators' proposals
    from crossvit_edge.calibration.collect import CalibrationStatistics

    stats = CalibrationStatistics.load(out / "calibration_stats.npz")
    for l in judged:
        assert l["input_amax"] == pytest.approx(candidate_ranges(stats.layers[l["name"]])[l["estimator"]], rel=1e-12)
    # the bundle's int8 artifact against the fp32 model on held-out images
    from crossvit_edge.data import open_image_set
    from crossvit_edge.runtime import load

    ckpt = load_checkpoint(str(micro_checkpoint))
    images = open_image_set(digits_dir / "val").sample(8, seed=0)
    from crossvit_edge.preprocess import Preprocessing

    pre = Preprocessing(input_size=ckpt.model.config.img_size, crop_pct=ckpt.model.config.crop_pct)
    x = np.concatenate(list(images.batches(pre, 8)))
    with torch.no_grad():
        ref = ckpt.model(torch.from_numpy(x)).numpy()
    with load(out) as model:
        got = np.concatenate([model.logits(x[i:i + 1]) for i in range(len(x))])
    cos = np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99, cos


def test_auto_without_images_is_one_line(tmp_path, micro_checkpoint, digits_dir):
    """--calib-method auto judges ranges on images: with --calib-stats alone it is refused."""
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    first = tmp_path / "first"
    convert(BuildSpec(target="onnx", output=first, precision="int8", checkpoint=str(micro_checkpoint), batch_size=1,
                      calibration=CalibrationSettings(data=digits_dir / "train", samples=8), overwrite=True))
    r = subprocess.run([sys.executable, str(MICRO_CLI), "crossvit_edge.convert", "--target", "onnx", "--precision", "int8",
                        "--checkpoint", str(micro_checkpoint), "--calib-stats", str(first / "calibration_stats.npz"),
                        "--calib-method", "auto", "--output", str(tmp_path / "second")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--calib-method auto needs --calib-data" in lines[0], r.stderr
    assert not (tmp_path / "second").exists()
