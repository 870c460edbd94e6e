"""Reliability diagram of HINGE's intervals from ``benchmarks/hinge_her2st.py`` JSON files.

    python benchmarks/plot_reliability.py docs/results/hinge_her2st_50genes.json \
        --out docs/images/hinge_reliability.png

For each nominal level p, the fraction of measured values (held-out sections, every fold and
seed in the files) inside mean +- z_p sd, with the calibrated sd the model ships and with the
raw spread of its samples. A calibrated model lies on the diagonal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def reliability(paths, method: str = "hinge") -> tuple[list[float], np.ndarray, int]:
    """Nominal levels, (levels, 2) mean coverage (calibrated, raw), number of fold runs."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows += [r["reliability"] for r in data["per_fold"].get(method, []) if "reliability" in r]
    if not rows:
        raise SystemExit(f"no '{method}' rows with reliability figures in {paths}")
    levels = sorted(rows[0], key=float)
    cov = np.array([[r[p] for p in levels] for r in rows]).mean(0)
    return [float(p) for p in levels], cov, len(rows)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--method", default="hinge")
    p.add_argument("--out", type=Path, default=Path("docs/images/hinge_reliability.png"))
    a = p.parse_args(argv)
    levels, cov, n = reliability(a.json, a.method)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="ideal")
    ax.plot(levels, cov[:, 0], "o-", color="C0", label="calibrated sd (shipped)")
    ax.plot(levels, cov[:, 1], "s-", color="C3", label="raw spread of the samples")
    ax.set_xlabel("nominal coverage of mean ± z·sd")
    ax.set_ylabel("measured values inside (held-out sections)")
    ax.set_title(f"HINGE intervals, her2st LOSO ({n} fold runs)", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    for lv, (c, r) in zip(levels, cov, strict=True):
        print(f"nominal {lv:4.2f}  calibrated {c:5.3f}  raw {r:5.3f}")
    print(f"wrote {a.out}")
    return a.out


if __name__ == "__main__":
    main()
