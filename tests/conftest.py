"""Shared fixtures: small real models, real images (scikit-learn digits as PNG files)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The demo data (train/ and val/ ImageFolders of digits PNGs)."""
    from crossvit_edge.data import write_digits_imagefolder

    root = tmp_path_factory.mktemp("digits")
    write_digits_imagefolder(root)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight crossvit_tiny_240 with 10 classes, saved as safetensors."""
    from crossvit_edge.checkpoint import save_checkpoint
    from crossvit_edge.crossvit import create_model

    torch.manual_seed(0)
    model = create_model("crossvit_tiny_240", num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model.state_dict(), path, {"model": "crossvit_tiny_240"})
    return path


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    from crossvit_edge.spec import DEMO_CHECKPOINT

    if not DEMO_CHECKPOINT.exists():
        pytest.skip("the demo checkpoint has not been trained yet (scripts/train_demo.py)")
    return DEMO_CHECKPOINT


def run_cli(module: str, *args: str, cwd=None):
    """Run ``python -m module args`` and return the CompletedProcess (text)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO)


MICRO_MODEL = "crossvit_micro_test_240"


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    """crossvit_tiny_240's layer shapes in one multi-scale block with one ViT block per branch:
    every module kind a converter meets (both patch embeddings, the resize, attention, MLP, the
    cross-attention fusion, projections, heads) at a fraction of ExecuTorch's export time, which
    grows with graph size. The config is registered in the model table for this test session only
    (in-process: CLI subprocesses do not see it); random weights, 10 classes."""
    from dataclasses import replace

    from crossvit_edge.checkpoint import save_checkpoint
    from crossvit_edge.crossvit import CROSSVIT_CONFIGS, CrossViT

    config = replace(CROSSVIT_CONFIGS["crossvit_tiny_240"], name=MICRO_MODEL, depth=(1, 1), num_multiscale_blocks=1, num_classes=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CROSSVIT_CONFIGS, MICRO_MODEL, config)
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("micro") / "micro.safetensors"
        save_checkpoint(CrossViT(config).state_dict(), path, {"model": MICRO_MODEL})
        yield path
