"""Range estimators, the streaming statistics pass, LayerNorm folding, the plan and mixed precision."""
from __future__ import annotations

import copy
import numpy as np
import pytest
import torch

from crossvit_edge.calibration.collect import CalibrationStatistics, collect_statistics
from crossvit_edge.calibration.estimators import AbsHistogram, compute_amax
from crossvit_edge.calibration.plan import build_plan, classify_layer, quantizable_layer_names
from crossvit_edge.calibration.qdq import apply_qdq, quantize_dequantize
from crossvit_edge.calibration.smoothing import apply_smoothing, smoothing_factors, smoothing_pairs
from crossvit_edge.crossvit import create_model
from crossvit_edge.data import open_image_set
from crossvit_edge.preprocess import Preprocessing


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("crossvit_tiny_240", num_classes=10)


@pytest.fixture(scope="module")
def micro():
    """The tests' one-block CrossViT: the statistics pass costs a fraction of crossvit_tiny's."""
    from crossvit_edge.crossvit import CrossViT

    from .conftest import micro_config

    torch.manual_seed(0)
    return CrossViT(micro_config()).eval()


@pytest.fixture(scope="module")
def images(digits_dir):
    s = open_image_set(digits_dir / "train").sample(16, seed=0)
    return s.load(Preprocessing()).astype(np.float32)


def _hist(x, chunks=4):
    h = AbsHistogram()
    for part in np.array_split(x, chunks):
        h.update(torch.from_numpy(part))
    return h


def test_estimators_on_a_heavy_tailed_distribution():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -55.0]]).astype(np.float32)  # two outliers
    h = _hist(x)
    assert h.amax == pytest.approx(55.0)
    mm, pc, en, ms = (compute_amax(h, m, 99.99) for m in ("minmax", "percentile", "entropy", "mse"))
    assert mm == pytest.approx(55.0)
    # percentile: 99.99% of |N(0,1)| lies below ~3.9
    assert 3.5 < pc < 4.5
    # entropy clips the outliers away and keeps the bulk of the distribution
    assert 2.0 < en < 20.0

    def quant_mse(c):
        s = c / 127
        return float(np.mean((x - np.clip(np.round(x / s), -127, 127) * s) ** 2))

    # MSE's choice really is (near) the best clipping value on the raw samples
    assert quant_mse(ms) <= 1.02 * min(quant_mse(mm), quant_mse(pc), quant_mse(en))
    # growing ranges: a later batch with a larger max extends the histogram, counts are kept
    assert h.counts.sum() == pytest.approx(len(x))


def test_histogram_is_order_deterministic():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50_000).astype(np.float32)
    a, b = _hist(x), _hist(x)
    assert np.array_equal(a.counts, b.counts) and a.width == b.width


def test_statistics_are_bit_identical_and_reusable(micro, images, tmp_path):
    layers = quantizable_layer_names(micro)
    batches = lambda: (images[i : i + 4] for i in range(0, len(images), 4))
    s1 = collect_statistics(micro, "micro", layers, batches())
    s2 = collect_statistics(micro, "micro", layers, batches())
    for name in layers:
        assert np.array_equal(s1.layers[name].counts, s2.layers[name].counts)
    assert s1.amax("entropy") == s2.amax("entropy")
    s1.save(tmp_path / "stats.npz")
    loaded = CalibrationStatistics.load(tmp_path / "stats.npz")
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert loaded.amax(method) == s1.amax(method)
    assert loaded.weights_sha256 == s1.weights_sha256


def _sharpened(model):
    """A copy with the qkv weights scaled up 8x: peaked, trained-like attention. Random weights
    attend almost uniformly over 401 tokens (p ~ 0.0025, below half the softmax output's 1/127 step:
    the int8 attention output would be 0)."""
    sharp = copy.deepcopy(model)
    for name, m in sharp.named_modules():
        if name.endswith(".attn.qkv"):
            m.weight.data.mul_(8.0)
    return sharp


