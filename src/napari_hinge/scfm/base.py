"""The contract every single-cell foundation-model backbone meets.

A backbone is a transformer over gene tokens: ``[CLS] + one token per gene``, each token
= gene embedding + value embedding (+ a learned ``zero_emb`` on genes whose value is
hidden). Its blocks are *post-norm* residual blocks,

    x <- norm1(alpha * x + attn(x));  x <- norm2(alpha * x + ffn(x)),

which is what scGPT (alpha = 1) and CellFM (DeepNorm, alpha = (2 L)^(1/4)) both are.
HINGE wraps each block from outside through exactly these parts (``attn``, ``ffn``,
``norm1``, ``norm2``, ``alpha``) and the ``value_decoder``, so a new backbone only has to
subclass :class:`PostNormBlock` and :class:`GeneTokenBackbone`.

Values fed to a backbone are already transformed (``config.value_transform`` names how,
e.g. ``'log1p_cp10k'``); mapping gene symbols to token ids goes through :meth:`gene_ids`,
which reports missing genes by name instead of dropping them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from napari_hinge.errors import InputError
from napari_hinge.persistence import (
    WEIGHTS_FILE,
    ModelFormat,
    config_from_dict,
    load_state_strict,
    read_json,
)


@dataclass
class BackboneConfig:
    kind: str = "builtin"  # registry name: 'builtin', 'scgpt', 'cellfm'
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    # Layers [0, mask_kv_layers) hide the keys/values of masked genes (CellFM: first half).
    mask_kv_layers: int = 0
    value_transform: str = "log1p_cp10k"
    extra: dict = field(default_factory=dict)


class PostNormBlock(nn.Module):
    """Post-norm residual block; subclasses implement ``attn`` and ``ffn``."""

    alpha: float = 1.0
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm

    def attn(self, h: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Token mixing. ``hidden`` (B, L) bool: True = token not visible as key/value."""
        raise NotImplementedError

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(self.alpha * x + self.attn(x, hidden))
        return self.norm2(self.alpha * x + self.ffn(x))


