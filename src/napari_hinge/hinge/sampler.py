"""Reverse masked diffusion: draw expression samples per spot, return their mean and spread.

Each sample starts from ``x_T`` = noise with every gene masked and a fresh random gene order;
for each step ``t -> t'`` of the time grid (``T..0``, or ``reveal_steps`` steps over the same
gamma),

    x0_hat = model(x_t, t, m_t', m_t, features)
    x_t'   = m_t x_t + d x0_hat + (1 - m_t') fresh noise,        d = m_t' & ~m_t

so the genes revealed at a step keep the value predicted then (methods.md 1.8). A model with a
variance head (``config.predict_variance``) draws each revealed gene from
``N(x0_hat, exp(logvar))`` instead, so later genes are conditioned on sampled values and the S
samples spread as the model believes they should. The prediction is the mean over samples of
the revealed genes' conditional means (``x0_hat`` when revealed: the same mean with less Monte
Carlo noise than the mean of the drawn values), their standard deviation the uncertainty. A
model with a prior (``config.prior``) samples the residual: every sample is the spot's prior
(of the mean of its views) plus ``config.residual_scale`` times the sampled residual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from napari_hinge.device import autocast

from .defaults import SAMPLER
from .model import HingeModel


class SampleResult(NamedTuple):
    """``mean`` and ``std`` (N, G) over the samples; ``samples`` (N, S, G) when asked for;
    ``prior`` (N, G) the deterministic prior they refine (zeros without one, None for image
    codes: the caller adds its own)."""

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor | None
    prior: torch.Tensor | None = None


def _as_views(features, n_features: int) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    f = f.float()
    if f.ndim == 2:
        f = f.unsqueeze(0)
    if f.ndim != 3 or f.shape[-1] != n_features:
        raise ValueError(f"features must be (N, {n_features}) or (K, N, {n_features}), "
                         f"got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    return f


@torch.no_grad()
def sample(model: HingeModel, features, *, n_samples: int = SAMPLER["n_samples"],
           reveal_steps: int | None = SAMPLER["reveal_steps"],
           batch_size: int | None = None, seed: int = 0, generator: torch.Generator | None = None,
           return_samples: bool = False, device: str | torch.device | None = None,
           progress: Callable[[int, int], None] | None = None,
           image_code: bool = False) -> SampleResult:
    """Sample ``n_samples`` expression vectors per spot.

    Parameters
    ----------
    model
        A :class:`~napari_hinge.hinge.model.HingeModel`.
    features
        (N, F) image features, or (K, N, F) views of each spot (sample ``s`` uses view ``s % K``:
        test-time augmentation for free).
    n_samples
        S, samples per spot.
    reveal_steps
        Number of reverse steps (default :data:`~napari_hinge.defaults.SAMPLER`; ``None``: all
        T). Fewer steps reveal several genes at once over
        the same gamma (a sub-sampled time grid).
    batch_size
        Rows (spot x sample) per forward pass; whole spots are kept in one batch. ``None``: 64 on
        the CPU (small batches stay in cache: measured fastest on one thread), 1024 on CUDA.
    seed, generator
        Randomness: a ``torch.Generator`` on the sampling device, or one seeded with ``seed``.
        The result is deterministic for the same seed, batch size and device.
    return_samples
        Also return all samples (N, S, G).
    device
        Where to run (default: the model's device). bf16 autocast on CUDA.
    progress
        Called with ``(spots_done, n_spots)`` after each batch.
    image_code
        ``features`` are image codes (N, d_model) (:meth:`HingeModel.image_linear`'s last
        d columns, as the dense slide path computes them); the prior is then left out (the
        caller adds its own) and the result is ``residual_scale`` times the residual.

    Returns
    -------
    SampleResult
        ``(mean, std, samples)`` on the CPU, float32; ``std`` is the population standard
        deviation over the samples (0 when ``n_samples == 1``).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if batch_size is None:
        batch_size = 1024 if device.type == "cuda" else 64
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    views = _as_views(features, model.cond.mlp_img[0].out_features if image_code
                      else model.config.feature_dim)
    K, N, _ = views.shape
    G, S = model.n_genes, n_samples
    sched = model.schedule
    grid = sched.time_grid(reveal_steps)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    stochastic = bool(model.config.predict_variance)
    code_kw = {"image_code": True} if image_code else {}  # plain calls stay plain
    spots_per_batch = max(1, batch_size // S)
    means, stds, all_samples, priors = [], [], [], []
    view_of = torch.arange(S) % K
    try:
        for start in range(0, N, spots_per_batch):
            idx = torch.arange(start, min(N, start + spots_per_batch))
            n = len(idx)
            # rows are spot-major: row i * S + s is sample s of spot idx[i]
            feats = views[view_of.repeat(n), idx.repeat_interleave(S)].to(device)
            rows = n * S
            ranks = sched.random_ranks(rows, generator=generator, device=device)
            x = sched.fill((rows, G), generator=generator, device=device)
            cond_mean = torch.zeros_like(x)
            for t, t_next in zip(grid[:-1], grid[1:], strict=True):
                m_t = sched.observed(ranks, t)
                m_next = sched.observed(ranks, t_next)
                tt = torch.full((rows,), t, device=device, dtype=torch.long)
                logvar = None
                with autocast(device):
                    if stochastic:
                        x0_hat, logvar = model(x, tt, m_next, m_t, feats, return_logvar=True,
                                               **code_kw)
                        logvar = logvar.float()
                    else:
                        x0_hat = model(x, tt, m_next, m_t, feats, **code_kw)
                x0_hat = x0_hat.float()
                reveal = m_next & ~m_t
                value = x0_hat
                if logvar is not None:
                    eps = torch.randn(x.shape, generator=generator, device=generator.device)
                    value = x0_hat + torch.exp(0.5 * logvar) * eps.to(device)
                if t_next > 0:
                    fresh = sched.fill((rows, G), generator=generator, device=device)
                else:  # every gene is revealed now: no noise left to draw
                    fresh = torch.zeros_like(x)
                cond_mean = torch.where(reveal, x0_hat, cond_mean)
                x = torch.where(m_t, x, torch.where(reveal, value, fresh))
            if image_code:  # the caller adds its own prior
                prior = torch.zeros(n, G)
            else:  # the prior of the mean of the standardised views
                z = model.standardize(views[:, idx].to(device)).mean(0)
                prior = model.prior_mean(z, standardized=True).float().cpu()
            lam = float(model.config.residual_scale) if model.config.prior else 1.0
            xs = x.view(n, S, G).cpu()
            mean = cond_mean.view(n, S, G).cpu().mean(1)
            if lam != 1.0:
                xs, mean = lam * xs, lam * mean
            xs = xs + prior[:, None]
            means.append(mean + prior)
            priors.append(prior)
            stds.append(xs.std(1, correction=0))
            if return_samples:
                all_samples.append(xs)
            if progress is not None:
                progress(start + n, N)
    finally:
        model.train(was_training)
    return SampleResult(
        mean=torch.cat(means),
        std=torch.cat(stds),
        samples=torch.cat(all_samples) if return_samples else None,
        prior=None if image_code else torch.cat(priors),
    )
