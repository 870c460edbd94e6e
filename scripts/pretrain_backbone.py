"""Pre-train the shipped builtin gene-token backbone (masked-value objective).

Objective: for every cell/spot draw up to ``--genes`` genes of the vocabulary that were measured
for it (gene-set sampling, so any panel works), hide a random 15-40 % of them (value replaced,
``zero_emb`` added) and predict their values; MSE on the hidden genes only. This is the objective
family of HINGE's masked diffusion ("objective alignment", methods.md 1.4).

Data (real, expression only; values = log1p(normalize_total to 1e4) over *all* genes of the table):
- her2st legacy-ST count tables, patients A, D, E, F, G, H (24 sections). Patient C (C1-C6) is
  held out entirely: the HINGE benchmark tests on patient C images.
- ``scrna_small/human_immune_559_cells.h5ad`` (human). The mouse file is not used: its 1,000 genes
  are mouse chromosome-1 genes, and a mouse cell is not a human spot.
Validation: 10 % of the spots/cells of the training data (whole cells held out), and patient C
(never seen). Figure = masked MSE / MSE of predicting each gene's training mean on the same entries.

    python scripts/pretrain_backbone.py --out src/napari_hinge/weights/backbone
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_hinge.scfm.base import BackboneConfig
from napari_hinge.scfm.builtin import PAD, BuiltinBackbone
from napari_hinge.training import StopToken, TrainEvent, seed_everything

HELD_OUT_PATIENT = "C"
# Unnamed clone-based loci (RP11-34P13.7, AC009133.12, AL627309.1, CTD-2331H12.4, ...).
CLONE_NAME = re.compile(r"^(RP\d+-|CT[A-D]-|A[CLP]\d{6}\.\d+$|FO\d{6}\.\d+$)")


def read_her2st(counts_dir: Path) -> dict[str, pd.DataFrame]:
    tables = {}
    for path in sorted(counts_dir.glob("*.tsv.gz")):
        tables[path.name.split(".")[0]] = pd.read_csv(path, sep="\t", index_col=0)
    if not tables:
        raise FileNotFoundError(f"no <section>.tsv.gz count tables in {counts_dir}")
    return tables


def read_immune(path: Path) -> pd.DataFrame:
    import anndata as ad

    a = ad.read_h5ad(path)
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    return pd.DataFrame(x, index=a.obs_names, columns=a.var_names)


def log1p_cp10k(df: pd.DataFrame) -> pd.DataFrame:
    lib = df.sum(axis=1).clip(lower=1).to_numpy()[:, None]
    return pd.DataFrame(np.log1p(df.to_numpy(np.float32) / lib * 1e4), index=df.index,
                        columns=df.columns)


def choose_vocab(train: dict[str, pd.DataFrame], immune: pd.DataFrame, n_max: int,
                 min_spot_frac: float, min_cell_frac: float,
                 keep_clone_genes: bool = False) -> list[str]:
    """Genes detected in >= min_spot_frac of the training spots (pooled) or in >= min_cell_frac
    of the immune cells, ranked by spot detection, capped at n_max."""
    det = {}
    n_spots = sum(len(t) for t in train.values())
    for t in train.values():
        for g, c in (t > 0).sum(axis=0).items():
            det[g] = det.get(g, 0) + int(c)
    spot_frac = pd.Series(det, dtype=float) / n_spots
    cell_frac = (immune > 0).mean(axis=0)
    keep = set(spot_frac.index[spot_frac >= min_spot_frac]) | set(
        cell_frac.index[cell_frac >= min_cell_frac])
    if not keep_clone_genes:
        keep = {g for g in keep if not CLONE_NAME.match(g)}
    score = pd.Series({g: max(spot_frac.get(g, 0.0), cell_frac.get(g, 0.0)) for g in keep})
    return sorted(score.sort_values(ascending=False).index[:n_max].tolist())


def to_matrix(df: pd.DataFrame, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(cells, vocab) values and a per-gene 'measured' flag (False where the table lacks it)."""
    vals = df.reindex(columns=genes).to_numpy(np.float32)
    measured = ~np.isnan(vals[0]) if len(vals) else np.zeros(len(genes), bool)
    return np.nan_to_num(vals), measured


