"""STMGAC: a contrastively augmented masked graph autoencoder for spatial domains.

Clean-room re-implementation from the description in ``docs/methods.md`` §2 and §6.2
(Fang et al., IEEE BIBM 2024; code ``wenwenmin/STMGAC``, which ships no licence, so
nothing was copied). Read top to bottom:

- online encoder F_s: MLP (in→64→32) then GCN (32→64→16) on the masked view;
- momentum encoder F_t: an EMA copy of F_s, fed the complementary view, no gradients;
- ``enc_to_dec`` + re-mask token, then the GCN projector F_p matched to F_t at masked
  nodes (latent MSE, self-distillation);
- GCN decoder F_d reconstructing the input of masked nodes from their neighbours
  (kept nodes' latents are zeroed first), scored with the scaled-cosine loss.

The losses and the triplet anchors live in ``losses.py``; the training loop in ``train.py``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from napari_hinge.persistence import WEIGHTS_FILE, ModelFormat, config_from_dict, load_state_strict


@dataclass
class STMGACConfig:
    """Architecture and masking hyper-parameters (defaults: the DLPFC preset)."""

    in_dim: int = 200
    mlp_dims: tuple[int, ...] = (64, 32)
    gcn_dims: tuple[int, ...] = (64, 16)
    proj_hidden: int = 32
    dropout: float = 0.2
    mask_rate: float = 0.7
    replace_rate: float = 0.1
    momentum: float = 0.998
    bn_momentum: float = 0.01
    bn_eps: float = 1e-3
    extra: dict = field(default_factory=dict)

    @property
    def latent_dim(self) -> int:
        return self.gcn_dims[-1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mlp_dims"], d["gcn_dims"] = list(self.mlp_dims), list(self.gcn_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> STMGACConfig:
        """Strict: unknown keys raise :class:`~napari_hinge.errors.InputError`."""
        return config_from_dict(cls, d, where="STMGAC config")


FORMAT = ModelFormat("stmgac", 2, STMGACConfig, title="STMGAC")


class GCNConv(nn.Module):
    """Graph convolution ``Â (X W) + b`` with a fixed, pre-normalised sparse Â."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, out_dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.lin.weight)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return adj @ self.lin(x) + self.bias


def _bn(dim: int, cfg: STMGACConfig) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(dim, momentum=cfg.bn_momentum, eps=cfg.bn_eps)


class Encoder(nn.Module):
    """MLP block (Linear→BN→ELU→Dropout) then GCN block (GCN→BN→ReLU→Dropout; last: no act)."""

    def __init__(self, cfg: STMGACConfig) -> None:
        super().__init__()
        mlp, d = [], cfg.in_dim
        for h in cfg.mlp_dims:
            mlp += [nn.Linear(d, h), _bn(h, cfg), nn.ELU(), nn.Dropout(cfg.dropout)]
            d = h
        self.mlp = nn.Sequential(*mlp)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for h in cfg.gcn_dims:
            self.convs.append(GCNConv(d, h))
            self.norms.append(_bn(h, cfg))
            d = h
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = norm(conv(h, adj))
            if i < last:
                h = torch.relu(h)
            h = self.dropout(h)
        return h


