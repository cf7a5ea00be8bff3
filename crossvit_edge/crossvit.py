"""The CrossViT family (Chen, Fan, Panda, ICCV 2021), written for deployment.

One file for the family, as in timm: a table of named configs, small modules, and a filter that maps
foreign checkpoint keys. State dicts are interchangeable with timm's and IBM's. What differs from
timm is what matters for export:

* in the export form, the 240->224 (408->384) bicubic resize of branch 1 is two constant matrix
  products (``y = A x A^T``), built once at construction and kept out of the state dict, because
  ``upsample_bicubic2d`` has no converter in Core ML, no XNNPACK delegate and no cubic Resize in
  several ONNX runtimes;
* eager mode is the fastest faithful form (the fp32 reference every artifact is compared with must
  be as fast as timm's): fused ``scaled_dot_product_attention``, ``F.interpolate``, no casts; the
  copy ``for_export`` returns is the export form (plain matmul-softmax-matmul attention, the resize
  matrices), the graph every exporter and quantizer is given;
* no casts in eager fp32; the export form computes LayerNorm and softmax in fp32 whatever the model's
  dtype (no nodes in fp32 graphs, Cast nodes around them in fp16 ones);
* ReLUs in the dagger stems are not in-place;
* the input size is fixed; another size is a clear error instead of a silent resize;
* no Python branches on tensor values, so ``torch.export`` succeeds in strict mode.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

__all__ = [
    "CrossViTConfig",
    "CROSSVIT_CONFIGS",
    "IBM_ALIASES",
    "CrossViT",
    "create_model",
    "resolve_name",
    "bicubic_resize_matrix",
    "filter_ibm_keys",
    "for_export",
    "list_models",
    "set_export_form",
]


@dataclass(frozen=True)
class CrossViTConfig:
    """Hyper-parameters of one variant; the table below names them as timm does."""

    name: str
    img_size: int
    scaled_size: int  # branch 1's input: 224 for the 240 models, 384 for the 408 ones
    embed_dim: Tuple[int, int]
    depth: Tuple[int, int]  # ViT blocks per branch inside each multi-scale block
    num_heads: Tuple[int, int]
    mlp_ratio: float
    dagger: bool = False  # three-conv patch embedding ("multi_conv")
    patch_size: Tuple[int, int] = (12, 16)
    num_multiscale_blocks: int = 3
    crop_pct: float = 0.875
    num_classes: int = 1000

    @property
    def branch_sizes(self) -> Tuple[int, int]:
        return (self.img_size, self.scaled_size)

    @property
    def num_patches(self) -> Tuple[int, int]:
        return tuple((s // p) ** 2 for s, p in zip(self.branch_sizes, self.patch_size))  # type: ignore[return-value]


def _cfg(name, img_size, embed_dim, depth, heads, mlp_ratio, dagger=False, crop_pct=0.875):
    return CrossViTConfig(
        name=name,
        img_size=img_size,
        scaled_size={240: 224, 408: 384}[img_size],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=(heads, heads),
        mlp_ratio=mlp_ratio,
        dagger=dagger,
        crop_pct=crop_pct,
    )


CROSSVIT_CONFIGS: Dict[str, CrossViTConfig] = {
    c.name: c
    for c in [
        _cfg("crossvit_tiny_240", 240, (96, 192), (1, 4), 3, 4.0),
        _cfg("crossvit_small_240", 240, (192, 384), (1, 4), 6, 4.0),
        _cfg("crossvit_base_240", 240, (384, 768), (1, 4), 12, 4.0),
        _cfg("crossvit_9_240", 240, (128, 256), (1, 3), 4, 3.0),
        _cfg("crossvit_15_240", 240, (192, 384), (1, 5), 6, 3.0),
        _cfg("crossvit_18_240", 240, (224, 448), (1, 6), 7, 3.0),
        _cfg("crossvit_9_dagger_240", 240, (128, 256), (1, 3), 4, 3.0, dagger=True),
        _cfg("crossvit_15_dagger_240", 240, (192, 384), (1, 5), 6, 3.0, dagger=True),
        _cfg("crossvit_18_dagger_240", 240, (224, 448), (1, 6), 7, 3.0, dagger=True),
        _cfg("crossvit_15_dagger_408", 408, (192, 384), (1, 5), 6, 3.0, dagger=True, crop_pct=1.0),
        _cfg("crossvit_18_dagger_408", 408, (224, 448), (1, 6), 7, 3.0, dagger=True, crop_pct=1.0),
    ]
}

# IBM's release names (the "_224" models also take 240x240 input, the "_384" ones 408x408).
IBM_ALIASES: Dict[str, str] = {
    "crossvit_tiny_224": "crossvit_tiny_240",
    "crossvit_small_224": "crossvit_small_240",
    "crossvit_base_224": "crossvit_base_240",
    "crossvit_9_224": "crossvit_9_240",
    "crossvit_15_224": "crossvit_15_240",
    "crossvit_18_224": "crossvit_18_240",
    "crossvit_9_dagger_224": "crossvit_9_dagger_240",
    "crossvit_15_dagger_224": "crossvit_15_dagger_240",
    "crossvit_18_dagger_224": "crossvit_18_dagger_240",
    "crossvit_15_dagger_384": "crossvit_15_dagger_408",
    "crossvit_18_dagger_384": "crossvit_18_dagger_408",
}


def list_models() -> List[str]:
    return sorted(CROSSVIT_CONFIGS)


def resolve_name(name: str) -> str:
    """timm name for ``name`` (timm or IBM spelling, optional ``.in1k``-style tag)."""
    base = name.split(".", 1)[0]
    base = IBM_ALIASES.get(base, base)
    if base not in CROSSVIT_CONFIGS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(list_models())} (IBM's *_224/*_384 names are accepted too)")
    return base


# --------------------------------------------------------------------------------------------------
# The bicubic resize as a constant linear map


def bicubic_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """A of shape (out, in) such that ``A @ x @ A.T == F.interpolate(x, out, mode="bicubic",
    align_corners=False)`` for square inputs.

    The map is Keys cubic convolution (a = -0.75) with half-pixel centres and border-clamped taps,
    3-4 non-zero taps per row. Rather than re-deriving it in float64 (which differs from PyTorch's
    float32 weight computation by up to 2e-5 per tap at 240->224, enough to show in the logits), the
    matrix is read off PyTorch's own kernel by resizing the identity basis: it is then the exact
    linear map the reference model computes. ``tests/test_crossvit.py`` checks it against the
    closed-form Keys weights.
    """
    basis = torch.eye(in_size, dtype=torch.float32).reshape(in_size, 1, in_size, 1)
    with torch.no_grad():
        columns = F.interpolate(basis, size=(out_size, 1), mode="bicubic", align_corners=False)
    return columns.reshape(in_size, out_size).t().contiguous()


# --------------------------------------------------------------------------------------------------
# Modules (attribute names follow timm's so state dicts load unchanged)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that, in the export form (``cast_to_fp32``), is computed in fp32 whatever the model's
    dtype: nothing in fp32 graphs, and in fp16 models (TensorRT, ONNX fp16) it keeps the variance
    from overflowing. The eager fp32 model skips the (no-op) casts."""

    cast_to_fp32 = False  # eager fp32: no casts; for_export turns the casts on (they vanish in fp32 graphs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cast_to_fp32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def softmax_fp32(scores: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 (exported as Cast -> Softmax -> Cast in fp16 models; nothing in fp32 ones)."""
    return scores.float().softmax(dim=-1).to(scores.dtype)


