"""Noise schedule (training) and DDIM sampler (inference), apart from any network.

- Cosine schedule (Nichol & Dhariwal 2021) over ``T`` discrete steps, ``alpha_bar`` clipped
  away from 0 so the last step still carries a trace of signal.
- **v-prediction** (Salimans & Ho 2022): the network predicts ``v = a * eps - s * x0`` with
  ``a = sqrt(alpha_bar)``, ``s = sqrt(1 - alpha_bar)``. It stays well-conditioned at both ends
  of the schedule, which matters with few DDIM steps and small networks.
- Deterministic DDIM (eta = 0 by default) over an evenly spaced subset of the T steps, with
  classifier-free guidance: ``v = v_uncond + w * (v_cond - v_uncond)`` (``w = 1``: purely
  conditional; ``w > 1`` pushes samples toward their condition).

The model is any callable ``model(x, t, cond) -> v``; ``cond=None`` asks for the unconditional
prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class NoiseSchedule:
    """Discrete cosine schedule with ``T`` steps (``alpha_bar[t]`` for t = 0..T-1)."""

    T: int = 1000
    s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self) -> None:
        if self.T < 2:
            raise ValueError(f"a noise schedule needs T >= 2 steps, got {self.T}")
        f = lambda t: math.cos((t / self.T + self.s) / (1 + self.s) * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f(i + 1) / f(i), self.max_beta) for i in range(self.T)]
        self.alpha_bar = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float()

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`` shaped ``(B, 1, 1, 1)``."""
        ab = self.alpha_bar.to(t.device)[t.long()]
        return ab.sqrt()[:, None, None, None], (1 - ab).sqrt()[:, None, None, None]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t)
        return a * x0 + s * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t)
        return a * noise - s * x0

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        return torch.randint(0, self.T, (n,), generator=generator, device=device)

    def training_loss(self, model: Callable, x0: torch.Tensor, cond=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error of the v-prediction at uniformly drawn timesteps."""
        t = self.sample_timesteps(len(x0), generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        xt = self.add_noise(x0, noise, t)
        v = model(xt, t, cond)
        return torch.mean((v.float() - self.v_target(x0, noise, t)) ** 2)

    def ddim_timesteps(self, steps: int, strength: float = 1.0) -> list[int]:
        """``steps`` evenly spaced training steps from ``strength * (T - 1)`` (1: the noisiest)
        down to 0."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in 1..{self.T}, got {steps}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        start = strength * (self.T - 1)
        return [int(round(x)) for x in torch.linspace(start, 0, steps).tolist()]


def ddim_sample_iter(model: Callable, schedule: NoiseSchedule, shape: tuple[int, ...], *,
                     cond=None, guidance: float = 1.0, steps: int = 25, eta: float = 0.0,
                     generator: torch.Generator | None = None, device=None,
                     x_init: torch.Tensor | None = None, strength: float = 1.0,
                     clip: float | None = 1.0) -> Iterator[tuple[int, torch.Tensor]]:
    """DDIM with classifier-free guidance, one yield per step: ``(step_index, x)``; the last
    ``x`` is the sample (each step's ``x0`` estimate clipped to ``[-clip, clip]``; ``None``
    for a latent code, which has no hard range).

    Parameters
    ----------
    model
        ``model(x, t, cond) -> v``; called with ``cond=None`` for the unconditional branch.
    cond
        Condition passed to the model (``None``: unconditional sampling, no guidance).
    guidance
        CFG scale ``w``; 1 = plain conditional, 0 = unconditional.
    steps
        Number of DDIM steps (evenly spaced over the schedule).
    eta
        0 = deterministic DDIM; 1 = DDPM-like noise.
    x_init, strength
        Edit instead of generate (SDEdit, Meng et al. 2022): ``x_init`` (clean, ``shape``) is
        noised to step ``strength * (T - 1)`` and denoised from there; a low strength keeps
        its layout and texture, 1 keeps nothing of it.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    ab_all = schedule.alpha_bar.to(device)
    ts = schedule.ddim_timesteps(steps, strength if x_init is not None else 1.0)
    x = torch.randn(shape, generator=generator).to(device)
    if x_init is not None:
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}")
        ab = ab_all[ts[0]]
        x = ab.sqrt() * x_init.to(device) + (1 - ab).sqrt() * x
    guided = cond is not None and guidance != 1.0
    for i, t in enumerate(ts):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        if cond is None:
            v = model(x, tt, None)
        elif guided:
            v_c, v_u = model(x, tt, cond), model(x, tt, None)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x, tt, cond)
        v = v.float()
        ab = ab_all[t]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = a * x - s * v
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        eps = (x - a * x0) / s.clamp_min(1e-8)
        if i == len(ts) - 1:
            x = x0
        else:
            ab_prev = ab_all[ts[i + 1]]
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp_min(0).sqrt()
            direction = (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            x = ab_prev.sqrt() * x0 + direction
            if eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(device)
        yield i, x


def ddim_sample(model: Callable, schedule: NoiseSchedule, shape: tuple[int, ...],
                **kwargs) -> torch.Tensor:
    """The final sample of :func:`ddim_sample_iter`."""
    x = None
    for _, x_i in ddim_sample_iter(model, schedule, shape, **kwargs):
        x = x_i
    return x


def to_uint8(x: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1
