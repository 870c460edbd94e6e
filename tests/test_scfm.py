"""Backbones and checkpoint loaders: builtin (shipped weights), scGPT, CellFM."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from napari_hinge.scfm import (
    BackboneConfig,
    BuiltinBackbone,
    CellFMBackbone,
    ScGPTBackbone,
    backbone_kind,
    bin_values,
    load_backbone,
    load_cellfm,
    load_scgpt,
    map_panel,
    random_backbone,
    save_backbone,
    transform_counts,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def c2_counts(shared_data) -> pd.DataFrame:
    """her2st section C2 (patient C: held out from the builtin pre-training)."""
    return pd.read_csv(shared_data / "her2st_subset" / "counts" / "C2.tsv.gz", sep="\t",
                       index_col=0)


@pytest.fixture(scope="module")
def census_vocab(shared_data) -> dict[str, int]:
    return json.loads((shared_data / "scgpt_vocab" / "default_census_vocab.json").read_text())


def scgpt_state(n_tokens: int, d: int, d_hid: int, n_layers: int, gen: torch.Generator,
                impl_layers: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Random tensors under the key names of a released scGPT ``best_model.pt``."""

    def r(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    s = {"encoder.embedding.weight": r(n_tokens, d),
         "encoder.enc_norm.weight": 1 + r(d), "encoder.enc_norm.bias": r(d),
         "value_encoder.linear1.weight": r(d, 1), "value_encoder.linear1.bias": r(d),
         "value_encoder.linear2.weight": r(d, d), "value_encoder.linear2.bias": r(d),
         "value_encoder.norm.weight": 1 + r(d), "value_encoder.norm.bias": r(d)}
    for i in range(n_layers):
        p = f"transformer_encoder.layers.{i}."
        qkv = "self_attn._impl.Wqkv." if i in impl_layers else "self_attn.Wqkv."
        s |= {p + qkv + "weight": r(3 * d, d), p + qkv + "bias": r(3 * d),
              p + "self_attn.out_proj.weight": r(d, d), p + "self_attn.out_proj.bias": r(d),
              p + "linear1.weight": r(d_hid, d), p + "linear1.bias": r(d_hid),
              p + "linear2.weight": r(d, d_hid), p + "linear2.bias": r(d),
              p + "norm1.weight": 1 + r(d), p + "norm1.bias": r(d),
              p + "norm2.weight": 1 + r(d), p + "norm2.bias": r(d)}
    for j in (0, 2, 4):
        s[f"decoder.fc.{j}.weight"] = r(1 if j == 4 else d, d)
        s[f"decoder.fc.{j}.bias"] = r(1 if j == 4 else d)
    # parts the backbone does not need (classifier, MVC, generation flag)
    s |= {"cls_decoder._decoder.0.weight": r(d, d), "cls_decoder.out_layer.weight": r(3, d),
          "mvc_decoder.gene2query.weight": r(d, d), "mvc_decoder.W.weight": r(d, d),
          "flag_encoder.weight": r(2, d)}
    return s


@pytest.fixture(scope="module")
def scgpt_folder(tmp_path_factory, census_vocab):
    folder = tmp_path_factory.mktemp("scgpt_whole_human_tiny")
    gen = torch.Generator().manual_seed(1)
    n_tokens = len(census_vocab) + 3  # scGPT appends <pad>, <cls>, <eoc>
    state = scgpt_state(n_tokens, 8, 16, 2, gen, impl_layers=(1,))
    torch.save(state, folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(census_vocab))
    (folder / "args.json").write_text(json.dumps(
        {"embsize": 8, "nheads": 2, "d_hid": 16, "nlayers": 2, "n_layers_cls": 3,
         "dropout": 0.2, "pad_token": "<pad>", "pad_value": -2, "mask_value": -1,
         "n_bins": 51, "input_emb_style": "continuous"}))
    return folder, state


CELLFM_OPTIMISER_KEYS = ("moment1.gene_emb", "moment2.gene_emb", "global_step",
                         "learning_rate", "beta1_power", "beta2_power", "ST_loss_scale",
                         "value_enc.mask_emb")


def cellfm_state(n_rows: int, d: int, n_layers: int, gen: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """Random tensors under CellFM's MindSpore key names (methods.md 4.2)."""

    def r(*shape):
        return torch.randn(*shape, generator=gen) * (1 / math.sqrt(shape[-1]))

    gene_emb = r(n_rows, d)
    gene_emb[0] = 0
    s = {"gene_emb": gene_emb, "cls_token": r(1, 1, d), "zero_emb": r(1, 1, d),
         "value_enc.value_enc.a": torch.tensor([[0.3]]),
         "value_enc.value_enc.w1.weight": r(256, 1) * 3,
         "value_enc.value_enc.w3.weight": r(256, 256),
         "value_enc.value_enc.table.weight": r(d, 256),
         "value_dec.w1.weight": r(d, d), "value_dec.w2.weight": r(1, d),
         "cellwise_dec.map.weight": r(d, d)}
    for i in range(n_layers):
        p = f"encoder.{i}."
        for n in "qkvuo":
            s[f"{p}attn.{n}_proj.weight"] = r(d, d)
        for n in "uvo":
            s[f"{p}ffn.{n}_proj.weight"] = r(d, d)
        for j in (1, 2):
            s[f"{p}post_norm{j}.gamma"] = 1 + 0.1 * r(d)
            s[f"{p}post_norm{j}.beta"] = 0.1 * r(d)
    s |= {k: torch.ones(3) for k in CELLFM_OPTIMISER_KEYS}
    return s


@pytest.fixture(scope="module")
def cellfm_files(tmp_path_factory, c2_counts):
    folder = tmp_path_factory.mktemp("cellfm_tiny")
    genes = [g for g in c2_counts.columns if g.isalnum()][:200]
    pd.DataFrame({"gene_name": genes, "chrom": "1"}).to_csv(folder / "gene_info.csv", index=False)
    gen = torch.Generator().manual_seed(2)
    state = cellfm_state(200 + 1 + (-201) % 8, 32, 2, gen)
    stored = dict(state)
    # a converter may write dense weights transposed (in x out): the loader must accept them
    stored["value_enc.value_enc.table.weight"] = state["value_enc.value_enc.table.weight"].t()
    stored["value_enc.value_enc.w1.weight"] = state["value_enc.value_enc.w1.weight"].t()
    torch.save(stored, folder / "cellfm_tiny.pt")
    return folder, state, genes


def builtin_tiny() -> BuiltinBackbone:
    torch.manual_seed(0)
    vocab = {"<pad>": 0} | {f"G{i}": i + 1 for i in range(50)}
    return BuiltinBackbone(BackboneConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32), vocab)


def _hidden_values_do_not_leak(model, n_genes: int, max_id: int, first_id: int = 1) -> None:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(first_id, max_id, (3, n_genes), generator=gen)
    vals = torch.rand(3, n_genes, generator=gen) * 4
    masked = torch.rand(3, n_genes, generator=gen) < 0.3
    other = torch.where(masked, vals + 5 * torch.rand(3, n_genes, generator=gen) + 1, vals)
    model.eval()
    with torch.no_grad():
        a, b = model(ids, vals, masked), model(ids, other, masked)
        c = model(ids, other, None)  # unmasked: the values must matter
    assert a.shape == (3, n_genes) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c).abs().max() > 1e-3


