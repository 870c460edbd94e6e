"""Train HINGE's modulation on (image features, expression) pairs; a generator of TrainEvents.

Masked-diffusion training (methods.md 1.4-1.6): per batch a step ``t`` per spot (uniform in
1..t_cap during the warm-start epochs, then 1..T), a random gene order, noise on the masked
genes, and the MSE on the genes revealed at ``t``. AdamW on the trainable parameters only,
MultiStepLR per epoch, gradient clipping. Each spot contributes ``aug_ratio`` of its K feature
views per epoch (sampled without replacement, HINGE's ``num_aug_ratio``). Validation holds out
whole spots (a spot with all its views) and reports the masked-diffusion loss at fixed random
steps (comparable across epochs) and, optionally, the gene-wise Pearson r of a cheap sampler run.

Checkpoints: ``checkpoint_dir/last.pt`` after every epoch (trainable weights, optimiser,
scheduler, RNG, history; written atomically) and ``checkpoint_dir/best/`` (a full
:meth:`HingeModel.save` folder) whenever the validation loss improves. ``resume=True``
continues from ``last.pt`` and gives the same weights as an uninterrupted run. Numbering,
resume rules and the device rule are the trainer contract of :mod:`napari_hinge.training`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from napari_hinge import ddp
from napari_hinge.device import autocast, default_device
from napari_hinge.metrics import gene_pearson
from napari_hinge.training import (
    CHECKPOINT_FILE,
    StopToken,
    TrainEvent,
    data_fingerprint,
    load_checkpoint,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

from .defaults import TRAIN
from .model import HingeModel
from .sampler import sample
from .schedule import masked_diffusion_loss, revealed_gaussian_nll


def _check_inputs(model: HingeModel, features, targets) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    y = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets)
    f, y = f.float(), y.float()
    if f.ndim == 2:
        f = f.unsqueeze(0)
    F, G = model.config.feature_dim, model.n_genes
    if f.ndim != 3 or f.shape[-1] != F:
        raise ValueError(f"train_features must be (N, {F}) or (K, N, {F}), got {tuple(f.shape)}")
    if y.ndim != 2 or y.shape[1] != G:
        raise ValueError(f"train_targets must be (N, {G}) over the model's genes, "
                         f"got {tuple(y.shape)}")
    if f.shape[1] != y.shape[0]:
        raise ValueError(f"features have {f.shape[1]} spots but targets have {y.shape[0]}")
    if not torch.isfinite(f).all():
        raise ValueError("train_features contain NaN or infinite values")
    if not torch.isfinite(y).all():
        raise ValueError("train_targets contain NaN or infinite values")
    return f, y


def split_groups(n: int, val_fraction: float, seed: int,
                 eligible=None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) spot indices; a spot and all its views are in the same part.
    ``eligible`` (bool, n): only these rows may validate (real spots, not synthetic pairs);
    the fraction is of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if eligible is not None:
        pool = np.flatnonzero(np.asarray(eligible, bool))
        _, val = split_groups(len(pool), val_fraction, seed)
        val = pool[val]
        return np.setdiff1d(np.arange(n), val), val
    n_val = int(round(val_fraction * n))
    if val_fraction > 0:
        n_val = min(max(1, n_val), n - 1)
    if n - n_val < 1:
        raise ValueError(f"need at least 2 spots to hold out validation spots, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def checkpoint_milestones(checkpoint_dir: str | Path) -> tuple[int, ...] | None:
    """The learning-rate milestones a checkpoint folder's run was started with (None when
    there is no readable checkpoint: the caller's error says why on resume)."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    settings = load_checkpoint(path).get("settings") or {}
    return tuple(settings["milestones"]) if "milestones" in settings else None


