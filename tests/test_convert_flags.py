"""The flag table (crossvit_edge.convert_flags): every flag x target x precision either refused in one
line before any work, or reaching the conversion with the setting recorded; a few real micro-model
conversions whose manifests record what was applied and nothing else; docs/usage.md's copy."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from crossvit_edge import convert_flags
from crossvit_edge.convert_flags import FLAGS, TARGET_PRECISIONS, Flag, FlagValue, why_not
from crossvit_edge.device_profiles import list_profiles, load_profile

REPO = Path(__file__).resolve().parents[1]


class Reached(Exception):
    """Raised by the stand-in for pipeline.convert: the CLI accepted every flag and started work."""

    def __init__(self, spec):
        super().__init__("reached convert")
        self.spec = spec


@pytest.fixture
def inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    stats = tmp_path / "stats.npz"
    stats.write_bytes(b"x")  # validate checks that it is a file; its content is read only later
    layers = tmp_path / "float_layers.txt"
    layers.write_text("blocks.0.fusion.0.attn.wq\n")
    return {"images": images, "stats": stats, "layers": layers}


def profile_for(target: str):
    """A shipped profile of ``target`` (None where there is none: its --profile cell is not walked)."""
    return next((name for name in list_profiles() if load_profile(name).target == target), None)


def example_args(flag: str, target: str, inputs) -> list:
    """A valid value for ``flag`` (every row of the table has one: a new row needs one here)."""
    values = {
        "--target": [], "--precision": [], "--output": [],  # always on the command line
        "--model": ["crossvit_tiny_240"], "--checkpoint": ["hf-hub:timm/crossvit_tiny_240.in1k"],
        "--profile": [profile_for(target)], "--overwrite": [], "--batch-size": ["2"],
        "--calib-data": [inputs["images"]], "--calib-samples": ["4"], "--calib-method": ["mse"],
        "--calib-percentile": ["99.9"], "--calib-batch-size": ["2"], "--calib-seed": ["3"],
        "--calib-stats": [inputs["stats"]], "--smooth-alpha": ["0.5"], "--float-layers": [inputs["layers"]],
        "--max-drop": ["1.5"], "--eval-data": [inputs["images"]], "--eval-samples": ["5"], "--ignore-class-names": [],
        "--fail-on-check": [], "--opset": ["18"], "--require-engine": [], "--fp16-baseline": ["on"], "--image-input": [], "--bundled-inputs": ["2"],
        "--etdump": [], "--verbose": [],
    }
    assert set(values) == {f.name for f in FLAGS}, "every flag of the table needs an example value here"
    return [] if flag in ("--target", "--precision", "--output") else [flag, *map(str, values[flag])]


def needed_args(flag: Flag, target: str, precision: str, inputs) -> list:
    """What ``flag`` acts through, where that applies itself (else the refusal would name it first)."""
    if flag.needs is None:
        return []
    other, values = flag.needs
    needed = convert_flags.FLAGS_BY_NAME[other]
    if not (_in(target, needed.targets) and _in(precision, needed.precisions)):
        return []
    if values is None:
        return example_args(other, target, inputs)
    return [other, str(values[0])]


def run_convert(argv, monkeypatch, capsys):
    """crossvit_edge.convert.main in-process, pipeline.convert replaced by Reached: (exit code, stderr
    lines, the spec that reached the conversion or None)."""
    import crossvit_edge.pipeline as pipeline
    from crossvit_edge import convert

    def reached(spec):
        raise Reached(spec)

    monkeypatch.setattr(pipeline, "convert", reached)
    try:
        rc, spec = convert.main([str(a) for a in argv]), None
    except Reached as r:
        rc, spec = None, r.spec
    return rc, capsys.readouterr().err.strip().splitlines(), spec


def test_every_flag_target_precision(tmp_path, inputs, monkeypatch, capsys):
    """The whole table: each flag on each target and precision. Where it does not apply: exit 2, one
    line naming the flag and the combination, nothing written. Where it applies: the conversion is
    reached and the manifest's build settings (BuildSpec.to_dict) hold its value."""
    out = tmp_path / "bundle"
    refused = reached = 0
    for flag in FLAGS:
        for target, precisions in TARGET_PRECISIONS.items():
            if flag.name == "--profile" and profile_for(target) is None:
                continue
            for precision in precisions:
                argv = ["--target", target, "--precision", precision, "--output", out,
                        *example_args(flag.name, target, inputs), *needed_args(flag, target, precision, inputs)]
                rc, err, spec = run_convert(argv, monkeypatch, capsys)
                combo = f"--target {target} --precision {precision}"
                applies = _in(target, flag.targets) and _in(precision, flag.precisions)
                if applies:
                    assert spec is not None, (flag.name, combo, err)
                    reached += 1
                    if flag.field and flag.name not in ("--output", "--overwrite"):
                        build = spec.to_dict()
                        head, _, key = flag.field.partition(".")
                        recorded = build[head][key] if key else build[head]
                        assert recorded not in (None, False), (flag.name, combo, build)
                else:
                    assert rc == 2 and len(err) == 1, (flag.name, combo, err)
                    assert flag.name in err[0] and combo in err[0] and "does not apply" in err[0], err
                    refused += 1
                assert not out.exists(), (flag.name, combo)
    assert refused > 50 and reached > 100, (refused, reached)