# ----------------------------------------------------------------------------- builtin


def test_builtin_forward_masking_and_bit_identical_round_trip(tmp_path):
    model = builtin_tiny()
    _hidden_values_do_not_leak(model, 20, 51)
    model.save(tmp_path / "bb")
    assert {p.name for p in (tmp_path / "bb").iterdir()} == {
        "config.json", "vocab.json", "model.safetensors"}
    back = BuiltinBackbone.load(tmp_path / "bb")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(),
                                strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert back.vocab == model.vocab and back.config == model.config
    again = load_backbone(tmp_path / "bb")  # the registry finds the saved folder too
    assert type(again) is BuiltinBackbone
    with pytest.raises(KeyError, match="-1"):
        model(torch.tensor([[1, -1]]), torch.zeros(1, 2))


def test_random_backbone_keeps_shape_changes_weights():
    model = builtin_tiny()
    rnd = random_backbone(model, seed=5)
    assert type(rnd) is BuiltinBackbone and rnd.vocab == model.vocab
    sd, sr = model.state_dict(), rnd.state_dict()
    assert sd.keys() == sr.keys()
    assert all(sd[k].shape == sr[k].shape for k in sd)
    assert not torch.equal(sd["blocks.0.linear1.weight"], sr["blocks.0.linear1.weight"])
    again = random_backbone(model, seed=5)
    assert torch.equal(again.state_dict()["gene_emb.weight"], sr["gene_emb.weight"])


