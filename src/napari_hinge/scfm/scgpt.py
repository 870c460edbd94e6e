"""scGPT checkpoints (``args.json`` + ``best_model.pt`` + ``vocab.json``) as a backbone.

The architecture follows scGPT's ``TransformerModel`` with ``input_emb_style='continuous'``:
GeneEncoder (Embedding + LayerNorm), ContinuousValueEncoder (clamp <= 512, Linear(1, D), ReLU,
Linear(D, D), LayerNorm), post-norm ``nn.TransformerEncoderLayer`` blocks with a ``d_hid``-wide
ReLU FFN (:class:`~napari_hinge.scfm.base.MHABlock`), ExprDecoder MLP D -> D -> D -> 1 with
LeakyReLU. The cell token is the gene token ``<cls>`` with value ``pad_value``. Hidden genes get
scGPT's own masking convention: their value input is replaced by ``mask_value`` (scGPT has no
``zero_emb``), so the hidden value never reaches the network.

Value convention: the released scGPT models were pre-trained on *per-cell binned* values
(``n_bins`` = 51: 0 for zero counts, non-zero values of a cell split into 50 quantile bins,
given to the continuous encoder as floats). ``config.value_transform`` is therefore
``'scgpt_binned'``; :func:`bin_values` computes it from any non-negative expression matrix.
Feeding log1p values instead works mechanically but is off-distribution for the weights.

Keys the backbone does not need are ignored and listed in ``backbone.ignored_keys``: the cell-type
classifier (``cls_decoder.*``), the MVC decoder (``mvc_decoder.*``), domain-specific batch norm
(``dsbn.*``, ``bn.*``), batch-label encoder (``batch_encoder.*``), the adversarial discriminator
(``grad_reverse_discriminator.*``), the generation flag (``flag_encoder.*``) and the explicit
zero-probability head (``decoder.zero_logit.*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .base import BackboneConfig, GeneTokenBackbone, MHABlock, require_complete_state

SPECIALS = ("<pad>", "<cls>", "<eoc>")
IGNORED_PREFIXES = ("cls_decoder.", "mvc_decoder.", "dsbn.", "bn.", "batch_encoder.",
                    "grad_reverse_discriminator.", "flag_encoder.", "decoder.zero_logit.",
                    "sim.", "creterion_cce.")
FILES = ("args.json", "best_model.pt", "vocab.json")


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, padding_idx: int | None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d_model: int, max_value: float = 512.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1).clamp(max=self.max_value)
        return self.norm(self.linear2(torch.relu(self.linear1(x))))


class ExprDecoder(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d_model, d_model), nn.LeakyReLU(),
                                nn.Linear(d_model, d_model), nn.LeakyReLU(),
                                nn.Linear(d_model, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h).squeeze(-1)


class ScGPTBackbone(GeneTokenBackbone):
    """scGPT whole-human style backbone; ``config.extra`` holds pad/mask values and ids."""

    def __init__(self, config: BackboneConfig, vocab: dict[str, int]) -> None:
        super().__init__()
        self.config = config
        self.vocab = dict(vocab)
        ex = config.extra
        n_tokens = int(ex.get("n_tokens", max(vocab.values()) + 1))
        d = config.d_model
        self.encoder = GeneEncoder(n_tokens, d, padding_idx=vocab.get(ex.get("pad_token",
                                                                              "<pad>")))
        self.value_encoder = ContinuousValueEncoder(d)
        self.blocks = nn.ModuleList(
            MHABlock(d, config.n_heads, config.d_ff, config.dropout) for _ in range(config.n_layers)
        )
        self.value_decoder = ExprDecoder(d)
        self.ignored_keys: list[str] = []

    def gene_tokens(self, gene_ids):
        return self.encoder(gene_ids)

    def embed(self, gene_ids, values, masked=None):
        if (gene_ids < 0).any():
            raise KeyError("gene id -1 (a gene missing from the scGPT vocabulary) passed to embed;"
                           " map the panel with gene_ids()/map_panel() first")
        ex = self.config.extra
        if masked is not None:  # scGPT's masking: the value input becomes mask_value
            values = values.masked_fill(masked, float(ex.get("mask_value", -1)))
        b = gene_ids.shape[0]
        cls_id = torch.full((b, 1), self.vocab["<cls>"], dtype=gene_ids.dtype,
                            device=gene_ids.device)
        cls_val = torch.full((b, 1), float(ex.get("pad_value", -2)), dtype=values.dtype,
                             device=values.device)
        ids = torch.cat([cls_id, gene_ids], dim=1)
        vals = torch.cat([cls_val, values], dim=1)
        return self.encoder(ids) + self.value_encoder(vals)


def bin_values(x: torch.Tensor, n_bins: int = 51) -> torch.Tensor:
    """scGPT's per-cell value binning: 0 stays 0; each cell's non-zero values go to bins
    1..n_bins-1 by that cell's quantiles (``np.digitize`` on ``n_bins - 1`` quantile edges).
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    out = torch.zeros_like(x)
    q = torch.linspace(0, 1, n_bins - 1)
    for i in range(x.shape[0]):
        nz = x[i] > 0
        if nz.any():
            edges = torch.quantile(x[i][nz], q)
            # np.digitize(v, edges) == number of edges <= v
            out[i][nz] = (x[i][nz].unsqueeze(-1) >= edges).sum(-1).clamp(max=n_bins - 1).float()
    return out


