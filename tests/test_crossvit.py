"""The model family against timm's implementation (the reference), and its export properties."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crossvit_edge.crossvit import (
    CROSSVIT_CONFIGS,
    IBM_ALIASES,
    Attention,
    CrossAttention,
    LayerNorm,
    bicubic_resize_matrix,
    create_model,
    filter_ibm_keys,
    for_export,
    resolve_name,
)
from crossvit_edge.errors import UserError

timm = pytest.importorskip("timm")

LARGE = {"crossvit_base_240", "crossvit_15_dagger_408", "crossvit_18_dagger_408", "crossvit_18_240", "crossvit_18_dagger_240"}
VARIANTS = [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in CROSSVIT_CONFIGS]


def _timm_pair(name, num_classes=1000, seed=0):
    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    ours = create_model(name, num_classes=num_classes)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_timm(name):
    ref, ours = _timm_pair(name)
    size = ours.config.img_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |ours - timm| = {diff}"


@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_ibm_keyed_state_dict_loads_the_same(name):
    ref, ours = _timm_pair(name, num_classes=7)
    sd = ref.state_dict()
    ibm = {}
    for k, v in sd.items():
        for stem in ("pos_embed", "cls_token"):
            if k in (f"{stem}_0", f"{stem}_1"):
                k = f"{stem}.{k[-1]}"
        ibm[k] = v
    assert "pos_embed.0" in ibm and "pos_embed_0" not in ibm
    other = create_model(name, num_classes=7)
    other.load_state_dict(filter_ibm_keys(ibm), strict=True)
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        assert (other(x) - ref(x)).abs().max().item() <= 1e-4


def test_key_count_and_names_match_the_reference():
    model = create_model("crossvit_9_240")
    keys = set(model.state_dict())
    assert len(keys) == 268  # crossvit.md: crossvit_9_240 has 268 keys
    assert "resize_matrix" not in keys  # a derived constant, not a weight
    assert {"pos_embed_0", "cls_token_1", "blocks.2.fusion.1.attn.wq.weight", "head.1.bias"} <= keys


@pytest.mark.parametrize("size,out", [(240, 224), (408, 384)])
def test_resize_matrix_matches_interpolate(size, out):
    a = bicubic_resize_matrix(size, out)
    assert a.shape == (out, size)
    taps = (a != 0).sum(1)
    assert taps.min() >= 3 and taps.max() <= 4
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2
    ref = F.interpolate(x, size=out, mode="bicubic", align_corners=False)
    assert (a @ x @ a.t() - ref).abs().max().item() <= 1e-5


def test_resize_matrix_is_keys_cubic():
    """Cross-check the matrix read off PyTorch against the closed form (a=-0.75, half-pixel,
    border clamp), computed independently in float64."""

    def keys(t, a=-0.75):
        near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
        far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return far(t + 1), near(t), near(1 - t), far(2 - t)

    n_in, n_out = 240, 224
    closed = torch.zeros(n_out, n_in, dtype=torch.float64)
    for d in range(n_out):
        src = n_in / n_out * (d + 0.5) - 0.5
        base = math.floor(src)
        for off, w in zip((-1, 0, 1, 2), keys(src - base)):
            closed[d, min(max(base + off, 0), n_in - 1)] += w
    assert (bicubic_resize_matrix(n_in, n_out).double() - closed).abs().max().item() < 5e-5
    assert torch.allclose(closed.sum(1), torch.ones(n_out, dtype=torch.float64))


def test_wrong_input_size_is_a_clear_error():
    model = create_model("crossvit_tiny_240", num_classes=10)
    with pytest.raises(UserError, match=r"takes input of shape \(B, 3, 240, 240\), got \(1, 3, 224, 224\)"):
        model(torch.zeros(1, 3, 224, 224))


def test_names_and_aliases():
    assert resolve_name("crossvit_9_224") == "crossvit_9_240"
    assert resolve_name("crossvit_15_dagger_384") == "crossvit_15_dagger_408"
    assert resolve_name("crossvit_9_240.in1k") == "crossvit_9_240"
    assert set(IBM_ALIASES.values()) == set(CROSSVIT_CONFIGS)
    with pytest.raises(UserError, match="unknown model 'crossvit_99_240'"):
        resolve_name("crossvit_99_240")


def test_param_counts_match_the_table():
    table = {"crossvit_tiny_240": 7.015, "crossvit_9_240": 8.553, "crossvit_9_dagger_240": 8.777, "crossvit_15_dagger_408": 28.500}
    for name, millions in table.items():
        with torch.device("meta"):
            model = create_model(name)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - millions) < 0.0015, (name, n)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE or n not in ("crossvit_tiny_240", "crossvit_9_dagger_240") else n for n in CROSSVIT_CONFIGS])
def test_strict_export_has_no_upsample(name):
    """The export form (what every converter is given) has neither the bicubic resize nor fused
    attention, and computes what the eager model (fused SDPA) computes."""
    model = create_model(name, num_classes=10)
    size = model.config.img_size
    ep = torch.export.export(for_export(model), (torch.zeros(1, 3, size, size),), strict=True)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("upsample" in t or "interpolate" in t for t in targets), targets
    assert not any("scaled_dot_product" in t for t in targets), targets
    assert sum("softmax" in t for t in targets) >= 1, targets
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), model(x), atol=1e-5)


def test_eager_model_runs_fused_attention_and_export_form_does_not():
    """Eager mode calls scaled_dot_product_attention in every self-attention module, the export form
    never; the model itself is left in eager form, and both compute the same function."""
    model = create_model("crossvit_tiny_240", num_classes=10)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    n_attention = sum(isinstance(m, Attention) for m in model.modules())
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", counting)
        eager = model(x)
        assert len(calls) == n_attention == 3 * (1 + 4)  # self-attention; the one-query cross-attention stays explicit
        calls.clear()
        exported_form = for_export(model)(x)
        assert calls == []
    assert all(m.fused_attn for m in model.modules() if isinstance(m, Attention))
    assert not any(m.fused_attn for m in model.modules() if isinstance(m, CrossAttention))
    assert not any(m.cast_to_fp32 for m in model.modules() if isinstance(m, LayerNorm))
    assert not model.resize_with_matrix and for_export(model).resize_with_matrix
    assert (eager - exported_form).abs().max().item() <= 1e-5
