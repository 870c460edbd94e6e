"""``napari-hinge domains DATA --k K --out OUT.h5ad``: STMGAC spatial domains, headless."""

from __future__ import annotations

from pathlib import Path

# Where results go without --out: a named folder, not loose files in the working folder.
RESULTS_DIR = Path("domains_out")
LABELS_TIF_ENCODING = ("pixel value = domain + 1 (domain d of obs['domain'] is painted d + 1); "
                       "0 = background (no spot)")


def register(subparsers) -> None:
    from .presets import AUTO_PRESET, PRESETS

    p = subparsers.add_parser(
        "domains",
        help="find spatial domains with STMGAC and write them to an h5ad (and a label TIFF)",
        description="Train STMGAC on a spatial data set, cluster its latent into K domains and "
        "write obs['domain'], obsm['X_stmgac'] and obsm['stmgac_denoised'] (denoised "
        "expression of the genes it was trained on) to OUT.h5ad. When the data carry expert "
        "labels (obs['pathology_label'] of her2st, a layer_labels.tsv beside DLPFC counts, or "
        "--truth) it reports ARI and NMI against them.",
        epilog=f"Label TIFF: {LABELS_TIF_ENCODING}.",
    )
    p.add_argument("data", help="Space Ranger folder, legacy-ST counts file or .h5ad")
    p.add_argument("--k", type=int, required=True, help="number of domains K")
    p.add_argument("--out", default=None,
                   help=f"output .h5ad, written atomically (default: {RESULTS_DIR}/NAME.h5ad, "
                   "NAME from DATA)")
    p.add_argument("--preset", default=AUTO_PRESET, choices=(AUTO_PRESET, *sorted(PRESETS)),
                   metavar="PRESET",
                   help="STMGAC preset: auto (legacy_st on legacy-ST data, dlpfc otherwise; the "
                   f"default) or one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (preset default)")
    p.add_argument("--seed", type=int, default=3407, help="random seed (default 3407)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, mps (default: CUDA, then MPS, then the CPU)")
    p.add_argument("--method", choices=("gmm", "leiden"), default="gmm",
                   help="clustering of the latent: Gaussian mixture (tied covariance, "
                   "default) or Leiden with the resolution searched to K")
    p.add_argument("--refine", dest="refine", action="store_true", default=None,
                   help="30-NN spatial majority vote (preset default)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="no spatial majority vote")
    p.add_argument("--truth", default=None,
                   help="expert labels to score against: an obs column or a TSV (spot id, "
                   "label); default: found in the data when present")
    p.add_argument("--labels-tif", default=None,
                   help="also write the domains as a uint8/uint16 label TIFF over the spots' "
                   f"pixel frame (each spot a disc of its true diameter; {LABELS_TIF_ENCODING})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="label TIFF pixels per coordinate pixel (default 1)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from .. import tl
    from .._files import atomic_write
    from ..io.spatial import read_spatial
    from .labels import domain_scores, domains_to_labels, ground_truth

    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist")
    out = Path(args.out) if args.out else RESULTS_DIR / f"{data.name.split('.')[0]}.h5ad"
    if out.suffix != ".h5ad":
        raise ValueError(f"--out must end in .h5ad, got {out}")
    adata = read_spatial(data)
    truth, source = ground_truth(adata, data, args.truth)  # before training: fail early
    tl.domains(adata, n_domains=args.k, preset=args.preset, epochs=args.epochs, seed=args.seed,
               refine=args.refine, method=args.method, device=args.device)
    params = adata.uns["domain"]["params"]
    print(f"preset {params['preset']}, {params['epochs']} epochs, seed {params['seed']}")
    if truth is not None:
        scores = domain_scores(adata, truth)
        adata.uns["domain"]["scores"] = {**scores, "truth": source}
        print(f"ARI {scores['ari']:.3f}  NMI {scores['nmi']:.3f}  against {source} "
              f"({scores['n_labelled']} labelled spots, {scores['n_truth_classes']} classes)")
    atomic_write(out, lambda tmp: adata.write_h5ad(tmp))
    print(f"wrote {out}")
    if args.labels_tif:
        import tifffile

        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * args.scale
        shape = (int(np.ceil(xy[:, 1].max())) + 64, int(np.ceil(xy[:, 0].max())) + 64)
        labels = domains_to_labels(adata, shape, scale=args.scale)
        tif = Path(args.labels_tif)
        atomic_write(tif, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
        print(f"wrote {tif} ({labels.shape[1]}x{labels.shape[0]} {labels.dtype}; "
              f"{LABELS_TIF_ENCODING})")
    sizes = adata.obs["domain"].value_counts().sort_index()
    print("domain sizes: " + ", ".join(f"{k}:{v}" for k, v in sizes.items()))
    return 0
