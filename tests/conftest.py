"""Shared fixtures: small real models, real images (scikit-learn digits as PNG files)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# at most 2 threads each, and no more threads than cores across pytest-xdist's workers
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

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


MICRO_MODEL = "crossvit_micro_test_240"
MICRO_CLI = Path(__file__).with_name("micro_cli.py")


def micro_config():
    """crossvit_tiny_240's layer shapes in one multi-scale block with one ViT block per branch:
    every module kind a converter meets (both patch embeddings, the resize, attention, MLP, the
    cross-attention fusion, projections, heads) at a fraction of the export, lowering, conversion
    and calibration time, which all grow with graph size. Tests only: not a CrossViT variant."""
    from dataclasses import replace

    from crossvit_edge.crossvit import CROSSVIT_CONFIGS

    return replace(CROSSVIT_CONFIGS["crossvit_tiny_240"], name=MICRO_MODEL, depth=(1, 1), num_multiscale_blocks=1, num_classes=10)


MICRO_DAGGER_MODEL = "crossvit_micro_dagger_test_240"
MICRO_DAGGER_408_MODEL = "crossvit_micro_dagger_test_408"


def micro_configs():
    """Every micro test config by name: the micro model, and the same shapes with the dagger
    (three-conv) stems at 240 and at 408 input (branch 1 resized 408 -> 384, crop_pct 1.0), for the
    variant paths the plain micro model does not take. Tests only."""
    from dataclasses import replace

    from crossvit_edge.crossvit import CROSSVIT_CONFIGS

    micro = micro_config()
    dagger_408 = CROSSVIT_CONFIGS["crossvit_15_dagger_408"]
    return {
        MICRO_MODEL: micro,
        MICRO_DAGGER_MODEL: replace(micro, name=MICRO_DAGGER_MODEL, dagger=True),
        MICRO_DAGGER_408_MODEL: replace(
            micro, name=MICRO_DAGGER_408_MODEL, dagger=True, img_size=dagger_408.img_size,
            scaled_size=dagger_408.scaled_size, crop_pct=dagger_408.crop_pct,
        ),
    }


def run_cli(module: str, *args: str, cwd=None, micro=False):
    """Run ``python -m module args`` and return the CompletedProcess (text). ``micro``: the same
    module run as ``__main__`` by tests/micro_cli.py, which first adds the micro config to the
    model table (a subprocess does not see the test session's table)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(MICRO_CLI), module] if micro else [sys.executable, "-m", module]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO)


@pytest.fixture(scope="module")
def micro_model_registered():
    """The micro config in the model table (in-process) while the requesting test module runs; gone
    again afterwards, so tests of the table itself see only the real variants."""
    from crossvit_edge.crossvit import CROSSVIT_CONFIGS

    with pytest.MonkeyPatch.context() as mp:
        for name, config in micro_configs().items():
            mp.setitem(CROSSVIT_CONFIGS, name, config)
        yield MICRO_MODEL


def make_micro_checkpoint(path: Path, seed: int = 0, model: str = MICRO_MODEL, **metadata) -> Path:
    """A random-weight micro CrossViT (10 classes; ``model`` one of ``micro_configs()``) saved as
    safetensors; needs micro_model_registered."""
    from crossvit_edge.checkpoint import save_checkpoint
    from crossvit_edge.crossvit import CrossViT

    torch.manual_seed(seed)
    save_checkpoint(CrossViT(micro_configs()[model]).state_dict(), path, {"model": model, **metadata})
    return path


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory, micro_model_registered) -> Path:
    return make_micro_checkpoint(tmp_path_factory.mktemp("micro") / "micro.safetensors")


def demo_int8_acceptance(demo_checkpoint, digits_dir, build_runner, target: str) -> dict:
    """The int8 acceptance numbers of one target on the trained demo model and the full digits val
    split: ``build_runner(precision, calib_samples)`` builds a bundle of the demo checkpoint and
    returns its Runner. The fp32 artifact equals PyTorch in top-1; int8 loses at most 0.5 points
    and agrees with fp32 on at least 99% of the images."""
    import numpy as np

    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.data import open_image_set
    from crossvit_edge.pipeline import reference_logits, run_batched
    from crossvit_edge.preprocess import Preprocessing

    images = open_image_set(digits_dir / "val")
    x, y = images.load(Preprocessing()).astype(np.float32), np.asarray(images.labels)
    torch_logits = reference_logits(load_checkpoint(demo_checkpoint).model, x)
    fp32 = run_batched(build_runner("fp32", None), x)
    int8 = run_batched(build_runner("int8", 256), x)
    top1 = lambda logits: float((logits.argmax(1) == y).mean())  # noqa: E731
    result = {"torch_top1": top1(torch_logits), f"fp32_{target}_top1": top1(fp32), f"int8_{target}_top1": top1(int8),
              "int8_agreement_with_fp32": float((int8.argmax(1) == fp32.argmax(1)).mean())}
    print(result)
    assert top1(fp32) == top1(torch_logits), result
    assert top1(fp32) - top1(int8) <= 0.005 and result["int8_agreement_with_fp32"] >= 0.99, result
    return result


def build_bundle(out: Path, checkpoint, digits_dir: Path, target: str, precision: str, batch_size: int = 1,
                 calib_samples: int = 32, eval_samples: int = 16) -> Path:
    """Convert ``checkpoint`` into a bundle at ``out`` through the library pipeline: calibration on
    the digits train split, the post-conversion check on ``eval_samples`` val images."""
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    spec = BuildSpec(target=target, output=out, precision=precision, checkpoint=str(checkpoint), batch_size=batch_size,
                     # calibration settings only where they apply (convert_flags: others are warned about)
                     calibration=CalibrationSettings(data=digits_dir / "train", samples=calib_samples) if precision == "int8" else CalibrationSettings(),
                     eval_data=digits_dir / "val", eval_samples=eval_samples, overwrite=True)
    convert(spec)
    return out


def row_cosine(a, b) -> np.ndarray:
    """Per-image cosine similarity of two logit batches (in float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def tiny_onnx(batch: int = 1, size: int = 240, classes: int = 10, input_name: str = "image", output_name: str = "logits"):
    """A small runnable ONNX model with the bundle signature (float32 [batch, 3, size, size] ->
    [batch, classes]): the channel means times a fixed matrix. For bundle tests that need a real
    artifact without a conversion."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 3 * classes, dtype=np.float32).reshape(3, classes), "w")
    nodes = [helper.make_node("ReduceMean", [input_name], ["m"], axes=[2, 3], keepdims=0), helper.make_node("MatMul", ["m", "w"], [output_name])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, size, size])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