class MHABlock(PostNormBlock):
    """Softmax multi-head attention + ReLU FFN, named like ``nn.TransformerEncoderLayer``
    (``self_attn.in_proj_weight``, ``linear1``, ``linear2``, ``norm1``, ``norm2``) so scGPT
    state dicts load after the ``Wqkv -> in_proj_`` renaming."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def attn(self, h, hidden=None):
        # nn.MultiheadAttention's own weights through F.linear + scaled_dot_product_attention:
        # torch's FLOP counter sees these projections (not those of the fused CPU path), and
        # on one thread attention takes ~15% less time (profiled)
        mha = self.self_attn
        B, L, D = h.shape
        heads = mha.num_heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).view(
            B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        mask = None if hidden is None else ~hidden[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=mha.dropout if self.training else 0.0)
        out = F.linear(out.transpose(1, 2).reshape(B, L, D), mha.out_proj.weight,
                       mha.out_proj.bias)
        return self.dropout(out)

    def ffn(self, h):
        return self.dropout(self.linear2(self.dropout(torch.relu(self.linear1(h)))))


class GeneTokenBackbone(nn.Module):
    """Base class: embed -> blocks -> value decoder.

    Subclasses set ``self.blocks`` (ModuleList of PostNormBlock), ``self.value_decoder``
    (maps gene tokens (B, G, D) to values (B, G)), and implement :meth:`embed`.
    ``vocab`` maps gene symbols to token ids.
    """

    config: BackboneConfig
    vocab: dict[str, int]
    blocks: nn.ModuleList
    value_decoder: nn.Module

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def embed(self, gene_ids: torch.Tensor, values: torch.Tensor,
              masked: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G) ids, (B, G) values, (B, G) bool masked -> (B, 1 + G, D), CLS first."""
        raise NotImplementedError

    def gene_tokens(self, gene_ids: torch.Tensor) -> torch.Tensor:
        """The gene part of :meth:`embed`'s tokens, (G,) ids -> (G, D). Every backbone here
        embeds a gene as ``gene token + value token (+ mask token)``, so HINGE can give a
        gene outside the vocabulary a learned token in the same space."""
        raise NotImplementedError(f"the {self.config.kind} backbone exposes no gene tokens")

    def hidden_tokens(self, masked: torch.Tensor | None) -> torch.Tensor | None:
        """Key/value mask for the first ``mask_kv_layers`` blocks; CLS is always visible."""
        if masked is None or self.config.mask_kv_layers == 0:
            return None
        cls = torch.zeros_like(masked[:, :1])
        return torch.cat([cls, masked], dim=1)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor,
                masked: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(gene_ids, values, masked)
        hidden = self.hidden_tokens(masked)
        for i, block in enumerate(self.blocks):
            h = block(h, hidden if i < self.config.mask_kv_layers else None)
        return self.value_decoder(h[:, 1:])

    def gene_ids(self, genes: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Token ids of ``genes`` (missing ones get id -1) and the names that are missing."""
        missing = [g for g in genes if g not in self.vocab]
        ids = torch.tensor([self.vocab.get(g, -1) for g in genes], dtype=torch.long)
        return ids, missing

    def require_genes(self, genes: list[str]) -> torch.Tensor:
        """Like :meth:`gene_ids` but raise, naming the missing genes."""
        ids, missing = self.gene_ids(genes)
        if missing:
            shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise KeyError(
                f"{len(missing)} of {len(genes)} genes are not in the {self.config.kind} "
                f"backbone's vocabulary: {shown}"
            )
        return ids


VOCAB_FILE = "vocab.json"
#: a saved backbone folder: config.json (this format) + vocab.json + model.safetensors
BACKBONE_FORMAT = ModelFormat("backbone", 2, BackboneConfig)


def read_config(directory: str | Path) -> tuple[BackboneConfig, dict[str, int]]:
    """The checked config and the vocabulary of a saved backbone folder."""
    directory = Path(directory)
    envelope = BACKBONE_FORMAT.read_envelope(directory)
    config = config_from_dict(BackboneConfig, envelope.get("config"),
                              where=directory / "config.json")
    path = directory / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a saved backbone folder")
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise InputError(f"{path}: must map gene symbols to integer token ids", path=path)
    return config, vocab


def save_backbone(backbone: GeneTokenBackbone, directory: str | Path) -> Path:
    """Write a backbone folder (any kind) atomically: ``config.json``, ``vocab.json``,
    ``model.safetensors``.

    :func:`napari_hinge.scfm.load_backbone` reads the folder back, picking the class from
    ``config.kind``; the round trip is bit-identical.
    """
    vocab = json.dumps(backbone.vocab)
    return BACKBONE_FORMAT.save(
        directory, backbone.config, backbone.state_dict(),
        write_extra=lambda tmp: (tmp / VOCAB_FILE).write_text(vocab),
        metadata={"backbone": backbone.config.kind})


def load_saved_weights(model: GeneTokenBackbone, directory: str | Path) -> GeneTokenBackbone:
    """Load a saved folder's weights (digest checked) into a backbone built from its config."""
    directory = Path(directory)
    _, state = BACKBONE_FORMAT.load(directory)
    load_state_strict(model, state, directory / WEIGHTS_FILE)
    return model.eval()


def map_panel(backbone: GeneTokenBackbone, genes: list[str]
              ) -> tuple[torch.Tensor, list[str], list[str]]:
    """Split a gene panel into the genes the backbone knows and those it does not.

    Returns
    -------
    ids
        Token ids of the present genes, in panel order.
    present
        The present gene names (same order as ``ids``).
    missing
        The gene names the vocabulary lacks, in panel order.
    """
    ids, missing = backbone.gene_ids(list(genes))
    keep = ids >= 0
    present = [g for g, k in zip(genes, keep.tolist(), strict=True) if k]
    return ids[keep], present, missing


def transform_counts(counts: torch.Tensor, transform: str = "log1p_cp10k",
                     library_size: torch.Tensor | None = None) -> torch.Tensor:
    """Raw counts (cells, genes) -> the values a backbone expects.

    ``'log1p_cp10k'``: ``log1p(counts / library_size * 1e4)``; ``library_size`` defaults to the
    row sum of ``counts`` (pass the total over *all* genes when ``counts`` is a panel subset).
    ``'log2p1'``: ``log2(counts + 1)`` (HINGE's released code).
    """
    counts = torch.as_tensor(counts, dtype=torch.float32)
    if transform == "log1p_cp10k":
        lib = counts.sum(-1, keepdim=True) if library_size is None else \
            torch.as_tensor(library_size, dtype=torch.float32).reshape(*counts.shape[:-1], 1)
        return torch.log1p(counts / lib.clamp_min(1.0) * 1e4)
    if transform == "log2p1":
        return torch.log2(counts + 1.0)
    raise ValueError(f"unknown value transform {transform!r}; use 'log1p_cp10k' or 'log2p1'")


def require_complete_state(expected: dict, state: dict, what: str, *, show=str) -> None:
    """Raise ``ValueError('<what>: missing N tensors: ...; wrong shapes: ...')`` when ``state``
    lacks tensors of ``expected`` (a module's state dict) or holds them in other shapes.
    ``show`` renders a key as the checkpoint file names it."""
    missing = [show(k) for k in expected if k not in state]
    wrong = [f"{show(k)} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors: {', '.join(missing[:8])}"
                     + (" ..." if len(missing) > 8 else ""))
    if wrong:
        parts.append(f"wrong shapes: {'; '.join(wrong[:8])}")
    raise ValueError(f"{what}: " + "; ".join(parts))
