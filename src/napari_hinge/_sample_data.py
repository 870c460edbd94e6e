"""Sample data contributions: small real data shipped inside the package."""

from __future__ import annotations


def her2st_sample():
    """her2st section C3: downsampled H&E under its measured spots, coloured by ERBB2."""
    from napari_hinge._layers import spatial_layer_data
    from napari_hinge._reader import in_microns
    from napari_hinge.datasets import load_her2st_sample

    adata = load_her2st_sample()
    return in_microns(spatial_layer_data(adata, name="her2st C3", color_by=SAMPLE_GENE))


def cmu1_sample():
    """CMU-1-Small-Region (Aperio SVS, CC0)."""
    from napari_hinge._layers import slide_layer_data
    from napari_hinge._reader import in_microns
    from napari_hinge.datasets import cmu_slide_path
    from napari_hinge.io.slides import open_slide

    return in_microns([slide_layer_data(open_slide(cmu_slide_path()))])


# HER2 itself: the gene that defines these tumours, and a strong spatial pattern.
SAMPLE_GENE = "ERBB2"
