"""``napari-hinge c2l pretrain | adapt | fill``: C2L-ST headless.

DATA is anything :func:`napari_hinge.io.spatial.read_spatial` reads (``FOLDER:SECTION`` for
her2st-layout folders)::

    napari-hinge c2l pretrain slide1.svs slide2.tif --out my_central --steps 2000
    napari-hinge c2l adapt her2st:C3 --out local_C3 --steps 600
    napari-hinge c2l fill her2st:C3 --model local_C3 --out fill_C3 --n-spacings 0.6
    napari-hinge c2l fill her2st:C3 --model local_C3 --region region.csv --source hinge

``fill`` writes ``mosaic.png`` (RGBA, transparent outside the tiles), ``fill.json``
(placement on the slide, parameters), ``tiles.csv`` (tile positions and conditioning
expression) and ``pairs.npz`` (synthetic training pairs, :mod:`napari_hinge.c2l.pairs`), which
``napari-hinge hinge train DATA --extra-pairs OUT/pairs.npz`` trains on next to the real spots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_hinge.cli import run_with_bar


def _train_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The training options, defaults from one row of :mod:`napari_hinge.defaults`."""
    steps, batch, lr = defaults["steps"], defaults["batch_size"], defaults["lr"]
    p.add_argument("--steps", type=int, default=steps,
                   help=f"optimiser steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch,
                   help=f"patches per step (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    p.add_argument("--ema", type=float, default=defaults["ema_decay"],
                   help="EMA decay of the weights")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help=f"random seed (default {defaults['seed']})")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="checkpoint folder (default: OUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--device", default=None,
                      help="cpu, cuda, mps (default: CUDA, then MPS, then the CPU)")


def register(subparsers) -> None:
    from napari_hinge.defaults import C2L_ADAPT, C2L_FILL, C2L_PRETRAIN

    p = subparsers.add_parser("c2l-pretrain", help="pre-train a C2L-ST central model",
                              description="Unconditional patch diffusion on tissue tiles of "
                                          "slides (112 um -> 64 px).")
    p.add_argument("slides", nargs="+", type=Path, help="slide/image files")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm/px for slides that do not record it (JPEG/PNG)")
    p.add_argument("--native", action="store_true",
                   help="cut 64 px tiles at the slides' own scale (coarse images)")
    p.add_argument("--init", default=None,
                   help="start from a central model folder or 'shipped' (fine-tuning)")
    p.add_argument("--max-patches", type=int, default=C2L_PRETRAIN["max_patches"],
                   help="per slide")
    _train_args(p, C2L_PRETRAIN)
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser("c2l-adapt", help="adapt a C2L-ST local model on paired spots",
                              description="Frozen central model + gene-conditioned FiLM, "
                                          "trained on the spots of one slide.")
    p.add_argument("data", help="spatial data (FOLDER:SECTION for her2st folders)")
    p.add_argument("--section", help="section of a her2st-layout folder")
    p.add_argument("--out", type=Path, required=True, help="local model folder to write")
    p.add_argument("--central", default="shipped", help="central model folder or 'shipped'")
    p.add_argument("--genes", help="comma-separated panel or a file with one gene per line "
                                   "(default: the panel rule on this section, --n-genes)")
    p.add_argument("--n-genes", type=int, default=C2L_ADAPT["n_genes"],
                   help=f"panel size when --genes is not given (default {C2L_ADAPT['n_genes']})")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="use this random fraction of the spots (few-shot adaptation)")
    _train_args(p, C2L_ADAPT)
    p.set_defaults(func=cmd_adapt)

    p = subparsers.add_parser("synthesize", help="fill a sparse region with synthetic H&E",
                              description="Generate gene-conditioned H&E tiles over a region "
                                          "(the slide is never modified).")
    p.add_argument("data", help="spatial data (FOLDER:SECTION for her2st folders)")
    p.add_argument("--section", help="section of a her2st-layout folder")
    p.add_argument("--model", required=True, help="local model folder (from c2l-adapt)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--region", type=Path, default=None,
                   help="polygon: CSV/JSON of (x, y) level-0 pixel vertices (default: tissue "
                        "farther than --n-spacings spot spacings from any spot)")
    p.add_argument("--n-spacings", type=float, default=C2L_FILL["n_spacings"],
                   help="spot spacings from the nearest spot (0.6: tissue between and "
                        "around the spots of a legacy-ST or Visium array)")
    p.add_argument("--source", choices=("neighbours", "hinge"), default=C2L_FILL["source"],
                   help="expression of the new tiles")
    p.add_argument("--hinge-model", default="shipped", help="HINGE model for --source hinge")
    p.add_argument("--k", type=int, default=C2L_FILL["k"],
                   help="neighbours for --source neighbours")
    p.add_argument("--guidance", type=float, default=C2L_FILL["guidance"],
                   help="classifier-free guidance")
    p.add_argument("--strength", type=float, default=C2L_FILL["strength"],
                   help="1: generate from noise; below 1: edit the real H&E under each tile")
    p.add_argument("--steps", type=int, default=C2L_FILL["steps"], help="DDIM steps")
    p.add_argument("--independent-tiles", action="store_true",
                   help="sample each tile on its own (about 3x faster, seams show) instead of "
                        "the region as one seamless canvas")
    p.add_argument("--seed", type=int, default=C2L_FILL["seed"], help="random seed (default 0)")
    p.add_argument("--max-tiles", type=int, default=C2L_FILL["max_tiles"],
                   help="refuse regions that need more tiles than this (default 2000)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--device", default=None,
                      help="cpu, cuda, mps (default: CUDA, then MPS, then the CPU)")
    p.set_defaults(func=cmd_synthesize)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")


