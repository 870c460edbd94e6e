"""``napari-hinge hinge train | predict | evaluate | predict-slide``: HINGE on any dataset.

DATA is anything :func:`napari_hinge.io.spatial.read_spatial` reads: a Space Ranger ``outs/``
folder, a ``.h5ad`` with ``obsm['spatial']`` and a slide path, or a her2st-layout folder with
``--section`` (or ``FOLDER:SECTION``, which also lets ``train`` take several sections)::

    napari-hinge hinge train her2st:C2 her2st:C4 her2st:C5 --out my_model --epochs 40
    napari-hinge hinge predict her2st --section C3 --model my_model --out C3_pred.h5ad
    napari-hinge hinge evaluate her2st --section C3 --model my_model --json C3_scores.json

``--model shipped`` (the default of predict/evaluate) uses the weights that ship with the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_hinge._files import atomic_write


def _data_args(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    parser.add_argument("data", nargs="+" if many else None,
                        help="Space Ranger outs/ folder, .h5ad, or her2st folder "
                             "(FOLDER:SECTION or --section)")
    parser.add_argument("--section", help="section of a her2st-layout folder")


def _sampler_args(parser: argparse.ArgumentParser) -> None:
    from .defaults import SAMPLER

    parser.add_argument("--model", default="shipped",
                        help="model folder written by 'train' (default: the shipped weights)")
    parser.add_argument("--samples", type=int, default=SAMPLER["n_samples"],
                        help="samples per spot (S; their spread is the uncertainty)")
    parser.add_argument("--reveal-steps", type=int, default=SAMPLER["reveal_steps"],
                        help="reverse steps, 1..T=50 (fewer is faster; 10 scores as 50)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (same seed, same maps)")
    parser.add_argument("--augment", action="store_true",
                        help="sample over the 8 dihedral views of each patch")
    parser.add_argument("--device", default=None,
                           help="cpu, cuda, mps (default: CUDA, then MPS, then the CPU)")


def register(subparsers) -> None:
    from .defaults import RECIPE, TRAIN
    from .defaults import SAMPLER as RECIPE_SAMPLER

    p = subparsers.add_parser("train", help="train HINGE on spatial datasets",
                              description="Train HINGE (frozen backbone, SoftAdaLN modulation).")
    _data_args(p, many=True)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--genes", help="comma-separated panel or a file with one gene per line "
                                   "(default: the panel rule, --n-genes)")
    p.add_argument("--n-genes", type=int, default=TRAIN["n_genes"],
                   help="panel size of the rule (top genes by variance, all measured genes)")
    p.add_argument("--include", help="genes added to the rule's panel (comma-separated or a "
                                     "file), e.g. markers; 'breast' = the built-in breast list")
    p.add_argument("--context-um", type=float, default=RECIPE["context_um"],
                   help="neighbour context radius in µm (0 = the spot alone)")
    p.add_argument("--prior", default=RECIPE["prior"] or "none", choices=("ridge", "none"),
                   help="deterministic prior the diffusion refines")
    p.add_argument("--variance", action=argparse.BooleanOptionalAction,
                   default=RECIPE["predict_variance"],
                   help="variance head: samples spread, calibrated intervals")
    p.add_argument("--depth-calibration", action=argparse.BooleanOptionalAction,
                   default=RECIPE["depth_calibration"],
                   help="scale each spot's interval by its sequencing depth predicted from "
                        "the image: ranks errors better, covers less on new sections")
    p.add_argument("--encoder", default="efficientnet-lite0",
                   help="patch encoder: efficientnet-lite0 (ships), uni, conch, uni+conch")
    p.add_argument("--encoder-weights", help="weights file of a user-supplied encoder")
    p.add_argument("--backbone", default="builtin",
                   help="'builtin', a backbone folder/checkpoint, or 'random'")
    p.add_argument("--epochs", type=int, default=TRAIN["epochs"], help="training epochs")
    p.add_argument("--batch-size", type=int, default=TRAIN["batch_size"],
                   help="spots per optimiser step")
    p.add_argument("--lr", type=float, default=TRAIN["lr"], help="AdamW learning rate")
    p.add_argument("--ada-rank", type=int, default=TRAIN["ada_rank"],
                   help="rank of the low-rank SoftAdaLN heads (0 = full heads, the paper)")
    p.add_argument("--no-augment", action="store_true", help="no dihedral feature views")
    p.add_argument("--val-fraction", type=float, default=TRAIN["val_fraction"],
                   help="spots held out for validation and for the interval calibration")
    p.add_argument("--seed", type=int, default=TRAIN["seed"],
                   help="seed of split, batches and noise")
    p.add_argument("--extra-pairs", type=Path, action="append", default=[], metavar="FILE",
                   help="synthetic pairs.npz from 'napari-hinge c2l fill' to train on next "
                        "to the real spots (repeatable; without --genes the panel is theirs)")
    p.add_argument("--extra-weight", type=float, default=1.0, metavar="W",
                   help="loss and ridge weight of each synthetic pair (default 1)")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="checkpoint folder (default: OUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT model")
    p.add_argument("--device", default=None,
                      help="cpu, cuda, mps (default: CUDA, then MPS, then the CPU)")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("predict", help="predict expression on spots with HINGE")
    _data_args(p)
    _sampler_args(p)
    p.add_argument("--out", type=Path, required=True, help=".h5ad to write")
    p.add_argument("--png", type=Path, default=None,
                   help="picture of the top genes (default: OUT with .png)")
    p.add_argument("--no-png", action="store_true", help="do not write the picture")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("evaluate", help="score HINGE against measured expression")
    _data_args(p)
    _sampler_args(p)
    p.add_argument("--pred", type=Path, default=None,
                   help="score this .h5ad written by 'predict' instead of predicting again")
    p.add_argument("--json", type=Path, default=None, help="write the scores here")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "predict-slide", help="paint predicted expression maps over a whole slide",
        description="Tissue mask, then (dense, the default) the encoder once over the tissue, "
                    "HINGE's prior every 16 µm and its samples every --sample-stride µm, or "
                    "(tiles) HINGE samples per tile: writes OUT (a folder) with maps.ome.tif "
                    "and uncertainty.ome.tif (pyramidal, genes x H x W, µm), maps.ome.zarr / "
                    "uncertainty.ome.zarr (NGFF) and tiles.h5ad; --spatialdata also "
                    "maps.sdata.zarr (slide, maps, uncertainty and --spots in one SpatialData "
                    "store).")
    p.add_argument("slide", type=Path, help="slide file (.svs, .ndpi, .tif, .ome.tif, .jpg, .png)")
    _sampler_args(p)
    p.add_argument("--genes", help="comma-separated genes or a file (default: all the model's)")
    _slide_mode_args(p)
    p.add_argument("--spatialdata", action="store_true",
                   help="also write OUT/maps.sdata.zarr: slide, maps and uncertainty (and "
                        "--spots) as one SpatialData store in µm (needs the spatialdata extra)")
    p.add_argument("--spots", default=None, metavar="DATA",
                   help="measured spots on this slide (anything 'predict' reads, e.g. "
                        "FOLDER:SECTION): their table and the maps read at them go into the "
                        "SpatialData store")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel when the file lacks it")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=cmd_predict_slide, samples=RECIPE_SAMPLER["slide_samples"])

    p = subparsers.add_parser(
        "predict-cohort", help="paint expression maps over many slides on a dask cluster",
        description="predict-slide for every slide of a cohort on dask.distributed (a local "
                    "cluster by default, --scheduler for a running one): OUT/<slide>/ per "
                    "slide (written atomically, complete.json last; a rerun skips complete "
                    "slides) and OUT/cohort.json, the per-slide summary with any errors; exit "
                    "status 1 when a slide failed.")
    p.add_argument("slides", nargs="*", type=Path, help="slide files")
    p.add_argument("--manifest", type=Path, default=None,
                   help="CSV with a 'slide' column (optional 'name', 'mpp')")
    p.add_argument("--model", default="shipped",
                   help="model folder written by 'train' (default: the shipped weights)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--genes", help="comma-separated genes or a file (default: all the model's)")
    _slide_mode_args(p)
    p.add_argument("--samples", type=int, default=RECIPE_SAMPLER["slide_samples"],
                   help="samples per position (S; their spread is the uncertainty)")
    p.add_argument("--reveal-steps", type=int, default=RECIPE_SAMPLER["reveal_steps"],
                   help="reverse steps, 1..T=50 (fewer is faster)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (same seed, same maps)")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of slides whose file and manifest row lack it")
    p.add_argument("--scheduler", default=None,
                   help="address of a running dask scheduler (tcp://HOST:PORT); default: a "
                        "local cluster")
    p.add_argument("--workers", type=int, default=None,
                   help="local cluster worker processes (default: cores / threads per worker)")
    p.add_argument("--threads-per-worker", type=int, default=1,
                   help="local cluster threads per worker (default 1)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per task (default: the host's cores / its dask threads)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace complete slides made with other settings or another model")
    p.set_defaults(func=cmd_predict_cohort)


def _slide_mode_args(p) -> None:
    """The whole-slide path's options, shared by predict-slide and predict-cohort."""
    from .defaults import SLIDE

    p.add_argument("--mode", choices=("dense", "tiles"), default=SLIDE["mode"],
                   help=f"dense: encoder once over the tissue, a value every 16 µm; tiles: "
                        f"every position encoded and sampled alone (default {SLIDE['mode']})")
    p.add_argument("--stride", type=float, default=None,
                   help=f"µm between map positions (default: dense {SLIDE['stride_um']:g}, "
                        "tiles 112, the patch side)")
    p.add_argument("--sample-stride", type=float, default=None,
                   help="dense: µm between the positions where HINGE draws its samples "
                        f"(residual and uncertainty, interpolated; default "
                        f"{SLIDE['sample_stride_um']:g})")


