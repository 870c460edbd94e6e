"""Vision transformers for the pathology foundation models UNI and CONCH, in plain PyTorch.

Both checkpoints are timm ``VisionTransformer`` state dicts (timm itself does not import
here). We rebuild the same modules with the same parameter names so the user's file loads
with ``strict=True``.

UNI (``MahmoodLab/UNI`` ``pytorch_model.bin``; timm ``vit_large_patch16_224``,
``init_values=1e-5``, ``num_classes=0``): ViT-L/16, 224 px, 24 blocks, width 1024,
16 heads, MLP 4096, LayerNorm eps 1e-6, layer scale. Feature = final-norm CLS token
(1024-d). Input normalised with ImageNet mean/std. Accepted keys, exactly::

    cls_token, pos_embed (1, 197, 1024), patch_embed.proj.{weight,bias},
    blocks.{0..23}.{norm1,norm2}.{weight,bias}, blocks.N.attn.qkv.{weight,bias},
    blocks.N.attn.proj.{weight,bias}, blocks.N.ls1.gamma, blocks.N.ls2.gamma,
    blocks.N.mlp.fc1.{weight,bias}, blocks.N.mlp.fc2.{weight,bias}, norm.{weight,bias}

CONCH (``MahmoodLab/CONCH`` ``pytorch_model.bin``; open_clip CoCa, config
``conch_ViT-B-16``): the vision tower is a timm ViT-B/16 at 448 px (12 blocks, width 768,
12 heads, no layer scale, no head) under ``visual.trunk.*``, followed by an attentional
pooler ``visual.attn_pool_contrast.*`` (one learned 512-d query, ``nn.MultiheadAttention``
with 8 heads and kdim = vdim = 768, LayerNorms ``ln_q``/``ln_k``) and ``visual.ln_contrast``.
The feature is CONCH's ``encode_image(proj_contrast=False, normalize=False)``: the pooled,
layer-normed 512-d embedding *before* the contrastive projection (what HINGE/Stem use).
Input 448 px, normalised with the OpenAI CLIP mean/std. Accepted keys::

    visual.trunk.<the timm ViT keys above, without ls*.gamma>,
    visual.attn_pool_contrast.{query, ln_q.*, ln_k.*, attn.q_proj_weight, attn.k_proj_weight,
        attn.v_proj_weight, attn.in_proj_bias, attn.out_proj.{weight,bias}},
    visual.ln_contrast.{weight,bias}

The ``visual.`` prefix may be absent (a vision-only export). Keys of the rest of CoCa,
which the image embedding does not use, are ignored: ``visual.proj_contrast``,
``visual.attn_pool_caption.*``, ``visual.ln_caption.*``, ``text.*``, ``text_decoder.*``,
``logit_scale``. Anything else is an error that names the file and the offending keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Encoder, images_to_tensor, load_state_dict_file, strict_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    init_values: float | None = 1e-5  # layer scale; None = no ls1/ls2 parameters
    ln_eps: float = 1e-6


UNI_CONFIG = ViTConfig()
CONCH_TRUNK_CONFIG = ViTConfig(
    img_size=448, embed_dim=768, depth=12, num_heads=12, init_values=None
)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm-compatible ViT trunk (class token, absolute position embedding, pre-norm blocks).

    ``forward`` returns all tokens after the final norm, ``(N, 1 + grid**2, embed_dim)``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, cfg.embed_dim) * 0.02)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        # like timm's dynamic_img_size: resample the grid part bicubically
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

    def forward(self, x):
        h, w = x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self._pos_embed(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _normalize(images: np.ndarray, size: int, mean, std) -> torch.Tensor:
    x = images_to_tensor(images, size) / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class UNIEncoder(VisionTransformer, Encoder):
    """UNI: ViT-L/16 CLS token, 1024-d, 224 px, ImageNet normalisation."""

    name = "uni"

    def __init__(self, cfg: ViTConfig = UNI_CONFIG):
        VisionTransformer.__init__(self, cfg)
        self.dim = cfg.embed_dim
        self.input_size = cfg.img_size
        self.weights_digest = "random"

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        return _normalize(images, self.input_size, IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x):
        return VisionTransformer.forward(self, x)[:, 0]


class AttentionalPooler(nn.Module):
    """CoCa attentional pooler: learned queries cross-attend to the layer-normed tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)  # open_clip LayerNorm: eps 1e-5
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(len(x), -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


@dataclass
class ConchConfig:
    trunk: ViTConfig = None  # type: ignore[assignment]
    embed_dim: int = 512
    pool_heads: int = 8

    def __post_init__(self):
        if self.trunk is None:
            self.trunk = CONCH_TRUNK_CONFIG
        elif isinstance(self.trunk, dict):
            self.trunk = ViTConfig(**self.trunk)


class ConchEncoder(Encoder):
    """CONCH vision tower: ViT-B/16 at 448 px + attentional pooler, 512-d, no projection."""

    name = "conch"

    def __init__(self, cfg: ConchConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ConchConfig()
        self.trunk = VisionTransformer(cfg.trunk)
        self.attn_pool_contrast = AttentionalPooler(
            cfg.embed_dim, cfg.trunk.embed_dim, cfg.pool_heads, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(cfg.embed_dim)
        self.dim = cfg.embed_dim
        self.input_size = cfg.trunk.img_size
        self.weights_digest = "random"

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        return _normalize(images, self.input_size, OPENAI_MEAN, OPENAI_STD)

    def forward(self, x):
        tokens = self.trunk(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


# Parts of a full CoCa checkpoint that the image embedding does not use.
_CONCH_IGNORED_PREFIXES = (
    "proj_contrast",
    "attn_pool_caption.",
    "ln_caption.",
)
_COCA_NON_VISUAL_PREFIXES = ("text.", "text_decoder.", "logit_scale")


def conch_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a CONCH/CoCa checkpoint to the keys of :class:`ConchEncoder` (see module docstring)."""
    if any(k.startswith("visual.") for k in state):
        out = {}
        for k, v in state.items():
            if k.startswith("visual."):
                out[k[len("visual.") :]] = v
            elif not k.startswith(_COCA_NON_VISUAL_PREFIXES):
                out[k] = v  # left in so that strict loading reports it
        state = out
    return {k: v for k, v in state.items() if not k.startswith(_CONCH_IGNORED_PREFIXES)}


def _digest(path: Path) -> str:
    from .._cache import file_digest

    return file_digest(path)


def load_uni(weights: str | Path, *, config: ViTConfig | None = None) -> UNIEncoder:
    """Load UNI (ViT-L/16) from the user's ``pytorch_model.bin``/``.pth``/``.safetensors``.

    ``config`` overrides the architecture (tests use a tiny one with the same key names).
    """
    path = Path(weights)
    state = load_state_dict_file(path)
    model = UNIEncoder(config or UNI_CONFIG)
    strict_load(model, state, path, what="UNI (timm vit_large_patch16_224, init_values=1e-5)")
    model.weights_digest = _digest(path)
    return model.eval()


def load_conch(weights: str | Path, *, config: ConchConfig | None = None) -> ConchEncoder:
    """Load the CONCH vision tower from the user's CoCa checkpoint (or a vision-only export)."""
    path = Path(weights)
    state = conch_vision_state(load_state_dict_file(path))
    model = ConchEncoder(config)
    strict_load(model, state, path, what="CONCH vision tower (open_clip CoCa ViT-B/16)")
    model.weights_digest = _digest(path)
    return model.eval()


def n_tokens(cfg: ViTConfig) -> int:
    """Number of tokens (class + patches) of a trunk at its native size."""
    return 1 + (cfg.img_size // cfg.patch_size) ** 2


__all__ = [
    "CONCH_TRUNK_CONFIG",
    "ConchConfig",
    "ConchEncoder",
    "UNI_CONFIG",
    "UNIEncoder",
    "ViTConfig",
    "VisionTransformer",
    "conch_vision_state",
    "load_conch",
    "load_uni",
    "n_tokens",
]
