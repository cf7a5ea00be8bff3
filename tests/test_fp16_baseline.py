"""FP16 beside INT8 (issue 26 item 3): an INT8 TensorRT bundle carries the FP16 form of the same
model (fp16 graph for strongly typed TensorRT, fp32 graph + FP16 flag for weakly typed), listed and
hashed; the device results file carries both engines; ``profile --merge`` shows the INT8/FP16 ratio,
both agreements with fp32 and the verdict.

No TensorRT here: the merge test runs the two ONNX files of a real bundle on ONNX Runtime (CPU),
times them with the device writer's own ``folder_results``, and labels the rows as ONNX Runtime
standing in. It checks the ratio/verdict computation and the rendering, not TensorRT's speed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from crossvit_edge.bundle import open_bundle
from crossvit_edge.metrics import INT8_MAX_AGREEMENT_LOSS, INT8_PAYS_RATIO, int8_verdict
from crossvit_edge.pipeline import convert
from crossvit_edge.spec import BuildSpec, CalibrationSettings

from .conftest import REPO, run_cli
from .test_debug import BLOCK_TORCH, _images
from .test_tensorrt import TRT_OK, TRT_WHY


def _convert(tmp_path, micro_checkpoint, digits_dir, profile_name, name, **options):
    from crossvit_edge.device_profiles import load_profile

    profile = load_profile(profile_name)
    bundle = tmp_path / name
    spec = BuildSpec(target="tensorrt", output=bundle, precision="int8", checkpoint=str(micro_checkpoint), profile=profile,
                     batch_size=profile.batch_size, calibration=CalibrationSettings(data=digits_dir / "train", samples=16),
                     eval_data=digits_dir / "val", eval_samples=4, overwrite=True, options=options)
    convert(spec)
    return bundle


def _float_initializer_types(path):
    model = onnx.load(str(path))
    kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if t.data_type in (1, 10)}
    io = {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in list(model.graph.input) + list(model.graph.output)}
    return kinds, io


def test_verdict_thresholds():
    """The three answers, at and around the documented thresholds."""
    fast, slow = {"p50_ms": 58.0}, {"p50_ms": 97.0}
    fp16 = {"p50_ms": 100.0}
    assert int8_verdict(fast, fp16, 0.99, 0.995)["verdict"] == "INT8 pays here: 0.58x FP16"
    assert int8_verdict(slow, fp16, 0.99, 0.99)["verdict"] == "INT8 does not pay here: 0.97x FP16, ship FP16"
    edge = int8_verdict({"p50_ms": 100.0 * INT8_PAYS_RATIO}, fp16, 1.0, 1.0)
    assert edge["pays"] is True and edge["ratio"] == pytest.approx(INT8_PAYS_RATIO)
    lossy = int8_verdict(fast, fp16, 0.97, 0.97 + INT8_MAX_AGREEMENT_LOSS + 0.005)
    assert lossy["pays"] is False and "points below FP16's, ship FP16" in lossy["verdict"] and lossy["ratio"] == pytest.approx(0.58)
    assert int8_verdict(None, fp16, 1.0, 1.0)["pays"] is None


def test_fp16_baseline_flag_refused_where_it_does_not_apply(tmp_path):
    r = run_cli("crossvit_edge.convert", "--target", "onnx", "--precision", "fp32", "--fp16-baseline", "off", "--output", tmp_path / "b")
    assert r.returncode == 2 and "--fp16-baseline does not apply to --target onnx --precision fp32" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_weakly_typed_baseline_is_the_fp32_graph_and_off_skips_it(tmp_path, micro_checkpoint, digits_dir):
    """TensorRT 8.5 (weakly typed): the baseline is an fp32 graph built with BuilderFlag.FP16;
    --fp16-baseline off leaves it out."""
    bundle = _convert(tmp_path, micro_checkpoint, digits_dir, "jetson-xavier-nx-jp5", "nx")
    manifest = open_bundle(bundle).manifest
    base = manifest["tensorrt"]["fp16_baseline"]
    assert base["mode"] == "explicit" and "FP16" in base["builder_flags"] and "INT8" not in base["builder_flags"]
    kinds, io = _float_initializer_types(bundle / base["onnx"])
    assert kinds == {"FLOAT"} and io == {"FLOAT"}
    assert manifest["files"][base["onnx"]]["bytes"] == (bundle / base["onnx"]).stat().st_size
    off = _convert(tmp_path, micro_checkpoint, digits_dir, "jetson-xavier-nx-jp5", "nx_off", fp16_baseline=False)
    m = open_bundle(off).manifest
    assert m["tensorrt"]["fp16_baseline"] is None and not any("fp16_baseline" in f for f in m["files"])


def test_strongly_typed_baseline_merges_into_the_report(tmp_path, micro_checkpoint, digits_dir):
    """Strongly typed (10.3, jetson-orin-nano-jp6): the baseline ONNX is fp16 inside with float32 I/O,
    listed with its sha256 and verified on open (a changed byte is refused). A results file written
    by the device code's own writers (ONNX Runtime standing in for both engines, honestly labelled)
    merges into a profile: two rows, the ratio from the file's p50s, agreements against fp32, the
    verdict in report.md."""
    bundle = _convert(tmp_path, micro_checkpoint, digits_dir, "jetson-orin-nano-jp6", "trt")
    manifest = open_bundle(bundle).manifest
    base = manifest["tensorrt"]["fp16_baseline"]
    assert base["mode"] == "strongly-typed" and base["builder_flags"] == []
    kinds, io = _float_initializer_types(bundle / base["onnx"])
    assert "FLOAT16" in kinds and io == {"FLOAT"}
    import hashlib

    assert manifest["files"][base["onnx"]]["sha256"] == hashlib.sha256((bundle / base["onnx"]).read_bytes()).hexdigest()

    folder = tmp_path / "imgs"
    for path in _images(digits_dir, 6).paths:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    results = tmp_path / "device" / "results.json"
    results.parent.mkdir()
    code = BLOCK_TORCH + textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import numpy as np
        from crossvit_edge.converters.onnx import OnnxRuntimeRunner
        from crossvit_edge.converters.tensorrt.device import RESULTS_FORMAT, baseline_manifest, folder_results, run_folder
        from crossvit_edge.bundle import read_manifest, write_json
        from crossvit_edge.data import open_image_set
        from crossvit_edge.preprocess import Preprocessing

        bundle = Path({str(bundle)!r})
        manifest = read_manifest(bundle)
        images = open_image_set(Path({str(folder)!r}))
        pre = Preprocessing.from_dict(manifest["preprocessing"])

        def record(m, onnx_name):
            runner = OnnxRuntimeRunner(bundle, m, artifact=onnx_name)
            logits = run_folder(runner, images, pre)
            x = np.stack([pre(images.paths[0])] * runner.batch_size).astype(np.float32)
            seconds = []
            for _ in range(5):
                t0 = time.perf_counter(); runner.run(x); seconds.append(time.perf_counter() - t0)
            return folder_results(bundle, m, runner, images, logits, seconds,
                                  device="ONNX Runtime on this CPU, standing in for TensorRT (not a TensorRT measurement)",
                                  timing="perf_counter around OnnxRuntimeRunner.run, 5 runs")

        result = record(manifest, manifest["tensorrt"]["onnx"])
        fp16 = baseline_manifest(manifest)
        result["fp16_baseline"] = record(fp16, manifest["tensorrt"]["fp16_baseline"]["onnx"])
        result["format"] = RESULTS_FORMAT
        write_json(Path({str(results)!r}), result)
        assert "torch" not in sys.modules
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    written = json.loads(results.read_text())
    assert written["fp16_baseline"]["precision"] == "fp16" and written["precision"] == "int8"

    out = tmp_path / "profile"
    r = run_cli("crossvit_edge.profile", "--checkpoint", micro_checkpoint, "--data", folder, "--output", out, "--runs", 2, "--warmup", 0, "--merge", results, micro=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    int8_row, fp16_row = rows[written["bundle"]], rows[f"{written['bundle']} (FP16 baseline)"]
    assert int8_row["precision"] == "int8" and fp16_row["precision"] == "fp16"
    (pair,) = report["int8_vs_fp16"]
    ratio = written["latency"]["p50_ms"] / written["fp16_baseline"]["latency"]["p50_ms"]
    assert pair["ratio"] == pytest.approx(ratio)
    assert pair["int8_top1_agreement"] == int8_row["accuracy"]["top1_agreement"]
    assert pair["fp16_top1_agreement"] == fp16_row["accuracy"]["top1_agreement"]
    # the fp16 graph is close to fp32 on every image (the fp16 ONNX on ONNX Runtime, not TensorRT)
    assert fp16_row["accuracy"]["cosine"] > 0.999
    expected = int8_verdict(written["latency"], written["fp16_baseline"]["latency"], pair["int8_top1_agreement"], pair["fp16_top1_agreement"])
    assert pair["verdict"] == expected["verdict"] and pair["verdict"].startswith(("INT8 pays here", "INT8 does not pay here"))
    md = (out / "report.md").read_text()
    assert "Does INT8 pay?" in md and f"{ratio:.2f}x" in md and "standing in for TensorRT" in md

    # a results file whose baseline names other images is refused in one line
    bad = dict(written)
    bad["fp16_baseline"] = {**written["fp16_baseline"], "images": list(reversed(written["fp16_baseline"]["images"]))}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = run_cli("crossvit_edge.profile", "--checkpoint", micro_checkpoint, "--data", folder, "--output", tmp_path / "p2", "--merge", tmp_path / "bad.json", micro=True)
    assert r.returncode == 2 and "fp16_baseline.images" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(not TRT_OK, reason=f"building and timing the INT8 and FP16 engines needs tensorrt and a CUDA GPU: {TRT_WHY}")
def test_device_runner_times_both_engines(tmp_path, micro_checkpoint, digits_dir):
    """On a machine with TensorRT: the device runner builds both engines and writes both records."""
    bundle = _convert(tmp_path, micro_checkpoint, digits_dir, "jetson-orin-nano-jp6", "trt")
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "crossvit_edge.converters.tensorrt.device", str(bundle), "--data", str(digits_dir / "val"),
                        "--build", "--runs", "5", "--warmup", "1", "--output", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["format"] == 2 and data["fp16_baseline"]["precision"] == "fp16" and data["fp16_baseline"]["latency"]["p50_ms"] > 0
    assert np.asarray(data["fp16_baseline"]["logits"]).shape == np.asarray(data["logits"]).shape
