"""The shipped demo model: what the README promises about it."""
from __future__ import annotations

import json

import numpy as np

from crossvit_edge.checkpoint import load_checkpoint
from crossvit_edge.data import open_image_set
from crossvit_edge.demo import evaluate_checkpoint
from crossvit_edge.pipeline import reference_logits
from crossvit_edge.spec import BuildSpec, CalibrationSettings


def test_demo_checkpoint_reaches_90_percent_on_val_pngs(demo_checkpoint, digits_dir):
    """Evaluated from the PNG files through the project's own preprocessing."""
    top1 = evaluate_checkpoint(str(demo_checkpoint), digits_dir / "val")
    assert top1 >= 0.90
    ckpt = load_checkpoint(demo_checkpoint)
    assert ckpt.name == "crossvit_tiny_240" and ckpt.num_classes == 10
    assert ckpt.labels == [str(i) for i in range(10)]
    # the recorded number is the measured one
    assert abs(float(ckpt.metadata["val_top1"]) - top1) < 1e-4
    assert demo_checkpoint.stat().st_size < 20e6
    assert json.loads(demo_checkpoint.with_suffix(".json").read_text())["shipped_val_top1"] == top1


# --------------------------------------------------------------------------------------------------
# int8 on the trained model (random weights give logit margins too small to judge top-1 by)


def test_demo_model_int8_plan_accuracy(demo_checkpoint, digits_dir):
    """The calibrated int8 plan on the trained demo model, 64 calibration images, a class-balanced
    third of the val split: the Q/DQ model every target is built from (the pipeline's own load and
    calibrate stages) within one image of fp32. That ONNX Runtime, ExecuTorch and Core ML execute a
    plan faithfully is tested per target on the micro model; the targets' own top-1 on the full split
    is in the slow tests and ``make demo``."""
    from crossvit_edge.pipeline import stage_calibrate, stage_load

    spec = BuildSpec(target="onnx", output=digits_dir / "unused", precision="int8", checkpoint=str(demo_checkpoint),
                     calibration=CalibrationSettings(data=digits_dir / "train", samples=64))  # the default method
    ctx = stage_load(spec)
    stage_calibrate(ctx)
    assert ctx.plan.to_dict()["summary"]["int8_layers"] > 50
    s = open_image_set(digits_dir / "val").sample(120, seed=0)
    x, y = s.load(ctx.preprocessing).astype(np.float32), np.asarray(s.labels)
    fp32 = reference_logits(ctx.fp32_model, x)
    int8 = reference_logits(ctx.model_for_export(), x)
    top1 = lambda l: float((l.argmax(1) == y).mean())  # noqa: E731
    agree = float((int8.argmax(1) == fp32.argmax(1)).mean())
    assert top1(fp32) - top1(int8) <= 1 / 120 + 1e-9 and agree >= 1 - 1 / 120 - 1e-9, (top1(fp32), top1(int8), agree)
    assert not np.allclose(int8, fp32, atol=1e-4)  # it is really quantized


def test_demo_measures_every_image_outside_the_calibration_sample(digits_dir, tmp_path):
    """The demo's measurement folder: the val split plus the train images the 256-image
    calibration sample does not hold, each once, none of the sample."""
    from crossvit_edge.data import open_image_set
    from crossvit_edge.demo import write_heldout_imagefolder
    from crossvit_edge.spec import CalibrationSettings

    settings = CalibrationSettings(data=digits_dir / "train", samples=256)
    train, val = open_image_set(digits_dir / "train"), open_image_set(digits_dir / "val")
    sample = train.sample(settings.samples, seed=settings.seed)
    out = write_heldout_imagefolder(digits_dir / "train", digits_dir / "val", sample.paths, tmp_path / "heldout")
    heldout = open_image_set(out)
    names = {p.name for p in heldout.paths}
    assert len(heldout) == len(names) == len(train) + len(val) - 256 == 1797 - 256
    assert not names & {p.name for p in sample.paths} and {p.name for p in val.paths} <= names
    assert heldout.classes == train.classes
    # labels follow the class folders
    assert all(heldout.classes[y] == p.parent.name for p, y in zip(heldout.paths, heldout.labels))
    write_heldout_imagefolder(digits_dir / "train", digits_dir / "val", sample.paths, out)  # rebuilt in place
    assert len(open_image_set(out)) == 1797 - 256