def test_shipped_builtin_beats_gene_mean_on_held_out_patient(c2_counts):
    """Patient C was held out of pre-training; baseline = each gene's mean *on C2 itself*."""
    model = load_backbone("builtin")
    assert isinstance(model, BuiltinBackbone) and not model.training
    pre = model.config.extra["pretraining"]
    assert all(not s.startswith("C") for s in pre["train_sections"])
    assert pre["val_ratio"] < 1.0
    model_dir = _builtin_dir()
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    assert size < 8 * 2**20, f"{model_dir} holds {size / 2**20:.1f} MiB"

    values = transform_counts(torch.tensor(c2_counts.to_numpy(), dtype=torch.float32))
    ids, present, missing = map_panel(model, list(c2_counts.columns))
    assert len(present) > 2000 and len(missing) > 0
    cols = torch.tensor([c2_counts.columns.get_loc(g) for g in present])
    x = values[:, cols]
    gen = torch.Generator().manual_seed(0)
    n_cells, n_genes = 96, 128
    rows = torch.randperm(len(x), generator=gen)[:n_cells]
    pick = torch.rand(n_cells, len(present), generator=gen).topk(n_genes, dim=1).indices
    vals = x[rows[:, None], pick]
    masked = torch.rand(n_cells, n_genes, generator=gen) < 0.3
    with torch.no_grad():
        pred = model(ids[pick], vals, masked)
    gene_mean = model.gene_mean[ids[pick]]  # the pre-training means: the recorded baseline
    mse_model = ((pred - vals)[masked] ** 2).mean().item()
    mse_mean = ((gene_mean - vals)[masked] ** 2).mean().item()
    ratio = mse_model / mse_mean
    print(f"C2 slice: masked MSE {mse_model:.4f}, gene-mean {mse_mean:.4f}, ratio {ratio:.3f}; "
          f"recorded on all of patient C: {pre['patient_c_ratio']:.3f}")
    assert ratio < 0.97
    assert abs(ratio - pre["patient_c_ratio"]) < 0.06


def _builtin_dir():
    from napari_hinge.scfm import BUILTIN_DIR

    return BUILTIN_DIR


# ----------------------------------------------------------------------------- scGPT


