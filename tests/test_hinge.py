"""HINGE: SoftAdaLN, the mask schedule, the model, the sampler and the training generator.

Tiny backbones (d_model 32, 2 blocks) keep the file fast; the training tests use real her2st
expression (section C2, log1p(normalize_total 1e4), the most variable genes) with random
"image features".
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from napari_hinge.hinge.model import HingeConfig, HingeModel, state_digest
from napari_hinge.hinge.sampler import sample
from napari_hinge.hinge.schedule import GAMMAS, MaskSchedule, masked_diffusion_loss
from napari_hinge.hinge.softadaln import Ada6Head, SoftAdaLNBlock, SoftPreNorm
from napari_hinge.hinge.train import split_groups, train_hinge, validation_loss
from napari_hinge.scfm.base import BackboneConfig, GeneTokenBackbone, MHABlock
from napari_hinge.scfm.builtin import BuiltinBackbone
from napari_hinge.scfm.cellfm import CellFMBackbone
from napari_hinge.scfm.scgpt import ScGPTBackbone
from napari_hinge.training import StopToken, load_checkpoint

N_GENES = 20


# -- fixtures ---------------------------------------------------------------------------------
class NoisyTokenBackbone(GeneTokenBackbone):
    """CellFM-like token path: the (noisy) value of a masked gene *is* encoded, plus zero_emb;
    keys/values of masked genes are hidden in the first block."""

    def __init__(self, genes: list[str], d: int = 32, n_layers: int = 2) -> None:
        super().__init__()
        self.config = BackboneConfig(kind="test", d_model=d, n_layers=n_layers, n_heads=2,
                                     d_ff=2 * d, mask_kv_layers=1)
        self.vocab = {g: i + 1 for i, g in enumerate(genes)}
        self.gene_emb = nn.Embedding(len(genes) + 1, d)
        self.value_enc = nn.Sequential(nn.Linear(1, d), nn.LeakyReLU(), nn.Linear(d, d))
        self.zero_emb = nn.Parameter(torch.randn(1, 1, d))
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.ModuleList(MHABlock(d, 2, 2 * d) for _ in range(n_layers))
        for blk in self.blocks:
            blk.alpha = 1.5  # DeepNorm-like residual scale: the wrapper must use it
        self.value_decoder = nn.Sequential(nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1),
                                           nn.Flatten(-2))

    def embed(self, gene_ids, values, masked=None):
        tok = self.gene_emb(gene_ids) + self.value_enc(values.unsqueeze(-1))
        if masked is not None:
            tok = tok + masked.unsqueeze(-1).float() * self.zero_emb
        return torch.cat([self.cls.expand(len(tok), 1, -1), tok], dim=1)


def builtin_backbone(genes: list[str], d: int = 32) -> BuiltinBackbone:
    vocab = {"<pad>": 0, **{g: i + 1 for i, g in enumerate(genes)}}
    cfg = BackboneConfig(d_model=d, n_layers=2, n_heads=2, d_ff=2 * d, mask_kv_layers=1)
    return BuiltinBackbone(cfg, vocab).eval()


def make_backbone(kind: str, genes: list[str], d: int = 32) -> GeneTokenBackbone:
    """Tiny random backbones of every kind (the real loaders are tested in test_scfm.py)."""
    if kind == "builtin":
        return builtin_backbone(genes, d)
    if kind == "noisy":
        return NoisyTokenBackbone(genes, d)
    if kind == "cellfm":  # retention blocks, DeepNorm alpha = 4^(1/4), K/V hidden in block 0
        cfg = BackboneConfig(kind="cellfm", d_model=d, n_layers=2, n_heads=2, d_ff=d,
                             mask_kv_layers=1)
        return CellFMBackbone(cfg, {g: i + 1 for i, g in enumerate(genes)}).eval()
    cfg = BackboneConfig(kind="scgpt", d_model=d, n_layers=2, n_heads=2, d_ff=2 * d,
                         value_transform="scgpt_binned")
    vocab = {"<pad>": 0, "<cls>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    return ScGPTBackbone(cfg, vocab).eval()


def make_model(kind: str = "builtin", genes: list[str] | None = None, feature_dim: int = 16,
               seed: int = 0, **cfg) -> HingeModel:
    torch.manual_seed(seed)
    genes = genes or [f"GENE{i}" for i in range(N_GENES)]
    bb = make_backbone(kind, genes + ["EXTRA1", "EXTRA2"])  # the panel is a vocabulary subset
    return HingeModel(bb, HingeConfig(genes=genes, feature_dim=feature_dim, **cfg))


@pytest.fixture(scope="module")
def her2st(shared_data):
    """C2 targets: log1p(cp10k) of the 20 most variable genes (>= 10% of spots expressed)."""
    counts = pd.read_csv(shared_data / "her2st_subset/counts/C2.tsv.gz", sep="\t", index_col=0)
    counts = counts[counts.sum(1) >= 100]
    x = np.log1p(counts.to_numpy(np.float64) / counts.sum(1).to_numpy()[:, None] * 1e4)
    expressed = (counts.to_numpy() > 0).mean(0) >= 0.1
    var = np.where(expressed, x.var(0), -1)
    top = np.argsort(-var)[:N_GENES]
    genes = [str(g) for g in counts.columns[top]]
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(counts), 16)).astype(np.float32)
    return genes, x[:, top].astype(np.float32), feats


def rand_inputs(model: HingeModel, B: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    G = model.n_genes
    sched = model.schedule
    t = torch.randint(1, sched.num_steps + 1, (B,), generator=g)
    cor = sched.corrupt(torch.rand(B, G, generator=g) * 3, t, generator=g)
    feats = torch.randn(B, model.config.feature_dim, generator=g)
    return cor, t, feats


# -- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("G", "a"), [(200, 1.354), (250, 1.411), (1000, 1.766)])
def test_poly_auto_exponent(G, a):
    s = MaskSchedule(G)
    assert s.exponent == pytest.approx(a, abs=1e-3)
    n = s.n_masked_table
    assert n[0] == 0 and n[-1] == G
    assert n[-2] == G - 1  # K = 1: the first reverse step reveals exactly one gene
    assert (n[1:] >= n[:-1]).all()


@pytest.mark.parametrize(("G", "cap"), [(50, 10), (200, 7), (250, 7), (300, 7)])
def test_warm_start_t_cap(G, cap):
    s = MaskSchedule(G)
    assert s.t_cap(0.2) == cap
    assert s.n_masked(cap) <= 0.2 * G < s.n_masked(cap + 1)
    t = s.sample_timesteps(2000, warm=True, generator=torch.Generator().manual_seed(0))
    assert t.min() == 1 and t.max() == cap
    t = s.sample_timesteps(2000, warm=False, generator=torch.Generator().manual_seed(0))
    assert t.min() == 1 and t.max() == 50


def test_exponent_is_clipped():
    assert MaskSchedule(10).exponent == 1.05  # log 10 / log 50 < 1.05
    assert MaskSchedule(10**8).exponent == 4.0


@pytest.mark.parametrize("gamma", GAMMAS)
def test_every_gamma_is_a_valid_schedule(gamma):
    s = MaskSchedule(120, gamma=gamma)
    n = s.n_masked_table
    assert n[0] == 0 and n[-1] == 120 and (n[1:] >= n[:-1]).all()
    assert 0 < s.n_masked(25) < 120
    with pytest.raises(ValueError, match="gamma must be one of"):
        MaskSchedule(10, gamma="nope")


def test_masks_nest_and_corruption():
    s = MaskSchedule(60)
    gen = torch.Generator().manual_seed(3)
    ranks = s.random_ranks(8, generator=gen)
    assert (ranks.sort(1).values == torch.arange(60)).all()  # a permutation per sample
    assert not (ranks[0] == ranks[1]).all()  # and a different one per sample
    prev = s.observed(ranks, 0)
    assert prev.all()
    for t in range(1, 51):
        m = s.observed(ranks, t)
        assert (prev >= m).all()  # m_{t-1} >= m_t
        assert ((~m).sum(1) == s.n_masked(t)).all()
        prev = m
    assert not prev.any()  # t = T: all masked

    x0 = torch.rand(8, 60) + 5
    t = torch.arange(1, 9) * 6
    cor = s.corrupt(x0, t, generator=gen)
    assert torch.equal(cor.x_t[cor.m_t], x0[cor.m_t])
    noise = cor.x_t[~cor.m_t]
    assert noise.abs().max() < 5 and noise.std() > 0.5  # N(0, 1), not the values
    assert torch.equal(cor.reveal, cor.m_prev & ~cor.m_t)
    assert torch.equal(cor.reveal.sum(1), s.n_masked(t) - s.n_masked(t - 1))
    zero = MaskSchedule(60, mask_fill="zero").corrupt(x0, t, ranks=ranks)
    assert (zero.x_t[~zero.m_t] == 0).all()
    with pytest.raises(ValueError, match="1..50"):
        s.corrupt(x0, torch.zeros(8, dtype=torch.long))


def test_loss_counts_only_revealed_genes():
    x0 = torch.zeros(2, 4)
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    reveal = torch.tensor([[True, False, False, False], [False, False, True, True]])
    assert masked_diffusion_loss(pred, x0, reveal) == pytest.approx((1 + 49 + 64) / 3)
    assert masked_diffusion_loss(pred, x0, torch.zeros_like(reveal)) == 0


def test_time_grid():
    s = MaskSchedule(200)
    assert s.time_grid() == list(range(50, -1, -1))
    assert s.time_grid(10) == list(range(50, -1, -5))
    small = MaskSchedule(20, gamma="linear")  # G < T: steps revealing nothing are merged
    grid = small.time_grid()
    n = small.n_masked_table
    assert grid[0] == 50 and grid[-1] == 0
    assert all(n[a] > n[b] for a, b in zip(grid[:-1], grid[1:], strict=True))
    assert len(grid) == 21
    with pytest.raises(ValueError, match="reveal steps"):
        s.time_grid(0)


# -- SoftAdaLN and the model --------------------------------------------------------------------
def test_softprenorm_and_head_init():
    x = torch.randn(3, 7, 16)
    norm = SoftPreNorm(16)
    assert norm.lam.item() == pytest.approx(6.1e-6, rel=0.01)
    assert torch.allclose(norm(x), x, atol=1e-4)
    with torch.no_grad():
        norm.logit.fill_(30.0)
    ln = nn.functional.layer_norm(x, (16,), eps=1e-6)
    assert torch.allclose(norm(x), ln, atol=1e-5)
    for rank in (None, 4):
        head = Ada6Head(8, 16, rank=rank)
        out = head(torch.randn(3, 8))
        assert len(out) == 6 and out[0].shape == (3, 1, 16)
        for i, chunk in enumerate(out):
            assert (chunk == (6.0 if i in (2, 5) else 0.0)).all()
    full = sum(p.numel() for p in Ada6Head(64, 64).parameters())
    low = sum(p.numel() for p in Ada6Head(64, 64, rank=8).parameters())
    assert full == 64 * 6 * 64 + 6 * 64 and low == 64 * 8 + 8 * 6 * 64 + 6 * 64


@pytest.mark.parametrize(("kind", "rank"), [("builtin", None), ("builtin", 4), ("noisy", None),
                                             ("cellfm", None), ("cellfm", 4), ("scgpt", None)])
def test_identity_at_init(kind, rank):
    """At initialisation the wrapped model is the backbone, up to sigmoid(6) on the branches.

    Tolerance: each residual branch is scaled by sigmoid(6) = 0.99753, a 0.25% change of the
    branch; the post-norm LayerNorm keeps the relative change of each block's output of that
    order, and 2 blocks x 2 branches + the decoder add up to at most ~5 x 0.25% ~ 1.2%. We assert
    < 1.5% of the output scale, and that the difference is not zero (the gate is really there).
    Exact equality holds with the gate forced to 1 and lam to 0.
    """
    model = make_model(kind, ada_rank=rank).eval()
    bb = model.backbone
    cor, t, feats = rand_inputs(model, B=6)
    ids = model.gene_ids.expand(6, -1)
    with torch.no_grad():
        ref = bb(ids, cor.x_t, ~cor.m_t)
        out = model(cor.x_t, t, cor.m_prev, cor.m_t, feats)
        diff = (out - ref).abs().max() / ref.abs().max()
        assert 0 < diff < 0.015
        # exact variant: gate bias +inf -> sigmoid = 1, SoftPreNorm logit -inf -> lam = 0
        for blk in model.blocks:
            blk.head.proj.bias[2 * 32:3 * 32] = math.inf
            blk.head.proj.bias[5 * 32:6 * 32] = math.inf
        for norm in [m for m in model.modules() if isinstance(m, SoftPreNorm)]:
            norm.logit.fill_(-math.inf)
        assert torch.equal(model(cor.x_t, t, cor.m_prev, cor.m_t, feats), ref)


def test_linear_gate_identity_is_exact():
    model = make_model("noisy", gate="linear", gate_bias=1.0, prenorm_logit=-math.inf).eval()
    cor, t, feats = rand_inputs(model)
    with torch.no_grad():
        ref = model.backbone(model.gene_ids.expand(5, -1), cor.x_t, ~cor.m_t)
        assert torch.equal(model(cor.x_t, t, cor.m_prev, cor.m_t, feats), ref)


def test_wrapper_uses_the_blocks_kv_masking():
    """Hiding keys/values in block 0 changes the output; the wrapper must pass ``hidden``."""
    model = make_model("noisy").eval()
    cor, t, feats = rand_inputs(model)
    blk = model.blocks[0]
    x = model.backbone.embed(model.gene_ids.expand(5, -1), cor.x_t, ~cor.m_t)
    c = model.cond(t, feats, cor.m_prev)
    hidden = model.backbone.hidden_tokens(~cor.m_t)
    assert hidden[:, 0].eq(False).all()  # CLS always visible
    with torch.no_grad():
        a, b = blk(x, c, hidden), blk(x, c, None)
    assert not torch.allclose(a, b)
    assert isinstance(blk, SoftAdaLNBlock) and blk.block is model.backbone.blocks[0]


def test_frozen_backbone_and_trainable_part():
    model = make_model("builtin")
    counts = model.param_counts()
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert counts["frozen"] == sum(p.numel() for p in model.backbone.parameters())
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] > 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not any(n.startswith("backbone.") for n in names)
    assert sum(1 for n in names if n.endswith(".logit")) == 2 * 2 + 1  # one per SoftPreNorm
    low = make_model("builtin", ada_rank=2).param_counts()
    assert low["trainable"] < counts["trainable"] and low["frozen"] == counts["frozen"]
    # gradients reach the zero-initialised heads (and nothing reaches the backbone)
    model.train()
    assert not model.backbone.training
    cor, t, feats = rand_inputs(model)
    out = model(cor.x_t, t, cor.m_prev, cor.m_t, feats)
    masked_diffusion_loss(out, torch.ones_like(out), ~cor.m_t).backward()
    assert model.blocks[0].head.proj.weight.grad.abs().sum() > 0
    assert model.decoder.head.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("kind", ["builtin", "scgpt", "cellfm"])
def test_genes_outside_the_vocabulary_get_learned_tokens(kind, tmp_path):
    """A panel gene the backbone does not know gets its own token: the mean token of its most
    co-expressed known genes at first, trained with the rest, saved with the model."""
    bb = make_backbone(kind, ["A", "B", "C"])
    model = HingeModel(bb, HingeConfig(genes=["A", "NEWGENE", "B", "C"], feature_dim=4))
    assert model.config.extra_genes == ["NEWGENE"]
    assert model.extra_gene_offset.requires_grad
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200)
    y = np.c_[a, a + 0.01 * rng.standard_normal(200), rng.standard_normal((200, 2))]
    model.init_extra_genes(y, k=1)  # NEWGENE follows A
    tokens = bb.gene_tokens(model.gene_ids)
    with torch.no_grad():
        torch.testing.assert_close(tokens[1] + model.extra_gene_offset[0], tokens[0])
        x = torch.randn(3, 4)
        m_t = torch.zeros(3, 4, dtype=torch.bool)
        m_prev = torch.tensor([[True, False, False, False]] * 3)
        out = model(x, torch.full((3,), 50), m_prev, m_t, torch.randn(3, 4))
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    if kind == "builtin":  # the builtin's registry folder round trip
        model.save(tmp_path / "m", include_backbone=True)
        again = HingeModel.load(tmp_path / "m")
        assert torch.equal(again.extra_gene_offset, model.extra_gene_offset)
        assert again.config.extra_genes == ["NEWGENE"]


def test_save_load_bit_identical(tmp_path):
    model = make_model("builtin", ada_rank=3, encoder="efficientnet-lite0")
    with torch.no_grad():  # move away from the init so the round trip is not trivially zeros
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = model.save(tmp_path / "hinge")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors",
                                                  "meta.json", "backbone"}
    backbone = BuiltinBackbone.load(folder / "backbone")
    loaded = HingeModel.load(folder, backbone=backbone)
    assert loaded.config == model.config and loaded.config.encoder == "efficientnet-lite0"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cor, t, feats = rand_inputs(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(cor.x_t, t, cor.m_prev, cor.m_t, feats),
                           loaded.eval()(cor.x_t, t, cor.m_prev, cor.m_t, feats))
    # without backbone=: napari_hinge.scfm.load_backbone reads the saved backbone folder
    alone = HingeModel.load(folder)
    assert all(torch.equal(a[k], alone.state_dict()[k]) for k in a)
    # saving again over the folder replaces it and leaves no temporary folders
    loaded.save(folder)  # (re-uses the identical backbone files by hard link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hinge"]
    again = HingeModel.load(folder, backbone=BuiltinBackbone.load(folder / "backbone"))
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)
    # another backbone than the one trained with is refused
    other = builtin_backbone(model.config.genes + ["EXTRA1", "EXTRA2"])
    with pytest.raises(ValueError, match="differs"):
        (folder / "backbone" / "model.safetensors").unlink()
        HingeModel.load(folder, backbone=other)
    with pytest.raises(FileNotFoundError, match="not found"):
        HingeModel.load(tmp_path / "missing")
    # a backbone class no loader knows: the error says to pass backbone=
    noisy = make_model("noisy").save(tmp_path / "noisy")
    with pytest.raises(ValueError, match="backbone="):
        HingeModel.load(noisy)


def test_state_digest_sees_one_bit():
    bb = builtin_backbone(["A", "B"])
    d0 = state_digest(bb)
    with torch.no_grad():
        w = bb.value_decoder.fc2.bias
        w.copy_(torch.nextafter(w, w + 1))
    assert state_digest(bb) != d0


# -- sampler ----------------------------------------------------------------------------------
def test_sampler_shapes_seeds_and_views():
    model = make_model("noisy")
    feats = torch.randn(7, 16)
    r1 = sample(model, feats, n_samples=3, reveal_steps=5, batch_size=8, seed=1,
                return_samples=True)
    assert r1.mean.shape == (7, N_GENES) and r1.std.shape == (7, N_GENES)
    assert r1.samples.shape == (7, 3, N_GENES)
    assert torch.isfinite(r1.samples).all() and (r1.std > 0).all()
    assert torch.allclose(r1.mean, r1.samples.mean(1)) and torch.allclose(
        r1.std, r1.samples.std(1, correction=0))
    r2 = sample(model, feats, n_samples=3, reveal_steps=5, batch_size=8, seed=1)
    assert torch.equal(r1.mean, r2.mean) and r2.samples is None
    r3 = sample(model, feats, n_samples=3, reveal_steps=5, batch_size=8, seed=2)
    assert not torch.equal(r1.mean, r3.mean)
    gen = torch.Generator().manual_seed(1)
    r4 = sample(model, feats, n_samples=3, reveal_steps=5, batch_size=8, generator=gen)
    assert torch.equal(r1.mean, r4.mean)
    # (K, N, F) views: sample s uses view s % K
    views = torch.stack([feats, feats + 1])
    assert sample(model, views, n_samples=2, reveal_steps=3).mean.shape == (7, N_GENES)
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        sample(model, torch.randn(7, 15))
    with pytest.raises(ValueError, match="NaN"):
        sample(model, torch.full((2, 16), float("nan")))
    assert model.training  # the sampler restores the mode


@pytest.mark.parametrize("reveal_steps", [None, 10, 1])
def test_sampler_reveals_each_gene_once_from_its_step(reveal_steps):
    """A fake network that predicts ``t`` everywhere: each gene's final value is the step at
    which it was revealed, so the histogram of values is exactly n(t) - n(t')."""
    model = make_model("builtin")
    calls = []

    def fake(x_t, t, m_prev, m_t, features):
        calls.append(int(t[0]))
        assert (m_prev >= m_t).all()
        return t.float()[:, None].expand(-1, x_t.shape[1]).clone()

    model.forward = fake
    res = sample(model, torch.randn(3, 16), n_samples=2, reveal_steps=reveal_steps,
                 return_samples=True)
    grid = model.schedule.time_grid(reveal_steps)
    assert calls == grid[:-1]
    n = model.schedule.n_masked_table
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        per_row = (res.samples == t).sum(-1)
        assert (per_row == n[t] - n[t_next]).all()


# -- training ---------------------------------------------------------------------------------
def test_training_on_her2st_reduces_the_loss(her2st, tmp_path):
    genes, x, feats = her2st
    model = make_model("builtin", genes=genes)
    _, val = split_groups(len(x), 0.1, seed=42)  # the split train_hinge makes with seed 42
    init_val = validation_loss(model, torch.as_tensor(feats[val]), torch.as_tensor(x[val]),
                               seed=43)
    events = list(train_hinge(model, feats, x, epochs=4, batch_size=32, lr=2e-3,
                              warmup_epochs=1, val_samples=2, checkpoint_dir=tmp_path / "ck"))
    kinds = [e.kind for e in events]
    steps_per_epoch = math.ceil((len(x) - round(0.1 * len(x))) / 32)
    assert kinds.count("step") == 4 * steps_per_epoch and kinds.count("epoch") == 4
    assert kinds[-1] == "done"
    epochs = [e for e in events if e.kind == "epoch"]
    assert epochs[0].metrics["t_max"] == model.schedule.t_cap() == 11
    assert epochs[1].metrics["t_max"] == 50
    assert all(np.isfinite(e.val_loss) and -1 <= e.metrics["val_pcc"] <= 1 for e in epochs)
    steps = [e.loss for e in events if e.kind == "step"]
    # the untrained model returns the backbone's output: its loss (~4) is near mean x^2 (5.2),
    # far above the gene variance (0.85) that predicting each gene's mean already reaches
    assert np.mean(steps[-steps_per_epoch:]) < 0.5 * np.mean(steps[:steps_per_epoch])
    assert init_val > 3.0
    assert min(e.val_loss for e in epochs[2:]) < 0.6 * init_val
    done = events[-1].metrics
    assert done["n_val"] == round(0.1 * len(x)) and done["seed"] == 42
    assert done["trainable_params"] == model.param_counts()["trainable"]
    best = HingeModel.load(tmp_path / "ck" / "best",
                           backbone=BuiltinBackbone.load(tmp_path / "ck" / "best" / "backbone"))
    assert best.config.genes == genes
    assert load_checkpoint(tmp_path / "ck" / "last.pt")["epoch"] == 4


def test_stop_mid_epoch_keeps_the_last_good_checkpoint(her2st, tmp_path):
    genes, x, feats = her2st
    model = make_model("builtin", genes=genes)
    stop = StopToken()
    events = []
    for ev in train_hinge(model, feats[:80], x[:80], epochs=3, batch_size=16, stop=stop,
                          val_samples=0, checkpoint_dir=tmp_path):
        events.append(ev)
        if ev.kind == "step" and ev.epoch == 2 and ev.step == 7:
            stop.request()
    assert events[-1].kind == "stopped" and events[-1].metrics["last_complete_epoch"] == 1
    assert [e.kind for e in events].count("step") == 7
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last.pt"]  # no temp files
    # without validation spots best/ follows the latest epoch
    for _ in train_hinge(make_model("builtin", genes=genes), feats[:40], x[:40], epochs=1,
                         val_fraction=0, checkpoint_dir=tmp_path / "noval"):
        pass
    assert (tmp_path / "noval" / "best" / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="resume=True"):
        next(train_hinge(model, feats[:80], x[:80], checkpoint_dir=tmp_path))


def test_resume_equals_an_uninterrupted_run(her2st, tmp_path):
    genes, x, feats = her2st
    views = np.stack([feats, feats[:, ::-1].copy(), -feats])  # K = 3 "views"
    base = make_model("builtin", genes=genes)
    kw = {"epochs": 2, "batch_size": 32, "warmup_epochs": 1, "val_samples": 2,
          "val_reveal_steps": 5, "aug_ratio": 2}
    straight = copy.deepcopy(base)
    for _ in train_hinge(straight, views[:, :90], x[:90], checkpoint_dir=tmp_path / "a", **kw):
        pass

    interrupted = copy.deepcopy(base)
    stop = StopToken()
    for ev in train_hinge(interrupted, views[:, :90], x[:90], checkpoint_dir=tmp_path / "b",
                          stop=stop, **kw):
        if ev.kind == "epoch":
            stop.request()
    assert ev.kind == "stopped"
    resumed = copy.deepcopy(base)  # a fresh process would start from the untrained model
    events = list(train_hinge(resumed, views[:, :90], x[:90], checkpoint_dir=tmp_path / "b",
                              resume=True, **kw))
    assert events[0].epoch == 2 and events[-1].kind == "done"
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.head.proj.weight"],
                           base.trainable_state_dict()["blocks.0.head.proj.weight"])
    ha = load_checkpoint(tmp_path / "a" / "last.pt")["history"]
    hb = load_checkpoint(tmp_path / "b" / "last.pt")["history"]
    assert ha == hb


def test_training_input_errors(her2st, tmp_path):
    genes, x, feats = her2st
    model = make_model("builtin", genes=genes)
    with pytest.raises(ValueError, match="over the model's genes"):
        next(train_hinge(model, feats, x[:, :5]))
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        next(train_hinge(model, feats[:, :3], x))
    with pytest.raises(ValueError, match="spots"):
        next(train_hinge(model, feats[:10], x))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        next(train_hinge(model, feats, bad))
    with pytest.raises(FileNotFoundError, match="last.pt"):
        next(train_hinge(model, feats, x, checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(ValueError, match="aug_ratio"):
        next(train_hinge(model, feats, x, aug_ratio=2))
