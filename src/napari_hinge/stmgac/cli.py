"""``napari-hinge domains DATA --k K --out OUT.h5ad``: STMGAC spatial domains, headless."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "domains",
        help="find spatial domains with STMGAC and write them to an h5ad (and a label TIFF)",
        description="Train STMGAC on a spatial data set, cluster its latent into K domains and "
        "write obs['domain'], obsm['X_stmgac'] and layers['stmgac_denoised'] to OUT.h5ad.",
    )
    p.add_argument("data", help="Space Ranger folder, legacy-ST counts file or .h5ad")
    p.add_argument("--k", type=int, required=True, help="number of domains K")
    p.add_argument("--out", required=True, help="output .h5ad (written atomically)")
    p.add_argument("--preset", default="dlpfc", help="STMGAC preset (default: dlpfc)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (preset default)")
    p.add_argument("--seed", type=int, default=3407, help="random seed (default 3407)")
    p.add_argument("--method", choices=("gmm", "leiden"), default="gmm",
                   help="clustering of the latent: Gaussian mixture (tied covariance, "
                   "default) or Leiden with the resolution searched to K")
    p.add_argument("--refine", dest="refine", action="store_true", default=None,
                   help="30-NN spatial majority vote (preset default)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="no spatial majority vote")
    p.add_argument("--labels-tif", default=None,
                   help="also write the domains as a uint8/uint16 label TIFF over the spots' "
                   "pixel frame (each spot a disc of its true diameter)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="label TIFF pixels per coordinate pixel (default 1)")
    p.set_defaults(func=run)


def _progress(ev) -> None:
    if ev.kind == "epoch" and (ev.step % 25 == 0 or ev.step == ev.total_steps):
        print(f"\repoch {ev.step}/{ev.total_steps} loss {ev.loss:.4f}", end="", file=sys.stderr,
              flush=True)
    elif ev.kind in ("done", "stopped"):
        print(file=sys.stderr)


def run(args) -> int:
    import numpy as np

    from .. import tl
    from ..io.spatial import read_spatial
    from ..training import atomic_write
    from .labels import domains_to_labels

    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist")
    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise ValueError(f"--out must end in .h5ad, got {out}")
    adata = read_spatial(data)
    tl.domains(adata, n_domains=args.k, preset=args.preset, epochs=args.epochs, seed=args.seed,
               refine=args.refine, method=args.method, progress=_progress)
    atomic_write(out, lambda tmp: adata.write_h5ad(tmp))
    print(f"wrote {out}")
    if args.labels_tif:
        import tifffile

        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * args.scale
        shape = (int(np.ceil(xy[:, 1].max())) + 64, int(np.ceil(xy[:, 0].max())) + 64)
        labels = domains_to_labels(adata, shape, scale=args.scale)
        tif = Path(args.labels_tif)
        atomic_write(tif, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
        print(f"wrote {tif} ({labels.shape[1]}x{labels.shape[0]} {labels.dtype})")
    sizes = adata.obs["domain"].value_counts().sort_index()
    print("domain sizes: " + ", ".join(f"{k}:{v}" for k, v in sizes.items()))
    return 0
