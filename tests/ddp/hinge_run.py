"""One HINGE training run on the arrays of a .npz; launched by tests/test_ddp.py alone or
under ``torchrun --nproc-per-node 2`` (each rank computes its rows of every batch).

    python tests/ddp/hinge_run.py DATA.npz OUT --epochs 2 [--resume]

Rank 0 writes OUT/state.safetensors (the trainable weights) and OUT/losses.json (the step
losses and the training rows each rank computed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--stop-after-epoch", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from napari_hinge import ddp
    from napari_hinge.hinge.pipeline import build_model
    from napari_hinge.hinge.train import train_hinge
    from napari_hinge.training import StopToken

    data = np.load(args.data)
    genes = [str(g) for g in data["genes"]]
    model = build_model(genes, data["features"].shape[-1], ada_rank=8, seed=3,
                        predict_variance=True)
    rows = [0]  # spots this process ran through the network in training steps

    def count(module, inputs):
        if module.training:
            rows[0] += len(inputs[0])

    model.register_forward_pre_hook(count)
    stop = StopToken()
    losses = []
    for ev in train_hinge(model, data["features"], data["targets"], epochs=args.epochs,
                          batch_size=16, lr=2e-3, warmup_epochs=1, val_fraction=0.2,
                          val_samples=2, val_reveal_steps=3, seed=5, device="cpu",
                          checkpoint_dir=args.out / "checkpoints", resume=args.resume,
                          stop=stop):
        if ev.kind == "step":
            losses.append(ev.loss)
        if ev.kind == "epoch" and ev.epoch == args.stop_after_epoch:
            stop.request()
    rows_per_rank = ddp.gather_objects(rows[0])
    if ddp.is_main():
        state = {k: v.detach().contiguous() for k, v in model.trainable_state_dict().items()}
        save_file(state, str(args.out / "state.safetensors"))
        (args.out / "losses.json").write_text(json.dumps(
            {"world_size": ddp.world_size(), "losses": losses, "rows": rows_per_rank}))


if __name__ == "__main__":
    main()
    # a marker for the test's failure message: an abort after it is in the teardown
    print(f"rank {os.environ.get('RANK', 0)} finished training", file=sys.stderr, flush=True)
