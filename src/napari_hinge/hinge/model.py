"""HINGE: a frozen gene-token foundation model turned into a histology-conditioned generator.

    c      = CondNet(t, image features, m_prev)                    (trainable)
    h      = backbone.embed(gene ids, x_t, masked = ~m_t)          (frozen; zero_emb on masked)
    h      = SoftAdaLNBlock_i(h, c), each pre-trained block       (block frozen, modulation trained)
    x0_hat = value_decoder(SoftPreNorm(h) (1 + scale) + shift)     (decoder frozen)

Keys/values of masked genes are hidden in the first ``backbone.config.mask_kv_layers`` blocks,
exactly as the backbone's own forward does. At initialisation the model reproduces the backbone
(see :mod:`napari_hinge.hinge.softadaln`). The mask schedule lives in
:mod:`napari_hinge.hinge.schedule`, the sampler in :mod:`napari_hinge.hinge.sampler`.

The network standardises its image features itself (``feature_mean`` / ``feature_std``
buffers, set from the training features by :meth:`HingeModel.set_feature_norm`): callers pass
the features as the encoder (plus neighbour context) made them.

A saved model folder (:data:`FORMAT`, the :mod:`napari_hinge.persistence` contract) holds
``config.json`` (kind, version, weights digest and :class:`HingeConfig`: genes, image encoder
name, feature size, backbone reference, schedule), ``model.safetensors`` (the trainable part and
the feature standardisation), ``meta.json`` (parameter counts, backbone digest),
``calibration.json`` when the model has an interval calibration and, unless the backbone is a
named shipped one, ``backbone/`` (a saved backbone folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from napari_hinge.errors import InputError
from napari_hinge.persistence import CONFIG_FILE, ModelFormat, read_json
from napari_hinge.scfm.base import BACKBONE_FORMAT, GeneTokenBackbone, save_backbone
from napari_hinge.training import load_safetensors

from .schedule import MaskSchedule
from .softadaln import CondNet, ModulatedDecoder, SoftAdaLNBlock

META_FILE = "meta.json"
# Registry names whose weights ship with the package: a saved model refers to them by name.
NAMED_BACKBONES = ("builtin",)
PRIORS = (None, "ridge")


@dataclass
class HingeConfig:
    """Everything needed to rebuild a :class:`HingeModel` around its backbone.

    Parameters
    ----------
    genes
        The panel (G gene symbols), in the order of the target vectors.
    feature_dim
        Size of the image feature vector per spot.
    encoder
        Name of the image encoder that made the features (recorded, checked by callers).
    backbone_ref
        Registry name (e.g. ``'builtin'``) or path the backbone was loaded from; ``None`` when the
        backbone was built in code (it is then saved inside the model folder).
    value_transform
        Transform of the target values; ``None`` takes the backbone's ``config.value_transform``.
    num_steps, gamma, k_tail, mask_fill, warmup_mask_ratio
        Mask schedule (:class:`~napari_hinge.hinge.schedule.MaskSchedule`) and warm-start ratio.
    ada_rank
        ``None``: full Ada6Head per block (paper); an int: low-rank heads of that rank.
    gate, gate_bias, prenorm_logit
        SoftAdaLN gate mode ('sigmoid'/'linear'), its initial bias, initial SoftPreNorm logit.
    t_dim, max_period
        Timestep sinusoid size and period.
    context_um
        When set, the network's features are the spot's encoder features followed by the mean
        of its neighbours' within this radius (:func:`napari_hinge.features.context_features`);
        ``feature_dim`` counts both halves.
    prior
        ``'ridge'``: a linear map of the (standardised) features gives a deterministic prior and
        the diffusion models the residual around it (the prior's weights are buffers of the
        model, fitted in closed form by :func:`napari_hinge.hinge.pipeline.fit_hinge_arrays`);
        ``None``: the diffusion models the whole signal.
    predict_variance
        A head on the decoder's input predicts each revealed gene's log-variance (trained by
        Gaussian likelihood on the residual of the detached mean); the sampler then draws each
        revealed gene from that Gaussian instead of keeping its mean, so the samples spread.
    center_sections
        Features are centred per section (the section's mean feature vector subtracted, after
        the context) before standardisation: the stain and scanner of a section shift all its
        spots alike (:func:`napari_hinge.features.center_per_group`).
    residual_scale
        The sampler adds ``residual_scale`` times the sampled residual to the prior (1: the
        residual as trained; smaller values shrink it toward the prior).
    extra_genes
        Panel genes outside the backbone's vocabulary (filled in by the model): each gets a
        learned gene token (:meth:`HingeModel.init_extra_genes`).
    """

    genes: list[str]
    feature_dim: int
    encoder: str | None = None
    backbone_ref: str | None = None
    backbone: dict = field(default_factory=dict)  # the backbone's BackboneConfig, recorded
    value_transform: str | None = None
    num_steps: int = 50
    gamma: str = "poly_auto"
    k_tail: int = 1
    mask_fill: str = "gauss"
    warmup_mask_ratio: float = 0.2
    ada_rank: int | None = None
    gate: str = "sigmoid"
    gate_bias: float = 6.0
    prenorm_logit: float = -12.0
    t_dim: int = 256
    max_period: float = 10000.0
    context_um: float | None = None
    prior: str | None = None
    predict_variance: bool = False
    center_sections: bool = False
    residual_scale: float = 1.0
    extra_genes: list[str] = field(default_factory=list)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def schedule(self) -> MaskSchedule:
        return MaskSchedule(self.n_genes, num_steps=self.num_steps, gamma=self.gamma,
                            k_tail=self.k_tail, mask_fill=self.mask_fill)


def state_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes, bytes): identifies exact weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


FORMAT = ModelFormat("hinge", 2, HingeConfig, title="HINGE")


class HingeModel(nn.Module):
    """Frozen backbone + CondNet + SoftAdaLN-wrapped blocks + modulated value decoder.

    Parameters
    ----------
    backbone
        A :class:`~napari_hinge.scfm.base.GeneTokenBackbone`, or a name/path for
        ``napari_hinge.scfm.load_backbone`` (then recorded as ``config.backbone_ref``).
    config
        :class:`HingeConfig`. Every gene must be in the backbone's vocabulary (KeyError naming
        the missing ones otherwise).

    Notes
    -----
    The backbone is frozen (``requires_grad=False``) and stays in eval mode even when the model
    trains, so it is a fixed function (no dropout inside it).
    """

    def __init__(self, backbone: GeneTokenBackbone | str | os.PathLike,
                 config: HingeConfig) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            from napari_hinge.scfm import load_backbone  # written beside this module

            if config.backbone_ref is None:
                config = replace(config, backbone_ref=str(backbone))
            backbone = load_backbone(backbone)
        if not isinstance(backbone, GeneTokenBackbone):
            raise TypeError(f"backbone must be a GeneTokenBackbone, got {type(backbone).__name__}")
        if len(set(config.genes)) != len(config.genes):
            raise ValueError("the gene panel has duplicate names")
        if config.feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {config.feature_dim}")
        if config.prior not in PRIORS:
            raise ValueError(f"unknown prior {config.prior!r}; use one of {PRIORS}")
        ids, extra = backbone.gene_ids(list(config.genes))
        config = replace(config, genes=list(config.genes), backbone=asdict(backbone.config),
                         extra_genes=extra)
        if config.value_transform is None:
            config.value_transform = backbone.config.value_transform
        self.config = config
        self.schedule = config.schedule()
        self.backbone = backbone.requires_grad_(False).eval()
        d = backbone.d_model
        in_vocab = ids >= 0
        # genes outside the vocabulary sit on a placeholder id (the first known gene, or any
        # token) plus a learned offset to their own token
        placeholder = int(ids[in_vocab][0]) if in_vocab.any() else 1
        self.register_buffer("gene_ids", torch.where(in_vocab, ids, placeholder),
                             persistent=False)
        self.register_buffer("extra_positions", (~in_vocab).nonzero().flatten(),
                             persistent=False)
        self.extra_gene_offset = nn.Parameter(torch.zeros(len(extra), d)) if extra else None
        # the training features' statistics (identity until set_feature_norm): saved with the
        # weights, so no caller has to remember to standardise
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))
        self.calibration = None  # a hinge.calibration.Calibration, saved with the model
        if config.prior is not None:
            self.register_buffer("prior_weight", torch.zeros(config.feature_dim, config.n_genes))
            self.register_buffer("prior_bias", torch.zeros(config.n_genes))
        self.cond = CondNet(d, config.n_genes, config.feature_dim, t_dim=config.t_dim,
                            max_period=config.max_period)
        self.blocks = nn.ModuleList(
            SoftAdaLNBlock(b, d, rank=config.ada_rank, gate=config.gate,
                           gate_bias=config.gate_bias, prenorm_logit=config.prenorm_logit)
            for b in backbone.blocks
        )
        self.decoder = ModulatedDecoder(backbone.value_decoder, d, d, rank=config.ada_rank,
                                        prenorm_logit=config.prenorm_logit,
                                        predict_variance=config.predict_variance)

    # -- bookkeeping ----------------------------------------------------------------------
    def train(self, mode: bool = True) -> HingeModel:
        super().train(mode)
        self.backbone.eval()  # frozen means a fixed function: no dropout in it
        return self

    def param_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        frozen = sum(p.numel() for p in self.backbone.parameters())
        return {"trainable": trainable, "frozen": frozen}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"trainable state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        self.load_state_dict(state, strict=False)

    @property
    def n_genes(self) -> int:
        return self.config.n_genes

    @torch.no_grad()
    def set_feature_norm(self, mean, std) -> None:
        """Install the (F,) mean and std that standardise the features inside the network."""
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if m.shape != self.feature_mean.shape or s.shape != self.feature_std.shape:
            raise ValueError(f"feature statistics of size {m.numel()}/{s.numel()}; the model "
                             f"takes {self.config.feature_dim} features")
        if not (torch.isfinite(m).all() and torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError("feature statistics must be finite with a positive std")
        self.feature_mean.copy_(m)
        self.feature_std.copy_(s)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """``(features - feature_mean) / feature_std`` (float32): what the network sees."""
        f = torch.as_tensor(features)
        if f.shape[-1] != self.config.feature_dim:
            raise ValueError(f"features have {f.shape[-1]} channels; the model expects "
                             f"{self.config.feature_dim} ({self.config.encoder})")
        f = f.to(self.feature_mean.device, torch.float32)
        return (f - self.feature_mean) / self.feature_std

    def prior_mean(self, features: torch.Tensor, *, standardized: bool = False) -> torch.Tensor:
        """The deterministic prior (B, G) of (B, F) features (already passed through
        :meth:`standardize` when ``standardized``); zeros without a prior."""
        if self.config.prior is None:
            return features.new_zeros(features.shape[0], self.n_genes)
        z = features.float() if standardized else self.standardize(features)
        return torch.addmm(self.prior_bias, z, self.prior_weight)

    def set_prior(self, weight, bias) -> None:
        """Install the prior's (F, G) weight and (G,) bias (fitted outside the network)."""
        if self.config.prior is None:
            raise ValueError("this model was configured without a prior (config.prior=None)")
        w = torch.as_tensor(weight, dtype=torch.float32)
        b = torch.as_tensor(bias, dtype=torch.float32)
        if w.shape != self.prior_weight.shape or b.shape != self.prior_bias.shape:
            raise ValueError(f"prior shapes {tuple(w.shape)}/{tuple(b.shape)} do not match "
                             f"{tuple(self.prior_weight.shape)}/{tuple(self.prior_bias.shape)}")
        self.prior_weight.copy_(w)
        self.prior_bias.copy_(b)

    @torch.no_grad()
    def init_extra_genes(self, targets, k: int = 5) -> None:
        """Start each out-of-vocabulary gene's token at the mean token of the ``k`` in-vocabulary
        panel genes most correlated with it in ``targets`` (N, G) (the training data)."""
        if self.extra_gene_offset is None:
            return
        y = torch.as_tensor(targets, dtype=torch.float64)
        y = (y - y.mean(0)) / y.std(0).clamp_min(1e-8)
        corr = (y.T @ y) / max(1, len(y) - 1)
        known = torch.ones(self.n_genes, dtype=torch.bool)
        known[self.extra_positions] = False
        if not known.any():
            return
        tokens = self.backbone.gene_tokens(self.gene_ids)  # (G, D), placeholder at extras
        for row, pos in enumerate(self.extra_positions.tolist()):
            c = corr[pos].masked_fill(~known, -2.0)
            top = c.topk(min(k, int(known.sum()))).indices
            self.extra_gene_offset[row] = tokens[top].mean(0) - tokens[pos]

    # -- forward --------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, m_prev: torch.Tensor,
                m_t: torch.Tensor, features: torch.Tensor, *, return_logvar: bool = False):
        """Predict ``x0`` (B, G) (the residual around :meth:`prior_mean` when the model has a
        prior), and with ``return_logvar`` also its log-variance (B, G).

        Parameters
        ----------
        x_t
            (B, G) current values (observed genes hold values, masked ones noise).
        t
            (B,) timesteps (int or float).
        m_prev, m_t
            (B, G) bool observed masks after and before this step; ``m_prev`` conditions, ``~m_t``
            selects the masked tokens.
        features
            (B, F) image features (standardised inside, :meth:`standardize`).
        """
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(B)
        c = self.cond(t, self.standardize(features).to(x_t.dtype), m_prev)
        masked = ~m_t.bool()
        ids = self.gene_ids.unsqueeze(0).expand(B, -1)
        h = self.backbone.embed(ids, x_t, masked)
        if self.extra_gene_offset is not None:
            h = h.index_add(1, self.extra_positions + 1,
                            self.extra_gene_offset.to(h.dtype).unsqueeze(0).expand(B, -1, -1))
        hidden = self.backbone.hidden_tokens(masked)
        n_kv = self.backbone.config.mask_kv_layers
        for i, block in enumerate(self.blocks):
            h = block(h, c, hidden if i < n_kv else None)
        if return_logvar:
            out, logvar = self.decoder(h[:, 1:], c, return_logvar=True)
            return (out.squeeze(-1) if out.ndim == 3 else out), logvar
        out = self.decoder(h[:, 1:], c)
        return out.squeeze(-1) if out.ndim == 3 else out

    # -- save / load ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, include_backbone: bool | None = None) -> Path:
        """Write the model folder atomically (:data:`FORMAT`; with ``calibration.json`` when
        the model has a calibration).

        ``include_backbone=None`` saves the backbone weights unless ``config.backbone_ref`` names
        a shipped backbone (:data:`NAMED_BACKBONES`).
        """
        directory = Path(directory)
        if include_backbone is None:
            include_backbone = self.config.backbone_ref not in NAMED_BACKBONES
        meta = {"backbone_digest": state_digest(self.backbone),
                "backbone_saved": bool(include_backbone), **self.param_counts()}

        def write_extra(tmp: Path) -> None:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            if self.calibration is not None:
                self.calibration.save(tmp)
            if include_backbone and not _reuse_backbone(directory, meta["backbone_digest"],
                                                        tmp / "backbone"):
                _save_backbone(self.backbone, tmp / "backbone")

        # a kill at any moment leaves a loadable model; a full disk names the folder
        return FORMAT.save(directory, self.config, self.trainable_state_dict(),
                           write_extra=write_extra)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, backbone: GeneTokenBackbone | None = None,
             map_location: str | torch.device = "cpu") -> HingeModel:
        """Rebuild a saved model bit-identically (with its feature standardisation and
        calibration).

        The backbone structure comes from ``backbone`` when given, else from
        ``load_backbone(folder/'backbone')`` or ``load_backbone(config.backbone_ref)``; saved
        backbone weights, when present, then overwrite it. The backbone digest recorded at save
        time is checked (InputError on a mismatch: other weights than the model was trained on).
        """
        from .calibration import Calibration

        directory = Path(directory)
        config, state = FORMAT.load(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: not a saved HINGE model")
        meta = read_json(meta_path)
        saved = directory / "backbone"
        if backbone is None:
            backbone = _resolve_backbone(saved, config.backbone_ref, directory)
        elif (saved / "model.safetensors").is_file():
            BACKBONE_FORMAT.read_envelope(saved)  # the saved weights must be this format too
            backbone.load_state_dict(load_safetensors(saved / "model.safetensors"), strict=True)
        digest = state_digest(backbone)
        if digest != meta.get("backbone_digest"):
            raise InputError(f"the backbone for {directory} differs from the one the model was "
                             f"saved with (digest {digest[:12]} != "
                             f"{str(meta.get('backbone_digest'))[:12]})", path=directory)
        model = cls(backbone, config)
        try:
            model.load_trainable_state_dict(state)
        except KeyError as exc:
            raise InputError(f"{directory / 'model.safetensors'}: {exc.args[0]}",
                             path=directory) from exc
        model.calibration = Calibration.load(directory)
        return model.to(map_location)


def _save_backbone(backbone: GeneTokenBackbone, directory: Path) -> None:
    if hasattr(backbone, "save"):
        backbone.save(directory)
    if not (directory / "model.safetensors").is_file():
        save_backbone(backbone, directory)  # generic: config.json + vocab.json + weights


def _reuse_backbone(old: Path, digest: str, new: Path) -> bool:
    """Hard-link the backbone files of an earlier save of the same backbone (e.g. ``best/``
    rewritten every epoch) instead of writing gigabytes again; False when there is none."""
    try:
        meta = json.loads((old / META_FILE).read_text())
        src = old / "backbone"
        version = json.loads((src / CONFIG_FILE).read_text()).get("version")
    except (OSError, ValueError, AttributeError):  # no earlier save to reuse
        return False
    if meta.get("backbone_digest") != digest or not (src / "model.safetensors").is_file() \
            or version != BACKBONE_FORMAT.version:
        return False
    if not all(f.is_file() for f in src.iterdir()):
        return False
    new.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, new / f.name)
        except OSError:
            shutil.copy2(f, new / f.name)
    return True


def _resolve_backbone(saved: Path, ref: str | None, directory: Path) -> GeneTokenBackbone:
    try:
        from napari_hinge.scfm import load_backbone
    except ImportError as exc:
        raise ValueError(f"cannot rebuild the backbone of {directory}: napari_hinge.scfm has no "
                         f"load_backbone; pass backbone= to HingeModel.load") from exc
    errors = []
    for source in ([saved] if saved.is_dir() else []) + ([ref] if ref else []):
        try:
            return load_backbone(source)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # try the next source
            errors.append(f"{source}: {exc}")
    raise ValueError(f"cannot rebuild the backbone of {directory} (tried {errors or 'nothing'}); "
                     f"pass backbone= to HingeModel.load")