def _read(data: str, section: str | None):
    from .pipeline import read_dataset

    return read_dataset(data, section=section)


def _genes(spec: str | None, *, minimum: int = 1, flag: str = "--genes") -> list[str] | None:
    if not spec:
        return None
    if spec.strip().lower() == "breast":
        from napari_hinge.expression import BREAST_MARKERS

        return list(BREAST_MARKERS)
    path = Path(spec)
    if path.is_file():
        genes = [g.strip() for g in path.read_text().splitlines() if g.strip()]
    else:
        genes = [g.strip().strip("'\"") for g in spec.split(",") if g.strip()]
    if len(genes) < minimum:
        raise ValueError(f"{flag}: need at least {minimum} genes, got {len(genes)}: "
                         f"{', '.join(genes) or 'none'}")
    return genes


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def cmd_train(args) -> int:
    from napari_hinge import ddp
    from napari_hinge.c2l.pairs import load_pairs
    from napari_hinge.errors import InputError

    from .pipeline import fit_hinge, save_model

    # under torchrun every process trains on its shard of each batch; rank 0 alone shows
    # progress and writes the model
    ddp.init()
    main = ddp.is_main()

    out = Path(args.out)
    if (out / "config.json").exists() and not (args.overwrite or args.resume):
        raise ValueError(f"{out} already holds a model; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if not 0 <= args.extra_weight < float("inf"):
        raise InputError(f"--extra-weight must be a number >= 0, got {args.extra_weight}")
    pairs = [load_pairs(f) for f in args.extra_pairs]  # checked before any encoding
    datasets = [_read(d, args.section) for d in args.data]
    ckpt = args.checkpoints or out.with_name(out.name + ".checkpoints")
    gen = fit_hinge(
        datasets, genes=_genes(args.genes, minimum=3), n_genes=args.n_genes,
        include=_genes(args.include, flag="--include") or (), encoder=args.encoder,
        context_um=args.context_um or None, prior=None if args.prior == "none" else args.prior,
        predict_variance=args.variance, depth_calibration=args.depth_calibration,
        encoder_weights=args.encoder_weights, backbone=args.backbone, epochs=args.epochs,
        augment=not args.no_augment, batch_size=args.batch_size, lr=args.lr,
        ada_rank=args.ada_rank or None, val_fraction=args.val_fraction, seed=args.seed,
        checkpoint_dir=ckpt, resume=args.resume, device=args.device,
        progress=lambda name, d, t: None, extra_pairs=pairs, extra_weight=args.extra_weight,
    )
    bar = None
    model = None
    try:
        while True:
            try:
                ev = next(gen)
            except FileExistsError as exc:  # an earlier run's checkpoints: never overwrite
                raise ValueError(f"{exc} (--resume continues it)") from None
            except StopIteration as stop:
                model = stop.value
                break
            if bar is None and ev.total_steps and main:
                bar = _bar(ev.total_steps, "train HINGE")
                bar.update(ev.step - (1 if ev.kind == "step" else 0))
            if ev.kind == "step" and bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=ev.epoch, loss=f"{ev.loss:.3f}")
            elif ev.kind == "epoch" and bar is not None:
                val = "" if ev.val_loss is None else f" val_loss {ev.val_loss:.4f}"
                pcc = ev.metrics.get("val_pcc")
                bar.write(f"epoch {ev.epoch}: loss {ev.loss:.4f}{val}"
                          + ("" if pcc is None else f" val_pcc {pcc:.3f}"))
            elif ev.kind == "stopped":
                if main:
                    print(f"stopped; resume with --resume (checkpoints in {ckpt})",
                          file=sys.stderr)
                return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last completed epoch is in {ckpt}; continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if not main:
        return 0
    save_model(model, out)
    summary = dict(model.train_summary or {})
    summary.pop("history", None)
    print(json.dumps({"model": str(out), "genes": len(model.config.genes), **summary},
                     indent=1, default=str))
    return 0


