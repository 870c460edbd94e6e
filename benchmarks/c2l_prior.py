"""How realistic is the C2L-ST central model's prior, and how does it move with training?

Frechet distance (64-d PCA of EfficientNet-Lite0 features, fitted on 1,500 corpus patches)
between ``--n`` real patches of the central pre-training corpus and, for each central model
given (a saved folder or a training checkpoint ``last.pt``), as many unconditional DDIM samples
(25 steps, seed 1). References in the same run: other real corpus patches (the noise floor of
the measure) and each model's autoencoder reconstructions of them (the floor of its samples).
The ratio column divides by the first model's distance.

    python benchmarks/c2l_prior.py --like bench_out/c2l_central_12000 --models \
        bench_out/c2l_central_1650,bench_out/step6000.pt,bench_out/c2l_central_12000,\
bench_out/c2l_central_dec3000,shipped

(``bench_out/c2l_central_1650``, ``bench_out/c2l_central_12000``: weights shipped before, from
git history; the ``.pt``: a training checkpoint of ``scripts/pretrain_c2l_central.py``, loaded
into ``--like``; ``bench_out/c2l_central_dec3000``: that script's shipped command with
``--decoder-steps 3000``.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from c2l import frechet


def load_central(spec: str, like: str):
    """``(model, diffusion steps)`` from a folder (or 'shipped'; steps from its training log), or
    from the EMA weights of a training checkpoint loaded into a copy of ``like`` (same
    architecture and autoencoder)."""
    from napari_hinge.c2l.central import CentralModel, shipped_central_dir
    from napari_hinge.training import load_checkpoint

    if spec.endswith(".pt"):
        state = load_checkpoint(spec)
        model = CentralModel.load(like)
        weights = model.state_dict()
        weights.update(state["ema"]["shadow"])
        model.load_state_dict(weights)
        return model.eval(), int(state["step"])
    log = (shipped_central_dir() if spec == "shipped" else Path(spec)) / "training_log.json"
    steps = json.loads(log.read_text()).get("steps") if log.is_file() else None
    return CentralModel.load(spec), steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shipped",
                   help="comma-separated central model folders, 'shipped' or checkpoints")
    p.add_argument("--like", default="shipped",
                   help="folder whose architecture and autoencoder a checkpoint is loaded into")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench_out/c2l_prior.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from sklearn.decomposition import PCA

    from napari_hinge._cache import cache_dir
    from napari_hinge.c2l.data import load_corpus
    from napari_hinge.encoders import get_encoder

    corpus_path = cache_dir("c2l") / f"central_corpus_seed{args.seed}.npz"
    if not corpus_path.is_file():
        raise SystemExit(f"{corpus_path}: no patch corpus; run scripts/pretrain_c2l_central.py "
                         "once (it cuts and caches the corpus)")
    patches = load_corpus(corpus_path).patches
    order = np.random.default_rng(5).permutation(len(patches))
    n = args.n
    reference, other_real = patches[order[:n]], patches[order[n:2 * n]]
    fit = patches[order[2 * n:2 * n + 1500]]
    encoder = get_encoder("efficientnet-lite0")
    encode = lambda p: encoder.encode(p, batch_size=16)  # noqa: E731
    pca = PCA(64, random_state=0).fit(encode(fit))
    z_ref = pca.transform(encode(reference))
    fd = lambda p: frechet(z_ref, pca.transform(encode(p)))  # noqa: E731

    rows = {"real corpus patches (other)": {"fd": fd(other_real)}}
    for spec in args.models.split(","):
        model, step = load_central(spec, args.like)
        if model.autoencoder is not None:  # each model's own decoder (it may be refined)
            rows[f"autoencoder reconstructions: {spec}"] = {
                "fd": fd(model.reconstruct(other_real))}
        t = time.perf_counter()
        samples = model.sample(n, steps=args.steps, seed=1, batch_size=100)
        rows[f"samples: {spec}"] = {"fd": fd(samples), "diffusion_steps": step,
                                    "sample_seconds": time.perf_counter() - t}
        print(f"{spec}: step {step}, FD {rows[f'samples: {spec}']['fd']:.2f}", flush=True)

    first = next(v["fd"] for k, v in rows.items() if k.startswith("samples"))
    for v in rows.values():
        v["ratio_vs_first_model"] = v["fd"] / first
    result = {"protocol": __doc__.split("\n\n")[1].strip(), "params": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows, "seconds": time.perf_counter() - t_start,
        "machine": {"processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'patches':<60} {'diffusion steps':>15} {'FD':>7} {'ratio':>6}")
    for k, v in rows.items():
        steps = v.get("diffusion_steps")
        print(f"{k:<60} {'' if steps is None else steps:>15} {v['fd']:7.2f} "
              f"{v['ratio_vs_first_model']:6.2f}")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
