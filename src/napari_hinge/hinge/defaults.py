"""HINGE's defaults, in one table that the library, the command line and the widgets read.

Torch-free, so ``napari-hinge ... --help`` stays instant.
"""

# The recipe users get by default; benchmarks/hinge_her2st.py ablates each entry over
# leave-one-section-out folds and seeds (README, "Expression from histology: HINGE").
RECIPE = {"context_um": 300.0, "center_sections": True, "prior": "ridge",
          "predict_variance": True, "residual_scale": 0.5}

# Sampler defaults: 10 reveal steps score as all 50 (README, "Sampling") at a fifth of the
# time; a slide map has many more positions than a section has spots, so it draws fewer
# samples per position.
SAMPLER = {"n_samples": 8, "reveal_steps": 10, "slide_samples": 4}

# Whole-slide maps (benchmarks/dense_features.py and benchmarks/predict_slide.py measure the
# choices): 'dense' runs the encoder once over the tissue and paints the model's prior and
# HINGE's sampled residual; 'tiles' encodes and samples every map position on its own.
# stride_um: map positions (rounded down to the dense encoder's 16 µm cells);
# sample_stride_um: where HINGE draws its samples (mean residual and calibrated
# uncertainty, interpolated onto the map).
SLIDE = {"mode": "dense", "stride_um": 16.0, "sample_stride_um": 448.0}