def test_scgpt_checkpoint_loads_every_weight(scgpt_folder, census_vocab):
    folder, state = scgpt_folder
    assert backbone_kind(folder) == "scgpt"
    model = load_backbone(folder)
    assert isinstance(model, ScGPTBackbone)
    assert len(model.vocab) == len(census_vocab) + 3
    assert model.vocab["<pad>"] == len(census_vocab)
    sd = model.state_dict()
    for i in range(2):
        qkv = "_impl.Wqkv" if i == 1 else "Wqkv"
        src = f"transformer_encoder.layers.{i}.self_attn.{qkv}."
        assert torch.equal(sd[f"blocks.{i}.self_attn.in_proj_weight"], state[src + "weight"])
        assert torch.equal(sd[f"blocks.{i}.self_attn.in_proj_bias"], state[src + "bias"])
        for name in ("linear1.weight", "linear2.bias", "norm1.weight", "norm2.bias",
                     "self_attn.out_proj.weight"):
            assert torch.equal(sd[f"blocks.{i}.{name}"],
                               state[f"transformer_encoder.layers.{i}.{name}"])
    for key in ("encoder.embedding.weight", "encoder.enc_norm.bias",
                "value_encoder.linear1.weight", "value_encoder.norm.weight"):
        assert torch.equal(sd[key], state[key])
    for j in (0, 2, 4):
        assert torch.equal(sd[f"value_decoder.fc.{j}.weight"], state[f"decoder.fc.{j}.weight"])
    landed = 2 * 12 + 9 + 6
    assert len(sd) == landed
    assert sorted(model.ignored_keys) == sorted(
        k for k in state if k.startswith(("cls_decoder", "mvc_decoder", "flag_encoder")))
    assert model.config.value_transform == "scgpt_binned"
    assert model.config.extra["mask_value"] == -1 and model.config.extra["pad_value"] == -2


def test_scgpt_block_equals_torch_transformer_layer(scgpt_folder):
    """The renamed Wqkv packing must give exactly nn.TransformerEncoderLayer (what scGPT runs)."""
    model = load_scgpt(scgpt_folder[0])
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    block_sd = {k[len("blocks.0."):]: v for k, v in model.state_dict().items()
                if k.startswith("blocks.0.")}
    layer.load_state_dict(block_sd, strict=True)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](x), layer(x))


def test_scgpt_forward_panel_mapping_and_masking(scgpt_folder, c2_counts, census_vocab):
    model = load_scgpt(scgpt_folder[0])
    panel = list(c2_counts.columns)
    ids, present, missing = map_panel(model, panel)
    expected_missing = [g for g in panel if g not in census_vocab]
    assert missing == expected_missing and len(missing) > 0
    assert ids.tolist() == [census_vocab[g] for g in present]
    ids_all, missing_all = model.gene_ids(panel)
    assert (ids_all == -1).sum().item() == len(missing_all) == len(missing)
    with pytest.raises(KeyError, match=missing[0].replace(".", r"\.")):
        model.require_genes(panel[:5] + [missing[0]])
    _hidden_values_do_not_leak(model, 30, len(census_vocab))
    counts = torch.tensor(c2_counts[present[:64]].to_numpy()[:4], dtype=torch.float32)
    binned = bin_values(counts)
    assert binned.min() >= 0 and binned.max() <= 50 and torch.equal(binned == 0, counts == 0)
    with torch.no_grad():
        out = model(ids[:64].expand(4, -1), binned)
    assert out.shape == (4, 64) and torch.isfinite(out).all()