def _load(spec: str, device):
    from napari_hinge.device import default_device

    from .pipeline import load_model

    return load_model(spec, map_location=default_device(device))


def _predict(args, adata):
    from .pipeline import predict_spots

    model = _load(args.model, args.device)
    bar = _bar(adata.n_obs, "sample spots")
    bar.unit = "spot"

    def tick(done, total):
        bar.update(done - bar.n)

    try:
        pred = predict_spots(model, adata, n_samples=args.samples,
                             reveal_steps=args.reveal_steps, seed=args.seed,
                             augment=args.augment, device=args.device, progress=tick)
    finally:
        bar.close()
    return pred


def cmd_predict(args) -> int:
    from .demo_job import plot_prediction

    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out {out}: the prediction is written as .h5ad")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    adata = _read(args.data, args.section)
    pred = _predict(args, adata)
    # never leave a half-written file where the user's was
    atomic_write(out, lambda tmp: pred.write_h5ad(tmp))
    written = {"h5ad": str(out), "spots": pred.n_obs, "genes": pred.n_vars,
               "genes_missing_in_data": pred.uns["hinge"]["genes_missing_in_data"]}
    if not args.no_png:
        png = args.png or out.with_suffix(".png")
        written["png"] = str(plot_prediction(pred, png))
    print(json.dumps(written, indent=1))
    return 0