def test_int8_attention_plan_points_and_qdq_model(micro):
    """The int8 attention option: the self-attention operands of every ViT block are plan entries
    (the cross-attention has none), the plan round-trips as data, mixed precision keeps them, and
    the Q/DQ model quantizes exactly those operands (at a tiny amax the attention output collapses;
    without the option it does not)."""
    from crossvit_edge.calibration.plan import QuantPlan, attention_owner, attention_point_names
    from crossvit_edge.calibration.qdq import QDQActivation
    from crossvit_edge.crossvit import TensorPoint, for_export

    points = attention_point_names(micro)
    n_blocks = sum(1 for n, _ in micro.named_modules() if n.endswith(".attn.qkv"))
    assert len(points) == 4 * n_blocks and not any(".fusion." in p for p in points)
    assert attention_point_names(micro, calibrated_only=True) == [p for p in points if not p.endswith(".probs")]
    layers = quantizable_layer_names(micro)
    amax = {n: 2.0 for n in layers + points if not n.endswith(".probs")}
    off, on = build_plan(micro, "micro", amax, {}), build_plan(micro, "micro", amax, {}, attention=True)
    assert "attention_matmuls" not in off.to_dict() and QuantPlan.from_dict(off.to_dict()).attention is None
    d = on.to_dict()
    assert [t["name"] for t in d["attention_matmuls"]["tensors"]] == points
    assert {t["amax"] for t in d["attention_matmuls"]["tensors"] if t["tensor"] == "probs"} == {1.0}
    assert QuantPlan.from_dict(d).to_dict() == d
    assert on.with_float(layers[:1], "test").attention == on.attention
    with pytest.raises(KeyError, match="attention operand"):
        build_plan(micro, "micro", {n: 2.0 for n in layers}, {}, attention=True)
    # the fp32 export form carries identity points: the same numbers as the eager model
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        eager, exported = micro(x), for_export(micro)(x)
    assert sum(isinstance(m, TensorPoint) for m in for_export(micro).modules()) == len(points)
    torch.testing.assert_close(exported, eager, atol=1e-4, rtol=1e-4)
    qmodel = apply_qdq(micro, on)
    assert sum(isinstance(m, QDQActivation) for m in qmodel.modules()) == len(points)
    assert not any(isinstance(m, TensorPoint) for m in qmodel.modules())
    # numbers, at the first block's attention output. Random weights attend almost uniformly over
    # 401 tokens (p ~ 0.0025, below half the softmax output's 1/127 step: the int8 attention output
    # would be 0), so the qkv weights are scaled up here to give trained-like, peaked attention.
    sharp = _sharpened(micro)
    stats = collect_statistics(for_export(sharp), "micro", layers + attention_point_names(sharp, calibrated_only=True), [x.numpy()])
    observed = stats.amax("minmax")
    name = attention_owner(points[0])
    seen = {}
    handle = sharp.get_submodule(name).register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        sharp(x)
    handle.remove()
    wrong_v = {**observed, **{p: 1e-3 * observed[p] for p in points if p.endswith(".v")}}
    errors = {}
    for key, plan in (("layers only", build_plan(sharp, "micro", observed, {})),
                      ("attention", build_plan(sharp, "micro", observed, {}, attention=True)),
                      ("wrong v range", build_plan(sharp, "micro", wrong_v, {}, attention=True))):
        with torch.no_grad():
            errors[key] = float((apply_qdq(sharp, plan).get_submodule(name)(seen["x"]) - seen["y"]).abs().mean())
    scale = float(seen["y"].abs().mean())
    assert errors["layers only"] < errors["attention"] < 0.1 * scale < errors["wrong v range"], (errors, scale)


def test_mixed_precision_returns_int8_attention_matmuls_to_float_as_a_pair(micro, images):
    """With the int8 attention option, each attention module's matmuls are one more candidate: a
    module whose v range is broken is probed alone, ranked most sensitive and returned to float
    (all four operand points leave the plan); the layers' int8 stays as planned."""
    from crossvit_edge.calibration.plan import attention_point_names
    from crossvit_edge.calibration.sensitivity import mixed_precision
    from crossvit_edge.crossvit import for_export

    sharp = _sharpened(micro)  # peaked attention, as trained models have
    layers = quantizable_layer_names(sharp)
    points = attention_point_names(sharp, calibrated_only=True)
    amax = collect_statistics(for_export(sharp), "micro", layers + points, [images[:8]]).amax("minmax")
    plan = build_plan(sharp, "micro", amax, {}, attention=True)
    modules = plan.attention_modules()
    assert len(modules) >= 2 and all(m.endswith(".attn") for m in modules)
    broken = modules[0]
    amax[broken + ".points.v"] *= 1e-3
    keep = layers[:2]
    plan = build_plan(sharp, "micro", amax, {}, attention=True).with_float(layers[2:], "test")
    out = mixed_precision(sharp, plan, images, None, max_drop=0.0, sensitivity_images=8)
    rec = out.mixed_precision
    assert rec["all_int8_score"] < rec["fp32_score"]
    first = rec["returned_to_float"][0]
    assert (first["layer"], first["kind"]) == (broken, "attention"), rec["returned_to_float"]
    assert broken not in out.attention_modules() and not any(t.name.startswith(broken + ".") for t in out.attention)
    assert len(out.attention) == len(plan.attention) - 4 * sum(r["kind"] == "attention" for r in rec["returned_to_float"])
    assert rec["final_drop_points"] <= 1e-9
    returned_layers = {r["layer"] for r in rec["returned_to_float"] if r["kind"] != "attention"}
    assert all(out.get(n).precision == "int8" for n in keep if n not in returned_layers)
    with torch.no_grad():  # the returned plan is one the Q/DQ model (and every converter) takes
        apply_qdq(sharp, out)(torch.from_numpy(images[:2]))


