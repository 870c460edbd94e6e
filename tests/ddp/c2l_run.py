"""A short C2L central pre-training (a tiny latent model) on real patches of a .npz;
launched by tests/test_ddp.py under ``torchrun --nproc-per-node 2``.

    python tests/ddp/c2l_run.py PATCHES.npz OUT [--stop-at STEP] [--resume]

Rank 0 writes OUT/state.safetensors (the EMA weights) and OUT/ranks.json (each rank's
training rows and weight digest)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("patches", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--stop-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from napari_hinge import ddp
    from napari_hinge.c2l.autoencoder import AutoencoderConfig
    from napari_hinge.c2l.central import CentralConfig, CentralModel
    from napari_hinge.c2l.train import train_central
    from napari_hinge.c2l.unet import UNetConfig
    from napari_hinge.training import StopToken, run_to_end

    torch.manual_seed(0)
    unet = UNetConfig(image_size=16, in_channels=4, stem=1, channels=(16, 32),
                      attention_levels=(1,), time_dim=32, groups=8)
    model = CentralModel(CentralConfig(unet=unet, timesteps=100,
                                       autoencoder=AutoencoderConfig(channels=(8, 16, 32),
                                                                     groups=8)))
    rows = [0]
    model.register_forward_pre_hook(
        lambda module, inputs: rows.__setitem__(0, rows[0] + len(inputs[0]))
        if module.training else None)
    stop = StopToken()

    def on_event(ev):
        if ev.kind == "step" and ev.step == args.stop_at:
            stop.request()

    model, _ = run_to_end(train_central(
        model, np.load(args.patches)["patches"], steps=6, batch_size=8, lr=1e-3, val_count=4,
        eval_every=3, seed=5, checkpoint_dir=args.out / "checkpoints", resume=args.resume,
        stop=stop), on_event)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    ranks = ddp.gather_objects({"rows": rows[0], "digest": digest})
    if ddp.is_main():
        save_file(state, str(args.out / "state.safetensors"))
        (args.out / "ranks.json").write_text(json.dumps(ranks))


if __name__ == "__main__":
    main()
    # a marker for the test's failure message: an abort after it is in the teardown
    print(f"rank {os.environ.get('RANK', 0)} finished training", file=sys.stderr, flush=True)