def _in(value, allowed):
    return allowed is None or value in allowed


def test_flags_refused_without_what_they_act_through(tmp_path, inputs, monkeypatch, capsys):
    """A flag that acts only through another is refused without it (or with another value of it)."""
    checked = 0
    for flag in FLAGS:
        if flag.needs is None:
            continue
        other, values = flag.needs
        target = flag.targets[0] if flag.targets else "onnx"
        precision = flag.precisions[0] if flag.precisions else "fp32"
        wrong = [] if values is None else [other, next(v for v in ("minmax", "entropy", "mse", "percentile") if v not in values)]
        argv = ["--target", target, "--precision", precision, "--output", tmp_path / "b", *example_args(flag.name, target, inputs), *wrong]
        rc, err, spec = run_convert(argv, monkeypatch, capsys)
        assert rc == 2 and len(err) == 1 and flag.name in err[0] and other in err[0], (flag.name, err)
        checked += 1
    assert checked >= 6


def test_explicit_default_is_refused_too(tmp_path, monkeypatch, capsys):
    """Given means given: --calib-samples 256 (the default value) on an fp16 build is refused."""
    rc, err, _ = run_convert(["--target", "onnx", "--precision", "fp16", "--output", tmp_path / "b", "--calib-samples", "256"],
                             monkeypatch, capsys)
    assert rc == 2 and "--calib-samples does not apply to --target onnx --precision fp16" in err[0], err


def test_flag_value_rows(monkeypatch):
    """A value that applies more narrowly than its flag is one FlagValue row: refused elsewhere, and in the doc table."""
    monkeypatch.setattr(convert_flags, "FLAG_VALUES", (FlagValue("--calib-method", "mse", targets=("onnx",), what="mse ranges"),))
    flag = convert_flags.FLAGS_BY_NAME["--calib-method"]
    value_of = {"--calib-method": "mse"}.get
    assert why_not(flag, "onnx", "int8", value_of) is None
    assert "--calib-method 'mse' does not apply to --target tensorrt --precision int8" in why_not(flag, "tensorrt", "int8", value_of)
    assert why_not(flag, "tensorrt", "int8", {"--calib-method": "minmax"}.get) is None
    assert "| `--calib-method mse` | int8 | - | - | - |" in convert_flags.markdown_table()