class TensorPoint(nn.Identity):
    """A named point on a tensor of the export form: the identity in fp32, a place where calibration
    observes the tensor and the int8 plan can put a Q/DQ pair (module names are the plan's keys)."""


class AttentionPoints(nn.Module):
    """The four operands of the attention matmuls: ``q`` (q * scale), ``k`` (k^T), ``v`` and
    ``probs`` (the softmax output)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.probs = TensorPoint(), TensorPoint(), TensorPoint(), TensorPoint()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool, points: "AttentionPoints" = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, heads, N, head_dim). ``fused``: one
    ``scaled_dot_product_attention`` call (eager speed); else the explicit matmul-softmax-matmul
    with the softmax in fp32, which is what exporters and quantizers are given (``for_export``),
    its matmul operands passed through ``points`` when given (identities: same numbers)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if points is None:
        return torch.matmul(softmax_fp32(torch.matmul(q * scale, k.transpose(-2, -1))), v)
    scores = torch.matmul(points.q(q * scale), points.k(k.transpose(-2, -1)))
    return torch.matmul(points.probs(softmax_fp32(scores)), points.v(v))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, dagger: bool, in_chans: int = 3):
        super().__init__()
        if not dagger:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        else:
            # ReLU not in place: in-place ops complicate functionalisation in every exporter.
            second_stride, second_pad, third_stride = {12: (3, 0, 1), 16: (2, 1, 2)}[patch_size]
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, embed_dim // 4, kernel_size=7, stride=4, padding=3),
                nn.ReLU(),
                nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=3, stride=second_stride, padding=second_pad),
                nn.ReLU(),
                nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=third_stride, padding=1),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Self-attention: fused SDPA in eager mode, matmul-softmax-matmul when ``fused_attn`` is off."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.points = AttentionPoints()  # no parameters: the state dict is timm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = attend(q, k, v, self.scale, self.fused_attn, self.points)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as the checkpoints were trained with
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossAttention(nn.Module):
    """One query (the CLS token) attending over all tokens: attention shape (B, h, 1, N)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        # One query: PyTorch's CPU SDPA kernel is slower here than the two small matmuls (as timm
        # computes it too), so eager mode keeps the explicit form.
        self.fused_attn = False
        self.wq = nn.Linear(dim, dim, bias=True)
        self.wk = nn.Linear(dim, dim, bias=True)
        self.wv = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.wq(x[:, 0:1]).reshape(b, 1, h, d).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(b, n, h, d).permute(0, 2, 1, 3)
        out = attend(q, k, v, self.scale, self.fused_attn)
        return self.proj(out.transpose(1, 2).reshape(b, 1, c))


class CrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The residual is the CLS token before the LayerNorm.
        return x[:, 0:1] + self.attn(self.norm1(x))


def _token_proj(dim_in: int, dim_out: int) -> nn.Sequential:
    """LayerNorm -> GELU -> Linear on the CLS token (indices 0 and 2 carry weights, as in timm)."""
    return nn.Sequential(LayerNorm(dim_in, eps=1e-6), nn.GELU(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Per-branch ViT blocks, then CLS-token cross-attention fusion between the two branches."""

    def __init__(self, dims: Tuple[int, int], depth: Tuple[int, int], num_heads: Tuple[int, int], mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(*[Block(dims[i], num_heads[i], mlp_ratio) for _ in range(depth[i])]) for i in range(2)
        )
        # projs[i]: branch i's CLS into the other branch's width; fusion[i] runs at that width;
        # revert_projs[i] brings the fused CLS back to branch i's width.
        self.projs = nn.ModuleList(_token_proj(dims[i], dims[1 - i]) for i in range(2))
        self.fusion = nn.ModuleList(CrossAttentionBlock(dims[1 - i], num_heads[1 - i]) for i in range(2))
        self.revert_projs = nn.ModuleList(_token_proj(dims[1 - i], dims[i]) for i in range(2))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        outs = (self.blocks[0](x0), self.blocks[1](x1))
        fused = []
        for i in range(2):
            other = outs[1 - i]
            cls = self.projs[i](outs[i][:, 0:1])
            cls = self.fusion[i](torch.cat((cls, other[:, 1:]), dim=1))
            cls = self.revert_projs[i](cls)
            fused.append(torch.cat((cls, outs[i][:, 1:]), dim=1))
        return fused[0], fused[1]


class CrossViT(nn.Module):
    """Two-branch CrossViT classifier taking exactly ``config.img_size`` square inputs."""

    def __init__(self, config: CrossViTConfig):
        super().__init__()
        self.config = config
        dims = config.embed_dim
        self.num_classes = config.num_classes
        self.patch_embed = nn.ModuleList(
            PatchEmbed(p, d, config.dagger) for p, d in zip(config.patch_size, dims)
        )
        # Named attributes (not ParameterLists) so the keys are timm's: cls_token_0, pos_embed_1, ...
        n0, n1 = config.num_patches
        self.cls_token_0 = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.cls_token_1 = nn.Parameter(torch.zeros(1, 1, dims[1]))
        self.pos_embed_0 = nn.Parameter(torch.zeros(1, 1 + n0, dims[0]))
        self.pos_embed_1 = nn.Parameter(torch.zeros(1, 1 + n1, dims[1]))
        self.blocks = nn.ModuleList(
            MultiScaleBlock(dims, config.depth, config.num_heads, config.mlp_ratio)
            for _ in range(config.num_multiscale_blocks)
        )
        self.norm = nn.ModuleList(LayerNorm(d, eps=1e-6) for d in dims)
        self.head = nn.ModuleList(nn.Linear(d, config.num_classes) for d in dims)
        # Not persistent: a derived constant, so checkpoints stay timm-compatible.
        self.register_buffer(
            "resize_matrix", bicubic_resize_matrix(config.img_size, config.scaled_size), persistent=False
        )
        # Eager mode resizes with F.interpolate (faster on CPU than the two matmuls, and what timm
        # runs); the export form (``for_export``) uses the matrices, which every backend runs.
        self.resize_with_matrix = False
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.cls_token_0, self.cls_token_1, self.pos_embed_0, self.pos_embed_1):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (3, self.config.img_size, self.config.img_size)

    def check_input(self, x: torch.Tensor) -> None:
        size = self.config.img_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise UserError(
                f"{self.config.name} takes input of shape (B, 3, {size}, {size}), got {tuple(x.shape)}; "
                f"preprocess images to {size}x{size} first"
            )

    def resize_branch1(self, x: torch.Tensor) -> torch.Tensor:
        """Bicubic 240->224: ``A @ x @ A^T`` in the export form (two small MatMuls that every backend
        runs), ``F.interpolate`` in eager mode (the same map to ~4e-6)."""
        if not self.resize_with_matrix:
            return F.interpolate(x, size=self.config.scaled_size, mode="bicubic", align_corners=False)
        a = self.resize_matrix
        return torch.matmul(torch.matmul(a, x), a.t())

    def _embed(self, x: torch.Tensor, i: int) -> torch.Tensor:
        cls_token = self.cls_token_0 if i == 0 else self.cls_token_1
        pos_embed = self.pos_embed_0 if i == 0 else self.pos_embed_1
        tokens = self.patch_embed[i](x)
        return torch.cat((cls_token.expand(x.shape[0], -1, -1), tokens), dim=1) + pos_embed

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        x0 = self._embed(x, 0)
        x1 = self._embed(self.resize_branch1(x), 1)
        for block in self.blocks:
            x0, x1 = block(x0, x1)
        return self.norm[0](x0), self.norm[1](x1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1 = self.forward_features(x)
        return (self.head[0](x0[:, 0]) + self.head[1](x1[:, 0])) * 0.5


def create_model(name: str, num_classes: int = 1000) -> CrossViT:
    """A randomly initialised model of the named variant (timm or IBM spelling)."""
    config = replace(CROSSVIT_CONFIGS[resolve_name(name)], num_classes=num_classes)
    return CrossViT(config).eval()


def set_export_form(model: nn.Module, export: bool) -> nn.Module:
    """Switch ``model`` (in place) between the eager form (fused SDPA self-attention, no casts, the
    resize by ``F.interpolate``) and the export form (explicit attention, LayerNorm and softmax
    computed in fp32 for fp16 models, the resize as matrices). Module attributes,
    not branches on tensors or dtypes, so every tracer (torch.export, torch.fx, jit) sees one path."""
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = not export
        elif isinstance(m, LayerNorm):
            m.cast_to_fp32 = export
        elif isinstance(m, CrossViT):
            m.resize_with_matrix = export
    return model


def for_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in export form: attention as matmul-softmax-matmul, LayerNorm and softmax
    in fp32 when the model is cast to fp16, the resize as two matmuls, the graph the Q/DQ placement, the TensorRT checks, PT2E annotation and every
    exporter are written against (an SDPA node would be decomposed differently by each, or, in
    Core ML and ONNX fp16, run its softmax in fp16). Same parameters, same function."""
    import copy

    return set_export_form(copy.deepcopy(model), True).eval()


class Fp16Inside(nn.Module):
    """float32 in, float32 out, fp16 inside: what apps feed and read (the manifest's input and output
    are float32) around a model cast to fp16. The ONNX fp16 graph and the ExecuTorch fp16 program
    are exported from this."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def fp16_inside(model: nn.Module) -> Fp16Inside:
    """``model`` cast to fp16 (in place) behind float32 input and output."""
    return Fp16Inside(model.half())


def filter_ibm_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map IBM's four differing keys (``pos_embed.0``, ``cls_token.1``, ...) to timm's."""
    out = {}
    for key, value in state_dict.items():
        for stem in ("pos_embed", "cls_token"):
            if key in (f"{stem}.0", f"{stem}.1"):
                key = f"{stem}_{key[-1]}"
        out[key] = value
    return out