class Pool:
    """Cells as rows of a dense value matrix, plus the genes measured for each row."""

    def __init__(self, blocks: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.values = torch.from_numpy(np.concatenate([b[0] for b in blocks]))
        self.measured = torch.from_numpy(
            np.concatenate([np.repeat(b[1][None], len(b[0]), 0) for b in blocks]))

    def __len__(self) -> int:
        return len(self.values)

    def batch(self, rows: torch.Tensor, n_genes: int, gen: torch.Generator,
              mask_lo: float = 0.15, mask_hi: float = 0.40):
        """Random measured-gene subsets (column index = token id - 1) and random masks."""
        score = torch.rand(len(rows), self.values.shape[1], generator=gen)
        score[~self.measured[rows]] = -1.0  # unmeasured genes never drawn
        cols = score.topk(n_genes, dim=1).indices
        vals = self.values[rows[:, None], cols]
        ratio = mask_lo + (mask_hi - mask_lo) * torch.rand(len(rows), 1, generator=gen)
        order = torch.rand(len(rows), n_genes, generator=gen).argsort(1).argsort(1)
        masked = order < (ratio * n_genes).round().clamp_min(1)
        return cols, vals, masked


@torch.no_grad()
def masked_mse(model: BuiltinBackbone, pool: Pool, gene_mean: torch.Tensor, n_genes: int,
               seed: int, batch: int = 64) -> tuple[float, float]:
    """(model MSE, gene-mean MSE) on the hidden entries of fixed random masks."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    se_m = se_b = n = 0.0
    for start in range(0, len(pool), batch):
        rows = torch.arange(start, min(start + batch, len(pool)))
        cols, vals, masked = pool.batch(rows, n_genes, gen)
        pred = model(cols + 1, vals, masked)
        base = gene_mean[cols]
        se_m += ((pred - vals)[masked] ** 2).sum().item()
        se_b += ((base - vals)[masked] ** 2).sum().item()
        n += masked.sum().item()
    return se_m / n, se_b / n


def pretrain(model: BuiltinBackbone, train: Pool, val: Pool, gene_mean: torch.Tensor, *,
             steps: int, batch: int, n_genes: int, lr: float, seed: int, eval_every: int,
             stop: StopToken | None = None):
    """Generator of TrainEvents (one 'epoch' = eval_every steps)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    history = []
    for step in range(1, steps + 1):
        if stop is not None and stop.requested:
            yield TrainEvent("stopped", step // eval_every, step, steps)
            return
        model.train()
        rows = torch.randint(len(train), (batch,), generator=gen)
        cols, vals, masked = train.batch(rows, n_genes, gen)
        pred = model(cols + 1, vals, masked)
        loss = ((pred - vals)[masked] ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        yield TrainEvent("step", step // eval_every, step, steps, loss=loss.item())
        if step % eval_every == 0 or step == steps:
            mse, base = masked_mse(model, val, gene_mean, n_genes, seed + 1)
            history.append({"step": step, "train_loss": loss.item(), "val_mse": mse,
                            "val_gene_mean_mse": base, "ratio": mse / base})
            yield TrainEvent("epoch", step // eval_every, step, steps, loss=loss.item(),
                             val_loss=mse, metrics={"gene_mean_mse": base, "ratio": mse / base})
    yield TrainEvent("done", steps // eval_every, steps, steps, metrics={"history": history})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--genes", type=int, default=256, help="genes per cell per step")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--min-spot-frac", type=float, default=0.05,
                   help="vocabulary: minimum detection over the training spots")
    p.add_argument("--keep-clone-genes", action="store_true",
                   help="keep clone-named loci such as AP000769.1 in the vocabulary")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    args = p.parse_args(argv)
    t0 = time.time()
    seed_everything(args.seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    tables = read_her2st(args.data / "her2st_subset" / "counts")
    train_secs = {k: v for k, v in tables.items() if not k.startswith(HELD_OUT_PATIENT)}
    test_secs = {k: v for k, v in tables.items() if k.startswith(HELD_OUT_PATIENT)}
    immune = read_immune(args.data / "scrna_small" / "human_immune_559_cells.h5ad")
    genes = choose_vocab(train_secs, immune, args.vocab_size, args.min_spot_frac, 0.10,
                         args.keep_clone_genes)
    vocab = {PAD: 0} | {g: i + 1 for i, g in enumerate(genes)}

    rng = np.random.default_rng(args.seed)
    train_blocks, val_blocks = [], []
    for df in [*train_secs.values(), immune]:
        vals, measured = to_matrix(log1p_cp10k(df), genes)
        is_val = rng.random(len(vals)) < 0.10
        train_blocks.append((vals[~is_val], measured))
        val_blocks.append((vals[is_val], measured))
    train, val = Pool(train_blocks), Pool(val_blocks)
    heldout = Pool([to_matrix(log1p_cp10k(df), genes) for df in test_secs.values()])
    # gene-mean baseline from the training rows where the gene was measured
    gene_mean = (train.values * train.measured).sum(0) / train.measured.sum(0).clamp_min(1)
    print(f"vocab {len(genes)} genes; train {len(train)} cells, val {len(val)}, "
          f"patient C {len(heldout)} spots; data read in {time.time() - t0:.0f}s", flush=True)

    config = BackboneConfig(kind="builtin", d_model=args.d_model, n_layers=args.layers,
                            n_heads=args.heads, d_ff=args.d_ff, dropout=0.0, mask_kv_layers=0,
                            value_transform="log1p_cp10k")
    model = BuiltinBackbone(config, vocab)
    t1 = time.time()
    summary = None
    for ev in pretrain(model, train, val, gene_mean, steps=args.steps, batch=args.batch,
                       n_genes=args.genes, lr=args.lr, seed=args.seed, eval_every=args.eval_every):
        if ev.kind == "epoch":
            print(f"step {ev.step:5d}  train {ev.loss:.4f}  val {ev.val_loss:.4f}  "
                  f"gene-mean {ev.metrics['gene_mean_mse']:.4f}  ratio {ev.metrics['ratio']:.3f}  "
                  f"({time.time() - t1:.0f}s)", flush=True)
        elif ev.kind == "done":
            summary = ev.metrics
    train_s = time.time() - t1
    val_mse, val_base = masked_mse(model, val, gene_mean, args.genes, args.seed + 1)
    c_mse, c_base = masked_mse(model, heldout, gene_mean, args.genes, args.seed + 2)
    print(f"final: val ratio {val_mse / val_base:.3f}; patient C ratio {c_mse / c_base:.3f}")

    command = "python scripts/pretrain_backbone.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv)
    record = {
        "command": command, "seed": args.seed, "steps": args.steps, "batch": args.batch,
        "genes_per_cell": args.genes, "min_spot_frac": args.min_spot_frac,
        "keep_clone_genes": args.keep_clone_genes, "mask_ratio": [0.15, 0.40], "lr": args.lr,
        "train_sections": sorted(train_secs), "held_out_sections": sorted(test_secs),
        "extra_data": "scrna_small/human_immune_559_cells.h5ad",
        "n_train_cells": len(train), "n_val_cells": len(val), "n_patient_c_spots": len(heldout),
        "val_masked_mse": val_mse, "val_gene_mean_mse": val_base, "val_ratio": val_mse / val_base,
        "patient_c_masked_mse": c_mse, "patient_c_gene_mean_mse": c_base,
        "patient_c_ratio": c_mse / c_base, "train_seconds": round(train_s),
        "torch": torch.__version__, "history": summary["history"],
    }
    with torch.no_grad():
        model.gene_mean[1:] = gene_mean
    model.config.extra = {"pretraining": {k: v for k, v in record.items() if k != "history"}}
    model.save(args.out)
    (args.out / "training_log.json").write_text(json.dumps(record, indent=1))
    write_training_md(args.out / "TRAINING.md", record, config, len(genes))
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"saved to {args.out} ({size:.1f} MiB)")
    return 0


def write_training_md(path: Path, r: dict, config: BackboneConfig, n_genes: int) -> None:
    val = (f"| held-out 10 % of training sources | {r['n_val_cells']} | "
           f"{r['val_masked_mse']:.4f} | {r['val_gene_mean_mse']:.4f} | {r['val_ratio']:.3f} |")
    pat = (f"| patient C (never seen) | {r['n_patient_c_spots']} | "
           f"{r['patient_c_masked_mse']:.4f} | {r['patient_c_gene_mean_mse']:.4f} | "
           f"{r['patient_c_ratio']:.3f} |")
    rows = "\n".join(f"| {h['step']} | {h['train_loss']:.4f} | {h['val_mse']:.4f} | "
                     f"{h['val_gene_mean_mse']:.4f} | {h['ratio']:.3f} |" for h in r["history"])
    path.write_text(f"""# Builtin backbone: how these weights were made

Command (from the repository root, data in `../shared/data`):

    {r['command']}

- Architecture: `BuiltinBackbone`, d_model {config.d_model}, {config.n_layers} post-norm
  softmax-attention blocks, {config.n_heads} heads, FFN {config.d_ff}; vocabulary {n_genes} genes
  + `<pad>`; values `log1p_cp10k` (log1p of counts normalised to 1e4 over all genes of the table).
- Objective: masked-value prediction. Per step {r['batch']} cells, each a random subset of
  {r['genes_per_cell']} measured vocabulary genes; {r['mask_ratio'][0]:.0%}-{r['mask_ratio'][1]:.0%}
  of them hidden (value replaced by 0 + `zero_emb`); MSE on hidden genes only.
  AdamW lr {r['lr']} (5 % warm-up, cosine), weight decay 0.01, grad clip 1.0, {r['steps']} steps,
  seed {r['seed']}, torch {r['torch']}, CPU, {r['train_seconds']} s of training.
- Data (real, expression only): her2st sections {', '.join(r['train_sections'])}
  and `{r['extra_data']}` (559 human cells). 10 % of the spots/cells of each source were held
  out for validation. The mouse file in `scrna_small` is not used (mouse chromosome-1 genes only).
- **Held out entirely: her2st patient C ({', '.join(r['held_out_sections'])})**, because the HINGE
  benchmark tests on patient C images.
- `gene_mean` buffer in the weights: each vocabulary gene's mean value over the training cells
  where it was measured (the baseline below).
- Vocabulary: genes detected in >= {r.get('min_spot_frac', 0.05):.0%} of the training spots
  (pooled) or >= 10 % of the immune cells, clone-named loci (RP11-..., AC/AL/AP000000.1,
  CTD-...) {'kept' if r.get('keep_clone_genes') else 'dropped'}, ranked by detection, capped at
  {n_genes} genes.

## Validation (masked MSE vs predicting each gene's training mean, same hidden entries)

| set | cells | masked MSE | gene-mean MSE | ratio |
|---|---|---|---|---|
{val}
{pat}

Training curve (validation every {r['history'][0]['step']} steps):

| step | train loss | val MSE | gene-mean MSE | ratio |
|---|---|---|---|---|
{rows}

The same figures are in `config.json` (`extra.pretraining`) and `training_log.json`.
""")


if __name__ == "__main__":
    raise SystemExit(main())