def _device(name):
    from napari_hinge.device import default_device

    return default_device(name)


def cmd_pretrain(args) -> int:
    from napari_hinge import ddp
    from napari_hinge.training import run_to_end

    from .central import CentralModel
    from .data import CorpusSource, build_corpus
    from .train import train_central

    _check_out(args.out, args.overwrite or args.resume)
    for s in args.slides:
        if not s.is_file():
            raise FileNotFoundError(f"slide not found: {s}")
    sources = [CorpusSource(str(s), mpp=args.mpp, native=args.native,
                            max_patches=args.max_patches) for s in args.slides]
    ddp.init()
    main = ddp.is_main()  # under torchrun: rank 0 reports and writes
    corpus = build_corpus(sources, seed=args.seed)
    if main:
        print(f"corpus: {corpus.summary()}")
    model = CentralModel.load(args.init) if args.init else CentralModel()
    ckpt = args.checkpoints or args.out.with_name(args.out.name + ".checkpoints")
    gen = train_central(model, corpus.patches, steps=args.steps, batch_size=args.batch_size,
                        lr=args.lr, ema_decay=args.ema, seed=args.seed, checkpoint_dir=ckpt,
                        resume=args.resume, device=_device(args.device))
    model, last = run_with_bar(gen, "c2l-pretrain") if main else run_to_end(gen)
    if not main:
        return 0
    model.cpu().save(args.out)
    print(f"wrote {args.out} (final loss {last.loss:.4f})")
    return 0


def _read_genes(spec: str | None) -> list[str] | None:
    if not spec:
        return None
    path = Path(spec)
    if path.is_file():
        return [g.strip() for g in path.read_text().splitlines() if g.strip()]
    return [g.strip() for g in spec.split(",") if g.strip()]


