"""A small convolutional autoencoder: the latent space the central diffusion model works in.

Why latent space: a pixel-space diffusion model must learn to remove noise from every pixel,
which a CPU budget of minutes never reaches (the first shipped central model, 900 steps in
pixel space, produced H&E-coloured noise). Here the autoencoder owns the pixels (64 x 64 x 3 ->
16 x 16 x 4, two stride-2 levels) and the diffusion model only has to learn the distribution
of a 1,024-number code, as in latent diffusion (Rombach et al. 2022), without their KL or
adversarial terms:

- the loss is L1 on pixels plus L1 on horizontal/vertical differences (keeps nuclei edges that
  a pure pixel loss blurs away);
- the code is standardised per channel with statistics measured on the training corpus
  (``latent_mean``/``latent_std`` buffers), so the diffusion model sees unit-variance inputs;
- during training a little Gaussian noise is added to the code (``code_noise`` times its
  spread), so the decoder tolerates the small errors a diffusion sample leaves in it;
- optionally, a second stage refines the decoder alone against a patch critic
  (:class:`PatchCritic`, hinge GAN loss with the adaptive weight of Esser et al. 2021): an L1
  decoder averages what the code leaves uncertain into blur, a critic penalises blur. The
  encoder stays frozen, so the code (and any diffusion model trained on it) stays valid.

Images are ``(B, 3, S, S)`` floats in [-1, 1] (:func:`napari_hinge.c2l.schedule.from_uint8`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import ResBlock


@dataclass
class AutoencoderConfig:
    """Architecture of :class:`PatchAutoencoder` (serialised inside the central model's)."""

    image_size: int = 64
    latent_channels: int = 4
    channels: tuple[int, ...] = (16, 48, 96)  # one stride-2 level between consecutive entries
    groups: int = 8
    code_noise: float = 0.1

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.image_size % self.factor:
            raise ValueError(f"image_size {self.image_size} does not divide by {self.factor}")

    @property
    def factor(self) -> int:
        """Side of the image over side of the code."""
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.factor
        return (self.latent_channels, side, side)

    def to_dict(self) -> dict:
        return asdict(self)


class PatchAutoencoder(nn.Module):
    """``encode(images) -> standardised code``, ``decode(code) -> images``."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = cfg = config or AutoencoderConfig()
        ch, g = cfg.channels, cfg.groups
        enc: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        # no residual block at full resolution: it would cost more than the rest together
        for i, c in enumerate(ch):
            if i > 0:
                enc.append(ResBlock(c, c, 0, g))
            if i + 1 < len(ch):
                enc.append(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1))
        enc += [nn.GroupNorm(g, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.latent_channels, 1)]
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)]
        for i in range(len(ch) - 1, -1, -1):
            if i > 0:
                dec.append(ResBlock(ch[i], ch[i], 0, g))
                dec += [nn.Upsample(scale_factor=2, mode="nearest"),
                        nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
        dec += [nn.GroupNorm(g, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], 3, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised code ``(B, C, s, s)`` of images in [-1, 1]."""
        z = self.encoder(images)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from a standardised code."""
        z = code * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        return self.decoder(z).clamp(-1, 1)

    def reconstruction_loss(self, images: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """L1 on pixels + L1 on pixel differences, through a slightly noised code."""
        z = self.encoder(images)
        spread = z.detach().std(dim=(0, 2, 3), keepdim=True)
        noise = torch.randn(z.shape, generator=generator).to(z.device)
        out = self.decoder(z + self.config.code_noise * spread * noise)
        return image_loss(out, images)

    @torch.no_grad()
    def set_latent_stats(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Per-channel mean/std of the raw code over ``images`` (the training corpus)."""
        codes = torch.cat([self.encoder(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])
        self.latent_mean.copy_(codes.mean(dim=(0, 2, 3)))
        self.latent_std.copy_(codes.std(dim=(0, 2, 3)).clamp_min(1e-6))


def image_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on pixels plus L1 on horizontal and vertical neighbour differences."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (F.l1_loss(out, target) + F.l1_loss(dx(out), dx(target))
            + F.l1_loss(dy(out), dy(target)))



class PatchCritic(nn.Module):
    """A small PatchGAN critic: ``(B, 3, S, S)`` in [-1, 1] -> ``(B, 1, S/8, S/8)`` logits,
    each judging a ~40 px neighbourhood (a few nuclei) as real or decoded."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def critic_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic: real patches above +1, decoded ones below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def adaptive_adversarial_weight(recon_loss: torch.Tensor, adv_loss: torch.Tensor,
                                last_layer: torch.Tensor, cap: float = 1e4) -> torch.Tensor:
    """Scale of the adversarial term that matches its gradient norm at the decoder's last
    layer to the reconstruction loss's (Esser et al. 2021), so neither swamps the other."""
    g_rec = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, cap).detach()
