"""Several encoders side by side: features concatenated (e.g. UNI 1024 + CONCH 512 = 1536-d)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from .base import Encoder


class ConcatEncoder(Encoder):
    """Runs each encoder with its own preprocessing and concatenates the features.

    ``preprocess`` keeps the raw uint8 patches (as a tensor) because each member resizes
    and normalises differently; ``forward`` takes that tensor.
    """

    def __init__(self, encoders: list[Encoder]):
        super().__init__()
        if len(encoders) < 2:
            raise ValueError("ConcatEncoder needs at least two encoders")
        self.members = nn.ModuleList(encoders)
        self.name = "+".join(e.name for e in encoders)
        self.dim = sum(e.dim for e in encoders)
        self.input_size = max(e.input_size for e in encoders)
        self.weights_digest = hashlib.sha256(
            "|".join(e.weights_digest for e in encoders).encode()
        ).hexdigest()[:24]

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB patches (N, H, W, 3), got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x.cpu().numpy().astype(np.uint8, copy=False)
        device = x.device
        return torch.cat([e(e.preprocess(raw).to(device)) for e in self.members], dim=1)