class STMGAC(nn.Module):
    """The full model. ``forward`` runs one training pass on a fresh random mask."""

    def __init__(self, cfg: STMGACConfig) -> None:
        super().__init__()
        self.config = cfg
        z = cfg.latent_dim
        self.encoder = Encoder(cfg)
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.enc_mask_token = nn.Parameter(torch.zeros(1, cfg.in_dim))
        self.rep_mask = nn.Parameter(torch.zeros(1, z))
        self.enc_to_dec = nn.Linear(z, z, bias=False)
        nn.init.xavier_uniform_(self.enc_to_dec.weight)
        self.proj_conv = GCNConv(z, cfg.proj_hidden)
        self.proj_norm = _bn(cfg.proj_hidden, cfg)
        self.proj_out = nn.Linear(cfg.proj_hidden, z, bias=False)
        nn.init.xavier_uniform_(self.proj_out.weight)
        self.dec_conv = GCNConv(z, cfg.in_dim)
        self.dec_norm = _bn(cfg.in_dim, cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    # -- views -------------------------------------------------------------------------
    def mask_views(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """GraphMAE-style masking: returns (online view, complementary view, masked, kept).

        Of the masked nodes, a ``replace_rate`` share get another random node's features,
        the rest are zeroed and get the learnable mask token. The complementary view keeps
        the masked nodes' true features and hides the kept ones.
        """
        n = x.shape[0]
        cfg = self.config
        dev = x.device
        perm = torch.randperm(n, generator=generator).to(dev)
        n_mask = int(cfg.mask_rate * n)
        mask_nodes, keep_nodes = perm[:n_mask], perm[n_mask:]
        x_m = x.clone()
        if cfg.replace_rate > 0 and n_mask > 0:
            perm_mask = torch.randperm(n_mask, generator=generator).to(dev)
            n_noise = int(cfg.replace_rate * n_mask)
            n_token = n_mask - n_noise
            token_nodes = mask_nodes[perm_mask[:n_token]]
            noise_nodes = mask_nodes[perm_mask[n_token:]]
            sources = torch.randperm(n, generator=generator)[:n_noise].to(dev)
            x_m[token_nodes] = 0.0
            x_m[noise_nodes] = x[sources]
        else:
            token_nodes = mask_nodes
            x_m[token_nodes] = 0.0
        x_m[token_nodes] = x_m[token_nodes] + self.enc_mask_token
        x_v = x.clone()
        x_v[keep_nodes] = 0.0
        x_v[keep_nodes] = x_v[keep_nodes] + self.enc_mask_token
        return x_m, x_v, mask_nodes, keep_nodes

    # -- pieces ------------------------------------------------------------------------
    def project(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.proj_norm(self.proj_conv(h, adj))))
        return self.proj_out(h)

    def decode(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dec_norm(self.dec_conv(h, adj)))

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA: θ_t ← m θ_t + (1 − m) θ_s (parameters only; BN statistics are the target's own)."""
        m = self.config.momentum
        for pt, ps in zip(
            self.target_encoder.parameters(), self.encoder.parameters(), strict=True
        ):
            pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)

    def forward(self, x: torch.Tensor, adj: torch.Tensor, generator: torch.Generator | None = None):
        """One training pass. Returns a dict with the tensors the losses need."""
        x_m, x_v, mask_nodes, keep_nodes = self.mask_views(x, generator)
        h_s = self.encoder(x_m, adj)
        with torch.no_grad():
            h_t = self.target_encoder(x_v, adj)
        self.update_target()
        r = self.enc_to_dec(h_s)
        r = r.index_copy(0, mask_nodes, self.rep_mask.expand(mask_nodes.numel(), -1))
        h_hat = self.project(r, adj)
        # Kept nodes are silenced so masked features are rebuilt from neighbours only.
        h_dec = h_hat.index_fill(0, keep_nodes, 0.0)
        x_hat = self.decode(h_dec, adj)
        return {
            "h_s": h_s,
            "h_t": h_t,
            "h_hat": h_hat,
            "x_hat": x_hat,
            "mask_nodes": mask_nodes,
            "keep_nodes": keep_nodes,
        }

    @torch.no_grad()
    def embed(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """The latent F_s(X) of the unmasked input (eval mode)."""
        was = self.training
        self.eval()
        try:
            return self.encoder(x, adj)
        finally:
            self.train(was)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """F_d(F_p(enc_to_dec(F_s(X)))): the reconstruction of every node, in input space."""
        was = self.training
        self.eval()
        try:
            h = self.encoder(x, adj)
            return self.decode(self.project(self.enc_to_dec(h), adj), adj)
        finally:
            self.train(was)

    # -- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the model folder atomically (:data:`FORMAT`)."""
        return FORMAT.save(directory, self.config, self.state_dict())

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> STMGAC:
        """Read a folder written by :meth:`save` (bit-identical)."""
        cfg, state = FORMAT.load(directory)
        model = cls(cfg)
        load_state_strict(model, state, Path(directory) / WEIGHTS_FILE)
        return model.to(map_location)
