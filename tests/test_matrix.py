"""The conversion matrix (scripts/conversion_matrix.py): every cell converts with the real CLI in a
child process and checks the bundle (exit 0, manifest, sha256, plan, cosine against fp32).

The default suite runs a fast subset on the tests' micro configs with the variant paths that the
plain micro model does not take: the dagger (three-conv) stems at 240 and the 408 input (branch 1
resized 408 -> 384, crop_pct 1.0), int8 through every target (the precision where the plan, the
stems and each target's quantizer meet). Two cells live with their target's tests, which check
them in detail and would otherwise be converted twice: Core ML int8 of the 240 dagger model
(tests/test_coreml.py) and ExecuTorch int8 of the 408 dagger model (tests/test_executorch.py); the
ExecuTorch 240 dagger cell (the same stems, ~2 minutes of lowering) is left to the full matrix.
The full matrix (eleven full-size variants, every target and precision) is slow-marked:
``pytest -m slow tests/test_matrix.py``, or the script itself for the table.
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from crossvit_edge.crossvit import list_models

from .conftest import MICRO_CLI, MICRO_DAGGER_408_MODEL, MICRO_DAGGER_MODEL, REPO

spec = importlib.util.spec_from_file_location("conversion_matrix", REPO / "scripts" / "conversion_matrix.py")
matrix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(matrix)

FAST = [
    (MICRO_DAGGER_408_MODEL, "onnx", "int8"),
    (MICRO_DAGGER_408_MODEL, "tensorrt", "int8"),
    (MICRO_DAGGER_408_MODEL, "coreml", "int8"),
    (MICRO_DAGGER_MODEL, "onnx", "int8"),
    (MICRO_DAGGER_MODEL, "tensorrt", "int8"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.mark.parametrize("variant,target,precision", FAST, ids=["-".join(c) for c in FAST])
def test_fast_cell(variant, target, precision, work, micro_model_registered):
    record = matrix.run_cell(variant, target, precision, work, [sys.executable, str(MICRO_CLI)], calib_samples=8, eval_samples=8)
    assert record["ok"], record["problems"]
    assert record["exit"] == 0 and record["peak_rss_bytes"] > 0 and record["seconds"] > 0
    manifest = json.loads((work / "bundles" / f"{variant}-{target}-{precision}" / "manifest.json").read_text())
    stem = {l["name"] for l in manifest["quantization_plan"]["layers"] if l["name"].startswith("patch_embed.") and l["precision"] == "int8"}
    assert len(stem) == 6  # three convs per branch, all int8
    assert manifest["accuracy_check"]["images"] == 8 and "passed" in manifest["accuracy_check"]


def test_cells_follow_the_converters_precisions():
    got = matrix.cells(["crossvit_9_dagger_240"], ["onnx", "tensorrt", "coreml", "executorch"], None)
    assert [(t, p) for _, t, p in got] == [
        ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"),
        ("tensorrt", "fp32"), ("tensorrt", "fp16"), ("tensorrt", "int8"),
        ("coreml", "fp32"), ("coreml", "fp16"), ("coreml", "int8-weights"), ("coreml", "int8"),
        ("executorch", "fp32"), ("executorch", "fp16"), ("executorch", "int8"),
    ]
    assert matrix.cells(["a", "b"], ["executorch"], ["int8"]) == [("a", "executorch", "int8"), ("b", "executorch", "int8")]


def test_table_and_resume(tmp_path):
    """Results are JSON lines keyed by cell, the last line winning (a rerun); the table has one row
    per variant, says which cells were not run and where the conversion's own check warned."""
    lines = [
        {"variant": "v", "target": "onnx", "precision": "int8", "ok": False, "seconds": 3.0, "peak_rss_bytes": 2**30, "problems": ["x"]},
        {"variant": "v", "target": "onnx", "precision": "int8", "ok": True, "seconds": 5.0, "peak_rss_bytes": 2**31, "cosine": 0.97},
        {"variant": "w", "target": "coreml", "precision": "int8", "ok": True, "seconds": 7.0, "peak_rss_bytes": 2**30, "cosine": 0.99,
         "passed": False, "top1_agreement": 0.8125, "check_failures": ["top1_agreement 0.8125 < 0.9"]},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    results = matrix.load_results(path)
    assert results[("v", "onnx", "int8")]["ok"] is True
    table = matrix.markdown_table(results, ["v", "w"], [("onnx", "int8"), ("coreml", "int8")])
    assert "| v | ok 5 s, 2.0 GiB, cos 0.9700 | not run |" in table
    assert "| w | not run | ok 7 s, 1.0 GiB, cos 0.9900, check warned: top1_agreement 0.8125 < 0.9 |" in table


FULL = [pytest.param(*cell, marks=pytest.mark.slow, id="-".join(cell))
        for cell in matrix.cells(list_models(), ["onnx", "tensorrt", "coreml", "executorch"], None)]


@pytest.mark.parametrize("variant,target,precision", FULL)
def test_full_matrix_cell(variant, target, precision, work):
    """One cell of the full matrix: a full-size random-weight variant (minutes and GBs each)."""
    record = matrix.run_cell(variant, target, precision, work, [sys.executable, "-m"])
    assert record["ok"], record["problems"]
