"""Masked diffusion in expression space: the mask schedule, kept apart from the network.

Time runs over ``t = 0..T`` (``T = 50``). At step ``t`` the first ``n(t) = floor(gamma(t) G)``
genes of a random per-sample order are *masked* (hold Gaussian noise), the rest are observed.
``n(0) = 0`` and ``n(T) = G``. With observed masks ``m_t`` (True = observed) the masks nest,
``m_{t-1} >= m_t``, and ``d_t = m_{t-1} & ~m_t`` are the genes revealed at step ``t``.

A per-sample order is held as ``ranks`` (B, G): the position of each gene in the order. Gene
``g`` is masked at ``t`` iff ``ranks[:, g] < n(t)``.

The default ``gamma`` is ``'poly_auto'``: ``gamma(t) = 1 - (1 - t/T)^a`` with
``a = log(K/G) / log(1/T)`` clipped to [1.05, 4] (``K = 1``), so that the first reverse step
reveals exactly K genes (methods.md 1.4). The other options are 'linear', 'cosine', 'sqrt',
'exp' (``beta``) and 'poly' (fixed ``alpha``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

GAMMAS = ("poly_auto", "poly", "linear", "cosine", "sqrt", "exp")
MASK_FILLS = ("gauss", "zero")


@dataclass
class Corruption:
    """One forward-corrupted batch: ``x_t``, observed masks ``m_t`` and ``m_prev`` (= m_{t-1}),
    ``reveal`` (= d_t) and the timesteps ``t``."""

    x_t: torch.Tensor
    m_t: torch.Tensor
    m_prev: torch.Tensor
    reveal: torch.Tensor
    t: torch.Tensor


@dataclass(eq=False)
class MaskSchedule:
    """How many genes are masked at each step, and the operations built on it.

    Parameters
    ----------
    n_genes
        Panel size G.
    num_steps
        T.
    gamma
        One of :data:`GAMMAS`.
    k_tail
        K of 'poly_auto': genes revealed by the first reverse step.
    poly_alpha, exp_beta
        Parameters of 'poly' and 'exp'.
    mask_fill
        'gauss' (masked entries hold N(0, 1) noise, the paper) or 'zero'.
    """

    n_genes: int
    num_steps: int = 50
    gamma: str = "poly_auto"
    k_tail: int = 1
    poly_alpha: float = 1.42
    exp_beta: float = 3.0
    mask_fill: str = "gauss"
    _table: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.gamma not in GAMMAS:
            raise ValueError(f"gamma must be one of {GAMMAS}, got {self.gamma!r}")
        if self.mask_fill not in MASK_FILLS:
            raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}")
        if self.n_genes < 1 or self.num_steps < 1:
            raise ValueError(f"need n_genes >= 1 and num_steps >= 1, got {self.n_genes}, "
                             f"{self.num_steps}")
        t = np.arange(self.num_steps + 1)
        # The epsilon keeps floor() from losing a gene to rounding (e.g. G (1/T)^a = 1 - 1e-15).
        n = np.floor(self.gamma_at(t) * self.n_genes + 1e-9).astype(np.int64)
        n = np.clip(n, 0, self.n_genes)
        n[0], n[-1] = 0, self.n_genes
        self._table = torch.from_numpy(np.maximum.accumulate(n))

    # -- the schedule -----------------------------------------------------------------------
    @property
    def exponent(self) -> float:
        """The polynomial exponent ``a`` ('poly_auto' and 'poly'), else NaN."""
        if self.gamma == "poly":
            return float(self.poly_alpha)
        if self.gamma == "poly_auto":
            if self.n_genes <= self.k_tail:
                return 1.05
            a = math.log(self.k_tail / self.n_genes) / math.log(1.0 / self.num_steps)
            return float(min(max(a, 1.05), 4.0))
        return float("nan")

    def gamma_at(self, t) -> np.ndarray:
        """Masked fraction ``gamma(t)`` in [0, 1] for integer or real ``t``."""
        s = np.clip(np.asarray(t, dtype=np.float64) / self.num_steps, 0.0, 1.0)
        if self.gamma in ("poly_auto", "poly"):
            return 1.0 - (1.0 - s) ** self.exponent
        if self.gamma == "linear":
            return s
        if self.gamma == "cosine":
            return 1.0 - np.cos(0.5 * np.pi * s)
        if self.gamma == "sqrt":
            return np.sqrt(s)
        return np.expm1(self.exp_beta * s) / np.expm1(self.exp_beta)  # 'exp'

    @property
    def n_masked_table(self) -> torch.Tensor:
        """``n(t)`` for ``t = 0..T`` (LongTensor of length T + 1)."""
        return self._table

    def n_masked(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        return self._table.to(t.device)[t]

    def revealing_steps(self) -> torch.Tensor:
        """The steps ``t`` in 1..T whose reverse step reveals at least one gene."""
        return (self._table[1:] > self._table[:-1]).nonzero().flatten() + 1

    def t_cap(self, ratio: float = 0.2) -> int:
        """Largest ``t`` with ``n(t) <= ratio * G`` (warm-start range 1..t_cap), at least 1."""
        ok = (self._table <= ratio * self.n_genes).nonzero().flatten()
        return max(1, int(ok.max()))

    def time_grid(self, steps: int | None = None) -> list[int]:
        """Descending timesteps ``[T, ..., 0]`` for a sampler with ``steps`` reveal steps
        (``None`` or ``T``: every step). Steps that would reveal no gene are merged."""
        T = self.num_steps
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"reveal steps must be in 1..{T}, got {steps}")
        grid = np.unique(np.round(np.linspace(0, T, steps + 1)).astype(np.int64))[::-1]
        keep = [int(grid[0])]
        for t in grid[1:]:
            # Equal n(t) means the same state; keep the lowest such t, the one whose step
            # reveals genes in training (d_t non-empty).
            if self._table[int(t)] == self._table[keep[-1]]:
                keep[-1] = int(t)
            else:
                keep.append(int(t))
        return keep

    # -- masks and corruption -----------------------------------------------------------------
    def random_ranks(self, batch: int, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
        """A fresh random gene order per sample, as ranks (B, G)."""
        dev = generator.device if generator is not None else device
        keys = torch.rand(batch, self.n_genes, generator=generator, device=dev)
        return keys.argsort(dim=1).argsort(dim=1).to(device if device is not None else dev)

    def observed(self, ranks: torch.Tensor, t) -> torch.Tensor:
        """Observed mask ``m_t`` (B, G) bool for a scalar ``t`` or per-sample ``t`` (B,)."""
        n = self.n_masked(torch.as_tensor(t, device=ranks.device))
        if n.ndim == 1:
            n = n[:, None]
        return ranks >= n

    def fill(self, shape, *, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """What masked entries hold: N(0, 1) noise ('gauss') or zeros."""
        if self.mask_fill == "zero":
            return torch.zeros(shape, device=device)
        dev = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=dev).to(device or dev)

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, *, ranks: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> Corruption:
        """Forward corruption ``x_t = m_t x0 + (1 - m_t) noise`` at per-sample steps ``t`` (B,)."""
        t = torch.as_tensor(t, dtype=torch.long, device=x0.device)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        if int(t.min()) < 1 or int(t.max()) > self.num_steps:
            raise ValueError(f"timesteps must lie in 1..{self.num_steps}")
        if ranks is None:
            ranks = self.random_ranks(x0.shape[0], generator=generator, device=x0.device)
        m_t = self.observed(ranks, t)
        m_prev = self.observed(ranks, t - 1)
        noise = self.fill(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
        x_t = torch.where(m_t, x0, noise)
        return Corruption(x_t=x_t, m_t=m_t, m_prev=m_prev, reveal=m_prev & ~m_t, t=t)

    def sample_timesteps(self, batch: int, *, warm: bool = False, warmup_ratio: float = 0.2,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform ``t`` in 1..T, or in 1..t_cap(warmup_ratio) during the warm-start epochs."""
        high = self.t_cap(warmup_ratio) if warm else self.num_steps
        return torch.randint(1, high + 1, (batch,), generator=generator)


def masked_diffusion_loss(x0_hat: torch.Tensor, x0: torch.Tensor,
                          reveal: torch.Tensor) -> torch.Tensor:
    """``sum((x0_hat - x0)^2 * d_t) / sum(d_t)`` over the batch (MSE on the genes revealed now)."""
    d = reveal.to(x0_hat.dtype)
    return ((x0_hat - x0) ** 2 * d).sum() / d.sum().clamp_min(1.0)


def revealed_gaussian_nll(logvar: torch.Tensor, x0_hat: torch.Tensor, x0: torch.Tensor,
                          reveal: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood (without the constant) of the revealed genes around
    the *detached* mean: it trains the variance head only, so the mean's objective stays the
    MSE above."""
    d = reveal.to(logvar.dtype)
    err2 = (x0 - x0_hat.detach()) ** 2
    nll = 0.5 * (logvar + err2 * torch.exp(-logvar))
    return (nll * d).sum() / d.sum().clamp_min(1.0)
