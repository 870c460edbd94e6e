"""Data-parallel training under ``torchrun`` (torch.distributed + DistributedDataParallel).

The one home of the distributed plumbing; the trainers call a few hooks:

- :func:`init` joins the process group that ``torchrun`` describes in the environment
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...): ``nccl`` when CUDA is there,
  ``gloo`` on CPU. Without torchrun (or with one process) it does nothing, and every other
  hook is the identity, so a plain run is the single-process run, bit for bit.
- :func:`shard` is DistributedSampler's rule applied to each global batch: rank ``r`` of
  ``W`` takes rows ``r, r+W, r+2W, ...``. Every rank draws the same global batch (and its
  timesteps and noise) from the same seeded streams, so W processes see what one process
  with the same global batch sees, and resume from one checkpoint stays exact.
- :func:`wrap` puts the model in DDP (gradients averaged across ranks in the backward pass);
  :func:`batch_share` turns a rank's mean over its rows into its share of the global-batch
  mean, so the averaged gradient is the single-process gradient.
- :func:`is_main`: only rank 0 writes checkpoints, models and logs.
"""

from __future__ import annotations

import atexit
import contextlib
import os

import torch

__all__ = ["active", "all_reduce_sum", "barrier", "batch_share", "cleanup", "device",
           "gather_objects", "init", "is_main", "launched", "rank", "shard", "world_size",
           "wrap"]


def launched() -> bool:
    """True when the environment describes more than one process (torchrun, srun + torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init() -> bool:
    """Join torchrun's process group once per process (a no-op without torchrun); returns
    :func:`active`. The backend is ``nccl`` with CUDA (each process on ``cuda:LOCAL_RANK``),
    else ``gloo``."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return active()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    atexit.register(cleanup)
    return active()


def cleanup() -> None:
    """Leave the process group (registered at exit by :func:`init`). A rank that tears gloo
    down while a peer still sends to it aborts ("terminate called without an active
    exception"), so every rank first passes a last barrier and then waits, on the
    rendezvous store rather than on gloo, until every rank has left that barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a peer gone already: nothing to wait for
            dist.barrier()
            _wait_for_every_rank("napari_hinge/left_last_barrier")
        dist.destroy_process_group()


def _wait_for_every_rank(key: str, timeout_s: float = 60.0) -> None:
    """Count this rank in under ``key`` of the process group's store and wait until all
    ranks have counted in (no gloo message is then in flight)."""
    import time

    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    world = dist.get_world_size()
    arrived = store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while arrived < world and time.monotonic() < deadline:
        time.sleep(0.01)
        arrived = store.add(key, 0)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and logs."""
    return rank() == 0


def device(chosen: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for CUDA under DDP, else ``chosen``."""
    if active() and chosen.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return chosen


def wrap(model: torch.nn.Module, on: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under DDP (it broadcasts rank 0's weights and
    averages the gradients), else ``model`` itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [on.index if on.index is not None else torch.cuda.current_device()] \
        if on.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard(n: int) -> slice:
    """The rows of a global batch of ``n`` this rank computes (all of them in one process)."""
    return slice(rank(), n, world_size()) if active() else slice(None)


def batch_share(local: torch.Tensor | float, total: torch.Tensor | float) -> torch.Tensor | float:
    """The factor that makes ``mean over this rank's rows x factor``, averaged by DDP over
    the ranks, equal the mean over the global batch: ``world_size * local / total``
    (``local``, ``total``: the weight, e.g. the count of scored values, of this rank's rows
    and of the whole batch)."""
    return world_size() * local / total


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks (``x`` itself in one process)."""
    if not active():
        return x
    import torch.distributed as dist

    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in one process)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if active():
        import torch.distributed as dist

        dist.barrier()
