"""The local model: a frozen central model plus zero-initialised gene-conditioned FiLM.

A gene-expression encoder (an MLP over the standardised ``log1p`` CP10k vector of a gene panel)
gives a condition embedding ``e``; with the central network's own timestep embedding it feeds
one zero-initialised linear head per residual block that outputs a per-channel ``(scale,
shift)`` applied as ``h * (1 + scale) + shift`` after the block's second normalisation
(FiLM / AdaLN-zero style). At initialisation every head outputs 0, so the local model *is* the
central model; training moves only the encoder and the heads, from a small number of paired
spots of one slide.

Classifier-free guidance: during training the condition is replaced by a learned null
embedding with probability ``cond_drop``; sampling mixes the two branches
(:func:`napari_hinge.c2l.schedule.ddim_sample_iter`).

Folder layout written by :meth:`LocalModel.save`: ``config.json`` + ``model.safetensors`` (the
adapter and the expression statistics) and ``central/`` (the frozen central model it adapts,
so a local model folder is self-contained).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_hinge.persistence import WEIGHTS_FILE, ModelFormat, config_from_dict, load_state_strict

from .central import CentralModel
from .schedule import ddim_sample_iter, from_uint8, to_uint8

CENTRAL_SUBDIR = "central"


@dataclass
class LocalConfig:
    """The adapter of a local model."""

    genes: list[str] = field(default_factory=list)
    hidden: int = 256
    cond_drop: float = 0.1
    #: where the central weights came from ('shipped' or a folder); informational
    central_ref: str = "shipped"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LocalConfig:
        """Strict: unknown keys raise :class:`~napari_hinge.errors.InputError`."""
        return config_from_dict(cls, data, where="C2L local config")


FORMAT = ModelFormat("c2l-local", 2, LocalConfig, title="C2L local")


class LocalModel(nn.Module):
    """``model(x, t, expression_or_None) -> v`` with the central weights frozen."""

    def __init__(self, central: CentralModel, config: LocalConfig):
        super().__init__()
        if not config.genes:
            raise ValueError("a local model needs a non-empty gene panel")
        if len(set(config.genes)) != len(config.genes):
            raise ValueError("the gene panel has duplicate names")
        self.config = config
        self.central = central
        for p in self.central.parameters():
            p.requires_grad_(False)
        g, h = len(config.genes), int(config.hidden)
        unet = central.unet
        self.register_buffer("expr_mean", torch.zeros(g))
        self.register_buffer("expr_std", torch.ones(g))
        self.gene_encoder = nn.Sequential(nn.Linear(g, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                                          nn.Linear(h, h))
        self.null = nn.Parameter(torch.zeros(h))
        self.time_proj = nn.Linear(unet.config.time_dim, h)
        self.film = nn.ModuleList(nn.Linear(h, 2 * c) for c in unet.block_channels)
        for head in self.film:  # zero init: at step 0 the local model is the central model
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @property
    def schedule(self):
        return self.central.schedule

    @property
    def genes(self) -> list[str]:
        return list(self.config.genes)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("central.")]

    def set_expression_stats(self, expression: np.ndarray) -> None:
        """Standardise the encoder's input with the training spots' mean/std per gene."""
        e = np.asarray(expression, dtype=np.float64)
        std = e.std(0)
        self.expr_mean.copy_(torch.as_tensor(e.mean(0), dtype=torch.float32))
        self.expr_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def embed(self, expression: torch.Tensor | None, batch: int,
              drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition embedding ``(B, hidden)``; ``None`` or ``drop`` rows give the null one."""
        null = self.null[None].expand(batch, -1)
        if expression is None:
            return null
        expression = expression.to(self.expr_mean.device, torch.float32)
        if expression.shape != (batch, len(self.config.genes)):
            raise ValueError(f"expression must be ({batch}, {len(self.config.genes)}), got "
                             f"{tuple(expression.shape)}")
        e = self.gene_encoder((expression - self.expr_mean) / self.expr_std)
        if drop is not None:
            e = torch.where(drop[:, None], null, e)
        return e

    def forward(self, x, t, cond=None, drop: torch.Tensor | None = None):
        unet = self.central.unet
        temb = unet.time_embedding(t)
        h = F.silu(self.embed(cond, len(x), drop) + self.time_proj(temb))
        mods = [tuple(head(h).chunk(2, dim=-1)) for head in self.film]
        return unet(x, t, mods, temb=temb)

    def training_loss(self, x0: torch.Tensor, expression: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """v-prediction MSE with condition dropout (``cond_drop``) for guidance."""
        drop = torch.rand(len(x0), generator=generator).to(x0.device) < self.config.cond_drop
        return self.schedule.training_loss(
            lambda x, t, c: self(x, t, c, drop=drop), x0, expression, generator)

    def sample_iter(self, expression, *, guidance: float = 2.0, steps: int = 25, seed: int = 0,
                    batch_size: int = 32, device=None, init=None, strength: float = 1.0):
        """Generator form of :meth:`sample`: yields ``(done, total)`` denoising steps (counted
        per patch) and returns the ``(N, S, S, 3)`` uint8 patches."""
        expr = torch.as_tensor(np.asarray(expression, dtype=np.float32))
        if expr.ndim != 2 or expr.shape[1] != len(self.config.genes):
            raise ValueError(f"expression must be (N, {len(self.config.genes)}) over the local "
                             f"model's genes, got {tuple(expr.shape)}")
        if init is not None:
            init = from_uint8(np.asarray(init))
            if len(init) != len(expr):
                raise ValueError(f"{len(init)} init patches for {len(expr)} expression rows")
        was = self.training
        self.eval()
        device = device or self.expr_mean.device
        cfg = self.central.config
        size = cfg.image_size
        g = torch.Generator().manual_seed(int(seed))
        n, total, done, out = len(expr), len(expr) * steps, 0, []
        try:
            for start in range(0, n, batch_size):
                cond = expr[start:start + batch_size].to(device)
                b = len(cond)
                x_init = (None if init is None else
                          self.central.encode(init[start:start + batch_size].to(device)))
                it = ddim_sample_iter(no_grad_model(self), self.schedule, (b, *cfg.sample_shape),
                                      cond=cond, guidance=guidance, steps=steps, generator=g,
                                      device=device, clip=cfg.x0_clip, x_init=x_init,
                                      strength=strength)
                x = None
                for _i, x_i in it:
                    x = x_i
                    done += b
                    yield done, total
                out.append(to_uint8(self.central.decode(x)))
        finally:
            self.train(was)
        return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)

    def sample(self, expression, *, guidance: float = 2.0, steps: int = 25, seed: int = 0,
               batch_size: int = 32, device=None, progress=None, init=None,
               strength: float = 1.0) -> np.ndarray:
        """One patch per expression row (``(N, G)`` over :attr:`genes`): ``(N, S, S, 3)`` uint8.

        ``guidance`` is the classifier-free guidance scale (1 = plain conditional). With
        ``init`` (uint8 patches, one per row) the patches are edits of those (SDEdit):
        ``strength`` < 1 keeps their layout, 1 generates from noise.
        """
        gen = self.sample_iter(expression, guidance=guidance, steps=steps, seed=seed,
                               batch_size=batch_size, device=device, init=init,
                               strength=strength)
        while True:
            try:
                done, total = next(gen)
            except StopIteration as stop:
                return stop.value
            if progress is not None:
                progress(done, total)

    # -- persistence ---------------------------------------------------------------------------
    def state_for_save(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("central.")}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the adapter (:data:`FORMAT`) with a copy of the central model in
        ``central/``, in one atomic folder swap: the two never mismatch."""
        return FORMAT.save(directory, self.config, self.state_for_save(),
                           write_extra=lambda tmp: self.central.save(tmp / CENTRAL_SUBDIR))

    @classmethod
    def load(cls, directory: str | os.PathLike, *,
             map_location: str | torch.device = "cpu") -> LocalModel:
        directory = Path(directory)
        config, state = FORMAT.load(directory, device=str(map_location))
        central = CentralModel.load(directory / CENTRAL_SUBDIR, map_location=map_location)
        model = cls(central, config).to(map_location)
        load_state_strict(_Adapter(model), state, directory / WEIGHTS_FILE)
        return model.eval()


def no_grad_model(model):
    """``model(x, t, cond)`` under ``torch.no_grad()`` per call, for samplers that yield
    (a no_grad block around a yield would leak into the caller)."""

    def call(x, t, cond):
        with torch.no_grad():
            return model(x, t, cond)

    return call


class _Adapter(nn.Module):
    """A view of a local model's own tensors (everything but ``central.*``), for loading."""

    def __init__(self, model: LocalModel):
        super().__init__()
        self._model = [model]  # a list: not registered as a submodule

    def state_dict(self, *args, **kwargs):
        return self._model[0].state_for_save()

    def load_state_dict(self, state, strict: bool = True):
        return self._model[0].load_state_dict(
            {**{f"central.{k}": v for k, v in self._model[0].central.state_dict().items()},
             **state}, strict=strict)


def build_local(central: CentralModel | str | os.PathLike = "shipped",
                genes: Sequence[str] = (), *, hidden: int = 256, cond_drop: float = 0.1,
                seed: int = 0) -> LocalModel:
    """A fresh local model over ``genes`` on a central model (object, folder or 'shipped')."""
    ref = "object"
    if not isinstance(central, CentralModel):
        ref = str(central)
        central = CentralModel.load(central)
    torch.manual_seed(int(seed))
    return LocalModel(central, LocalConfig(genes=list(genes), hidden=hidden,
                                           cond_drop=cond_drop, central_ref=ref))
