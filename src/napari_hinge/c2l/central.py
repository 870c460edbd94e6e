"""The central model: an unconditional diffusion model of H&E patches.

A :class:`CentralModel` is a :class:`~napari_hinge.c2l.unet.UNet` plus its noise schedule, the
physical scale of its patches (``patch_um`` of tissue resampled to ``image_size`` px, so that
every caller cuts patches the way the model saw them) and, for a latent model, the frozen
:class:`~napari_hinge.c2l.autoencoder.PatchAutoencoder` whose code the UNet denoises
(``encode``/``decode`` are the identity for a pixel-space model). It learns morphology from unpaired
patches of many slides; the local model (:mod:`napari_hinge.c2l.local`) freezes it and adds
gene-conditioned modulation.

Folder layout written by :meth:`CentralModel.save`: ``config.json`` and ``model.safetensors``
(:data:`FORMAT`, the :mod:`napari_hinge.persistence` contract).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from napari_hinge.persistence import WEIGHTS_FILE, ModelFormat, config_from_dict, load_state_strict

from .autoencoder import AutoencoderConfig, PatchAutoencoder
from .schedule import NoiseSchedule, ddim_sample, from_uint8, to_uint8
from .unet import UNet, UNetConfig

SHIPPED = "shipped"


@dataclass
class CentralConfig:
    """Everything needed to rebuild a central model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    timesteps: int = 1000
    #: tissue side of one patch in µm (resampled to ``unet.image_size`` pixels)
    patch_um: float = 112.0
    prediction: str = "v"
    #: latent model: the autoencoder whose code the UNet works on (None: pixel space)
    autoencoder: AutoencoderConfig | None = None

    def __post_init__(self) -> None:
        if self.autoencoder is not None:
            c, side, _ = self.autoencoder.latent_shape
            if (self.unet.in_channels, self.unet.image_size // self.unet.stem,
                    self.unet.stem) != (c, side, 1):
                raise ValueError(f"a latent UNet needs in_channels {c}, image_size {side} and "
                                 f"stem 1 for the autoencoder's code, got {self.unet}")

    @property
    def image_size(self) -> int:
        """Side in pixels of the patches the model generates."""
        ae = self.autoencoder
        return ae.image_size if ae is not None else self.unet.image_size

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one sample in the space the diffusion runs in."""
        if self.autoencoder is not None:
            return self.autoencoder.latent_shape
        return (self.unet.in_channels, self.unet.image_size, self.unet.image_size)

    @property
    def x0_clip(self) -> float | None:
        """Pixel values live in [-1, 1]; a standardised code has no hard range."""
        return None if self.autoencoder is not None else 1.0

    @property
    def microns_per_pixel(self) -> float:
        """Pixel size of the patches the model generates."""
        return self.patch_um / self.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CentralConfig:
        """Strict: unknown keys raise :class:`~napari_hinge.errors.InputError`."""
        return config_from_dict(cls, data, where="C2L central config")


FORMAT = ModelFormat("c2l-central", 2, CentralConfig, title="C2L central")


class CentralModel(nn.Module):
    """Unconditional patch diffusion model: ``model(x, t, cond=None) -> v``."""

    def __init__(self, config: CentralConfig | None = None):
        super().__init__()
        self.config = config or CentralConfig()
        if self.config.prediction != "v":
            raise ValueError(f"only v-prediction is implemented, got {self.config.prediction!r}")
        self.unet = UNet(self.config.unet)
        self.schedule = NoiseSchedule(self.config.timesteps)
        self.autoencoder = None
        if self.config.autoencoder is not None:
            self.autoencoder = PatchAutoencoder(self.config.autoencoder)
            self.autoencoder.requires_grad_(False)  # trained before the UNet, then frozen

    def forward(self, x, t, cond=None, modulations=None):
        return self.unet(x, t, modulations)

    def set_autoencoder(self, autoencoder: PatchAutoencoder) -> None:
        """Copy a trained autoencoder's weights (and code statistics) into this latent model."""
        if self.autoencoder is None:
            raise ValueError("a pixel-space central model has no autoencoder")
        self.autoencoder.load_state_dict(autoencoder.state_dict())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the diffusion denoises (the code, or the images)."""
        return images if self.autoencoder is None else self.autoencoder.encode(images)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`: images in [-1, 1]."""
        return x.clamp(-1, 1) if self.autoencoder is None else self.autoencoder.decode(x)

    @torch.no_grad()
    def reconstruct(self, patches, batch_size: int = 64):
        """uint8 patches ``(N, S, S, 3)`` through :meth:`encode` and :meth:`decode`: what the
        autoencoder keeps of them (the closest to real any latent sample can get)."""
        import numpy as np

        batches = (from_uint8(patches[i:i + batch_size])
                   for i in range(0, len(patches), batch_size))
        return np.concatenate([to_uint8(self.decode(self.encode(x))) for x in batches])

    @torch.no_grad()
    def sample(self, n: int, *, steps: int = 25, seed: int = 0, batch_size: int = 32,
               device=None, progress=None):
        """``n`` unconditional patches as ``(n, S, S, 3)`` uint8."""
        import numpy as np

        was = self.training
        self.eval()
        device = device or next(self.parameters()).device
        out = []
        g = torch.Generator().manual_seed(int(seed))
        done = 0
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = ddim_sample(self, self.schedule, (b, *self.config.sample_shape), steps=steps,
                            generator=g, device=device, clip=self.config.x0_clip)
            out.append(to_uint8(self.decode(x)))
            done += b
            if progress is not None:
                progress(done, n)
        self.train(was)
        return np.concatenate(out) if out else np.zeros((0, self.config.image_size,
                                                        self.config.image_size, 3), np.uint8)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, half: bool = False) -> Path:
        """Write the model folder atomically (:data:`FORMAT`); ``half`` stores the
        floating-point tensors as float16 (half the size; reload the folder to work with
        exactly what was written)."""
        state = self.state_dict()
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        return FORMAT.save(directory, self.config, state)

    @classmethod
    def load(cls, directory: str | os.PathLike = SHIPPED, *,
             map_location: str | torch.device = "cpu") -> CentralModel:
        """Load a folder written by :meth:`save`, or ``'shipped'`` for the packaged weights."""
        directory = shipped_central_dir() if str(directory) == SHIPPED else Path(directory)
        config, state = FORMAT.load(directory, device=str(map_location))
        model = cls(config).to(map_location)
        load_state_strict(model, state, directory / WEIGHTS_FILE)
        return model.eval()


def shipped_central_dir() -> Path:
    """Folder of the shipped central weights."""
    return Path(__file__).resolve().parents[1] / "weights" / "c2l_central"
