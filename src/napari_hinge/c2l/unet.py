"""A small pixel-space UNet for 64 px H&E patches, in plain PyTorch.

Readable top to bottom (nanoGPT style). Design choices, all for a CPU budget of minutes:

- a space-to-depth stem (``pixel_unshuffle``, 4x4 by default): the network works at 16x16 with
  48 input channels and returns to 64x64 with ``pixel_shuffle``; this cuts the cost of the
  full-resolution levels ~16x (the trick of "simple diffusion") while keeping every pixel
  (measured here: 2x2 stem ~9 s per batch-32 step on the shared CPU, 4x4 stem ~2.5 s);
- one residual block per level down and up, GroupNorm + SiLU, sinusoidal time embedding added
  after the first convolution of each block;
- self-attention only at the coarse levels (8x8 and 4x4 tokens, cheap);
- every residual block accepts an optional per-channel modulation ``(scale, shift)`` applied
  after its second normalisation as ``h * (1 + scale) + shift``: the hook the local
  (gene-conditioned) model uses for FiLM; without it the block is the plain central network.

``diffusers`` (UNet2DModel) would pull nine more packages (huggingface_hub, httpx, ...) into the
plugin's dependencies; this file is ~200 lines and has the same shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet` (serialised with the model)."""

    image_size: int = 64
    in_channels: int = 3
    stem: int = 4  # space-to-depth factor: the UNet runs at 16x16 for 64 px patches
    channels: tuple[int, ...] = (64, 96, 128)
    attention_levels: tuple[int, ...] = (1, 2)  # indices into channels (8x8 and 4x4)
    time_dim: int = 128
    groups: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(int(i) for i in self.attention_levels)
        side = self.image_size // self.stem
        if self.image_size % self.stem or side % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"image_size {self.image_size} does not divide by the stem and "
                             f"{len(self.channels) - 1} downsamplings")
        for c in self.channels:
            if c % self.groups:
                raise ValueError(f"channels {self.channels} must be multiples of groups "
                                 f"{self.groups}")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (continuous or integer) timesteps, ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time added in between, optional FiLM after the 2nd norm.

    ``time_dim=0`` makes a plain residual block (the autoencoder's), called with ``temb=None``.
    """

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.out_channels = c_out

    def forward(self, x, temb=None, mod=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]
        h = self.norm2(h)
        if mod is not None:
            scale, shift = mod
            h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """Predicts the diffusion target (v) from a noisy image ``x`` (B, 3, S, S) in [-1, 1]
    and timesteps ``t`` (B,).

    ``modulations`` is ``None`` or one ``(scale, shift)`` pair (each ``(B, C)``) per residual
    block, in :attr:`blocks` order; ``n_blocks`` and :attr:`block_channels` say how many and
    how wide.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        td = cfg.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        c0 = cfg.channels[0]
        self.stem = nn.Conv2d(cfg.in_channels * cfg.stem**2, c0, 3, padding=1)
        blk = lambda a, b: ResBlock(a, b, td, cfg.groups, cfg.dropout)  # noqa: E731
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = []
        c = c0
        for i, ch in enumerate(cfg.channels):
            self.down.append(blk(c, ch))
            self.down_attn.append(Attention(ch, cfg.groups) if i in cfg.attention_levels
                                  else nn.Identity())
            skips.append(ch)
            c = ch
            last = i == len(cfg.channels) - 1
            self.downsample.append(nn.Identity() if last
                                   else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = blk(c, c)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, ch in reversed(list(enumerate(cfg.channels))):
            self.up.append(blk(c + skips[i], ch))
            self.up_attn.append(Attention(ch, cfg.groups) if i in cfg.attention_levels
                                else nn.Identity())
            c = ch
            self.upsample.append(nn.Identity() if i == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, cfg.channels[i - 1], 3, padding=1)))
            if i > 0:
                c = cfg.channels[i - 1]
        self.out_norm = nn.GroupNorm(cfg.groups, c0)
        self.out = nn.Conv2d(c0, cfg.in_channels * cfg.stem**2, 3, padding=1)
        # Zero output: the untrained network predicts 0, a stable start for v-prediction.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def blocks(self) -> list[ResBlock]:
        """The residual blocks in the order ``modulations`` are consumed."""
        return [*self.down, self.mid, *self.up]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block_channels(self) -> list[int]:
        return [b.out_channels for b in self.blocks]

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(timestep_embedding(t, self.config.time_dim))

    def forward(self, x, t, modulations=None, temb=None):
        temb = self.time_embedding(t) if temb is None else temb
        mods = list(modulations) if modulations is not None else [None] * self.n_blocks
        if len(mods) != self.n_blocks:
            raise ValueError(f"expected {self.n_blocks} modulations, got {len(mods)}")
        h = self.stem(F.pixel_unshuffle(x, self.config.stem))
        k = 0
        skips = []
        for block, attn, down in zip(self.down, self.down_attn, self.downsample, strict=True):
            h = attn(block(h, temb, mods[k]))
            k += 1
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb, mods[k])
        k += 1
        for block, attn, up in zip(self.up, self.up_attn, self.upsample, strict=True):
            h = attn(block(torch.cat([h, skips.pop()], dim=1), temb, mods[k]))
            k += 1
            h = up(h)
        h = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(h, self.config.stem)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
