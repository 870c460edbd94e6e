"""Small real data shipped with the package (see ``sample_data/README.md``).

- her2st section C3 (HER2+ breast cancer, legacy ST; Andersson et al. 2021): H&E at 1/2 of
  the original resolution, raw counts of 1000 genes, spot coordinates on that image.
  C3 is held out from the shipped HINGE weights (trained on C2, C4-C6).
- ``CMU-1-Small-Region.svs``: the OpenSlide Aperio test slide (CC0), unchanged.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["cmu_slide_path", "her2st_sample_paths", "load_her2st_sample", "sample_dir"]

HER2ST_SECTION = "C3"


def sample_dir() -> Path:
    """Folder of the shipped sample data (inside the installed package)."""
    path = Path(__file__).resolve().parent / "sample_data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"sample data folder missing: {path} (rebuild with scripts/make_sample_data.py)"
        )
    return path


def her2st_sample_paths() -> dict[str, Path]:
    """Paths of the shipped her2st section: ``folder``, ``counts``, ``spots``, ``image``.

    ``folder`` is in the her2st layout, so ``read_her2st(folder, 'C3')`` reads it too.
    """
    s = HER2ST_SECTION
    folder = sample_dir() / f"her2st_{s}"
    paths = {
        "folder": folder,
        "counts": folder / "counts" / f"{s}.tsv.gz",
        "spots": folder / "spots" / f"{s}_selection.tsv",
        "image": folder / "images" / f"{s}_HE.jpg",
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"shipped sample incomplete, missing: {', '.join(missing)}")
    return paths


def load_her2st_sample(*, images: bool = True):
    """The shipped her2st C3 section as AnnData (read with ``read_legacy_st``).

    ``obs['total_counts_all_genes']`` holds each spot's UMI total over all ~15.8k genes of the
    source, for normalising the 1000-gene subset as the full table would be.
    """
    from napari_hinge.io.legacy_st import read_legacy_st

    p = her2st_sample_paths()
    return read_legacy_st(
        p["counts"], p["spots"], image=p["image"], library_id=HER2ST_SECTION, images=images
    )


def cmu_slide_path() -> Path:
    """Path of the shipped ``CMU-1-Small-Region.svs`` (single-level Aperio SVS, 0.499 µm/px)."""
    path = sample_dir() / "CMU-1-Small-Region.svs"
    if not path.is_file():
        raise FileNotFoundError(f"shipped slide missing: {path}")
    return path
