"""Pre-train the shipped C2L-ST central model (unconditional 64 px H&E patch diffusion).

Stages, each resumable from --checkpoints: the autoencoder (64 x 64 x 3 -> 16 x 16 x 4,
``checkpoints/autoencoder``), then the latent diffusion UNet on its frozen code, then (with
``--decoder-steps``) the decoder alone against a patch critic (``checkpoints/decoder``; the
encoder stays frozen, so the diffusion model's code is unchanged). ``--pixel`` trains the
earlier pixel-space model instead (one stage).

Corpus (unpaired tissue tiles, 112 um of tissue -> 64 px, half-patch overlap):
her2st C2, C4, C5, C6 (C3 is left out: it is the shipped sample and the held-out section of the
benchmarks), CMU-1-Small-Region, and the three DLPFC low-resolution images cut at their own scale
(64 px = ~0.8 mm there; upsampling 9 px spots would add no morphology).

    python scripts/pretrain_c2l_central.py --data ../shared/data --ae-steps 2000 --steps 4000 \
        --out src/napari_hinge/weights/c2l_central

Writes OUT/config.json, OUT/model.safetensors (float16), OUT/training_log.json,
OUT/samples.png, OUT/reconstructions.png (latent: real patches over their autoencoder
reconstructions) and OUT/TRAINING.md; checkpoints in --checkpoints (``--resume`` continues
them), with a grid of real corpus patches (real_patches.png) to compare the samples with.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_hinge import ddp
from napari_hinge.c2l.autoencoder import AutoencoderConfig, PatchAutoencoder
from napari_hinge.c2l.central import CentralConfig, CentralModel
from napari_hinge.c2l.data import CorpusSource, build_corpus, load_corpus, save_corpus
from napari_hinge.c2l.train import refine_decoder, train_autoencoder, train_central
from napari_hinge.c2l.unet import UNetConfig, count_parameters
from napari_hinge.training import (
    load_checkpoint,
    run_to_end,
    save_checkpoint,
    seed_everything,
)

HER2ST_TRAIN = ("C2", "C4", "C5", "C6")


def corpus_sources(data: Path, *, her2st_max: int, cmu_max: int, dlpfc_max: int):
    from napari_hinge.io.legacy_st import read_her2st

    sources = []
    for s in HER2ST_TRAIN:
        meta = read_her2st(data / "her2st_subset", s).uns["napari_hinge"]
        sources.append(CorpusSource(meta["slide_path"], mpp=meta["microns_per_pixel"],
                                    max_patches=her2st_max, name=f"her2st {s}"))
    sources.append(CorpusSource(str(data / "wsi_small" / "CMU-1-Small-Region.svs"),
                                max_patches=cmu_max, name="CMU-1-Small-Region"))
    for d in ("151673", "151674", "151675"):
        sources.append(CorpusSource(
            str(data / "dlpfc_visium_lowres" / d / "spatial" / "tissue_lowres_image.png"),
            native=True, max_patches=dlpfc_max, name=f"DLPFC {d} lowres"))
    return sources


def grid_png(images: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n, s = len(images), images.shape[1]
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (s + 2), cols * (s + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (s + 2):r * (s + 2) + s, c * (s + 2):c * (s + 2) + s] = im
    Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2),
                                   Image.NEAREST).save(path)


def training_seconds(history: list[dict]) -> float:
    """Wall-clock training time over every run in ``history``: each resumed run's clock
    starts again at 0, so sum the last reading before every restart."""
    total, previous = 0.0, 0.0
    for entry in history:
        if entry["seconds"] < previous:
            total += previous
        previous = entry["seconds"]
    return total + previous


def drive(gen, label: str, t0: float):
    """:func:`run_to_end` printing each evaluation; returns (model, the 'done' event or None)."""

    def report(ev):
        if ev.kind == "epoch" and ddp.is_main():
            print(f"{label} step {ev.step}/{ev.total_steps} loss {ev.loss:.4f} val "
                  f"{ev.val_loss:.4f} {time.perf_counter() - t0:.0f}s", flush=True)

    model, last = run_to_end(gen, report)
    return model, last if last is not None and last.kind == "done" else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("src/napari_hinge/weights/c2l_central"))
    p.add_argument("--corpus", type=Path, default=None,
                   help="cache of the cut patches (default: the package cache, built once)")
    p.add_argument("--checkpoints", type=Path, default=Path("bench_out/c2l_central.checkpoints"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", default="64,96,128")
    p.add_argument("--her2st-max", type=int, default=2000)
    p.add_argument("--cmu-max", type=int, default=1000)
    p.add_argument("--dlpfc-max", type=int, default=200)
    p.add_argument("--ae-steps", type=int, default=2000)
    p.add_argument("--ae-batch-size", type=int, default=16)
    p.add_argument("--ae-lr", type=float, default=1e-3)
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="then refine the decoder alone against a patch critic (0: skip)")
    p.add_argument("--decoder-batch-size", type=int, default=16)
    p.add_argument("--decoder-lr", type=float, default=1e-4)
    p.add_argument("--critic-lr", type=float, default=2e-4)
    p.add_argument("--adversarial-weight", type=float, default=0.5)
    p.add_argument("--pixel", action="store_true", help="pixel-space model (no autoencoder)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    # under torchrun (README: training on a cluster) the diffusion stage is data-parallel;
    # rank 0 alone builds the corpus cache, prints and writes, the others wait for its files
    ddp.init()
    main_rank = ddp.is_main()
    say = print if main_rank else (lambda *a, **k: None)

    sources = corpus_sources(args.data, her2st_max=args.her2st_max, cmu_max=args.cmu_max,
                             dlpfc_max=args.dlpfc_max)
    if args.corpus is None:
        from napari_hinge._cache import cache_dir

        args.corpus = cache_dir("c2l") / f"central_corpus_seed{args.seed}.npz"
    if main_rank and not args.corpus.is_file():
        t = time.perf_counter()
        save_corpus(build_corpus(sources, seed=args.seed), args.corpus)
        say(f"corpus: built in {time.perf_counter() - t:.0f} s", flush=True)
    ddp.barrier()
    corpus = load_corpus(args.corpus)
    say("corpus:", corpus.summary(), flush=True)

    channels = tuple(int(c) for c in args.channels.split(","))
    ae_config = None if args.pixel else AutoencoderConfig()
    if ae_config is None:
        unet = UNetConfig(stem=4, channels=channels, attention_levels=(1, 2))
    else:
        c, side, _ = ae_config.latent_shape
        unet = UNetConfig(image_size=side, in_channels=c, stem=1, channels=channels,
                          attention_levels=(1, 2))
    model = CentralModel(CentralConfig(unet=unet, autoencoder=ae_config))
    n_params = count_parameters(model)
    say(f"central model: {n_params / 1e6:.2f} M parameters", flush=True)
    ckpt = args.checkpoints
    t0 = time.perf_counter()
    ae_log = {}
    if ae_config is not None:
        ae_final = ckpt / "autoencoder" / "final.pt"
        if ae_final.is_file():
            state = load_checkpoint(ae_final)
            model.autoencoder.load_state_dict(state["weights"])
            ae_log = state["log"]
            say(f"autoencoder: loaded {ae_final}", flush=True)
        else:
            resume_ae = args.resume and (ckpt / "autoencoder" / "last.pt").is_file()
            ae, done = drive(train_autoencoder(
                PatchAutoencoder(ae_config), corpus.patches, steps=args.ae_steps,
                batch_size=args.ae_batch_size, lr=args.ae_lr, seed=args.seed, eval_every=100,
                checkpoint_dir=ckpt / "autoencoder", resume=resume_ae, device=args.device),
                "autoencoder", t0)
            model.set_autoencoder(ae.cpu())
            ae_log = {"steps": args.ae_steps, "batch_size": args.ae_batch_size,
                      "lr": args.ae_lr, "history": done.metrics["history"] if done else [],
                      "seconds": done.metrics["seconds"] if done else None}
            if main_rank:  # every rank trained the same autoencoder (not data-parallel)
                save_checkpoint(ae_final, {"weights": model.autoencoder.state_dict(),
                                           "log": ae_log})
    resume = args.resume and (ckpt / "last.pt").is_file()
    ddp.barrier()  # rank 0's autoencoder/final.pt is written
    model, done = drive(train_central(
        model, corpus.patches, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        ema_decay=args.ema, seed=args.seed, eval_every=50, checkpoint_dir=ckpt, resume=resume,
        device=args.device), "diffusion", t0)
    if ae_config is not None and args.decoder_steps > 0:
        # the encoder stays frozen: the code (and the diffusion model on it) does not change
        dec_dir = ckpt / "decoder"
        _, dec_done = drive(refine_decoder(
            model.autoencoder, corpus.patches, steps=args.decoder_steps,
            batch_size=args.decoder_batch_size, lr=args.decoder_lr, critic_lr=args.critic_lr,
            adversarial_weight=args.adversarial_weight, seed=args.seed, eval_every=100,
            checkpoint_dir=dec_dir, resume=args.resume and (dec_dir / "last.pt").is_file(),
            device=args.device), "decoder", t0)
        ae_log["decoder_refinement"] = {
            "steps": args.decoder_steps, "batch_size": args.decoder_batch_size,
            "lr": args.decoder_lr, "critic_lr": args.critic_lr,
            "adversarial_weight": args.adversarial_weight,
            "history": dec_done.metrics["history"] if dec_done else [],
            "seconds": training_seconds(dec_done.metrics["history"]) if dec_done else None}
    if not main_rank:
        return 0
    # ship float16 and sample from what was written, so the pictures match the shipped file
    model.cpu().save(args.out, half=True)
    model = CentralModel.load(args.out)
    samples = model.sample(32, steps=25, seed=1)
    grid_png(samples, args.out / "samples.png")
    real = corpus.patches[np.random.default_rng(1).choice(len(corpus), 32, replace=False)]
    grid_png(real, args.checkpoints / "real_patches.png")
    if ae_config is not None:
        recon = model.reconstruct(real[:16])
        grid_png(np.concatenate([real[:8], recon[:8], real[8:16], recon[8:16]]),
                 args.out / "reconstructions.png")
    log = {"command": " ".join(["python", *sys.argv]), "seed": args.seed, "steps": args.steps,
           "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema,
           "parameters": n_params, "corpus": corpus.summary(), "threads": args.threads,
           "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "autoencoder": ae_log,
           "history": done.metrics["history"] if done else [],
           "seconds": training_seconds(done.metrics["history"]) if done else None}
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2))
    h, ah = log["history"], ae_log.get("history") or [{}]
    space = ("pixel space, 4x4 space-to-depth stem" if ae_config is None else
             f"latent space: an autoencoder 64 x 64 x 3 -> {unet.image_size} x "
             f"{unet.image_size} x {unet.in_channels}\n(trained first, then frozen; "
             f"{ae_log.get('steps')} steps of batch {ae_log.get('batch_size')}, lr "
             f"{ae_log.get('lr')}, {ae_log.get('seconds') or 0:.0f} s; validation L1 + "
             f"gradient L1 {ah[-1].get('val_loss') or float('nan'):.4f})")
    refined = ae_log.get("decoder_refinement")
    if refined:
        rh = refined["history"] or [{}]
        space += (f";\nthen the decoder alone refined against a patch critic (encoder frozen, so "
                  f"the code is unchanged):\n{refined['steps']} steps of batch "
                  f"{refined['batch_size']}, lr {refined['lr']}, critic lr {refined['critic_lr']},"
                  f" adversarial weight {refined['adversarial_weight']}, "
                  f"{refined['seconds'] or 0:.0f} s; validation L1 + gradient L1 "
                  f"{rh[-1].get('val_loss') or float('nan'):.4f}")
    resumed = ("\n(Finished from the checkpoints of an earlier run; checkpoints resume exactly, "
               "so the\nsame command without `--resume` gives the same weights.)\n"
               if args.resume else "")
    (args.out / "TRAINING.md").write_text(f"""# C2L-ST central model (shipped weights)

