"""CellFM (retention / "ERetNet") backbone and a loader for converted CellFM weights.

CellFM is distributed as a MindSpore ``.ckpt``; this module needs no MindSpore. It reads a file
already converted to PyTorch (``torch.save`` of a dict of tensors, ``.pt``/``.pth``) or to
``.safetensors`` that keeps the MindSpore key names (methods.md 4.2), plus CellFM's gene table
(``expand_gene_info.csv`` for the 800M model, ``gene_info.csv`` for the 80M one; gene id = row
index + 1, 0 = pad).

Layer (methods.md 1.2, CellFM ``retention.py``): bias-free q, k, v, u, o projections;
Q = ReLU(q)/sqrt(dh), K = ReLU(k)/sqrt(dh), V = v / sqrt(L_genes), U = SiLU(u);
O = Q (K^T V) per head (linear attention, no softmax); SRMSNorm(O) * U; o_proj. FFN = gated
linear unit o(u(x) * v(x)). DeepNorm post-norm x <- LN(alpha x + f(x)), alpha = (2 L)^(1/4).
Keys of masked genes are zeroed in the first ``L // 2`` layers (zeroing K removes their whole
K^T V contribution, as in CellFM, whose code multiplies K only).

MindSpore defaults that a faithful port keeps (recorded in ``config.extra``): ``nn.LeakyReLU``
slope 0.2 and ``nn.LayerNorm`` epsilon 1e-7 (PyTorch's are 0.01 and 1e-5).
Hidden genes: ``zero_emb`` is added (as in HINGE) and, by default, their value input is replaced
by 0 (``extra['hide_masked_values']``) so a hidden value never reaches the network; HINGE's
released code instead feeds the diffusion noise through the value encoder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from .base import BackboneConfig, GeneTokenBackbone, PostNormBlock, require_complete_state

GENE_TABLES = ("expand_gene_info.csv", "gene_info.csv")
NAME_COLUMNS = ("gene_name", "gene", "symbol", "feature_name", "name", "HGNC")
SKIP_PATTERNS = (r"^moment1\.", r"^moment2\.", r"^global_step$", r"^learning_rate$",
                 r"^beta\d_power$", r"^ST_", r"^value_enc\.mask_emb$", r"^adam_",
                 r"^accu_grads\.", r"^scale_sense$", r"^current_iterator_step$",
                 r"^last_overflow_iterator_step$", r"^epoch_num$", r"^step_num$")
LAYER_RE = re.compile(r"^encoder\.(\d+)\.")


class SRMSNorm(nn.Module):
    """x / max(||x||_2 / sqrt(d), 1e-12) (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        return x / (x.float().norm(dim=-1, keepdim=True) / math.sqrt(d)).clamp_min(1e-12).to(
            x.dtype)


class MHRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        for name in ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj"):
            setattr(self, name, nn.Linear(d_model, d_model, bias=False))
        self.inner_norm = SRMSNorm()

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        h, dh = self.n_heads, self.head_dim

        def heads(t):
            return t.view(b, n, h, dh).transpose(1, 2)  # (B, H, N, dh)

        q = torch.relu(heads(self.q_proj(x))) / math.sqrt(dh)
        k = torch.relu(heads(self.k_proj(x))) / math.sqrt(dh)
        v = heads(self.v_proj(x)) / math.sqrt(max(n - 1, 1))  # len_scale = 1/sqrt(L_genes)
        u = nn.functional.silu(heads(self.u_proj(x)))
        if hidden is not None:
            k = k * (~hidden).to(k.dtype)[:, None, :, None]
        o = q @ (k.transpose(-1, -2) @ v)  # linear attention: (dh x dh) state per head
        o = self.inner_norm(o) * u
        return self.o_proj(o.transpose(1, 2).reshape(b, n, d))


class GatedLinearUnit(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.u_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class RetentionBlock(PostNormBlock):
    """CellFM's RetentionLayer as a :class:`PostNormBlock` (``retention``/``glu`` submodules)."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, dropout: float = 0.0,
                 eps: float = 1e-7) -> None:
        super().__init__()
        self.retention = MHRetention(d_model, n_heads)
        self.glu = GatedLinearUnit(d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.alpha = (2 * n_layers) ** 0.25

    def attn(self, h, hidden=None):
        return self.dropout(self.retention(h, hidden))

    def ffn(self, h):
        return self.dropout(self.glu(h))


class SoftLookupValueEncoder(nn.Module):
    """x -> W1 (1 -> 256) -> LeakyReLU -> W3 v + a v -> softmax -> table (256 -> D)."""

    def __init__(self, d_model: int, n_bins: int = 256, slope: float = 0.2) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, n_bins, bias=False)
        self.w3 = nn.Linear(n_bins, n_bins, bias=False)
        self.table = nn.Linear(n_bins, d_model, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = nn.functional.leaky_relu(self.w1(x.unsqueeze(-1)), self.slope)
        return self.table(torch.softmax(self.w3(v) + self.a * v, dim=-1))


class CellFMValueDecoder(nn.Module):
    def __init__(self, d_model: int, slope: float = 0.2) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_model, bias=False)
        self.w2 = nn.Linear(d_model, 1, bias=False)
        self.slope = slope

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.leaky_relu(self.w1(h), self.slope)).squeeze(-1)


class CellFMBackbone(GeneTokenBackbone):
    """CellFM encoder: ``gene_emb`` rows = gene id (row 0 = pad), ``cls_token``, ``zero_emb``."""

    def __init__(self, config: BackboneConfig, vocab: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.vocab = dict(vocab)
        ex = config.extra
        d, slope = config.d_model, float(ex.get("leaky_slope", 0.2))
        n_rows = int(ex.get("n_gene_rows", _rows(max(vocab.values(), default=0))))
        self.gene_emb = nn.Parameter(torch.randn(n_rows, d) * 0.02)
        with torch.no_grad():
            self.gene_emb[0] = 0
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.zero_emb = nn.Parameter(torch.zeros(1, 1, d))
        self.value_encoder = SoftLookupValueEncoder(d, int(ex.get("value_bins", 256)), slope)
        L = config.n_layers
        self.blocks = nn.ModuleList(
            RetentionBlock(d, config.n_heads, L, config.dropout * i / L,
                           float(ex.get("ln_eps", 1e-7))) for i in range(L)
        )
        self.value_decoder = CellFMValueDecoder(d, slope)

    def gene_tokens(self, gene_ids):
        return self.gene_emb[gene_ids]

    def embed(self, gene_ids, values, masked=None):
        if (gene_ids < 0).any():
            raise KeyError("gene id -1 (a gene missing from CellFM's gene table) passed to embed;"
                           " map the panel with gene_ids()/map_panel() first")
        tok = self.gene_emb[gene_ids]
        if masked is not None:
            if self.config.extra.get("hide_masked_values", True):
                values = values.masked_fill(masked, 0.0)
            tok = tok + self.value_encoder(values) + masked.to(tok.dtype).unsqueeze(-1) \
                * self.zero_emb
        else:
            tok = tok + self.value_encoder(values)
        return torch.cat([self.cls_token.expand(tok.shape[0], 1, -1), tok], dim=1)


def _rows(max_id: int) -> int:
    """CellFM's gene_emb height: n_genes + 1 rounded up to a multiple of 8."""
    n = max_id + 1
    return n + (-n) % 8


def read_gene_table(path: str | Path) -> dict[str, int]:
    """CellFM gene table csv -> {symbol: row index + 1} (0 is the pad row).

    The symbol comes from a name column (gene_name, gene, symbol, ...) or else the first column.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CellFM gene table {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001 - any parse failure: tell the user which file
        raise ValueError(f"{path} is not a readable CSV gene table: {err}") from None
    cols = {c.lower(): c for c in df.columns}
    col = next((cols[c.lower()] for c in NAME_COLUMNS if c.lower() in cols), df.columns[0])
    names = df[col].tolist()
    if not names:
        raise ValueError(f"{path} lists no genes")
    vocab: dict[str, int] = {}
    for i, g in enumerate(names):
        vocab.setdefault(g, i + 1)
    return vocab


def _map_key(key: str) -> str:
    key = key.replace(".post_norm1.gamma", ".norm1.weight").replace(".post_norm1.beta",
                                                                      ".norm1.bias")
    key = key.replace(".post_norm2.gamma", ".norm2.weight").replace(".post_norm2.beta",
                                                                      ".norm2.bias")
    key = key.replace(".post_norm1.", ".norm1.").replace(".post_norm2.", ".norm2.")
    key = LAYER_RE.sub(lambda m: f"blocks.{m.group(1)}.", key)
    key = key.replace(".attn.", ".retention.").replace(".ffn.", ".glu.")
    if key.startswith("value_enc.value_enc."):
        key = "value_encoder." + key[len("value_enc.value_enc."):]
    elif key.startswith("value_dec."):
        key = "value_decoder." + key[len("value_dec."):]
    return key


def _ms_name(key: str) -> str:
    """PyTorch parameter name -> the MindSpore key name users see in their file."""
    key = re.sub(r"^blocks\.(\d+)\.", r"encoder.\1.", key)
    key = key.replace(".retention.", ".attn.").replace(".glu.", ".ffn.")
    for n in ("1", "2"):
        key = key.replace(f".norm{n}.weight", f".post_norm{n}.gamma")
        key = key.replace(f".norm{n}.bias", f".post_norm{n}.beta")
    if key.startswith("value_encoder."):
        key = "value_enc.value_enc." + key[len("value_encoder."):]
    elif key.startswith("value_decoder."):
        key = "value_dec." + key[len("value_decoder."):]
    return key


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from napari_hinge.training import load_safetensors

        return load_safetensors(path)
    if path.suffix == ".ckpt":
        raise ValueError(f"{path} is a MindSpore checkpoint; convert it first to .pt or "
                         ".safetensors with the same key names (no MindSpore here)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path} could not be read as a PyTorch tensor dict: {err}") from None
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a dict of named tensors")
    return {k: torch.as_tensor(v) for k, v in raw.items()}


def find_gene_table(weights: Path) -> Path | None:
    for name in GENE_TABLES:
        for folder in (weights.parent, weights.parent / "csv"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_cellfm(weights: str | Path, gene_table: str | Path | None = None, *,
                n_heads: int | None = None, head_dim: int = 32,
                dropout: float = 0.0) -> CellFMBackbone:
    """Load converted CellFM weights (``.pt``/``.pth``/``.safetensors``, MindSpore key names).

    Parameters
    ----------
    weights
        The converted weight file.
    gene_table
        CellFM's gene table csv; default: ``expand_gene_info.csv`` or ``gene_info.csv`` beside
        the weights (or in a ``csv/`` folder there).
    n_heads
        Attention heads; default ``d_model // head_dim`` (48 for the 1536-wide models).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"CellFM weight file {weights} does not exist")
    table = Path(gene_table) if gene_table is not None else find_gene_table(weights)
    if table is None:
        raise FileNotFoundError(f"no CellFM gene table ({' or '.join(GENE_TABLES)}) beside "
                                f"{weights}; pass gene_table=")
    vocab = read_gene_table(table)
    raw = _read_tensors(weights)
    skip = re.compile("|".join(SKIP_PATTERNS))
    skipped = [k for k in raw if skip.search(k)]
    tensors = {_map_key(k): v for k, v in raw.items() if not skip.search(k)}

    if "gene_emb" not in tensors:
        raise ValueError(f"{weights} lacks 'gene_emb' (not a CellFM weight file?)")
    n_rows, d = tensors["gene_emb"].shape
    layers = sorted({int(m.group(1)) for k in raw if (m := LAYER_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{weights} has no contiguous encoder.<i>.* layers (found {layers[:5]})")
    if max(vocab.values()) >= n_rows:
        raise ValueError(f"{table} lists {max(vocab.values())} genes but gene_emb in {weights} "
                         f"has only {n_rows} rows (a different CellFM gene table?)")
    heads = n_heads or max(1, d // head_dim)
    config = BackboneConfig(
        kind="cellfm", d_model=d, n_layers=len(layers), n_heads=heads, d_ff=d, dropout=dropout,
        mask_kv_layers=len(layers) // 2, value_transform="log1p_cp10k",
        extra={"n_gene_rows": n_rows, "value_bins": int(max(tensors.get(
            "value_encoder.w1.weight", torch.empty(256, 1)).shape)),
            "leaky_slope": 0.2, "ln_eps": 1e-7, "hide_masked_values": True,
            "gene_table": table.name, "source": str(weights)},
    )
    model = CellFMBackbone(config, vocab)
    want = model.state_dict()
    state, unused = {}, []
    for k, v in tensors.items():
        if k not in want:
            unused.append(k)
            continue
        if k in ("cls_token", "zero_emb") and v.numel() == want[k].numel():
            v = v.reshape(want[k].shape)
        elif k == "value_encoder.a" and v.numel() == 1:
            v = v.reshape(1, 1)
        elif v.dim() == 2 and v.shape != want[k].shape and v.t().shape == want[k].shape:
            v = v.t()  # a transposed dense weight (in x out)
        state[k] = v.to(want[k].dtype).contiguous()
    require_complete_state(want, state, f"{weights} is not a complete CellFM encoder "
                           f"(d_model {d}, {len(layers)} layers)", show=_ms_name)
    model.load_state_dict(state, strict=True)
    model.skipped_keys = skipped
    model.ignored_keys = unused
    return model.eval()