def cmd_adapt(args) -> int:
    from napari_hinge.hinge.pipeline import read_dataset

    from .data import paired_spots
    from .local import build_local
    from .train import train_local

    _check_out(args.out, args.overwrite or args.resume)
    adata = read_dataset(args.data, section=args.section)
    patches, expr, genes, _ = paired_spots(adata, _read_genes(args.genes), n_genes=args.n_genes)
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.fraction < 1:
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(len(patches), max(2, int(round(args.fraction * len(patches)))),
                                  replace=False))
        patches, expr = patches[pick], expr[pick]
    print(f"{len(patches)} paired spots, {len(genes)} genes")
    local = build_local(args.central, genes, seed=args.seed)
    ckpt = args.checkpoints or args.out.with_name(args.out.name + ".checkpoints")
    local, last = run_with_bar(train_local(local, patches, expr, steps=args.steps,
                                     batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema,
                                     seed=args.seed, checkpoint_dir=ckpt, resume=args.resume,
                                     device=_device(args.device)), "c2l-adapt")
    local.cpu().save(args.out)
    print(f"wrote {args.out} (final loss {last.loss:.4f})")
    return 0


def read_polygon(path: Path) -> np.ndarray:
    """(V, 2) x, y vertices from a CSV (two columns, optional header) or a JSON list."""
    if not path.is_file():
        raise FileNotFoundError(f"region file not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            poly = np.asarray(json.loads(path.read_text()), dtype=float)
        else:
            text = path.read_text().strip().splitlines()
            rows = [r for r in text if r and not r[0].isalpha()]
            poly = np.asarray([[float(v) for v in r.replace(";", ",").split(",")[:2]]
                               for r in rows])
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a list of (x, y) vertices ({exc})") from exc
    if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
        raise ValueError(f"{path}: a region needs >= 3 (x, y) vertices, got shape {poly.shape}")
    return poly


def cmd_synthesize(args) -> int:
    from PIL import Image

    from napari_hinge.hinge.pipeline import read_dataset
    from napari_hinge.io.slides import open_slide
    from napari_hinge.training import atomic_write

    from .fill import fill_region_iter
    from .local import LocalModel
    from .pairs import pairs_from_fill, save_pairs

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"local model folder not found: {model_dir}")
    _check_out(args.out, args.overwrite)
    local = LocalModel.load(model_dir).to(_device(args.device))
    adata = read_dataset(args.data, section=args.section)
    meta = adata.uns.get("napari_hinge", {})
    if not meta.get("slide_path"):
        raise FileNotFoundError(f"{args.data}: no H&E image to fill")
    slide = open_slide(meta["slide_path"], mpp=meta.get("microns_per_pixel"))
    region = read_polygon(args.region) if args.region else None
    hinge = None
    if args.source == "hinge":
        from napari_hinge.hinge.pipeline import load_model

        hinge = load_model(args.hinge_model)
    result, last = run_with_bar(fill_region_iter(local, slide, adata, region=region,
                                           n_spacings=args.n_spacings, source=args.source,
                                           hinge_model=hinge, k=args.k, guidance=args.guidance,
                                           steps=args.steps, seed=args.seed,
                                           max_tiles=args.max_tiles, strength=args.strength,
                                           seamless=not args.independent_tiles,
                                           device=_device(args.device)), "synthesize")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "mosaic.png",
                 lambda tmp: Image.fromarray(result.mosaic, "RGBA").save(tmp, format="PNG"))
    result.table().to_csv(out / "tiles.csv", index=False)

    # the training pairs 'napari-hinge hinge train --extra-pairs' reads (one format: c2l.pairs)
    save_pairs(pairs_from_fill(result, meta["slide_path"]), out / "pairs.npz")
    place = result.placement()
    info = {**result.params, "n_tiles": len(result.layout), "model": str(model_dir),
            "slide_path": meta["slide_path"], "microns_per_pixel": result.microns_per_pixel,
            "placement": {"scale": list(place["scale"]), "translate": list(place["translate"]),
                          "units": "µm" if result.microns_per_pixel else "px"},
            "mosaic_shape": list(result.mosaic.shape)}
    atomic_write(out / "fill.json", lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    print(f"{len(result.layout)} tiles -> {out}")
    return 0
