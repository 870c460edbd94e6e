"""Rebuild ``src/napari_hinge/sample_data`` from ``../shared/data`` (deterministic).

What it writes (see ``sample_data/README.md``):

- ``her2st_C3/``: her2st section C3 in the her2st layout, read by ``read_legacy_st``:
  ``images/C3_HE.jpg`` (the H&E downsampled ``--factor`` times, Lanczos, JPEG quality 85),
  ``counts/C3.tsv.gz`` (C3's raw counts on a gene subset chosen over C2-C6, see ``select_genes``)
  and ``spots/C3_selection.tsv`` (pixel coordinates scaled to the downsampled image, plus a
  ``total_counts`` column: each spot's UMI total over all genes of the source table).
- ``CMU-1-Small-Region.svs``: the OpenSlide CC0 test slide, copied unchanged.

Usage::

    python scripts/make_sample_data.py [--shared ../shared/data] [--factor 2]

Running it twice gives byte-identical files (gzip mtime 0, fixed JPEG settings, sorted genes).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from napari_hinge.geometry import image_pixel_limit
from napari_hinge.io.legacy_st import read_her2st, read_legacy_st

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "napari_hinge" / "sample_data"
SECTION = "C3"  # held out from the shipped HINGE weights (trained on C2, C4-C6)
GENE_SECTIONS = ("C2", "C3", "C4", "C5", "C6")
N_TOP_VAR = 300
MIN_EXPRESSED = 0.10
MAX_GENES = 1000
JPEG_QUALITY = 85
# Named markers kept whatever their variance: ERBB2 is high everywhere in this HER2+ tumour, so
# variance alone drops it, yet "colour the spots by ERBB2" is the first thing a demo user does.
MARKERS = ("ERBB2", "GRB7", "ESR1", "KRT19", "EPCAM", "PTPRC", "CD74", "COL1A1", "ACTB", "GAPDH")
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def select_genes(her2st: Path) -> list[str]:
    """Genes kept in the sample: top variance ∪ markers ∪ broadly expressed, over C2-C6.

    Targets are log1p(normalize_total to 1e4) with library sizes over all genes of each
    section. Kept: the ``N_TOP_VAR`` genes of highest variance over the pooled C2-C6 spots,
    the ``MARKERS``, plus the genes expressed (count > 0) in >= 10% of those spots, ranked by
    variance and cut so that the total stays <= ``MAX_GENES``. Only genes present in every
    section qualify.
    """
    tables = []
    for s in GENE_SECTIONS:
        ad = read_her2st(her2st, s, images=False)
        X = ad.X.toarray().astype(np.float64)
        lib = X.sum(axis=1, keepdims=True)
        norm = np.log1p(X / np.maximum(lib, 1) * 1e4)
        tables.append((pd.Index(ad.var_names), X > 0, norm))
    common = tables[0][0]
    for names, _, _ in tables[1:]:
        common = common.intersection(names, sort=False)
    expressed = np.vstack([e[:, n.get_indexer(common)] for n, e, _ in tables])
    logn = np.vstack([v[:, n.get_indexer(common)] for n, _, v in tables])
    var = logn.var(axis=0)
    frac = expressed.mean(axis=0)
    # stable order: variance descending, ties by name
    order = np.lexsort((np.asarray(common), -var))
    top = list(common[order[:N_TOP_VAR]])
    chosen = set(top) | {g for g in MARKERS if g in common}
    for i in order:
        if len(chosen) >= MAX_GENES:
            break
        if frac[i] >= MIN_EXPRESSED:
            chosen.add(common[i])
    n_broad = int((frac >= MIN_EXPRESSED).sum())
    print(
        f"genes: {len(common)} common to {', '.join(GENE_SECTIONS)}; "
        f"{n_broad} expressed in >= {MIN_EXPRESSED:.0%} of spots; kept {len(chosen)} "
        f"(top {N_TOP_VAR} by variance + {len(MARKERS)} markers + broadly expressed by "
        f"variance, cap {MAX_GENES})"
    )
    return sorted(chosen)


def _gzip_bytes(text: str) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no file name: identical bytes on every run
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as fh:
        fh.write(text.encode())
    return buf.getvalue()


def build_her2st(her2st: Path, out: Path, factor: int) -> dict:
    genes = select_genes(her2st)
    sec = out / f"her2st_{SECTION}"
    for sub in ("counts", "spots", "images"):
        (sec / sub).mkdir(parents=True, exist_ok=True)

    # image: Lanczos downsample, baseline JPEG at a fixed quality (no EXIF, no timestamps)
    src_img = her2st / "images" / f"{SECTION}_HE.jpg"
    with image_pixel_limit(), Image.open(src_img) as img:
        w, h = img.size
        small = img.convert("RGB").resize(
            (round(w / factor), round(h / factor)), Image.Resampling.LANCZOS
        )
    sx, sy = small.width / w, small.height / h
    img_path = sec / "images" / f"{SECTION}_HE.jpg"
    small.save(img_path, format="JPEG", quality=JPEG_QUALITY, optimize=True, subsampling="4:2:0")

    # counts: the source table restricted to the chosen genes (integers, same layout)
    counts = pd.read_csv(her2st / "counts" / f"{SECTION}.tsv.gz", sep="\t", index_col=0)
    total = counts.sum(axis=1)
    sub = counts.loc[:, [g for g in counts.columns if g in set(genes)]].astype(np.int64)
    (sec / "counts" / f"{SECTION}.tsv.gz").write_bytes(_gzip_bytes(sub.to_csv(sep="\t")))

    # spots: pixel coordinates scaled to the downsampled image; library size over all genes
    spots = pd.read_csv(her2st / "spots" / f"{SECTION}_selection.tsv", sep="\t")
    spots["pixel_x"] = (spots["pixel_x"] * sx).round(3)
    spots["pixel_y"] = (spots["pixel_y"] * sy).round(3)
    ids = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    spots["total_counts"] = total.reindex(ids).fillna(0).astype(np.int64).to_numpy()
    spots.to_csv(sec / "spots" / f"{SECTION}_selection.tsv", sep="\t", index=False)
    return {
        "factor": factor,
        "scale": (sx, sy),
        "size": (small.width, small.height),
        "n_genes": sub.shape[1],
        "n_spots": sub.shape[0],
    }


def copy_cmu(wsi: Path, out: Path) -> Path:
    src = wsi / "CMU-1-Small-Region.svs"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if digest != CMU_SHA256:
        raise ValueError(f"{src}: sha256 {digest} is not the CMU-1-Small-Region test slide")
    dst = out / src.name
    shutil.copyfile(src, dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="the shared data folder (default ../shared/data)",
    )
    parser.add_argument("--factor", type=int, default=2, help="image downsample factor")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    info = build_her2st(args.shared / "her2st_subset", args.out, args.factor)
    copy_cmu(args.shared / "wsi_small", args.out)

    # load through the real reader: the check that the sample is usable as shipped
    sec = args.out / f"her2st_{SECTION}"
    ad = read_legacy_st(
        sec / "counts" / f"{SECTION}.tsv.gz",
        sec / "spots" / f"{SECTION}_selection.tsv",
        image=sec / "images" / f"{SECTION}_HE.jpg",
    )
    meta = ad.uns["napari_hinge"]
    print(
        f"her2st {SECTION}: {ad.n_obs} spots x {ad.n_vars} genes, image {info['size']} "
        f"(1/{info['factor']}), mpp {meta['microns_per_pixel']:.4f}, "
        f"spot {meta['spot_diameter_px']:.1f} px"
    )
    for f in sorted(p for p in args.out.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        print(f"{f.stat().st_size / 2**20:8.3f} MiB  {digest}  {f.relative_to(args.out)}")


if __name__ == "__main__":
    main()