def test_python_spec_not_applied_is_named_and_not_recorded(tmp_path, inputs):
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    spec = BuildSpec(target="executorch", output=tmp_path / "b", precision="fp16", smoothing_alpha=0.5,
                     calibration=CalibrationSettings(data=inputs["images"], method="mse"), options={"opset": 17})
    reasons = convert_flags.not_applied(spec)
    assert any(r.startswith("--smooth-alpha does not apply to --target executorch --precision fp16") for r in reasons), reasons
    assert any(r.startswith("--opset does not apply") for r in reasons) and any(r.startswith("--calib-data") for r in reasons)
    build = spec.to_dict()
    assert build["calibration"] is None and "smoothing_alpha" not in build and build["options"] == {}, build
    spec.precision = "int8"
    build = spec.to_dict()
    # ExecuTorch's int8 layer inputs take the plan's ranges: the method applies and is recorded
    assert build["calibration"]["data"] == str(inputs["images"]) and build["calibration"]["method"] == "mse", build
    assert build["smoothing_alpha"] == 0.5


def test_docs_flag_table_matches_code():
    text = (REPO / "docs" / "usage.md").read_text()
    m = re.search(r"<!-- flag table: generated by python -m crossvit_edge.convert_flags -->\n(.*?)<!-- end of flag table -->", text, re.S)
    assert m, "docs/usage.md has no generated flag table"
    assert m.group(1) == convert_flags.markdown_table(), "regenerate: python -m crossvit_edge.convert_flags"


def test_converters_build_what_the_table_lists():
    from crossvit_edge.converters import CONVERTERS
    from crossvit_edge.pipeline import get_converter

    assert set(CONVERTERS) == set(TARGET_PRECISIONS)
    for target, precisions in TARGET_PRECISIONS.items():
        assert get_converter(target).precisions == precisions


# --------------------------------------------------------------------------------------------------
# Real micro-model conversions: the manifest records what was applied, and only that


def _convert(micro_checkpoint, out, *args):
    from crossvit_edge import convert

    rc = convert.main(["--checkpoint", str(micro_checkpoint), "--output", str(out), *map(str, args)])
    assert rc == 0
    return json.loads((out / "manifest.json").read_text())


def test_manifest_fp16_records_no_int8_settings(tmp_path, micro_checkpoint, digits_dir):
    build = _convert(micro_checkpoint, tmp_path / "b", "--target", "onnx", "--precision", "fp16",
                     "--eval-data", digits_dir / "val", "--eval-samples", 4)["build"]
    assert build["calibration"] is None, build
    for key in ("smoothing_alpha", "max_drop", "float_layers"):
        assert key not in build, build
    assert build["eval_samples"] == 4 and build["eval_data"] == str(digits_dir / "val")


def test_manifest_int8_records_applied_calibration(tmp_path, micro_checkpoint, digits_dir):
    manifest = _convert(micro_checkpoint, tmp_path / "b", "--target", "onnx", "--precision", "int8",
                        "--calib-data", digits_dir / "train", "--calib-samples", 8, "--calib-batch-size", 4,
                        "--calib-method", "percentile", "--calib-percentile", 99.9, "--smooth-alpha", 0.5)
    build, cal = manifest["build"], manifest["build"]["calibration"]
    assert (cal["method"], cal["percentile"], cal["samples"], cal["batch_size"]) == ("percentile", 99.9, 8, 4), cal
    assert build["smoothing_alpha"] == 0.5 and manifest["quantization_plan"]["smoothing"]["alpha"] == 0.5
    assert manifest["calibration"]["images"] == 8  # applied: the plan was calibrated on 8 images
    assert "eval_samples" not in build and "max_drop" not in build  # no --eval-data: neither applied


def test_manifest_executorch_int8_records_the_plan_method(tmp_path, micro_checkpoint, digits_dir):
    """ExecuTorch's int8 inputs take the plan's ranges: the default method is applied and recorded,
    the percentile (only with --calib-method percentile) is not, and no statistics file was given."""
    manifest = _convert(micro_checkpoint, tmp_path / "b", "--target", "executorch", "--precision", "int8",
                        "--calib-data", digits_dir / "train", "--calib-samples", 4)
    build = manifest["build"]
    assert build["calibration"]["samples"] == 4 and build["calibration"]["data"] == str(digits_dir / "train")
    assert build["calibration"]["method"] == "auto" == manifest["quantization_plan"]["calibration"]["method"]
    assert "percentile" not in build["calibration"] and build["calibration"]["stats"] is None, build["calibration"]
    assert build["options"] == {}, build
