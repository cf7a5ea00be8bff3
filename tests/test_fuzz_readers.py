"""Property-based fuzzing of the readers of untrusted files: manifests (and whole bundles), device
profiles, ``--merge`` results files and calibration statistics. Whatever the input, the only
exception that may escape is ``UserError`` (one line, exit 2 in the CLIs). Inputs are valid
documents with one part replaced, deleted or added, and raw bytes. Under a minute in all."""
from __future__ import annotations

import copy
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossvit_edge.bundle import SCHEMA_VERSION, open_bundle, parse_json, validate_manifest, write_manifest
from crossvit_edge.device_profiles import load_profile, parse_profile
from crossvit_edge.errors import UserError
from crossvit_edge.harness import validate_results
from crossvit_edge.preprocess import Preprocessing

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_FILES = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["", "..", "/etc/passwd", "../x", "a/../../b", "onnx", "engine", "payload:Runner"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


def valid_manifest() -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "format": "crossvit_edge bundle", "target": "onnx", "model": "m", "num_classes": 3,
        "labels": ["a", "b", "c"], "checkpoint": {"source": "m.safetensors", "metadata": {}}, "precision": "int8",
        "input": {"name": "image", "shape": [2, 3, 32, 32], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "logits", "shape": [2, 3], "dtype": "float32"},
        "preprocessing": Preprocessing(input_size=32).to_dict(),
        "artifact": {"file": "model.onnx", "kind": "onnx", "bytes": 5, "stand_in": {"file": "model.onnx", "kind": "onnx"}},
        "files": {"model.onnx": {"sha256": "0" * 64, "bytes": 5}},
        "tensorrt": {"engine": "model.engine", "dla": {"core": 0, "gpu_fallback": True}},
        "coreml": {"compute_units": "ALL"}, "executorch": {"bundled_program": None},
        "notes": ["n"],
    }


def paths_of(value, prefix=()):
    """Every path (tuple of keys/indices) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """``base`` with one to three parts replaced by arbitrary JSON, deleted, or given a new key."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(doc)]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            if action == "replace":
                doc = draw(json_values)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        if not isinstance(doc, (dict, list)):
            break
    return doc


def only_user_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert "\n" not in str(e) and len(str(e)) < 2000, str(e)[:300]
        return None


def test_the_valid_documents_pass():
    """The fuzz bases are valid (otherwise every example would only test the first check)."""
    assert validate_manifest(valid_manifest(), "m") is not None
    assert validate_results(valid_results(), "r", num_classes=3)["logits"].shape == (2, 3)
    assert parse_profile(valid_profile(), "p").batch_size == 2


@FUZZ
@given(mutated(valid_manifest()))
def test_fuzz_manifest_schema(doc):
    only_user_error(validate_manifest, doc, "manifest.json")


@FUZZ
@given(st.binary(max_size=200) | mutated(valid_manifest()).map(lambda d: json.dumps(d).encode()))
def test_fuzz_manifest_bytes(raw):
    data = only_user_error(parse_json, raw, "manifest.json")
    if data is not None:
        only_user_error(validate_manifest, data, "manifest.json")


@FUZZ_FILES
@given(doc=mutated(valid_manifest()))
def test_fuzz_open_bundle(tmp_path_factory, doc):
    """A whole bundle folder: the manifest's paths and hashes meet the real file system."""
    root = tmp_path_factory.mktemp("b")
    (root / "model.onnx").write_bytes(b"model")
    good = write_manifest(root, {k: v for k, v in valid_manifest().items() if k not in ("files", "schema_version")})
    if isinstance(doc, dict) and isinstance(doc.get("files"), dict) and "model.onnx" in doc["files"]:
        doc["files"]["model.onnx"] = good["files"]["model.onnx"]  # so that later checks are reached
    (root / "manifest.json").write_text(json.dumps(doc))
    only_user_error(open_bundle, root)


def valid_results() -> dict:
    return {"bundle": "b", "target": "tensorrt", "precision": "int8", "runner": "r", "device": "d", "images": ["0/a.png", "1/b.png"],
            "logits": [[0.1, 0.2, 0.3], [1.0, -2.0, 3.5]], "engine_bytes": 10, "device_memory_bytes": 20,
            "latency": {"runs": 3, "batch_size": 1, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "mean_ms": 1.5, "min_ms": 0.5,
                        "throughput_ips": 100.0}}


