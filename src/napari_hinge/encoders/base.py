"""The ``Encoder`` interface and helpers shared by every patch encoder."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".safetensors")


class Encoder(nn.Module):
    """A frozen patch encoder: RGB uint8 patches in, one feature vector per patch out.

    Subclasses set ``name`` (registry name), ``dim`` (feature size), ``input_size`` (square
    side in pixels the network expects) and ``weights_digest`` (content key of the weights,
    part of the feature-cache key), and implement ``preprocess`` and ``forward``.
    """

    name: str = "encoder"
    dim: int = 0
    input_size: int = 224
    weights_digest: str = "random"
    #: input pixels per cell of ``forward_map`` for encoders that run fully convolutionally
    #: (:mod:`napari_hinge.dense`); None: patch by patch only
    dense_stride: int | None = None

    def preprocess(self, images: np.ndarray) -> torch.Tensor:  # pragma: no cover - abstract
        """uint8 RGB ``(N, H, W, 3)`` -> float ``(N, 3, S, S)`` ready for ``forward``."""
        raise NotImplementedError

    def encode(
        self,
        images: np.ndarray,
        batch_size: int = 8,
        *,
        device: str | torch.device | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Encode uint8 RGB patches ``(N, H, W, 3)`` to float32 features ``(N, dim)``."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB patches (N, H, W, 3), got shape {images.shape}")
        if device is None:
            device = next(self.parameters()).device
        self.eval()
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = self.preprocess(images[start : start + batch_size]).to(device)
                out[start : start + len(x)] = self(x).float().cpu().numpy()
                if progress is not None:
                    progress(min(start + batch_size, len(images)), len(images))
        return out


def images_to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float32 ``(N, 3, size, size)`` in 0..255, antialiased resize."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB patches (N, H, W, 3), got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.bin``/``.pth``/``.pt``/``.ckpt`` (torch) or ``.safetensors``.

    A ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper and a DataParallel ``module.``
    prefix are unwrapped. Only tensors are read (``weights_only``): no code runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported weights file type {path.suffix!r}; expected one of "
            f"{', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def strict_load(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, *, what: str
):
    """``load_state_dict(strict=True)`` with an error that names the file and the first bad keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (first: {shape[:3]})")
        raise ValueError(f"{path}: not a {what} checkpoint: " + "; ".join(parts))
    model.load_state_dict(dict(state), strict=True)