def test_scgpt_missing_or_misshaped_keys_name_the_file(tmp_path, scgpt_folder):
    folder, state = scgpt_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("args.json", "vocab.json"):
        (bad / name).write_bytes((folder / name).read_bytes())
    broken = {k: v for k, v in state.items() if "layers.1.linear2" not in k}
    torch.save(broken, bad / "best_model.pt")
    with pytest.raises(ValueError, match=r"best_model\.pt.*blocks\.1\.linear2"):
        load_scgpt(bad)
    broken = dict(state)
    broken["transformer_encoder.layers.0.linear1.weight"] = torch.zeros(32, 8)
    torch.save(broken, bad / "best_model.pt")
    with pytest.raises(ValueError, match=r"best_model\.pt.*wrong shapes"):
        load_scgpt(bad)
    (bad / "best_model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="best_model.pt"):
        load_scgpt(bad)
    with pytest.raises(ValueError, match="not a backbone folder"):
        backbone_kind(bad)


def test_any_backbone_saves_and_reloads_bit_identically(tmp_path, scgpt_folder):
    model = load_scgpt(scgpt_folder[0])
    save_backbone(model, tmp_path / "saved")
    back = load_backbone(tmp_path / "saved")
    assert type(back) is ScGPTBackbone and back.vocab == model.vocab
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


# ----------------------------------------------------------------------------- CellFM


def test_cellfm_file_loads_every_tensor_and_skips_optimiser(cellfm_files):
    folder, state, genes = cellfm_files
    assert backbone_kind(folder / "cellfm_tiny.pt") == "cellfm"
    model = load_backbone(folder / "cellfm_tiny.pt")
    assert isinstance(model, CellFMBackbone)
    c = model.config
    assert (c.d_model, c.n_layers, c.n_heads, c.mask_kv_layers) == (32, 2, 1, 1)
    assert model.vocab[genes[0]] == 1 and model.vocab[genes[-1]] == 200
    assert sorted(model.skipped_keys) == sorted(CELLFM_OPTIMISER_KEYS)
    assert model.ignored_keys == ["cellwise_dec.map.weight"]
    sd = model.state_dict()
    mapping = {"gene_emb": "gene_emb", "cls_token": "cls_token", "zero_emb": "zero_emb",
               "value_encoder.a": "value_enc.value_enc.a",
               "value_encoder.w1.weight": "value_enc.value_enc.w1.weight",
               "value_encoder.w3.weight": "value_enc.value_enc.w3.weight",
               "value_encoder.table.weight": "value_enc.value_enc.table.weight",
               "value_decoder.w1.weight": "value_dec.w1.weight",
               "value_decoder.w2.weight": "value_dec.w2.weight"}
    for i in range(2):
        for n in "qkvuo":
            mapping[f"blocks.{i}.retention.{n}_proj.weight"] = f"encoder.{i}.attn.{n}_proj.weight"
        for n in "uvo":
            mapping[f"blocks.{i}.glu.{n}_proj.weight"] = f"encoder.{i}.ffn.{n}_proj.weight"
        for j in (1, 2):
            mapping[f"blocks.{i}.norm{j}.weight"] = f"encoder.{i}.post_norm{j}.gamma"
            mapping[f"blocks.{i}.norm{j}.bias"] = f"encoder.{i}.post_norm{j}.beta"
    assert set(sd) == set(mapping)
    for ours, theirs in mapping.items():
        assert torch.equal(sd[ours], state[theirs]), ours
    assert math.isclose(model.blocks[0].alpha, 4 ** 0.25)


def _reference_retention_layer(x, sd, p, n_heads, alpha, hidden):
    """methods.md 1.2 written out directly, for one CellFM layer."""
    b, n, d = x.shape
    dh = d // n_heads

    def proj(name, t):
        return (t @ sd[f"{p}{name}"].T).view(b, n, n_heads, dh).permute(0, 2, 1, 3)

    q = torch.relu(proj("retention.q_proj.weight", x)) / math.sqrt(dh)
    k = torch.relu(proj("retention.k_proj.weight", x)) / math.sqrt(dh)
    k = k * (~hidden).float()[:, None, :, None]
    v = proj("retention.v_proj.weight", x) / math.sqrt(n - 1)
    u = torch.nn.functional.silu(proj("retention.u_proj.weight", x))
    o = torch.einsum("bhid,bhjd,bhje->bhie", q, k, v)
    o = o / (o.norm(dim=-1, keepdim=True) / math.sqrt(dh)).clamp_min(1e-12) * u
    o = o.permute(0, 2, 1, 3).reshape(b, n, d) @ sd[f"{p}retention.o_proj.weight"].T

    def ln(t, j):
        return torch.nn.functional.layer_norm(t, (d,), sd[f"{p}norm{j}.weight"],
                                              sd[f"{p}norm{j}.bias"], eps=1e-7)

    x = ln(alpha * x + o, 1)
    f = ((x @ sd[f"{p}glu.u_proj.weight"].T) * (x @ sd[f"{p}glu.v_proj.weight"].T)
         ) @ sd[f"{p}glu.o_proj.weight"].T
    return ln(alpha * x + f, 2)


def test_cellfm_layer_matches_the_written_formula(cellfm_files):
    folder, _, _ = cellfm_files
    model = load_cellfm(folder / "cellfm_tiny.pt", n_heads=4)
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 11, 32, generator=gen)
    hidden = torch.rand(2, 11, generator=gen) < 0.3
    hidden[:, 0] = False
    with torch.no_grad():
        ours = model.blocks[0](x, hidden)
    ref = _reference_retention_layer(x, sd, "blocks.0.", 4, model.blocks[0].alpha, hidden)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_cellfm_forward_masking_and_safetensors(cellfm_files, tmp_path):
    folder, state, genes = cellfm_files
    model = load_cellfm(folder / "cellfm_tiny.pt")
    _hidden_values_do_not_leak(model, 40, 201)
    # HINGE's released behaviour (noise through the value encoder) is available and does leak
    model.config.extra["hide_masked_values"] = False
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 201, (2, 30), generator=gen)
    vals = torch.rand(2, 30, generator=gen)
    masked = torch.zeros(2, 30, dtype=torch.bool)
    masked[:, :10] = True
    with torch.no_grad():
        a = model(ids, vals, masked)
        b = model(ids, torch.where(masked, vals + 3, vals), masked)
    assert (a - b).abs().max() > 1e-4

    st = tmp_path / "st"
    st.mkdir()
    (st / "expand_gene_info.csv").write_bytes((folder / "gene_info.csv").read_bytes())
    save_file({k: v.contiguous() for k, v in state.items()}, str(st / "cellfm.safetensors"))
    assert backbone_kind(st) == "cellfm"
    again = load_backbone(st)  # the folder: weights + gene table found beside them
    assert torch.equal(again.state_dict()["blocks.1.glu.o_proj.weight"],
                       state["encoder.1.ffn.o_proj.weight"])
    ids, present, missing = map_panel(again, genes[:5] + ["NOT_A_GENE"])
    assert present == genes[:5] and missing == ["NOT_A_GENE"] and ids.tolist() == [1, 2, 3, 4, 5]


