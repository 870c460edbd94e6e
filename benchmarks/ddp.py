"""Training throughput under torchrun: samples/s of HINGE training and of the C2L central
pre-training with 1 and 2 processes (DDP, gloo on CPU / nccl on CUDA), same global batch.

    python benchmarks/ddp.py [--epochs 3] [--c2l-steps 12] [--out docs/results/ddp.json]

Real inputs: EfficientNet-lite0 features and log-normalised expression of the shipped her2st
C3 sample's spots (HINGE, 50 genes, the shipped backbone), real 64 px tissue patches of the
same slide (C2L, the shipped central model's architecture). One torch thread per process.
Steps are timed after one warm-up epoch/step. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cohort import machine_record, write_result  # benchmarks/cohort.py, beside this file

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "napari_hinge" / "sample_data" / "her2st_C3"


def prepare(work: Path) -> Path:
    """Features, targets and patches of the sample, written once for the workers."""
    from napari_hinge._convention import META_KEY
    from napari_hinge.c2l.data import slide_patches
    from napari_hinge.encoders import get_encoder
    from napari_hinge.features import encode_spots
    from napari_hinge.hinge.pipeline import read_dataset
    from napari_hinge.io.slides import open_slide

    adata = read_dataset(SAMPLE, section="C3")
    meta = adata.uns[META_KEY]
    counts = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, float)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    top = np.argsort(-x.var(0))[:50]
    feats = encode_spots(meta["slide_path"], adata.obsm["spatial"],
                         encoder=get_encoder("efficientnet-lite0"),
                         side_px=int(round(112 / meta["microns_per_pixel"])))
    slide = open_slide(meta["slide_path"], mpp=meta["microns_per_pixel"])
    patches, _ = slide_patches(slide, max_patches=256, seed=0)
    path = work / "inputs.npz"
    np.savez(path, features=feats.astype(np.float32), targets=x[:, top].astype(np.float32),
             genes=np.array([str(g) for g in adata.var_names[top]], dtype=str), patches=patches)
    return path


def worker(inputs: Path, out: Path, epochs: int, c2l_steps: int, batch: int) -> None:
    """One process of the torchrun job: time HINGE epochs and C2L steps."""
    import torch

    torch.set_num_threads(1)
    from napari_hinge import ddp
    from napari_hinge.c2l.central import CentralModel
    from napari_hinge.c2l.train import train_central
    from napari_hinge.hinge.pipeline import build_model
    from napari_hinge.hinge.train import train_hinge

    data = np.load(inputs)
    genes = [str(g) for g in data["genes"]]
    model = build_model(genes, data["features"].shape[-1], ada_rank=32, seed=0)
    times = []
    for ev in train_hinge(model, data["features"], data["targets"], epochs=epochs + 1,
                          batch_size=batch, val_fraction=0.1, val_samples=0, device="cpu"):
        if ev.kind == "step":
            times.append(time.perf_counter())
        if ev.kind == "epoch" and ev.epoch == 1:
            first_timed = len(times)  # the steps after the warm-up epoch
    n_train = len(data["targets"]) - int(round(0.1 * len(data["targets"])))
    hinge_s = times[-1] - times[first_timed - 1]
    c2l_times = []
    for ev in train_central(CentralModel(), data["patches"], steps=c2l_steps + 1,
                            batch_size=batch, val_count=8, eval_every=10 ** 6, device="cpu"):
        if ev.kind == "step":
            c2l_times.append(time.perf_counter())
    c2l_s = c2l_times[-1] - c2l_times[0]
    if ddp.is_main():
        out.write_text(json.dumps({
            "world_size": ddp.world_size(),
            "hinge": {"samples": epochs * n_train, "seconds": round(hinge_s, 3),
                      "samples_per_s": round(epochs * n_train / hinge_s, 2)},
            "c2l_central": {"samples": c2l_steps * batch, "seconds": round(c2l_s, 3),
                            "samples_per_s": round(c2l_steps * batch / c2l_s, 2)}}))


def launch(nproc: int, inputs: Path, out: Path, args) -> dict:
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", __file__, "--worker", str(inputs), str(out),
           "--epochs", str(args.epochs), "--c2l-steps", str(args.c2l_steps),
           "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=3, help="timed HINGE epochs")
    p.add_argument("--c2l-steps", type=int, default=12, help="timed C2L steps")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "ddp.json")
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args.epochs, args.c2l_steps, args.batch_size)
        return 0
    import torch

    work = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    inputs = prepare(work)
    load = os.getloadavg()
    runs = {n: launch(n, inputs, work / f"n{n}.json", args) for n in args.nproc}
    load_after = os.getloadavg()
    base = runs[args.nproc[0]]
    print(f"{'processes':>9s} {'HINGE samples/s':>16s} {'x':>6s} {'C2L samples/s':>14s} {'x':>6s}")
    for n, r in runs.items():
        h, c = r["hinge"]["samples_per_s"], r["c2l_central"]["samples_per_s"]
        print(f"{n:9d} {h:16.1f} {h / base['hinge']['samples_per_s']:6.2f} {c:14.2f} "
              f"{c / base['c2l_central']['samples_per_s']:6.2f}")
    print(f"load average before {load[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} "
          f"cores (shared machine); one torch thread per process")
    result = {"command": f"python benchmarks/ddp.py --epochs {args.epochs} --c2l-steps "
                         f"{args.c2l_steps} --batch-size {args.batch_size}",
              "global_batch": args.batch_size, "runs": {str(n): r for n, r in runs.items()},
              "speedup": {str(n): {k: round(r[k]["samples_per_s"] / base[k]["samples_per_s"], 3)
                                   for k in ("hinge", "c2l_central")} for n, r in runs.items()},
              "backend": "nccl" if torch.cuda.is_available() else "gloo",
              **machine_record(load, load_after)}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
