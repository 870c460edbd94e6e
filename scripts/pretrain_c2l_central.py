"""Pre-train the shipped C2L-ST central model (unconditional 64 px H&E patch diffusion).

Corpus (unpaired tissue tiles, 112 um of tissue -> 64 px, half-patch overlap):
her2st C2, C4, C5, C6 (C3 is left out: it is the shipped sample and the held-out section of the
benchmarks), CMU-1-Small-Region, and the three DLPFC low-resolution images cut at their own scale
(64 px = ~0.8 mm there; upsampling 9 px spots would add no morphology).

    python scripts/pretrain_c2l_central.py --data ../shared/data --steps 1500 \
        --out src/napari_hinge/weights/c2l_central

Writes OUT/config.json, OUT/model.safetensors, OUT/training_log.json, OUT/samples.png and
OUT/TRAINING.md; checkpoints in --checkpoints (``--resume`` continues them), with a grid of
real corpus patches (real_patches.png) to compare the samples with.
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

from napari_hinge.c2l.central import CentralConfig, CentralModel
from napari_hinge.c2l.data import CorpusSource, build_corpus, load_corpus, save_corpus
from napari_hinge.c2l.train import train_central
from napari_hinge.c2l.unet import UNetConfig, count_parameters
from napari_hinge.training import seed_everything

HER2ST_TRAIN = ("C2", "C4", "C5", "C6")


def corpus_sources(data: Path, *, her2st_max: int, cmu_max: int, dlpfc_max: int):
    from napari_hinge.io.spatial import read_her2st

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
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    sources = corpus_sources(args.data, her2st_max=args.her2st_max, cmu_max=args.cmu_max,
                             dlpfc_max=args.dlpfc_max)
    if args.corpus is None:
        from napari_hinge._cache import cache_dir

        args.corpus = cache_dir("c2l") / f"central_corpus_seed{args.seed}.npz"
    if args.corpus.is_file():
        corpus = load_corpus(args.corpus)
    else:
        t = time.perf_counter()
        corpus = build_corpus(sources, seed=args.seed)
        save_corpus(corpus, args.corpus)
        print(f"corpus: {len(corpus)} patches in {time.perf_counter() - t:.0f} s", flush=True)
    print("corpus:", corpus.summary(), flush=True)

    channels = tuple(int(c) for c in args.channels.split(","))
    config = CentralConfig(unet=UNetConfig(stem=4, channels=channels, attention_levels=(1, 2)))
    model = CentralModel(config)
    n_params = count_parameters(model)
    print(f"central UNet: {n_params / 1e6:.2f} M parameters", flush=True)
    ckpt = args.checkpoints
    gen = train_central(model, corpus.patches, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, ema_decay=args.ema, seed=args.seed, eval_every=50,
                        checkpoint_dir=ckpt, resume=args.resume, device=args.device)
    t0 = time.perf_counter()
    done = None
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            model = stop.value
            break
        if ev.kind == "epoch":
            print(f"step {ev.step}/{ev.total_steps} loss {ev.loss:.4f} val {ev.val_loss:.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        if ev.kind == "done":
            done = ev
    model.cpu().save(args.out)
    samples = model.sample(32, steps=25, seed=1)
    grid_png(samples, args.out / "samples.png")
    real = corpus.patches[np.random.default_rng(1).choice(len(corpus), 32, replace=False)]
    grid_png(real, args.checkpoints / "real_patches.png")
    log = {"command": " ".join(["python", *sys.argv]), "seed": args.seed, "steps": args.steps,
           "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema,
           "parameters": n_params, "corpus": corpus.summary(), "threads": args.threads,
           "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "history": done.metrics["history"] if done else [],
           "seconds": done.metrics["seconds"] if done else None}
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2))
    h = log["history"]
    (args.out / "TRAINING.md").write_text(f"""# C2L-ST central model (shipped weights)

Unconditional pixel-space diffusion model of H&E patches: 112 um of tissue at 64 x 64 px
(1.75 um/px), v-prediction, cosine schedule (T = 1000), UNet with a 4x4 space-to-depth stem,
channels {channels}, attention at 8x8 and 4x4, {n_params / 1e6:.2f} M parameters, EMA
{args.ema}. Sampled with DDIM (25 steps in `samples.png`).

Command (from the repository root):

    {log['command']}

- Data: {json.dumps(corpus.summary())} patches (tissue tiles, half-patch overlap, random
  flips/rotations during training). her2st C3 is left out (shipped sample, held-out benchmark
  section). DLPFC low-resolution images are cut at their own scale (~12.7 um/px).
- Seed {args.seed}; {args.steps} steps of batch {args.batch_size}; AdamW lr {args.lr};
  {args.threads} CPU threads (shared machine), {log['seconds'] or 0:.0f} s.
- Final training loss (mean of the last 50 steps) {h[-1]['loss'] if h else float('nan'):.4f};
  validation loss (64 held-out patches, fixed noise/timesteps, EMA weights)
  {h[-1]['val_loss'] if h else float('nan'):.4f}; full curve in `training_log.json`.

These are weights from a CPU budget of minutes: samples have H&E colours and tissue-like
texture at low magnification, not crisp nuclei. Re-run the command with more `--steps` on a GPU
for a better prior; the local model adapts to whatever central weights it is given.
""")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