Unconditional diffusion model of H&E patches, 112 um of tissue at 64 x 64 px (1.75 um/px), in
{space}.
v-prediction, cosine schedule (T = 1000), UNet channels {channels}, attention at the
two coarse levels, {n_params / 1e6:.2f} M parameters in all, EMA {args.ema}, stored as float16.
`samples.png`: 32 DDIM samples (25 steps, seed 1){'' if ae_config is None else
'; `reconstructions.png`: rows of real patches, each followed by its reconstruction'}.

Command (from the repository root):

    {log['command']}
{resumed}
- Data: {json.dumps(corpus.summary())} patches (tissue tiles, half-patch overlap, random
  flips/rotations during training). her2st C3 is left out (shipped sample, held-out benchmark
  section). DLPFC low-resolution images are cut at their own scale (~12.7 um/px).
- Seed {args.seed}; {args.steps} diffusion steps of batch {args.batch_size}; AdamW lr {args.lr};
  {args.threads} CPU threads (shared machine), {log['seconds'] or 0:.0f} s for the diffusion.
- Final diffusion training loss (mean of the last 50 steps)
  {h[-1]['loss'] if h else float('nan'):.4f}; validation loss (64 held-out patches, fixed
  noise/timesteps, EMA weights) {h[-1]['val_loss'] if h else float('nan'):.4f}; full curves
  in `training_log.json`.

Re-run the command with more `--steps` (or `--resume` with a larger `--steps`) on a GPU for a
better prior; the local model adapts to whatever central weights it is given.
""")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
