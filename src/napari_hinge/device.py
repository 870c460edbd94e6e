"""Pick the compute device and matching autocast; CUDA is never required."""

from __future__ import annotations

import contextlib

import torch


def default_device(prefer: str | None = None) -> torch.device:
    """CUDA when present, else Apple MPS, else CPU (or ``prefer`` when given)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
