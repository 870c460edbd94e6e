"""Sampling speed of the shipped HINGE model on this machine, against its matmul throughput.

    python benchmarks/hinge_sampling.py                      # S = 8, T = 50, current threads
    python benchmarks/hinge_sampling.py --threads 2 --reveal-steps 50,25,10,5

In one run:
1. the CPU's (or GPU's) matrix-multiply throughput: GFLOP/s of a large ``torch.mm``
   (fp32, the same thread count) -- the baseline;
2. the model's FLOPs per sample step (one forward of one spot-sample row), counted with
   ``torch.utils.flop_counter`` (matmuls, attention);
3. sampling speed with S = 8 samples and T = 50 steps, in spot-samples/s, for a few batch
   sizes -> achieved GFLOP/s and the fraction of the matmul throughput;
4. the sampler's ``reveal_steps`` option (fewer reverse steps than T, several genes revealed per
   step): speed and mean PCC on the held-out section (her2st C3, never trained on).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from napari_hinge.hinge.pipeline import load_model, model_inputs
from napari_hinge.hinge.sampler import sample
from napari_hinge.metrics import expression_scores

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_HINGE_SHARED", REPO.parent / "shared")) / "data" / \
    "her2st_subset"


def matmul_gflops(n: int = 2048, repeats: int = 5, device="cpu") -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_row_step(model, rows: int = 64) -> float:
    """FLOPs of one model forward per (spot x sample) row, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    G, F = model.n_genes, model.config.feature_dim
    sched = model.schedule
    ranks = sched.random_ranks(rows)
    t = model.config.num_steps // 2
    m_t, m_prev = sched.observed(ranks, t), sched.observed(ranks, t - 1)
    x = torch.randn(rows, G)
    feats = torch.randn(rows, F)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, torch.full((rows,), t), m_prev, m_t, feats)
    return fc.get_total_flops() / rows


def held_out(model, section: str):
    """Features (identity view, 160 px crops as in training) and targets of a held-out section."""
    from napari_hinge.encoders import get_encoder
    from napari_hinge.expression import HER2ST_PATCH_PX, load_her2st_sections, panel_targets

    enc = get_encoder(model.config.encoder)
    (sec,) = load_her2st_sections(DATA, [section], encoder=enc, side_px=HER2ST_PATCH_PX)
    coords = sec.adata.obsm["spatial"] * sec.adata.uns["napari_hinge"]["microns_per_pixel"]
    return model_inputs(model, sec.features, coords), panel_targets(sec.adata, model.config.genes,
                                                                    sec.targets)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shipped")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--spots", type=int, default=64, help="spots in the speed measurement")
    p.add_argument("--batch-sizes", default="128,512", help="rows per forward")
    p.add_argument("--reveal-steps", default="50,25,10,5")
    p.add_argument("--pcc-spots", type=int, default=0,
                   help="spots of the held-out section in the reveal-steps sweep (0 = all)")
    p.add_argument("--section", default="C3", help="held-out her2st section for the PCC cost")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    model = load_model(a.model).to(a.device)
    T = model.config.num_steps

    mm = matmul_gflops(device=a.device)
    fl = flops_per_row_step(model.cpu())
    model.to(a.device)
    X, Y = held_out(model, a.section)
    Xs = X[: a.spots]
    if a.pcc_spots:
        X, Y = X[: a.pcc_spots], Y[: a.pcc_spots]

    speed = []
    for bs in [int(b) for b in a.batch_sizes.split(",")]:
        sample(model, Xs[:4], n_samples=a.samples, reveal_steps=2, batch_size=bs,
               device=a.device)  # warm-up
        t = time.perf_counter()
        sample(model, Xs, n_samples=a.samples, batch_size=bs, seed=a.seed, device=a.device)
        dt = time.perf_counter() - t
        rate = len(Xs) * a.samples / dt
        achieved = rate * T * fl / 1e9
        speed.append({"batch_rows": bs, "seconds": dt, "spot_samples_per_s": rate,
                      "spots_per_s": rate / a.samples, "gflops": achieved,
                      "fraction_of_matmul": achieved / mm})
    best = max(speed, key=lambda r: r["spot_samples_per_s"])

    reveal = []
    for rs in [int(r) for r in a.reveal_steps.split(",")]:
        t = time.perf_counter()
        res = sample(model, X, n_samples=a.samples, reveal_steps=rs, seed=a.seed,
                     batch_size=best["batch_rows"], device=a.device)
        dt = time.perf_counter() - t
        sc = expression_scores(res.mean.numpy(), Y)
        reveal.append({"reveal_steps": rs, "seconds": dt,
                       "spot_samples_per_s": len(X) * a.samples / dt,
                       "pcc_mean": sc["pcc_mean"], "pcc_top10": sc["pcc_top10"],
                       "mse": sc["mse"]})
    ref = next((r for r in reveal if r["reveal_steps"] == T), reveal[0])
    for r in reveal:
        r["speedup_vs_T"] = r["spot_samples_per_s"] / ref["spot_samples_per_s"]
        r["pcc_change_vs_T"] = r["pcc_mean"] - ref["pcc_mean"]

    dev = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor()
    print(f"HINGE sampling, model {a.model} ({model.n_genes} genes, backbone "
          f"{model.config.backbone_ref}, d {model.backbone.d_model}), device {a.device} "
          f"({dev or platform.machine()}), {threads} threads, S = {a.samples}, T = {T}")
    print(f"matmul throughput (torch.mm 2048^2 fp32): {mm:.1f} GFLOP/s;  model FLOPs per "
          f"sample step: {fl / 1e6:.2f} MFLOP")
    print(f"\n{'rows/batch':>10s} {'spot-samples/s':>15s} {'spots/s':>8s} {'GFLOP/s':>8s} "
          f"{'of matmul':>9s}")
    for r in speed:
        print(f"{r['batch_rows']:10d} {r['spot_samples_per_s']:15.1f} {r['spots_per_s']:8.2f} "
              f"{r['gflops']:8.1f} {r['fraction_of_matmul']:9.1%}")
    print(f"\nreveal steps on held-out {a.section} ({len(X)} spots, S = {a.samples}):")
    print(f"{'steps':>6s} {'spot-samples/s':>15s} {'speedup':>8s} {'PCC':>6s} {'dPCC':>7s} "
          f"{'top10':>6s}")
    for r in reveal:
        print(f"{r['reveal_steps']:6d} {r['spot_samples_per_s']:15.1f} {r['speedup_vs_T']:8.2f} "
              f"{r['pcc_mean']:6.3f} {r['pcc_change_vs_T']:+7.3f} {r['pcc_top10']:6.3f}")
    out = {"benchmark": "hinge_sampling", "model": a.model, "device": a.device,
           "device_name": dev, "threads": threads, "n_samples": a.samples, "T": T,
           "matmul_gflops": mm, "flops_per_sample_step": fl, "speed": speed,
           "best": best, "reveal_steps": reveal, "held_out_section": a.section,
           "seed": a.seed, "torch": torch.__version__, "load_avg": os.getloadavg()}
    path = a.out or REPO / "bench_out" / f"hinge_sampling_{a.device.split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
