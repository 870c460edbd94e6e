"""Why her2st's legacy_st ARI moved in the #15 reshaping: STMGAC on the 7 labelled her2st
sections with scanpy's seurat_v3 HVGs (today's code) and with the numpy LOESS HVGs that
commit 0b3af59 replaced (read from git, so run it in a clone), everything else today's.

    python benchmarks/domains_hvg_flavour.py --out docs/results/domains_her2st_hvg_flavour.json

Prints ARI per section and seed for both and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import domains as D
from napari_hinge.stmgac import preprocess as P
from napari_hinge.stmgac.presets import get_preset

REPLACED_IN = "0b3af59"  # the commit that moved the HVGs to scanpy's seurat_v3


def old_hvg():
    """``seurat_v3_hvg`` of the preprocess module before ``REPLACED_IN``."""
    src = subprocess.run(["git", "show", f"{REPLACED_IN}^:src/napari_hinge/stmgac/preprocess.py"],
                         capture_output=True, text=True, check=True, cwd=D.REPO).stdout
    module = types.ModuleType("stmgac_preprocess_before")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(src, module.__name__, "exec"), module.__dict__)
    return module.seurat_v3_hvg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", nargs="*", default=D.HER2ST_SECTIONS)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=D.REPO / "bench_out" / "domains_hvg.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    preset = get_preset("legacy_st")
    flavours = {"scanpy seurat_v3 (today)": P.highly_variable_genes,
                f"numpy LOESS (before {REPLACED_IN})": old_hvg()}
    ari: dict[str, dict[str, list[float]]] = {name: {} for name in flavours}
    for sec in args.sections:
        adata, truth = D.load_her2st(D.SHARED / "her2st_subset", sec)
        for name, hvg in flavours.items():
            today = P.highly_variable_genes
            P.highly_variable_genes = hvg
            try:
                data = D.prepare(sec, adata, truth, preset)
            finally:
                P.highly_variable_genes = today
            rows = D.run_dataset(data, args.seeds, None, lambda msg: None)
            ari[name][sec] = [float(r["ari"]) for r in rows if r["method"] == "stmgac"]
            print(f"{sec:4s} {name:34s} ARI " + " ".join(f"{a:6.3f}" for a in ari[name][sec]),
                  flush=True)
    summary = {}
    for name, per in ari.items():
        values = np.array(list(per.values()))  # sections x seeds
        seed_means = values.mean(0)
        summary[name] = {"ari_mean": float(values.mean()), "sd_over_seeds": float(seed_means.std()),
                         "seed_means": seed_means.tolist()}
        print(f"{name:34s} mean ARI {values.mean():.3f} ± {seed_means.std():.3f} over seeds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": "legacy_st", "seeds": args.seeds, "ari": ari,
                                    "summary": summary}, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