def is_scgpt_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in FILES)


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON gene vocabulary: {err}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{path} must map gene symbols to integer ids")
    for tok in SPECIALS:  # scGPT appends these when absent
        if tok not in vocab:
            vocab[tok] = max(vocab.values(), default=-1) + 1
    return vocab


def _normalise_key(key: str) -> str:
    for old in ("module.",):  # DataParallel prefix
        if key.startswith(old):
            key = key[len(old):]
    key = key.replace("self_attn._impl.Wqkv.", "self_attn.in_proj_")
    key = key.replace("self_attn.Wqkv.", "self_attn.in_proj_")
    key = key.replace("transformer_encoder.layers.", "blocks.")
    if key.startswith("decoder.fc."):
        key = "value_decoder." + key[len("decoder."):]
    return key


def load_scgpt(folder: str | Path, *, dropout: float | None = None) -> ScGPTBackbone:
    """Load an scGPT checkpoint folder (``args.json``, ``best_model.pt``, ``vocab.json``).

    Raises
    ------
    FileNotFoundError
        When one of the three files is missing.
    ValueError
        When a tensor the backbone needs is missing or has the wrong shape (named with the file),
        or when the checkpoint uses an input style this loader does not implement.
    """
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: an scGPT checkpoint folder "
                                    f"holds {', '.join(FILES)}")
    args_path, weights_path = folder / "args.json", folder / "best_model.pt"
    try:
        args = json.loads(args_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{args_path} is not valid JSON: {err}") from None
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ValueError(f"{args_path}: input_emb_style {style!r} is not supported "
                         "(only scGPT's 'continuous' value encoder is)")
    if args.get("pre_norm", False):
        raise ValueError(f"{args_path}: pre_norm=True checkpoints are not post-norm backbones")
    for k in ("embsize", "nheads", "d_hid", "nlayers"):
        if k not in args:
            raise ValueError(f"{args_path} lacks the model setting {k!r}")
    vocab = _read_vocab(folder / "vocab.json")

    try:
        raw = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a state dict"
        raise ValueError(f"{weights_path} could not be read as a PyTorch state dict: {err}") \
            from None
    if isinstance(raw, dict) and "model_state_dict" in raw:
        raw = raw["model_state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{weights_path} does not hold a state dict")

    emb = raw.get("encoder.embedding.weight")
    if emb is None:
        raise ValueError(f"{weights_path} lacks 'encoder.embedding.weight' (not an scGPT model?)")
    if max(vocab.values()) >= emb.shape[0]:
        raise ValueError(f"{folder / 'vocab.json'} has ids up to {max(vocab.values())} but "
                         f"{weights_path} embeds only {emb.shape[0]} tokens")
    config = BackboneConfig(
        kind="scgpt", d_model=int(args["embsize"]), n_layers=int(args["nlayers"]),
        n_heads=int(args["nheads"]), d_ff=int(args["d_hid"]),
        dropout=float(args.get("dropout", 0.0) if dropout is None else dropout),
        mask_kv_layers=0, value_transform="scgpt_binned",
        extra={"n_tokens": int(emb.shape[0]), "pad_token": args.get("pad_token", "<pad>"),
               "pad_value": args.get("pad_value", -2), "mask_value": args.get("mask_value", -1),
               "n_bins": args.get("n_bins", 51), "source": str(folder)},
    )
    model = ScGPTBackbone(config, vocab)
    want = model.state_dict()
    state, ignored = {}, []
    for key, tensor in raw.items():
        new = _normalise_key(key)
        if new in want:
            state[new] = tensor
        elif not key.endswith("num_batches_tracked"):
            ignored.append(key)
    require_complete_state(want, state, f"{weights_path} does not fit {args_path} "
                           f"(embsize {config.d_model}, {config.n_layers} layers)")
    model.load_state_dict(state, strict=True)
    model.ignored_keys = ignored
    config.extra["ignored_keys"] = sorted({k.split(".")[0] for k in ignored})
    return model.eval()
