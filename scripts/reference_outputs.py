"""Outputs of the shipped models on the shipped sample (her2st C3), fixed seeds, for proving
that a refactor changes nothing: run it on two checkouts and compare.

    NAPARI_HINGE_CACHE=/tmp/ref-cache PYTHONPATH=OLD/src python scripts/reference_outputs.py old.npz
    NAPARI_HINGE_CACHE=/tmp/ref-cache PYTHONPATH=NEW/src python scripts/reference_outputs.py new.npz
    python scripts/reference_outputs.py --compare old.npz new.npz

Recorded: the shipped HINGE's prediction (mean, calibrated std, 80% lower bound; 4 samples,
10 reveal steps, seed 0), 4 samples of the shipped C2L central model (5 DDIM steps, seed 0),
STMGAC domains (20 epochs, seed 0: embedding, denoised expression, labels) and, with
``--train``, the trainable weights of a HINGE trained 2 epochs (seed 0, 20 genes, no views)
on the sample. Only public functions are called, so older checkouts run it too.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def record(out: str, train: bool) -> None:
    import torch

    from napari_hinge import tl
    from napari_hinge.c2l.central import CentralModel
    from napari_hinge.datasets import load_her2st_sample
    from napari_hinge.hinge.pipeline import fit_hinge, load_model, predict_spots

    torch.set_num_threads(1)
    res = {}
    adata = load_her2st_sample()
    pred = predict_spots(load_model("shipped"), adata.copy(), n_samples=4, reveal_steps=10,
                         seed=0)
    res["hinge_mean"] = np.asarray(pred.X)
    res["hinge_std"] = np.asarray(pred.layers["std"])
    res["hinge_lower80"] = np.asarray(pred.layers["lower_80"])
    res["c2l_samples"] = CentralModel.load("shipped").sample(4, steps=5, seed=0)
    dom = tl.domains(adata.copy(), n_domains=4, epochs=20, seed=0, copy=True)
    for key in dom.obsm:
        res[f"stmgac_{key}"] = np.asarray(dom.obsm[key])
    res["stmgac_labels"] = np.asarray(dom.obs["domain"].astype(str)).astype("U")
    if train:
        gen = fit_hinge([adata], n_genes=20, epochs=2, seed=0, augment=False, val_samples=0)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                model = done.value
                break
        for k, v in model.trainable_state_dict().items():
            res[f"train_{k}"] = v.numpy()
    np.savez(out, **res)
    print(f"wrote {out}: {len(res)} arrays")


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    differ = 0
    for k in sorted(set(a.files) | set(b.files)):
        if k not in a.files or k not in b.files:
            print(f"{k:50s} only in {'the second' if k in b.files else 'the first'}")
            continue
        same = a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and np.array_equal(a[k],
                                                                                      b[k])
        differ += not same
        print(f"{k:50s} {str(a[k].shape):16s} {'bit-identical' if same else 'DIFFERENT'}")
    print(f"{differ} of the arrays in both differ")
    return 1 if differ else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="the .npz to write")
    p.add_argument("--train", action="store_true", help="also train HINGE 2 epochs")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two .npz files")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give the .npz to write, or --compare A B")
    record(args.out, args.train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
