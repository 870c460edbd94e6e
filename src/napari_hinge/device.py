"""Pick the compute device and matching autocast; CUDA is never required."""

from __future__ import annotations

import contextlib

import torch


def default_device(device: str | torch.device | None = None) -> torch.device:
    """The device rule of every trainer, sampler and CLI (``--device``): ``device`` when
    given, else CUDA when present, else Apple MPS, else the CPU.

    Raises
    ------
    ValueError
        ``device`` names CUDA or MPS and this machine's torch has none.
    """
    if device is not None and str(device) != "":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but this torch sees no "
                             "CUDA GPU; use --device cpu (or leave it out)")
        if dev.type == "mps" and not _mps_available():
            raise ValueError(f"device {str(device)!r} was asked for but Apple MPS is not "
                             "available; use --device cpu (or leave it out)")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions are fast here: on CUDA, and on CPUs whose oneDNN has
    native bf16 (AVX512-BF16 / AMX; there the dense encoder runs about 2x faster than in
    float32). Elsewhere bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