def epoch_rows(train_idx: np.ndarray, K: int, aug_ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's training rows ``(views, spots)``: ``aug_ratio`` of each spot's ``K`` views
    (without replacement), shuffled (the global torch RNG, seeded by the trainer)."""
    views = torch.rand(len(train_idx), K).argsort(1)[:, :aug_ratio].reshape(-1)
    spots = torch.as_tensor(train_idx).repeat_interleave(aug_ratio)
    order = torch.randperm(len(spots))
    return views[order], spots[order]


@torch.no_grad()
def validation_loss(model: HingeModel, features: torch.Tensor, targets: torch.Tensor, *,
                    seed: int, batch_size: int = 128,
                    device: torch.device | None = None) -> float:
    """Masked-diffusion loss at fixed random steps and orders (seeded), pooled over all revealed
    genes. Steps are uniform over those that reveal genes (for G < T some reveal none, and a small
    validation set could otherwise score nothing). ``features`` (N, F), ``targets`` (N, G)."""
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sched = model.schedule
    steps = sched.revealing_steps()
    was_training = model.training
    model.eval()
    num = den = 0.0
    try:
        for s in range(0, len(targets), batch_size):
            x0 = targets[s:s + batch_size]
            t = steps[torch.randint(0, len(steps), (len(x0),), generator=gen)]
            cor = sched.corrupt(x0, t, generator=gen)
            with autocast(device):
                pred = model(cor.x_t.to(device), t.to(device), cor.m_prev.to(device),
                             cor.m_t.to(device), features[s:s + batch_size].to(device))
            d = cor.reveal.to(device).float()
            num += float((((pred.float() - x0.to(device)) ** 2) * d).sum())
            den += float(d.sum())
    finally:
        model.train(was_training)
    return num / max(den, 1.0)


def train_hinge(model: HingeModel, train_features, train_targets, *, val_fraction: float = 0.1,
                epochs: int = TRAIN["epochs"], batch_size: int = TRAIN["batch_size"],
                lr: float = TRAIN["lr"],
                milestones: tuple[int, ...] = (20, 35), gamma: float = 0.2,
                warmup_epochs: int = TRAIN["warmup_epochs"], grad_clip: float = 1.0,
                seed: int = TRAIN["seed"],
                checkpoint_dir: str | Path | None = None, resume: bool = False,
                stop: StopToken | None = None, val_every: int = 1, aug_ratio: int = 1,
                val_samples: int = 2, val_reveal_steps: int = 10,
                prior_values=None, sample_weights=None, val_eligible=None,
                device: str | torch.device | None = None) -> Iterator[TrainEvent]:
    """Train a :class:`HingeModel` (its trainable part) by masked diffusion; yields TrainEvents.

    Parameters
    ----------
    model
        The model; trained in place (the backbone stays frozen).
    train_features
        (N, F) image features, or (K, N, F) with K views per spot (e.g. the 8 dihedral views).
    train_targets
        (N, G) target values over ``model.config.genes``, already transformed
        (``model.config.value_transform``).
    val_fraction
        Fraction of spots held out for validation (0: none).
    epochs, batch_size, lr, milestones, gamma, grad_clip
        AdamW (betas 0.9/0.999, eps 1e-8, no weight decay) with MultiStepLR per epoch.
    warmup_epochs
        Warm-start curriculum: epochs 1..warmup_epochs sample ``t`` in 1..t_cap only.
    seed
        Seeds the split, the batches, the masks and the noise (recorded in the summary).
    checkpoint_dir
        Where ``last.pt`` and ``best/`` go (None: no checkpoints, no resume). Without validation
        spots ``best/`` holds the latest epoch's model.
    resume
        Continue from ``checkpoint_dir/last.pt`` (FileNotFoundError without one; InputError
        when it was written with other settings or data). Without it an existing ``last.pt``
        is never overwritten (FileExistsError).
    stop
        Checked between steps; when requested a 'stopped' event is yielded and the generator
        returns (the last completed epoch's checkpoint stays).
    val_every
        Validate every this many epochs (and after the last).
    aug_ratio
        Views per spot per epoch (1..K), drawn without replacement.
    val_samples, val_reveal_steps
        The validation sampler run for the val Pearson r (``val_samples=0`` turns it off); its
        samples cycle through the K views. The validation loss uses view 0.
    prior_values
        (N, G) prior of each training spot for a model with a prior (``config.prior``): the
        network learns ``targets - prior_values``. Pass out-of-fold values (the prior fitted
        without the spot's section), so the residuals look like those of unseen spots; default:
        the model's own prior of the spot's view 0.
    sample_weights, val_eligible
        (N,) loss weight per spot (e.g. synthetic C2L pairs below 1), and the (N,) bool rows
        that may be validation spots (real ones: a model is judged on measured spots).
    device
        Training device (default: :func:`napari_hinge.device.default_device`).

    Yields
    ------
    TrainEvent
        'step' (loss), 'epoch' (mean train loss, val_loss, metrics: val_pcc, lr, t_max,
        best_val_loss), 'stopped', 'done' (metrics: the run summary).
    """
    if epochs < 1 or batch_size < 1 or val_every < 1:
        raise ValueError("epochs, batch_size and val_every must be >= 1")
    stop = stop or StopToken()
    ddp.init()  # under torchrun: one process per device, each on a shard of every batch
    ddp.barrier()  # rank 0 has finished writing what an earlier run in this job wrote
    device = ddp.device(default_device(device))
    feats, targets = _check_inputs(model, train_features, train_targets)
    K, N, _ = feats.shape
    if model.config.prior is not None:
        if prior_values is None:
            with torch.no_grad():
                prior_values = model.prior_mean(feats[0])
        prior_values = torch.as_tensor(np.asarray(prior_values), dtype=torch.float32)
        if prior_values.shape != targets.shape:
            raise ValueError(f"prior_values must be {tuple(targets.shape)}, got "
                             f"{tuple(prior_values.shape)}")
        absolute_targets, targets = targets, targets - prior_values
    else:
        absolute_targets, prior_values = targets, torch.zeros_like(targets)
    if not 1 <= aug_ratio <= K:
        raise ValueError(f"aug_ratio must be in 1..{K} (the number of feature views)")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    train_idx, val_idx = split_groups(N, val_fraction, seed, val_eligible)
    # per-spot loss weights (synthetic pairs below 1): they scale each spot's revealed genes
    weights = None if sample_weights is None else \
        torch.as_tensor(np.asarray(sample_weights, np.float32))
    if weights is not None and (weights.shape != (N,) or not torch.isfinite(weights).all()
                                or (weights < 0).any()):
        raise ValueError(f"sample_weights must be {N} finite weights >= 0")
    settings = {"config": asdict(model.config), "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "milestones": list(milestones), "gamma": gamma,
                "warmup_epochs": warmup_epochs, "grad_clip": grad_clip, "seed": seed,
                "aug_ratio": aug_ratio, "val_idx": val_idx,
                "data": data_fingerprint(feats, absolute_targets, prior_values)}
    last_path, ck = open_checkpoint(ckpt_dir, resume=resume, settings=settings)

    model.to(device)
    model.train()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    sched = model.schedule
    with_variance = bool(model.config.predict_variance)
    t_cap = sched.t_cap(model.config.warmup_mask_ratio)
    n_rows = len(train_idx) * aug_ratio
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total_steps = epochs * steps_per_epoch
    history: list[dict] = []
    best_val, best_epoch, start_epoch = math.inf, 0, 1

    if ck is not None:
        try:
            model.load_trainable_state_dict(ck["model"])
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"{last_path} does not fit this model's configuration: {exc}") \
                from exc
        opt.load_state_dict(ck["optimizer"])
        lr_sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        start_epoch = ck["epoch"] + 1
        best_val, best_epoch, history = ck["best_val"], ck["best_epoch"], ck["history"]
    else:
        seed_everything(seed)

    net = ddp.wrap(model, device)  # after resume: DDP starts every rank from rank 0's weights
    val_feats = feats[:, val_idx]
    val_targets = targets[val_idx]
    step = (start_epoch - 1) * steps_per_epoch
    for epoch in range(start_epoch, epochs + 1):
        warm = epoch <= warmup_epochs
        views, spots = epoch_rows(train_idx, K, aug_ratio)
        losses = []
        for b in range(steps_per_epoch):
            if stop.requested:
                yield TrainEvent("stopped", epoch, step, total_steps, metrics={
                    "last_complete_epoch": epoch - 1,
                    "checkpoint": str(last_path) if last_path and last_path.exists() else None})
                return
            sl = slice(b * batch_size, (b + 1) * batch_size)
            x0 = targets[spots[sl]]
            f = feats[views[sl], spots[sl]]
            t = sched.sample_timesteps(len(x0), warm=warm,
                                       warmup_ratio=model.config.warmup_mask_ratio)
            cor = sched.corrupt(x0, t)
            mine = ddp.shard(len(x0))  # this rank's rows of the global batch (all in one process)
            x0 = x0[mine].to(device)
            reveal = cor.reveal[mine].to(device)
            if weights is not None:  # a weighted mean over the revealed genes
                reveal = reveal * weights[spots[sl]][mine].to(device)[:, None]
            with autocast(device):
                out = net(cor.x_t[mine].to(device), t[mine].to(device),
                          cor.m_prev[mine].to(device), cor.m_t[mine].to(device),
                          f[mine].to(device), return_logvar=with_variance)
            pred, logvar = out if with_variance else (out, None)
            loss = masked_diffusion_loss(pred.float(), x0, reveal)
            objective = loss if logvar is None else \
                loss + revealed_gaussian_nll(logvar.float(), pred.float(), x0, reveal)
            if ddp.active():  # both terms are means over the revealed genes: weigh by them
                share = ddp.batch_share(reveal.sum().clamp_min(1.0),
                                        cor.reveal.sum().clamp_min(1.0).to(device))
                objective = objective * share
                loss = ddp.all_reduce_sum(loss.detach() * share) / ddp.world_size()
            opt.zero_grad(set_to_none=True)
            objective.backward()
            if grad_clip and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            yield TrainEvent("step", epoch, step, total_steps, loss=losses[-1])
        lr_now = opt.param_groups[0]["lr"]
        lr_sched.step()

        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": lr_now,
                  "t_max": t_cap if warm else sched.num_steps}
        val_loss = None
        if len(val_idx) and (epoch % val_every == 0 or epoch == epochs):
            val_loss = validation_loss(model, val_feats[0], val_targets, seed=seed + 1,
                                       device=device)
            record["val_loss"] = val_loss
            if val_samples > 0 and len(val_idx) >= 2:
                res = sample(model, val_feats, n_samples=val_samples,
                             reveal_steps=min(val_reveal_steps, sched.num_steps),
                             seed=seed + 2, device=device)
                # the sampler adds the model's prior; score with the out-of-fold one
                with torch.no_grad():
                    z = model.standardize(val_feats.to(device)).mean(0)
                    own = model.prior_mean(z, standardized=True).cpu()
                pred = res.mean - own + prior_values[val_idx]
                record["val_pcc"] = float(gene_pearson(pred.numpy(),
                                                       absolute_targets[val_idx].numpy()).mean())
        improved = val_loss is not None and val_loss < best_val
        if improved:
            best_val, best_epoch = val_loss, epoch
        history.append(record)
        # the one place checkpoints are written (by rank 0 under torchrun); nothing to
        # compare on: best/ is the latest
        if ckpt_dir is not None and (improved or not len(val_idx)) and ddp.is_main():
            model.save(ckpt_dir / "best")
        if last_path is not None and ddp.is_main():
            save_checkpoint(last_path, {
                "model": {k: v.detach().cpu() for k, v in model.trainable_state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": lr_sched.state_dict(),
                "epoch": epoch, "rng": rng_state(), "best_val": best_val,
                "best_epoch": best_epoch, "history": history, "settings": settings,
            })
        yield TrainEvent("epoch", epoch, step, total_steps, loss=record["train_loss"],
                         val_loss=val_loss,
                         metrics={k: v for k, v in record.items() if k not in ("epoch",)}
                         | {"best_val_loss": best_val if best_epoch else None})

    ddp.barrier()  # every rank returns once rank 0's checkpoints are written
    counts = model.param_counts()
    yield TrainEvent("done", epochs, step, total_steps,
                     loss=history[-1]["train_loss"] if history else None,
                     val_loss=best_val if best_epoch else None,
                     metrics={"epochs": epochs, "best_epoch": best_epoch,
                              "best_val_loss": best_val if best_epoch else None,
                              "seed": seed, "n_train": int(len(train_idx)),
                              "n_val": int(len(val_idx)), "views": K, "aug_ratio": aug_ratio,
                              "t_cap": t_cap, "trainable_params": counts["trainable"],
                              "frozen_params": counts["frozen"], "history": history,
                              "checkpoint_dir": str(ckpt_dir) if ckpt_dir else None})
