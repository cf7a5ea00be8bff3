"""Device profiles (schema), bundles (atomic, hashed) and the profiling harness end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from crossvit_edge.bundle import read_manifest, staged_bundle, write_manifest
from crossvit_edge.device_profiles import list_profiles, load_profile
from crossvit_edge.errors import UserError
from crossvit_edge.metrics import compare_logits, latency_summary

from .conftest import run_cli, tiny_onnx


def test_every_shipped_profile_loads():
    names = list_profiles()
    assert {"jetson-orin-nano-jp6", "iphone-15-pro", "android-arm64-xnnpack", "cpu-onnxruntime"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.target in ("onnx", "tensorrt", "coreml", "executorch", "coreai")


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("name: x\ntarget: tensorrt\ntensorrt: {versoin: '10.3'}\n", "unknown key tensorrt.versoin"),
        ("name: x\ntarget: coreml\ncoreml: {compute_units: GPU}\n", "compute_units must be one of"),
        ("name: x\ntarget: onnx\nbatch_size: zero\n", "batch_size: expected int"),
        ("name: x\ntarget: tpu\n", "unknown target 'tpu'"),
        ("name: x\ntarget: onnx\ncoreml: {}\n", "section 'coreml' does not belong"),
        ("target: onnx\n", "missing required key 'name'"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_profile_schema_errors(tmp_path, yaml_text, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_profile(str(path))
    with pytest.raises(UserError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_staged_bundle_is_atomic_and_hashed(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with staged_bundle(out) as stage:
            (stage / "model.bin").write_bytes(b"half")
            raise RuntimeError("conversion failed")
    assert not out.exists() and not list(tmp_path.iterdir())
    model = tiny_onnx().SerializeToString()  # a real artifact: open_bundle reads its signature
    with staged_bundle(out) as stage:
        (stage / "model.bin").write_bytes(model)
        write_manifest(stage, minimal_manifest("model.bin"))
    m = read_manifest(out)
    assert m["files"]["model.bin"]["bytes"] == len(model)
    (out / "model.bin").write_bytes(model[:-1] + bytes([model[-1] ^ 1]))  # same size: caught by the hash
    with pytest.raises(UserError, match="does not match its sha256"):
        read_manifest(out)
    (out / "model.bin").write_bytes(model + b"x")
    with pytest.raises(UserError, match=f"{len(model) + 1} bytes, the manifest says {len(model)}"):
        read_manifest(out)
    with pytest.raises(UserError, match="exists and is not empty"):
        with staged_bundle(out) as stage:
            (stage / "x").write_text("y")


def minimal_manifest(artifact: str) -> dict:
    """The keys the manifest schema requires, for an ONNX bundle of a 10-class 240 px model."""
    from crossvit_edge.preprocess import Preprocessing

    return {
        "format": "crossvit_edge bundle", "target": "onnx", "model": "m", "num_classes": 10, "labels": None,
        "checkpoint": {"source": "m.safetensors", "metadata": {}}, "precision": "fp32",
        "input": {"name": "image", "shape": [1, 3, 240, 240], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [1, 10], "dtype": "float32"},
        "preprocessing": Preprocessing().to_dict(), "artifact": {"file": artifact, "kind": "onnx", "bytes": 7},
    }


def test_metrics_against_hand_computed_values():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    got = np.array([[2.0, 1.0, 0.0], [1.0, 0.0, 3.0]])
    m = compare_logits(got, ref, labels=np.array([0, 1]))
    assert m["top1"] == 0.5 and m["reference_top1"] == 1.0 and m["top1_agreement"] == 0.5
    assert m["top5"] == 1.0
    cos1 = 1.0
    cos2 = (0 * 1 + 3 * 0 + 1 * 3) / (np.sqrt(10) * np.sqrt(10))
    assert m["cosine"] == pytest.approx((cos1 + cos2) / 2)
    p = np.exp(ref[1]) / np.exp(ref[1]).sum()
    q = np.exp(got[1]) / np.exp(got[1]).sum()
    assert m["kl"] == pytest.approx(np.sum(p * np.log(p / q)) / 2)
    # logit SNR over every logit: signal 4+1+0+0+9+1 = 15, noise 0+0+0+1+9+4 = 14
    assert m["snr_db"] == pytest.approx(10 * np.log10(15 / 14))
    assert compare_logits(ref, ref)["snr_db"] == 200.0
    lat = latency_summary([0.010, 0.020, 0.030, 0.040], batch_size=2)
    assert lat["p50_ms"] == pytest.approx(25.0) and lat["throughput_ips"] == pytest.approx(80.0)


def test_profile_cli_reports_json_markdown_and_plot(tmp_path, micro_checkpoint, digits_dir):
    bundle = tmp_path / "b"
    r = run_cli("crossvit_edge.convert", "--target", "onnx", "--checkpoint", micro_checkpoint, "--output", bundle, micro=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "report"
    r = run_cli("crossvit_edge.profile", bundle, "--data", digits_dir / "val", "--samples", 20, "--runs", 3, "--warmup", 1, "--output", out, micro=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"fp32 reference", "b"}
    acc = rows["b"]["accuracy"]
    assert acc["images"] == 20 and acc["top1_agreement"] == 1.0 and acc["max_abs_diff"] < 1e-4
    # the fp32 ONNX export against PyTorch: float rounding only, far above any int8 artifact's SNR
    assert acc["snr_db"] > 80 and 0 <= acc["kl"] < 1e-8
    assert acc["top1"] == rows["fp32 reference"]["accuracy"]["top1"]
    lat = rows["b"]["latency"]
    assert lat["runs"] == 3 and lat["p50_ms"] > 0 and lat["p99_ms"] >= lat["p50_ms"]
    assert rows["b"]["size_bytes"] > 1e6
    md = (out / "report.md").read_text()
    assert "| b | onnx | fp32 |" in md and "| SNR dB | KL |" in md
    assert f"| {acc['snr_db']:.1f} | {acc['kl']:.2e} |" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_cli("crossvit_edge.profile", tmp_path / "nothing", "--data", digits_dir / "val", "--output", out)
    assert bad.returncode == 2 and "not a bundle" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