@FUZZ
@given(mutated(valid_results()))
def test_fuzz_results_file(doc):
    out = only_user_error(validate_results, doc, "results.json", num_classes=3)
    if out is not None:  # what passes is what the harness relies on
        assert out["logits"].shape == (len(out["images"]), 3) and np.isfinite(out["logits"]).all()
        if out["latency"] is not None:  # the report and the plot read p50_ms
            assert out["latency"]["p50_ms"] >= 0
        for v in (out["latency"] or {}).values():
            assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def valid_profile() -> dict:
    return {"name": "p", "target": "tensorrt", "description": "d", "batch_size": 2, "precision": "int8", "threads": 2,
            "tensorrt": {"version": "10.3", "dla_core": 0, "workspace_mib": 1024, "mode": "explicit", "opset": 17}}


@FUZZ
@given(mutated(valid_profile()))
def test_fuzz_profile_schema(doc):
    profile = only_user_error(parse_profile, doc, "p.yaml")
    if profile is not None:
        assert 1 <= profile.batch_size <= 4096


@FUZZ_FILES
@given(text=st.text(max_size=300) | st.sampled_from(["a: &a [1]\nb: *a\n", "name: [" * 300, "!!python/object:os.system x",
                                                     "name: p\ntarget: onnx\n" + "x: " * 200]))
def test_fuzz_profile_yaml(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\udc80" not in text else path.write_bytes(b"\xff")
    only_user_error(load_profile, str(path))


# --------------------------------------------------------------------------------------------------
# Calibration statistics (.npz: arrays + JSON metadata)


@pytest.fixture(scope="module")
def stats_bytes() -> bytes:
    torch = pytest.importorskip("torch")
    from crossvit_edge.calibration.collect import CalibrationStatistics
    from crossvit_edge.calibration.estimators import AbsHistogram

    h = AbsHistogram()
    h.update(torch.linspace(-3, 3, 1000))
    stats = CalibrationStatistics("m", "0" * 64, {"blocks.0.fc1": h}, {"norm": np.ones(4, np.float32)}, {"images": 8},
                                  fisher={"blocks.0.fc1": np.linspace(0.0, 1.0, len(h.counts))}, fisher_images=8)
    with tempfile.TemporaryDirectory() as d:
        stats.save(Path(d) / "s.npz")
        return (Path(d) / "s.npz").read_bytes()


def _meta_and_arrays(raw: bytes):
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return json.loads(bytes(z["meta"]).decode()), {k: z[k] for k in z.files if k != "meta"}


def test_stats_round_trip(tmp_path, stats_bytes):
    from crossvit_edge.calibration.collect import CalibrationStatistics

    (tmp_path / "s.npz").write_bytes(stats_bytes)
    stats = CalibrationStatistics.load(tmp_path / "s.npz")
    assert stats.model == "m" and stats.layers["blocks.0.fc1"].amax == pytest.approx(3.0) and stats.channel_amax["norm"].shape == (4,)
    h = stats.layers["blocks.0.fc1"]
    assert stats.fisher_images == 8 and stats.fisher["blocks.0.fc1"].tolist() == np.linspace(0.0, 1.0, len(h.counts)).tolist()


@FUZZ_FILES
@given(data=st.data())
def test_fuzz_calibration_statistics(tmp_path_factory, stats_bytes, data):
    from crossvit_edge.calibration.collect import CalibrationStatistics

    path = tmp_path_factory.mktemp("s") / "s.npz"
    how = data.draw(st.sampled_from(["bytes", "meta", "arrays"]))
    if how == "bytes":  # truncated or corrupted archive
        raw = bytearray(stats_bytes)
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = raw[: data.draw(st.integers(0, len(raw)))]
        path.write_bytes(bytes(raw))
    else:
        meta, arrays = _meta_and_arrays(stats_bytes)
        if how == "meta":
            meta = data.draw(mutated(meta))
        else:
            key = data.draw(st.sampled_from(sorted(arrays)))
            arrays[key] = data.draw(st.sampled_from([np.array([np.nan, 1.0]), np.array([-1.0]), np.zeros((2, 2)), np.array(["x"]),
                                                     np.array([], np.float64), np.array([1, 2], np.int8)]))
        meta_bytes = json.dumps(meta).encode()
        np.savez(path, meta=np.frombuffer(meta_bytes, np.uint8), **arrays)
    stats = only_user_error(CalibrationStatistics.load, path)
    if stats is not None:  # what loads can be planned from
        for method in ("minmax", "percentile", "entropy", "mse"):
            assert all(math.isfinite(a) and a > 0 for a in stats.amax(method).values())
        for name, w in stats.fisher.items():  # auto's weights: one per bin of the layer's histogram
            assert len(w) == len(stats.layers[name].counts) and np.isfinite(w).all() and (w >= 0).all()