def test_plan_places_int8_only_on_the_weighted_layers_of_the_blocks(model):
    names = quantizable_layer_names(model)
    assert "patch_embed.0.proj" in names and "blocks.0.blocks.1.3.mlp.fc2" in names
    assert "blocks.2.fusion.1.attn.wk" in names and "blocks.2.fusion.1.attn.wv" in names
    for float_layer in ("blocks.0.fusion.0.attn.wq", "blocks.0.fusion.0.attn.proj", "blocks.1.projs.0.2", "blocks.1.revert_projs.1.2", "head.0"):
        assert float_layer not in names
        assert classify_layer(float_layer)[0] is False
    # tiny: 3 multi-scale blocks x (1 + 4 ViT blocks x 4 linears + 2 fusions x 2) + 2 patch convs
    assert len(names) == 3 * (5 * 4 + 4) + 2
    plan = build_plan(model, "crossvit_tiny_240", {n: 1.0 for n in names}, {})
    d = plan.to_dict()
    assert d["summary"]["int8_layers"] == len(names)
    assert d["activations"]["zero_point"] == 0 and "LayerNorm" in d["float_ops"]


def test_smoothing_preserves_the_function_and_flattens_ranges(model, images):
    layers = quantizable_layer_names(model)
    # give norm1 of the first block an outlier channel, as trained ViTs have
    m = create_model("crossvit_tiny_240", num_classes=10)
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.blocks[0].blocks[1][0].norm1.weight[5] = 40.0
    stats = collect_statistics(m, "t", layers, [images[:8]], histograms=False)
    factors = smoothing_factors(m, stats.channel_amax, alpha=0.5)
    assert set(factors) == {n for n, _ in smoothing_pairs(m)}
    smoothed = apply_smoothing(m, factors)
    x = torch.from_numpy(images[:4])
    with torch.no_grad():
        assert (smoothed(x) - m(x)).abs().max().item() < 1e-4
    after = collect_statistics(smoothed, "t", layers, [images[:8]], histograms=False)
    name = "blocks.0.blocks.1.0.attn.qkv"
    ratio = lambda c: c.max() / np.median(c)
    assert ratio(after.channel_amax[name]) < ratio(stats.channel_amax[name]) / 3


def test_qdq_model_matches_fake_quant_semantics(micro, images):
    model = micro
    x = torch.tensor([0.5, -0.26, 1000.0, 0.015, 0.025])
    scale = torch.tensor(0.01)
    got = quantize_dequantize(x, scale, torch.tensor(0, dtype=torch.int8))
    # round half to even, saturate at 127 (and -128)
    assert torch.allclose(got, torch.tensor([0.5, -0.26, 1.27, 0.02, 0.02]))
    layers = quantizable_layer_names(model)
    stats = collect_statistics(model, "micro", layers, [images[:8]])
    plan = build_plan(model, "micro", stats.amax("percentile", 99.99), {})
    q = apply_qdq(model, plan)
    with torch.no_grad():
        a, b = model(torch.from_numpy(images)), q(torch.from_numpy(images))
    cos = torch.nn.functional.cosine_similarity(a, b).min().item()
    assert 0.98 < cos < 1.0  # quantized: close, not identical


def test_mixed_precision_returns_the_most_sensitive_layers_first(micro, images):
    from crossvit_edge.calibration.sensitivity import mixed_precision

    model = micro
    layers = quantizable_layer_names(model)
    stats = collect_statistics(model, "micro", layers, [images[:8]])
    # a deliberately bad plan: a few layers with a range far too small to hold their inputs
    amax = stats.amax("minmax")
    bad = {"blocks.0.blocks.1.0.attn.qkv": 0.05, "blocks.0.blocks.0.0.mlp.fc1": 0.05}
    amax.update(bad)
    keep = set(bad) | {"blocks.0.blocks.1.0.mlp.fc1", "blocks.0.blocks.0.0.attn.proj"}
    plan = build_plan(model, "micro", amax, {}).with_float([n for n in layers if n not in keep], "test")
    out = mixed_precision(model, plan, images, None, max_drop=0.0, sensitivity_images=8)
    rec = out.mixed_precision
    returned = [r["layer"] for r in rec["returned_to_float"]]
    # broken layers are the most sensitive: only they go back to float (on this model returning one
    # of them already restores full agreement)
    assert returned and set(returned) <= set(bad), returned
    sens = [r["sensitivity_kl"] for r in rec["returned_to_float"]]
    assert sens == sorted(sens, reverse=True)
    assert rec["final_drop_points"] <= 0.0 + 1e-9
    assert all(out.get(n).precision == "float" for n in returned)
