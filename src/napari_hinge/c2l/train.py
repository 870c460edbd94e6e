"""C2L-ST training as generators of :class:`~napari_hinge.training.TrainEvent`.

- :func:`train_autoencoder`: the latent model's autoencoder, on unpaired patches (first).
- :func:`refine_decoder`: optionally, the autoencoder's decoder alone against a patch critic
  (sharper tiles; the encoder, hence the code the diffusion model learns, does not change).
- :func:`train_central`: unconditional v-prediction on unpaired patches (the UNet's weights; a
  latent model's autoencoder is frozen and encodes every batch).
- :func:`train_local`: the same loss with condition dropout on paired ``(patch, expression)``
  spots; only the adapter (gene encoder + FiLM heads) is optimised, the central model is frozen.

Both draw random batches with a random dihedral flip/rotation per batch (H&E has no preferred
orientation), keep an exponential moving average (EMA) of the trained weights (what a diffusion
model should sample with), yield 'step' after every optimiser step and 'epoch' every
``eval_every`` steps (an epoch here is one such round, numbered from 1) with a validation loss
on a fixed held-out set (fixed noise and timesteps, so the curve is comparable across steps),
check ``stop.requested`` between steps, and write atomic checkpoints
(``checkpoint_dir/last.pt``) that resume exactly: the trainer contract of
:mod:`napari_hinge.training` (numbering, resume rules, device rule). The generator's return
value is the model with the EMA weights loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from pathlib import Path

import numpy as np
import torch

from napari_hinge.device import default_device
from napari_hinge.training import (
    StopToken,
    TrainEvent,
    open_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

from .autoencoder import (
    PatchAutoencoder,
    PatchCritic,
    adaptive_adversarial_weight,
    critic_hinge_loss,
    image_loss,
)
from .central import CentralModel
from .data import dihedral_torch
from .local import LocalModel
from .schedule import from_uint8


class EMA:
    """Exponential moving average of a set of parameters (warm-up: ``min(decay, (1+n)/(10+n))``)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach(), 1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def _split(n: int, val_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    val_count = min(val_count, max(0, n - 1))
    return np.sort(order[val_count:]), np.sort(order[:val_count])


def _run(n_train: int, steps: int, batch_size: int, lr: float, ema_decay: float, seed: int,
         eval_every: int) -> dict:
    """The settings every C2L trainer passes to :func:`_loop` (and records in checkpoints)."""
    return {"n_train": int(n_train), "steps": int(steps), "batch_size": int(batch_size),
            "lr": float(lr), "ema_decay": float(ema_decay), "seed": int(seed),
            "eval_every": int(eval_every)}


def _open(checkpoint_dir, resume: bool, kind: str, config: dict, run: dict,
          **more) -> tuple[Path | None, dict | None, dict]:
    """The checkpoint path, the state to resume (or None) and the run's settings, checked
    against the checkpoint's (:func:`napari_hinge.training.open_checkpoint`)."""
    settings = {"kind": kind, "config": config, **run, **more}
    path, state = open_checkpoint(checkpoint_dir, resume=resume, settings=settings)
    return path, state, settings


def _loop(*, model, trainable: dict[str, torch.nn.Parameter], loss_fn: Callable, n_train: int,
          val_loss_fn: Callable | None, steps: int, batch_size: int, lr: float,
          weight_decay: float, ema_decay: float, seed: int, eval_every: int,
          checkpoint: Path | None, state: dict | None, settings: dict,
          stop: StopToken | None, extra_state: dict | None = None,
          companions: dict | None = None) -> Generator[TrainEvent, None, None]:
    """The shared loop; ``state`` is the checkpoint to resume (from :func:`_open`).
    ``companions``: other stateful objects ``loss_fn`` updates itself (a critic and its
    optimiser), saved in and restored from the checkpoints with the rest."""
    companions = companions or {}
    stop = stop or StopToken()
    resume = state is not None
    seed_everything(seed)
    opt = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=weight_decay)
    ema = EMA(trainable, ema_decay)
    start = 0
    ckpt = checkpoint
    history: list[dict] = []
    if resume:
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(state["params"][k])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        start, history = int(state["step"]), list(state.get("history", []))
        for name, obj in companions.items():
            obj.load_state_dict(state["companions"][name])
        set_rng_state(state["rng"])
    # own generators (batches, flips, noise, timesteps), saved with checkpoints: a resumed run
    # draws exactly what the uninterrupted run would have drawn
    g = torch.Generator()
    g.manual_seed(seed * 7919)
    rng = np.random.default_rng(seed * 31)
    if resume:
        g.set_state(state["generator"])
        rng.bit_generator.state = state["numpy_generator"]

    def save(step: int) -> None:
        if ckpt is None:
            return
        save_checkpoint(ckpt, {"params": {k: v.detach().cpu() for k, v in trainable.items()},
                               "optimizer": opt.state_dict(), "ema": ema.state_dict(),
                               "step": step, "rng": rng_state(), "history": history,
                               "generator": g.get_state(),
                               "numpy_generator": rng.bit_generator.state,
                               "companions": {k: v.state_dict() for k, v in companions.items()},
                               "settings": settings, **(extra_state or {})})

    losses: list[float] = []
    t0 = time.perf_counter()
    epoch = start // max(1, eval_every) + 1  # the eval round under way, from 1
    step = start
    for step in range(start, steps):
        if stop.requested:
            save(step)
            yield TrainEvent("stopped", epoch, step, steps, losses[-1] if losses else None)
            _load_ema(trainable, ema)
            return
        idx = rng.choice(n_train, size=min(batch_size, n_train), replace=n_train < batch_size)
        k = int(rng.integers(8))
        model.train()
        loss = loss_fn(idx, k, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
        ema.update(trainable)
        losses.append(loss.item())
        yield TrainEvent("step", epoch, step + 1, steps, losses[-1])
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = None
            if val_loss_fn is not None:
                backup = {kk: v.detach().clone() for kk, v in trainable.items()}
                _load_ema(trainable, ema)
                val = val_loss_fn()
                with torch.no_grad():
                    for kk, p in trainable.items():
                        p.copy_(backup[kk])
            recent = float(np.mean(losses[-eval_every:]))
            history.append({"step": step + 1, "loss": recent, "val_loss": val,
                            "seconds": time.perf_counter() - t0})
            save(step + 1)
            yield TrainEvent("epoch", epoch, step + 1, steps, recent, val,
                             metrics={"seconds": time.perf_counter() - t0})
            epoch += 1
    _load_ema(trainable, ema)
    last = history[-1] if history else {}
    yield TrainEvent("done", len(history), steps, steps, last.get("loss"), last.get("val_loss"),
                     metrics={"history": history, "steps": steps, "seed": seed,
                              "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                              "seconds": time.perf_counter() - t0})


@torch.no_grad()
def _load_ema(trainable: dict[str, torch.nn.Parameter], ema: EMA) -> None:
    for k, p in trainable.items():
        p.copy_(ema.shadow[k])


@torch.no_grad()
def _fixed_val_loss(model, x0: torch.Tensor, seed: int, cond=None) -> float:
    """v-MSE of ``model(x, t, cond)`` on ``x0`` at fixed timesteps (spread over 0..T-1) and
    fixed noise, so that the validation curve is comparable across steps."""
    schedule = model.schedule
    g = torch.Generator().manual_seed(seed + 12345)
    t = torch.linspace(0, schedule.T - 1, len(x0)).round().long().to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    model.eval()
    v = model(schedule.add_noise(x0, noise, t), t, cond)
    return float(((v - schedule.v_target(x0, noise, t)) ** 2).mean())


def _check_patches(patches: np.ndarray, size: int) -> np.ndarray:
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[1:] != (size, size, 3) or patches.dtype != np.uint8:
        raise ValueError(f"patches must be uint8 (N, {size}, {size}, 3), got {patches.shape} "
                         f"{patches.dtype}")
    return patches


def train_autoencoder(model: PatchAutoencoder, patches: np.ndarray, *, steps: int = 2000,
                      batch_size: int = 16, lr: float = 1e-3, ema_decay: float = 0.995,
                      val_count: int = 64, eval_every: int = 100, stats_count: int = 4096,
                      seed: int = 0, checkpoint_dir=None, resume: bool = False,
                      stop: StopToken | None = None, device=None
                      ) -> Generator[TrainEvent, None, PatchAutoencoder]:
    """Train the autoencoder of a latent central model on unpaired uint8 patches, then measure
    its code statistics on (up to ``stats_count``) training patches. Returns the model with
    the EMA weights."""
    patches = _check_patches(patches, model.config.image_size)
    device = default_device(device)
    model.to(device)
    train_idx, val_idx = _split(len(patches), val_count, seed)
    data = from_uint8(patches[train_idx])
    val_x = from_uint8(patches[val_idx]).to(device) if len(val_idx) else None

    def loss_fn(idx, k, g):
        return model.reconstruction_loss(dihedral_torch(data[idx], k).to(device), g)

    def val_loss_fn():
        model.eval()
        with torch.no_grad():
            return float(image_loss(model.decoder(model.encoder(val_x)), val_x))

    run = _run(len(data), steps, batch_size, lr, ema_decay, seed, eval_every)
    ckpt, state, settings = _open(checkpoint_dir, resume, "c2l-autoencoder",
                                  model.config.to_dict(), run)
    trainable = dict(model.named_parameters())
    yield from _loop(model=model, trainable=trainable, loss_fn=loss_fn,
                     val_loss_fn=val_loss_fn if val_x is not None else None, weight_decay=0.0,
                     checkpoint=ckpt, state=state, settings=settings, stop=stop, **run)
    model.eval()
    pick = np.random.default_rng(seed).permutation(len(data))[:stats_count]
    model.set_latent_stats(data[np.sort(pick)].to(device))
    return model


class _Count:
    """A step counter a loss function keeps, saved like a module (``_loop``'s companions)."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])


def refine_decoder(model: PatchAutoencoder, patches: np.ndarray, *, steps: int = 3000,
                   batch_size: int = 16, lr: float = 1e-4, critic_lr: float = 2e-4,
                   adversarial_weight: float = 0.5, critic_warmup: int = 200,
                   ema_decay: float = 0.995, val_count: int = 64, eval_every: int = 100,
                   seed: int = 0, checkpoint_dir=None, resume: bool = False,
                   stop: StopToken | None = None, device=None
                   ) -> Generator[TrainEvent, None, PatchAutoencoder]:
    """Refine a trained autoencoder's decoder with a hinge-GAN patch critic; the encoder and
    the code statistics stay as they are.

    Each step trains the critic on real patches against their current reconstructions, then the
    decoder on L1 + gradient L1 plus ``adversarial_weight`` times the adaptively scaled critic
    term (:func:`~napari_hinge.c2l.autoencoder.adaptive_adversarial_weight`), which is off for
    the first ``critic_warmup`` steps while the critic learns what decoded patches look like.
    The validation loss is the plain reconstruction loss (it may rise a little as the decoder
    trades pixel accuracy for sharpness). Returns the autoencoder with the EMA decoder.
    """
    patches = _check_patches(patches, model.config.image_size)
    device = default_device(device)
    model.to(device)
    model.encoder.requires_grad_(False)
    model.decoder.requires_grad_(True)
    torch.manual_seed(seed)
    critic = PatchCritic().to(device)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=critic_lr, betas=(0.5, 0.9))
    last_layer = model.decoder[-1].weight
    train_idx, val_idx = _split(len(patches), val_count, seed)
    data = from_uint8(patches[train_idx])
    val_x = from_uint8(patches[val_idx]).to(device) if len(val_idx) else None
    decoder_steps = _Count()  # checkpointed with the critic, so the warm-up survives a resume

    def loss_fn(idx, k, g):
        x = dihedral_torch(data[idx], k).to(device)
        model.encoder.eval()
        with torch.no_grad():
            z = model.encoder(x)
            spread = z.std(dim=(0, 2, 3), keepdim=True)
            z = z + model.config.code_noise * spread * torch.randn(z.shape, generator=g).to(device)
        out = model.decoder(z)
        critic.train()
        d_loss = critic_hinge_loss(critic(x), critic(out.detach()))
        critic_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        critic_opt.step()
        rec = image_loss(out, x)
        decoder_steps.n += 1
        if decoder_steps.n <= critic_warmup or adversarial_weight == 0:
            return rec
        adv = -critic(out).mean()
        w = adaptive_adversarial_weight(rec, adv, last_layer)
        return rec + adversarial_weight * w * adv

    def val_loss_fn():
        model.eval()
        with torch.no_grad():
            return float(image_loss(model.decoder(model.encoder(val_x)), val_x))

    run = _run(len(data), steps, batch_size, lr, ema_decay, seed, eval_every)
    ckpt, state, settings = _open(checkpoint_dir, resume, "c2l-decoder", model.config.to_dict(),
                                  run, critic_lr=float(critic_lr),
                                  adversarial_weight=float(adversarial_weight),
                                  critic_warmup=int(critic_warmup))
    trainable = {f"decoder.{n}": p for n, p in model.decoder.named_parameters()}
    yield from _loop(model=model, trainable=trainable, loss_fn=loss_fn,
                     val_loss_fn=val_loss_fn if val_x is not None else None, weight_decay=0.0,
                     checkpoint=ckpt, state=state, settings=settings, stop=stop,
                     companions={"critic": critic, "critic_optimizer": critic_opt,
                                 "decoder_steps": decoder_steps}, **run)
    model.requires_grad_(False)
    return model.eval()


def train_central(model: CentralModel, patches: np.ndarray, *, steps: int = 2000,
                  batch_size: int = 32, lr: float = 2e-4, weight_decay: float = 0.0,
                  ema_decay: float = 0.995, val_count: int = 64, eval_every: int = 100,
                  seed: int = 0, checkpoint_dir=None, resume: bool = False,
                  stop: StopToken | None = None, device=None
                  ) -> Generator[TrainEvent, None, CentralModel]:
    """Pre-train a central model on unpaired uint8 patches ``(N, S, S, 3)``.

    A latent model's autoencoder must be trained already (:func:`train_autoencoder`,
    :meth:`CentralModel.set_autoencoder`); it is saved in the checkpoints so a resumed run
    needs nothing else. Returns (as the generator's value) the model with the EMA weights.
    """
    patches = _check_patches(patches, model.config.image_size)
    device = default_device(device)
    train_idx, val_idx = _split(len(patches), val_count, seed)
    run = _run(len(train_idx), steps, batch_size, lr, ema_decay, seed, eval_every)
    ckpt, state, settings = _open(checkpoint_dir, resume, "c2l-central", model.config.to_dict(),
                                  run, weight_decay=float(weight_decay))
    frozen = {}
    if model.autoencoder is not None:
        if state is not None:
            model.autoencoder.load_state_dict(state["autoencoder"])
        frozen = {"autoencoder": {k: v.detach().cpu()
                                  for k, v in model.autoencoder.state_dict().items()}}
    model.to(device)
    data = from_uint8(patches[train_idx])
    val_x = (model.encode(from_uint8(patches[val_idx]).to(device)) if len(val_idx)
             else None)
    schedule = model.schedule

    def loss_fn(idx, k, g):
        x0 = model.encode(dihedral_torch(data[idx], k).to(device))
        return schedule.training_loss(model, x0, None, g)

    def val_loss_fn():
        return _fixed_val_loss(model, val_x, seed)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    yield from _loop(model=model, trainable=trainable, loss_fn=loss_fn,
                     val_loss_fn=val_loss_fn if val_x is not None else None,
                     weight_decay=weight_decay, checkpoint=ckpt, state=state,
                     settings=settings, stop=stop, extra_state=frozen, **run)
    return model.eval()


def train_local(model: LocalModel, patches: np.ndarray, expression: np.ndarray, *,
                steps: int = 600, batch_size: int = 32, lr: float = 1e-3,
                weight_decay: float = 0.0, ema_decay: float = 0.99, val_count: int = 16,
                eval_every: int = 50, seed: int = 0, checkpoint_dir=None, resume: bool = False,
                stop: StopToken | None = None, device=None
                ) -> Generator[TrainEvent, None, LocalModel]:
    """Adapt a local model on paired spots (``patches`` uint8, ``expression`` ``(N, G)``
    over ``model.genes``). Sets the expression standardisation from the training spots on a
    fresh run. Returns the model with the EMA adapter weights.
    """
    patches = _check_patches(patches, model.central.config.image_size)
    expression = np.asarray(expression, dtype=np.float32)
    if expression.shape != (len(patches), len(model.genes)):
        raise ValueError(f"expression must be ({len(patches)}, {len(model.genes)}) over the "
                         f"model's genes, got {expression.shape}")
    if len(patches) < 2:
        raise ValueError("local adaptation needs at least 2 paired spots")
    device = default_device(device)
    train_idx, val_idx = _split(len(patches), val_count, seed)
    run = _run(len(train_idx), steps, batch_size, lr, ema_decay, seed, eval_every)
    ckpt, state, settings = _open(checkpoint_dir, resume, "c2l-local", model.config.to_dict(),
                                  run, weight_decay=float(weight_decay))
    model.to(device)
    if state is None:
        model.set_expression_stats(expression[train_idx])
    else:
        with torch.no_grad():
            model.expr_mean.copy_(state["expr_mean"])
            model.expr_std.copy_(state["expr_std"])
    data, cond = from_uint8(patches[train_idx]), torch.as_tensor(expression[train_idx])
    val_x = (model.central.encode(from_uint8(patches[val_idx]).to(device)) if len(val_idx)
             else None)
    val_c = torch.as_tensor(expression[val_idx]).to(device)

    def loss_fn(idx, k, g):
        model.central.eval()  # frozen: no dropout in the central network
        x0 = model.central.encode(dihedral_torch(data[idx], k).to(device))
        return model.training_loss(x0, cond[idx].to(device), g)

    def val_loss_fn():
        return _fixed_val_loss(model, val_x, seed, val_c)

    trainable = {n: p for n, p in model.named_parameters() if not n.startswith("central.")}
    yield from _loop(model=model, trainable=trainable, loss_fn=loss_fn,
                     val_loss_fn=val_loss_fn if val_x is not None else None,
                     weight_decay=weight_decay, checkpoint=ckpt, state=state,
                     settings=settings, stop=stop,
                     extra_state={"expr_mean": model.expr_mean.cpu(),
                                  "expr_std": model.expr_std.cpu()}, **run)
    return model.eval()