def cmd_evaluate(args) -> int:
    from .pipeline import evaluate

    adata = _read(args.data, args.section)
    if args.pred is not None:
        import anndata as ad

        if not Path(args.pred).is_file():
            raise FileNotFoundError(f"--pred {args.pred}: file not found")
        pred = ad.read_h5ad(args.pred)
        if "measured" not in pred.layers or "measured" not in pred.var:
            raise ValueError(f"--pred {args.pred}: not a file written by "
                             "'napari-hinge hinge predict'")
        if pred.n_obs != adata.n_obs:
            raise ValueError(f"--pred {args.pred} has {pred.n_obs} spots, the data {adata.n_obs}")
    else:
        pred = _predict(args, adata)
    scores = evaluate(pred, adata)
    per_gene = scores.pop("pcc_per_gene")
    print(f"{'metric':14s} value")
    for k in ("pcc_mean", "pcc_top10", "pcc_top50", "mse", "mae", "coexpression"):
        print(f"{k:14s} {scores[k]:.4f}")
    print(f"{'genes scored':14s} {scores['genes_scored']} (missing in data: "
          f"{', '.join(scores['genes_missing_in_data']) or 'none'}); spots {scores['n_spots']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(scores | {"pcc_per_gene": per_gene}, indent=1,
                                        default=str))
    return 0


