"""The defaults of every model, in one table that the library, the command line and the
widgets read (a library function's keyword default, a CLI option's default and a widget's
initial value all come from here, so the three run the same job when nothing is changed).

Plain Python, no imports: ``napari-hinge ... --help`` stays instant.
"""

# ---------------------------------------------------------------------------------------------
# HINGE

# The recipe users get by default; benchmarks/hinge_her2st.py ablates each entry over
# leave-one-section-out folds and seeds (README, "Expression from histology: HINGE").
# depth_calibration (scale each spot's spread by its depth predicted from the image) is off
# in the shipped model (trained before it covered). Over the 5 LOSO folds (seed 0) it raises
# the spread-error Spearman per gene from 0.14 to 0.18 at depth_power 0.5 (0.20 at 1), with
# 80% intervals covering 0.77-0.85 on every held-out section now that its multipliers are
# the worst calibration section's (pooled, 0.70-0.82); at power 1 C6 over-covers (0.88).
HINGE_RECIPE = {"context_um": 300.0, "center_sections": True, "prior": "ridge",
                "predict_variance": True, "residual_scale": 0.5, "depth_calibration": False,
                "depth_power": 0.5}

# Sampler defaults: 10 reveal steps score as all 50 (README, "Sampling") at a fifth of the
# time; a slide map (or a C2L-ST region conditioned on HINGE) has many more positions than a
# section has spots, so it draws fewer samples per position.
SAMPLER = {"n_samples": 8, "reveal_steps": 10, "slide_samples": 4}

# Whole-slide maps (benchmarks/dense_features.py and benchmarks/predict_slide.py measure the
# choices): 'dense' runs the encoder once over the tissue and paints the model's prior and
# HINGE's sampled residual; 'tiles' encodes and samples every map position on its own.
# stride_um: map positions (rounded down to the dense encoder's 16 µm cells);
# sample_stride_um: where HINGE draws its samples (mean residual and calibrated
# uncertainty, interpolated onto the map); encoder_bf16: the dense encoder in bfloat16,
# 'auto' where that is fast (CUDA, CPUs with native bf16: napari_hinge.device.fast_bf16;
# on her2st C2/C3 it reads at the spots as float32 does, README "Dense maps, measured").
SLIDE = {"mode": "dense", "stride_um": 16.0, "sample_stride_um": 448.0,
         "encoder_bf16": "auto"}

# Training. lr 1e-3: 1e-4 left the validation loss at 1.50 after 10 epochs on ~700 spots
# (hinge/pipeline.py, fit_hinge_arrays); the milestones scale HINGE's (20, 35) of 40 epochs.
HINGE_TRAIN = {"n_genes": 50, "epochs": 40, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 5,
               "ada_rank": 32, "val_fraction": 0.1, "seed": 42}

# ---------------------------------------------------------------------------------------------
# STMGAC (the preset, picked from the data, carries the training settings: stmgac/presets.py)

STMGAC = {"preset": "auto", "n_domains": 7, "seed": 3407, "method": "gmm",
          "covariance_type": "tied"}

# ---------------------------------------------------------------------------------------------
# C2L-ST

# Central model pre-training (the shipped one: scripts/pretrain_c2l_central.py, lr 3e-4).
C2L_PRETRAIN = {"steps": 2000, "batch_size": 32, "lr": 3e-4, "ema_decay": 0.995,
                "max_patches": 4000, "seed": 0}
# Local (gene-conditioned) adaptation on the paired spots of one slide.
C2L_ADAPT = {"n_genes": 50, "steps": 600, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.99,
             "seed": 0}
# Filling a region with synthetic tiles.
C2L_FILL = {"n_spacings": 0.6, "source": "neighbours", "k": 6, "guidance": 2.0, "steps": 25,
            "strength": 1.0, "max_tiles": 2000, "seed": 0}
