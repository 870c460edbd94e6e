"""STMGAC training as a generator of :class:`~napari_hinge.training.TrainEvent` s.

Full-batch, one optimiser step per epoch (methods.md §2.7 / §6.2): mask → online and
momentum encoders → EMA → projector + latent MSE → decoder + scaled-cosine loss →
triplet loss on anchors refreshed every ``t_step`` epochs → weighted sum, clip, Adam.
Progress, stop requests, seeding, the device rule and checkpoints follow the trainer
contract of :mod:`napari_hinge.training` (one epoch = one step here).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..device import default_device
from ..training import (
    StopToken,
    TrainEvent,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .graph import gcn_normalize, to_torch
from .losses import TripletSampler, latent_mse, sce_loss
from .model import STMGAC, STMGACConfig
from .presets import Preset, get_preset


def config_from_preset(preset: Preset, in_dim: int) -> STMGACConfig:
    return STMGACConfig(
        in_dim=int(in_dim),
        dropout=preset.dropout,
        mask_rate=preset.mask_rate,
        replace_rate=preset.replace_rate,
        momentum=preset.momentum,
    )


def train_stmgac(
    x: np.ndarray,
    adjacency: sp.spmatrix,
    preset: Preset | str = "dlpfc",
    *,
    n_domains: int | None = None,
    epochs: int | None = None,
    seed: int = 3407,
    stop: StopToken | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
) -> Generator[TrainEvent, None, STMGAC]:
    """Train STMGAC on ``x`` (spots x features) over the binary spatial ``adjacency``.

    Yields a 'step' and an 'epoch' event per epoch (epochs and steps count from 1; metrics:
    the three loss terms), 'stopped' if ``stop`` was requested (the model trained so far is
    returned), and 'done' at the end (metrics: final losses, seconds, triplet counts, and
    ``'model'``). The trained :class:`STMGAC` is also the generator's return value.

    ``checkpoint_dir`` receives ``last.pt`` every ``checkpoint_every`` epochs, at a stop and
    at the end; ``resume=True`` continues it exactly (rules: :mod:`napari_hinge.training`).
    ``device=None`` follows :func:`napari_hinge.device.default_device`.
    """
    preset = get_preset(preset)
    epochs = int(preset.epochs if epochs is None else epochs)
    n_domains = int(preset.n_domains if n_domains is None else n_domains)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"STMGAC input must be a 2-d (spots x features) array, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("STMGAC input holds NaN or infinite values")
    if adjacency.shape != (x.shape[0], x.shape[0]):
        raise ValueError(f"adjacency {adjacency.shape} does not match {x.shape[0]} spots")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if n_domains > x.shape[0]:
        raise ValueError(f"K = {n_domains} domains is larger than the {x.shape[0]} spots")
    stop = stop or StopToken()
    dev = default_device(device)
    config = config_from_preset(preset, x.shape[1])
    settings = {"config": config.to_dict(), "preset": preset.to_dict(), "epochs": epochs,
                "n_domains": n_domains, "seed": seed, "n_spots": int(x.shape[0])}
    checkpoint, ck = open_checkpoint(checkpoint_dir, resume=resume, settings=settings)

    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    model = STMGAC(config).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=preset.lr, weight_decay=preset.weight_decay)
    sampler = TripletSampler(
        adjacency, topk=preset.topk, n_clusters=n_domains, t_step=preset.t_step,
        margin=preset.margin, n_iter=preset.kmeans_iters,
    )
    start_epoch = 0  # epochs done
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        gen.set_state(ck["generator"])
        sampler.anchor, sampler.positive, sampler.negative = (
            t.to(dev) if t is not None else None for t in ck["triplets"]
        )
        start_epoch = int(ck["epoch"])

    def save(epoch: int) -> None:
        if checkpoint is None:
            return
        save_checkpoint(checkpoint, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
            "rng": rng_state(), "generator": gen.get_state(), "settings": settings,
            "triplets": (sampler.anchor, sampler.positive, sampler.negative),
        })

    xt = torch.from_numpy(x).to(dev)
    adj = to_torch(gcn_normalize(adjacency), dev)
    model.train()
    t0 = time.perf_counter()
    parts: dict[str, float] = {}
    loss_value = float("nan")
    for epoch in range(start_epoch, epochs):  # 0-based here; events count from 1
        if stop.requested:
            save(epoch)
            yield TrainEvent("stopped", epoch + 1, epoch, epochs, loss_value,
                             metrics=dict(parts))
            return model
        out = model(xt, adj, gen)
        m = out["mask_nodes"]
        l_r = sce_loss(out["x_hat"][m], xt[m], preset.sce_t)
        l_m = latent_mse(out["h_hat"][m], out["h_t"][m])
        if sampler.due(epoch):
            sampler.refresh(out["h_s"], out["h_t"], gen)
        l_t = sampler.loss(out["h_s"])
        loss = preset.w_recon * l_r + preset.w_mean * l_m + preset.w_tri * l_t
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"STMGAC loss became {loss.item()} at epoch {epoch} "
                f"(recon {l_r.item()}, latent {l_m.item()}, triplet {l_t.item()})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), preset.clip)
        opt.step()
        loss_value = float(loss.item())
        parts = {"recon": float(l_r.item()), "latent": float(l_m.item()),
                 "triplet": float(l_t.item()), **sampler.info}
        yield TrainEvent("step", epoch + 1, epoch + 1, epochs, loss_value)
        yield TrainEvent("epoch", epoch + 1, epoch + 1, epochs, loss_value, metrics=dict(parts))
        if checkpoint is not None and (epoch + 1) % checkpoint_every == 0:
            save(epoch + 1)
    save(epochs)
    summary = {**parts, "epochs": epochs, "seconds": time.perf_counter() - t0, "seed": seed,
               "model": model}
    yield TrainEvent("done", epochs, epochs, epochs, loss_value, metrics=summary)
    return model