def cmd_predict_slide(args) -> int:
    from napari_hinge.cli import run_with_bar

    from .slide_predict import predict_slide_dense_iter, predict_slide_iter, write_slide_outputs

    if not args.slide.is_file():
        raise FileNotFoundError(f"{args.slide} does not exist")
    if args.spots and not args.spatialdata:
        raise ValueError("--spots goes into the SpatialData store: add --spatialdata")
    # read before the slide's minutes of work: a bad path fails at once
    spots = _read(args.spots, None) if args.spots else None
    model = _load(args.model, args.device)
    common = {"stride_um": args.stride, "genes": _genes(args.genes), "n_samples": args.samples,
              "reveal_steps": args.reveal_steps, "seed": args.seed, "mpp": args.mpp}
    if args.mode == "dense":
        gen = predict_slide_dense_iter(model, args.slide, sample_stride_um=args.sample_stride,
                                       device=args.device, previews=False, **common)
    else:
        gen = predict_slide_iter(model, args.slide, **common)
    prediction, _ = run_with_bar(gen, "steps", unit="step")
    out = Path(args.out)
    write_slide_outputs(prediction, out, spatialdata=args.spatialdata, spots=spots)
    print(json.dumps({"out": str(out), "tiles": len(prediction.grid),
                      "raster": list(prediction.grid.shape), "genes": len(prediction.genes),
                      **prediction.params}, indent=1, default=str))
    return 0


def cmd_predict_cohort(args) -> int:
    from tqdm.auto import tqdm

    from .cohort import cohort_slides, predict_cohort, summary_table

    jobs = cohort_slides(args.slides, manifest=args.manifest, mpp=args.mpp)
    slides_bar = tqdm(total=len(jobs), desc="slides", unit="slide", file=sys.stderr,
                      dynamic_ncols=True, position=0)
    tiles_bar = tqdm(total=0, desc="tile batches", unit="batch", file=sys.stderr,
                     dynamic_ncols=True, position=1)
    seen: dict[str, tuple[int, int]] = {}  # slide -> (batches done, batches in all)
    failed = []

    def progress(kind, info):
        if kind == "slide":
            if info["status"] == "failed":
                failed.append(info["name"])
                slides_bar.write(f"{info['name']}: {info['error']}")
            slides_bar.update(1)
            slides_bar.set_postfix(failed=len(failed))
        else:
            seen[info["name"]] = (info["done"], info["total"])
            tiles_bar.total = sum(t for _, t in seen.values())
            tiles_bar.n = sum(d for d, _ in seen.values())
            tiles_bar.refresh()

    try:
        summary = predict_cohort(
            jobs, args.model, args.out, scheduler=args.scheduler, n_workers=args.workers,
            threads_per_worker=args.threads_per_worker, torch_threads=args.torch_threads,
            mode=args.mode, stride_um=args.stride, sample_stride_um=args.sample_stride,
            genes=_genes(args.genes), n_samples=args.samples,
            reveal_steps=args.reveal_steps, seed=args.seed, overwrite=args.overwrite,
            progress=progress)
    finally:
        tiles_bar.close()
        slides_bar.close()
    print(summary_table(summary))
    print(json.dumps({"out": summary["out"], "summary": str(Path(summary["out"]) / "cohort.json"),
                      "workers": summary["workers"], **summary["counts"],
                      "seconds": summary["seconds"]}, indent=1))
    return 1 if summary["counts"]["failed"] else 0
