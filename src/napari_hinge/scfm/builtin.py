"""Our own small gene-token backbone, pre-trained on real expression data.

scGPT-style token embedding (gene embedding + continuous value encoder), post-norm softmax
attention blocks (:class:`~napari_hinge.scfm.base.MHABlock`) and an MLP value decoder.
Masked genes get a learned ``zero_emb`` *and* their value input is replaced by 0, so a hidden
value never reaches the network (HINGE puts noise there; the backbone must not see it).

The shipped weights live in ``napari_hinge/weights/backbone`` and are made by
``scripts/pretrain_backbone.py`` (masked-value pre-training, see its TRAINING.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import (
    BackboneConfig,
    GeneTokenBackbone,
    MHABlock,
    load_saved_weights,
    read_config,
    save_backbone,
)

PAD = "<pad>"


class ValueEncoder(nn.Module):
    """Scalar value -> D: Linear(1, D) -> ReLU -> Linear(D, D) -> LayerNorm (scGPT style)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear2(torch.relu(self.linear1(x.unsqueeze(-1)))))


class ValueDecoder(nn.Module):
    """Gene token (B, G, D) -> value (B, G): Linear(D, D) -> LeakyReLU -> Linear(D, 1)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_model)
        self.fc2 = nn.Linear(d_model, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.leaky_relu(self.fc1(h))).squeeze(-1)


class BuiltinBackbone(GeneTokenBackbone):
    """A small scGPT-like backbone; ``vocab`` maps symbols to ids, id 0 = ``<pad>``."""

    def __init__(self, config: BackboneConfig, vocab: dict[str, int]) -> None:
        super().__init__()
        if config.kind != "builtin":
            raise ValueError(f"BuiltinBackbone needs config.kind 'builtin', got {config.kind!r}")
        if vocab.get(PAD) != 0:
            raise ValueError("a builtin vocabulary must map '<pad>' to id 0")
        self.config = config
        self.vocab = dict(vocab)
        n_tokens = max(vocab.values()) + 1
        d = config.d_model
        self.gene_emb = nn.Embedding(n_tokens, d, padding_idx=0)
        self.value_encoder = ValueEncoder(d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.zero_emb = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(
            MHABlock(d, config.n_heads, config.d_ff, config.dropout) for _ in range(config.n_layers)
        )
        self.value_decoder = ValueDecoder(d)
        # Each gene's mean value over the pre-training cells (0 for <pad>): the baseline the
        # pre-training figures are measured against, and a neutral fill for unknown values.
        self.register_buffer("gene_mean", torch.zeros(n_tokens))

    def gene_tokens(self, gene_ids):
        return self.gene_emb(gene_ids)

    def embed(self, gene_ids, values, masked=None):
        if (gene_ids < 0).any():
            raise KeyError("gene id -1 (a gene missing from the vocabulary) passed to embed; "
                           "map the panel with gene_ids()/map_panel() first")
        tok = self.gene_emb(gene_ids)
        if masked is not None:
            m = masked.to(tok.dtype).unsqueeze(-1)
            values = values.masked_fill(masked, 0.0)  # the hidden value never enters
            tok = tok + self.value_encoder(values) + m * self.zero_emb
        else:
            tok = tok + self.value_encoder(values)
        cls = self.cls_token.expand(tok.shape[0], 1, -1)
        return torch.cat([cls, tok], dim=1)

    def save(self, directory: str | Path) -> Path:
        """Write config.json, vocab.json and model.safetensors into ``directory``."""
        return save_backbone(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> BuiltinBackbone:
        """Read a folder written by :meth:`save` (bit-identical weights)."""
        config, vocab = read_config(directory)
        return load_saved_weights(cls(config, vocab), directory)