def test_cellfm_missing_key_names_the_file_and_key(cellfm_files, tmp_path):
    folder, state, _ = cellfm_files
    (tmp_path / "gene_info.csv").write_bytes((folder / "gene_info.csv").read_bytes())
    broken = {k: v for k, v in state.items() if k != "encoder.1.attn.u_proj.weight"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken\.pt.*encoder\.1\.attn\.u_proj\.weight"):
        load_cellfm(tmp_path / "broken.pt")
    torch.save(state, tmp_path / "alone.pt")
    (tmp_path / "gene_info.csv").unlink()
    with pytest.raises(FileNotFoundError, match="gene table"):
        load_cellfm(tmp_path / "alone.pt")
    (tmp_path / "x.ckpt").write_bytes(b"\0")
    with pytest.raises(ValueError, match="MindSpore"):
        backbone_kind(tmp_path / "x.ckpt")


# ----------------------------------------------------------------------------- helpers


def test_transform_counts_log1p_cp10k(c2_counts):
    x = c2_counts.to_numpy()[:20].astype(np.float64)
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4)  # scanpy normalize_total + log1p
    ours = transform_counts(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)
    # a panel subset keeps the library size of all genes
    sub = transform_counts(torch.from_numpy(x[:, :10]), library_size=torch.from_numpy(x.sum(1)))
    np.testing.assert_allclose(sub.numpy(), expected[:, :10], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(transform_counts(torch.from_numpy(x[:, :10]), "log2p1").numpy(),
                               np.log2(x[:, :10] + 1), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown value transform"):
        transform_counts(torch.from_numpy(x), "zscore")
