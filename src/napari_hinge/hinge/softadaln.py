"""SoftAdaLN: condition a frozen post-norm transformer block from outside.

HINGE turns each pre-trained block ``x <- norm1(alpha x + attn(x)); x <- norm2(alpha x + ffn(x))``
into

    z = SoftPreNorm(x);  h = shift + (1 + scale) * z
    x <- norm1(alpha x + sigmoid(gate) * attn(h))        (and the same for the FFN with norm2)

where ``(shift, scale, gate)`` for both sub-layers come from an :class:`Ada6Head` on the
condition vector ``c``. ``SoftPreNorm(x) = (1 - lam) x + lam LN(x)`` with ``lam = sigmoid(b)``,
``b`` initialised to -12, so the pre-norm starts as (almost) the identity. The head's weights
start at zero and its gate biases at +6, so at initialisation the wrapped block *is* the
pre-trained block up to ``sigmoid(6) = 0.9975`` on the residual branch (methods.md 1.3).

The wrapped block and decoder are *referenced*, not registered as sub-modules: their
parameters stay owned by the backbone (frozen, saved with it), while a wrapper's own
``parameters()`` are exactly its trainable modulation. Move the backbone to a device yourself
when you use a wrapper on its own (``HingeModel.to`` moves both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from napari_hinge.scfm.base import PostNormBlock

GATE_MODES = ("sigmoid", "linear")


class SoftPreNorm(nn.Module):
    """``(1 - lam) x + lam LayerNorm_noaffine(x)``, ``lam = sigmoid(logit)`` (one trainable scalar).

    Parameters
    ----------
    dim
        Feature size of ``x`` (last axis).
    init_logit
        Initial ``logit``; -12 gives ``lam ~ 6e-6`` (nearly the identity). ``-inf`` gives exactly
        the identity.
    eps
        LayerNorm epsilon.
    """

    def __init__(self, dim: int, init_logit: float = -12.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.logit = nn.Parameter(torch.tensor(float(init_logit)))

    @property
    def lam(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.logit).to(x.dtype)
        # (1 - lam) x + lam LN(x) in one pass over x (lerp: exactly x when lam = 0)
        return torch.lerp(x, F.layer_norm(x, (self.dim,), eps=self.eps), lam)

    def extra_repr(self) -> str:
        return f"{self.dim}, lam={self.lam.item():.3g}"


class AdaHead(nn.Module):
    """``SiLU(c) -> Linear(d_cond -> n * d_model)`` (or a low-rank ``d_cond -> r -> n * d_model``),
    split into ``n`` chunks of ``(B, 1, d_model)``.

    The output projection starts at zero weight and zero bias, except the chunks named in
    ``gate_chunks`` whose bias starts at ``gate_bias``: at initialisation every shift and scale is
    0 and every gate is constant. With ``rank`` the first projection is Xavier-uniform (no bias)
    and the second is zero-initialised, so the identity start is kept and the head costs
    ``r (d_cond + n d_model)`` parameters instead of ``n d_cond d_model``.
    """

    def __init__(self, d_cond: int, d_model: int, n_chunks: int, *, rank: int | None = None,
                 gate_chunks: tuple[int, ...] = (), gate_bias: float = 6.0) -> None:
        super().__init__()
        if rank is not None and rank < 1:
            raise ValueError(f"AdaHead rank must be a positive integer or None, got {rank}")
        self.n_chunks = n_chunks
        self.d_model = d_model
        self.rank = rank
        if rank is None:
            self.down = None
            self.proj = nn.Linear(d_cond, n_chunks * d_model)
        else:
            self.down = nn.Linear(d_cond, rank, bias=False)
            nn.init.xavier_uniform_(self.down.weight)
            self.proj = nn.Linear(rank, n_chunks * d_model)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            self.proj.bias.zero_()
            for k in gate_chunks:
                self.proj.bias[k * d_model:(k + 1) * d_model] = gate_bias

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = F.silu(c)
        if self.down is not None:
            h = self.down(h)
        return self.proj(h).unsqueeze(1).chunk(self.n_chunks, dim=-1)


class Ada6Head(AdaHead):
    """(shift_a, scale_a, gate_a, shift_f, scale_f, gate_f) for one block; gate biases at +6."""

    def __init__(self, d_cond: int, d_model: int, *, rank: int | None = None,
                 gate_bias: float = 6.0) -> None:
        super().__init__(d_cond, d_model, 6, rank=rank, gate_chunks=(2, 5), gate_bias=gate_bias)


def _residual(block: PostNormBlock, x: torch.Tensor) -> torch.Tensor:
    return x if block.alpha == 1 else block.alpha * x


def _gate(g: torch.Tensor, mode: str) -> torch.Tensor:
    return torch.sigmoid(g) if mode == "sigmoid" else g


class SoftAdaLNBlock(nn.Module):
    """A :class:`~napari_hinge.scfm.base.PostNormBlock` conditioned by SoftAdaLN.

    Parameters
    ----------
    block
        The pre-trained block; its ``attn``, ``ffn``, ``norm1``, ``norm2`` and ``alpha`` are used
        as they are (referenced, not copied or registered).
    d_cond
        Size of the condition vector ``c``.
    rank
        ``None`` for the full Ada6Head of the paper, else a low-rank head of this rank.
    gate
        ``'sigmoid'`` (paper default, bias +6) or ``'linear'`` (the gate is used as is; give
        ``gate_bias=1`` for an exact identity start).
    gate_bias, prenorm_logit
        Initial gate bias and SoftPreNorm logit.
    """

    def __init__(self, block: PostNormBlock, d_cond: int, *, rank: int | None = None,
                 gate: str = "sigmoid", gate_bias: float = 6.0,
                 prenorm_logit: float = -12.0) -> None:
        super().__init__()
        if gate not in GATE_MODES:
            raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
        if not isinstance(block, PostNormBlock):
            raise TypeError(f"SoftAdaLNBlock wraps a PostNormBlock, got {type(block).__name__}")
        d_model = block.norm1.normalized_shape[-1]
        self._block = (block,)  # a tuple keeps it out of this module's parameters/state_dict
        self.gate = gate
        self.head = Ada6Head(d_cond, d_model, rank=rank, gate_bias=gate_bias)
        self.norm_attn = SoftPreNorm(d_model, prenorm_logit)
        self.norm_ffn = SoftPreNorm(d_model, prenorm_logit)

    @property
    def block(self) -> PostNormBlock:
        return self._block[0]

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        blk = self.block
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.head(c)
        # addcmul(a, b, c) = a + b * c: one pass over the (B, L, D) tokens instead of two
        h = torch.addcmul(shift_a, self.norm_attn(x), 1 + scale_a)
        x = blk.norm1(torch.addcmul(_residual(blk, x), _gate(gate_a, self.gate),
                                    blk.attn(h, hidden)))
        h = torch.addcmul(shift_f, self.norm_ffn(x), 1 + scale_f)
        return blk.norm2(torch.addcmul(_residual(blk, x), _gate(gate_f, self.gate), blk.ffn(h)))


class ModulatedDecoder(nn.Module):
    """``decoder(SoftPreNorm(h) * (1 + scale) + shift)`` with (shift, scale) from a zero-init head.

    ``decoder`` (the backbone's ``value_decoder``) is referenced, not registered.
    """

    def __init__(self, decoder: nn.Module, d_model: int, d_cond: int, *,
                 rank: int | None = None, prenorm_logit: float = -12.0,
                 predict_variance: bool = False) -> None:
        super().__init__()
        self._decoder = (decoder,)
        self.head = AdaHead(d_cond, d_model, 2, rank=rank)
        self.norm = SoftPreNorm(d_model, prenorm_logit)
        # log-variance per token from the same modulated input; starts at log(1) everywhere
        self.logvar = nn.Linear(d_model, 1) if predict_variance else None
        if self.logvar is not None:
            nn.init.zeros_(self.logvar.weight)
            nn.init.zeros_(self.logvar.bias)

    @property
    def decoder(self) -> nn.Module:
        return self._decoder[0]

    def forward(self, h: torch.Tensor, c: torch.Tensor, *, return_logvar: bool = False):
        shift, scale = self.head(c)
        z = torch.addcmul(shift, self.norm(h), 1 + scale)
        out = self.decoder(z)
        if not return_logvar:
            return out
        if self.logvar is None:
            raise ValueError("this decoder has no variance head (predict_variance=False)")
        return out, self.logvar(z).squeeze(-1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT sinusoid ``[cos(t f), sin(t f)]``, ``f_i = max_period^(-2i / dim)``; (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))
    for layer in (mlp[0], mlp[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    return mlp


class CondNet(nn.Module):
    """``c = MLP_t(sinusoid(t)) + MLP_img(features) + MLP_mask(m_prev)``, each MLP
    Linear -> SiLU -> Linear to ``d_model`` (Xavier-uniform weights, zero biases).

    ``m_prev`` is the observed-gene mask of the *next* state (the genes revealed after this
    step), a (B, G) {0, 1} input.
    """

    def __init__(self, d_model: int, n_genes: int, feature_dim: int, *, t_dim: int = 256,
                 max_period: float = 10000.0) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.max_period = max_period
        self.mlp_t = _mlp(t_dim, d_model)
        self.mlp_img = _mlp(feature_dim, d_model)
        self.mlp_mask = _mlp(n_genes, d_model)

    def forward(self, t: torch.Tensor, features: torch.Tensor,
                m_prev: torch.Tensor, *, image_code: bool = False) -> torch.Tensor:
        """``image_code``: ``features`` are already ``mlp_img[0](features)`` (the dense
        slide path projects its feature maps through that linear layer once)."""
        temb = timestep_embedding(t, self.t_dim, self.max_period).to(features.dtype)
        img = self.mlp_img[1:](features) if image_code else self.mlp_img(features)
        return self.mlp_t(temb) + img + self.mlp_mask(m_prev.to(features.dtype))
