"""The network input's int8 range comes from the preprocessing's exact bounds, never calibrated
(issue 28 item 1): the plan's arithmetic, and on every int8 target the debugger's own measure on
the demo model: the grid read from the artifact at each patch-embedding conv's input has scale
bound / 127 and clips no image value."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from crossvit_edge.calibration.plan import (IMAGE_BOUNDS, build_plan, image_channel_bounds, image_fed_layers, image_input_amax,
                                            image_input_ranges)
from crossvit_edge.crossvit import CROSSVIT_CONFIGS, CrossViT, bicubic_resize_matrix
from crossvit_edge.preprocess import IMAGENET_MEAN, IMAGENET_STD

from .conftest import build_bundle, micro_config


def test_image_bounds_are_the_normalised_pixel_range():
    bounds = image_channel_bounds(IMAGENET_MEAN, IMAGENET_STD)
    for (lo, hi), m, s in zip(bounds, IMAGENET_MEAN, IMAGENET_STD):
        assert lo == pytest.approx(-m / s) and hi == pytest.approx((1 - m) / s)
    # ImageNet: the widest channel is blue's top, (1 - 0.406) / 0.225 = 2.64
    assert image_input_amax(bounds) == pytest.approx(max(max(abs(lo), abs(hi)) for lo, hi in bounds)) == pytest.approx(0.594 / 0.225)


def test_resized_bound_is_attained_and_never_exceeded():
    """The bicubic overshoot bound is exact: the image that puts every tap at the end its sign asks
    for reaches it through the real resize, and random images in the box stay inside it."""
    bounds = image_channel_bounds(IMAGENET_MEAN, IMAGENET_STD)
    a = bicubic_resize_matrix(240, 224)
    amax = image_input_amax(bounds, a.numpy())
    assert amax > image_input_amax(bounds)  # bicubic's negative taps overshoot the image's range
    i = int(torch.clip(a, 0, None).sum(1).argmax())  # the row with the most negative weight
    w = torch.outer(a[i], a[i])  # weights of output pixel (i, i)
    reached = 0.0
    for lo, hi in bounds:
        for top, bottom in ((hi, lo), (lo, hi)):  # the largest value, the most negative one
            x = torch.where(w > 0, torch.tensor(top), torch.tensor(bottom)).to(torch.float32)
            y = torch.nn.functional.interpolate(x[None, None], size=224, mode="bicubic", align_corners=False)[0, 0]
            reached = max(reached, float(y.abs().max()))
    assert amax * (1 - 1e-5) <= reached <= amax * (1 + 1e-5)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(4, 3, 240, 240, generator=g)  # pixels, saturated half the time
    img = torch.where(torch.rand(img.shape, generator=g) < 0.5, img.round(), img)
    norm = (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = torch.nn.functional.interpolate(norm, size=224, mode="bicubic", align_corners=False)
    assert float(out.abs().max()) <= amax * (1 + 1e-6)


@pytest.mark.parametrize("dagger", [False, True])
def test_plan_takes_the_image_range_for_the_layers_fed_the_image(dagger):
    model = CrossViT(replace(micro_config(), dagger=dagger)).eval()
    fed = image_fed_layers(model)
    assert sorted(fed.values()) == [0, 1]
    assert all(n.startswith(f"patch_embed.{b}.") for n, b in fed.items())
    ranges = image_input_ranges(model, IMAGENET_MEAN, IMAGENET_STD)
    amax = {n: 123.0 for n, _ in model.named_modules()}  # a calibrated value every layer would otherwise take
    plan = build_plan(model, "m", amax, {"method": "entropy"}, fixed_amax=ranges)
    for layer in plan.int8_layers():
        if layer.name in fed:
            assert layer.input_amax == ranges[layer.name] and layer.input_range == IMAGE_BOUNDS
            assert layer.to_dict()["input_scale"] == ranges[layer.name] / 127.0
        else:
            assert layer.input_amax == 123.0 and "input_range" not in layer.to_dict()
    again = type(plan).from_dict(json.loads(json.dumps(plan.to_dict())))
    assert [l.input_range for l in again.layers] == [l.input_range for l in plan.layers]


def test_fp16_scale_holds_the_range():
    """fp16 programs store the scale rounded: the nearest fp16 to 2.64 / 127 lands below it (its grid
    would clip the image's top), the scale taken holds it and is the smallest fp16 that does."""
    from crossvit_edge.calibration.qdq import fp16_scale_holding

    amax = image_input_amax(image_channel_bounds(IMAGENET_MEAN, IMAGENET_STD))
    assert float(np.float16(amax / 127.0)) * 127.0 < amax
    for value in (amax, 1e-3, 0.37, 6.0, 100.0):
        s = fp16_scale_holding(value)
        assert float(np.float16(s)) == s and s * 127.0 >= value
        assert float(np.nextafter(np.float16(s), np.float16(0))) * 127.0 < value


def test_plan_schema_accepts_the_image_range_and_rejects_another():
    from crossvit_edge.bundle import PLAN_INPUT_RANGES

    assert PLAN_INPUT_RANGES == (IMAGE_BOUNDS,)


# --------------------------------------------------------------------------------------------------
# Every int8 target on the demo model: the debugger's clipped share and the artifact's own scale

TARGETS = [
    ("onnx", {"int8_form": "tensorrt"}),
    ("onnx", {"int8_form": "ort-cpu", "ort_fusions": True}),
    ("executorch", {}),
    ("coreml", {}),
    # Core ML with --image-input is not here: its first convs see pixel - mean (the std folded into
    # their weights) and the debugger compares that grid with the fp32 model's normalised values
    # (85.5% "clipped" measured: a unit mismatch of the debugger's, not yet fixed; issue 28 note).
    # Core AI is checked on the micro model in test_coreai.py: coreai-core's Linux runtime took over
    # 600 s to load the demo model's int8 asset in CI.
]


@pytest.mark.parametrize("target,options", TARGETS, ids=[f"{t}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for t, o in TARGETS])
def test_int8_bundle_never_clips_the_image(tmp_path, demo_checkpoint, digits_dir, target, options):
    from crossvit_edge.debug import main as debug_main
    from crossvit_edge.pipeline import convert
    from crossvit_edge.spec import BuildSpec, CalibrationSettings

    out = tmp_path / "bundle"
    spec = BuildSpec(target=target, output=out, precision="int8", checkpoint=str(demo_checkpoint), batch_size=1, options=options,
                     calibration=CalibrationSettings(data=digits_dir / "train", samples=8),
                     eval_data=digits_dir / "val", eval_samples=4, overwrite=True)
    convert(spec)
    manifest = json.loads((out / "manifest.json").read_text())
    plan = {l["name"]: l for l in manifest["quantization_plan"]["layers"]}
    pre = manifest["preprocessing"]
    report_dir = tmp_path / "debug"
    args = [str(out), "--data", str(digits_dir / "val"), "--samples", "24", "--output", str(report_dir)]
    if target == "executorch":
        args += ["--calib-data", str(digits_dir / "train")]
    assert debug_main(args) == 0
    rows = {r["key"]: r for r in json.loads((report_dir / "layerwise.json").read_text())["points"]}
    model = CrossViT(CROSSVIT_CONFIGS[manifest["model"]])
    checked = 0
    for layer, branch in image_fed_layers(model).items():
        expected = image_input_ranges(model, pre["mean"], pre["std"])[layer]
        assert plan[layer]["input_range"] == IMAGE_BOUNDS and plan[layer]["input_amax"] == pytest.approx(expected, rel=1e-12)
        row = rows[f"{layer}:input"]
        assert row["status"] == "compared", row
        assert row["clipped_share"] == 0.0, row
        scale = row["quant"]["scale"]
        if target == "coreml" and options.get("image_input"):
            # the std is folded into the first convs: the program's input is pixel - mean
            expected = image_input_ranges(model, pre["mean"], (1.0, 1.0, 1.0))[layer]
        # Core ML's program holds the scale in fp16, rounded up by fix_input_observers (a relative step of 2**-10)
        assert scale == pytest.approx(expected / 127.0, rel=1e-3 if target == "coreml" else 1e-6), (layer, row["quant"])
        assert scale * 127.0 >= expected * (1 - 1e-9), (layer, row["quant"])
        lo, hi = row["quant"]["range"]
        assert lo <= -expected * (1 - 1e-6) and hi >= expected * (1 - 1e-6), row["quant"]
        checked += 1
    assert checked == 2
