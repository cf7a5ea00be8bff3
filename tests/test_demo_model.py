"""The shipped demo model: what the README promises about it."""
from __future__ import annotations

import json

from crossvit_edge.checkpoint import load_checkpoint
from crossvit_edge.demo import evaluate_checkpoint


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
