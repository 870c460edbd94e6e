"""Encoders: the shipped EfficientNet-Lite0 on real photos and H&E, UNI/CONCH key layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from napari_hinge import encoders
from napari_hinge.encoders import get_encoder, list_encoders, register_encoder
from napari_hinge.encoders.concat import ConcatEncoder
from napari_hinge.encoders.efficientnet_lite0 import (
    EfficientNetLite0,
    SameConv2d,
    load_efficientnet_lite0,
    weights_path,
)
from napari_hinge.encoders.vit import (
    ConchConfig,
    ConchEncoder,
    UNIEncoder,
    ViTConfig,
    load_conch,
    load_uni,
)
from napari_hinge.patches import dihedral

TINY_UNI = ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4)
TINY_CONCH = ConchConfig(
    trunk=ViTConfig(img_size=48, patch_size=16, embed_dim=24, depth=2, num_heads=4,
                    init_values=None),
    embed_dim=16,
    pool_heads=4,
)


@pytest.fixture(scope="module")
def effnet():
    return get_encoder("efficientnet-lite0")


def _center_square(img):
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s, :3]


@pytest.fixture(scope="module")
def he_patches(shared_data):
    """8 real 160 px H&E patches around her2st C2 spots (from the tiled TIFF, fast to read)."""
    from napari_hinge.io.legacy_st import read_her2st
    from napari_hinge.patches import spot_patches

    ad = read_her2st(shared_data / "her2st_subset", "C2", images=False)
    slide = shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif"
    return spot_patches(slide, ad.obsm["spatial"][::23][:8], side_px=160)


def test_efficientnet_all_296_tensors_load_strictly():
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    model = EfficientNetLite0()
    assert set(model.state_dict()) == set(state)
    loaded = load_efficientnet_lite0()
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.dim == 1280 and loaded.input_size == 224
    assert loaded.weights_digest != "random"


@pytest.mark.parametrize(
    ("photo", "classes"),
    [
        ("chelsea", {281, 282, 283, 284, 285}),  # tabby, tiger, Persian, Siamese, Egyptian cat
        ("coffee", {967, 968}),  # espresso, cup
        ("rocket", {657, 744}),  # missile, projectile
    ],
)
def test_efficientnet_classifies_real_photos(effnet, photo, classes):
    """Real photographs that ship with scikit-image; a wrong padding/BN/activation breaks it."""
    from skimage import data

    img = _center_square(getattr(data, photo)())
    with torch.inference_mode():
        logits = effnet.logits(effnet.preprocess(img[None]))
    assert int(logits.argmax()) in classes


def test_tf_same_padding_is_asymmetric():
    """TF 'SAME' with stride 2 pads only bottom/right on even inputs (not PyTorch's k//2)."""
    torch.manual_seed(0)
    conv = SameConv2d(3, 4, 3, stride=2)
    x = torch.randn(1, 3, 224, 224)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.allclose(conv(x), ref, atol=1e-6)
    sym = F.conv2d(x, conv.weight, stride=2, padding=1)
    assert not torch.allclose(conv(x), sym, atol=1e-3)


def test_efficientnet_features_stable_under_dihedral_transforms(effnet, he_patches):
    """H&E has no orientation: a view's features are closer to its own other views than to
    other spots, and the (meaningless on H&E) ImageNet head mostly agrees with itself."""
    views = np.stack([dihedral(he_patches, k) for k in range(8)])  # (8, N, h, w, 3)
    feats = effnet.encode(views.reshape(-1, *views.shape[2:])).reshape(8, len(he_patches), -1)
    f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    same = np.mean([f[0, i] @ f[k, i] for i in range(f.shape[1]) for k in range(1, 8)])
    other = np.mean([f[0, i] @ f[0, j] for i in range(f.shape[1]) for j in range(f.shape[1])
                     if i != j])
    assert same > 0.85
    assert same > other + 0.03
    with torch.inference_mode():  # the ImageNet head on the pooled features
        top5 = effnet._fc(torch.from_numpy(feats)).topk(5, dim=-1).indices  # (8, N, 5)
    overlaps = [len(set(top5[0, i].tolist()) & set(top5[k, i].tolist())) / 5
                for k in range(1, 8) for i in range(top5.shape[1])]
    # chance overlap of two random top-5 sets out of 1000 classes is 0.005
    assert np.mean(overlaps) >= 0.3, np.mean(overlaps)


def test_encode_batches_consistently(effnet, he_patches):
    a = effnet.encode(he_patches, batch_size=3)
    b = effnet.encode(he_patches, batch_size=8)
    assert a.dtype == np.float32 and a.shape == (len(he_patches), 1280)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_preprocess_resizes_with_antialiasing(effnet, he_patches):
    x = effnet.preprocess(he_patches[:2])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # (x - 127) / 128


def test_efficientnet_rejects_wrong_layout(tmp_path):
    path = tmp_path / "uni_tiny.bin"
    torch.save(UNIEncoder(TINY_UNI).state_dict(), path)
    with pytest.raises(ValueError, match="uni_tiny.bin.*missing keys.*_conv_stem"):
        load_efficientnet_lite0(path)


# --- UNI / CONCH key layouts ------------------------------------------------------------------

UNI_BLOCK_KEYS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
}


def _uni_keys(depth):
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in UNI_BLOCK_KEYS}


def test_uni_state_dict_has_timm_layout():
    assert set(UNIEncoder(TINY_UNI).state_dict()) == _uni_keys(2)
    sd = UNIEncoder(TINY_UNI).state_dict()
    assert sd["pos_embed"].shape == (1, 1 + (32 // 16) ** 2, 32)
    assert torch.allclose(sd["blocks.0.ls1.gamma"], torch.full((32,), 1e-5))


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_uni_tiny_checkpoint_roundtrip(tmp_path, suffix):
    torch.manual_seed(0)
    src = UNIEncoder(TINY_UNI).eval()
    for p in src.parameters():  # non-trivial values everywhere, layer scale included
        p.data.normal_(0, 0.2)
    path = tmp_path / f"pytorch_model{suffix}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    enc = load_uni(path, config=TINY_UNI)
    assert enc.dim == 32 and enc.input_size == 32 and enc.name == "uni"
    imgs = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        ref = src(src.preprocess(imgs)).numpy()
    np.testing.assert_allclose(enc.encode(imgs), ref, rtol=1e-5, atol=1e-5)


def test_uni_wrong_layout_names_file_and_keys(tmp_path):
    sd = UNIEncoder(TINY_UNI).state_dict()
    sd = {k: v for k, v in sd.items() if ".ls" not in k}  # a ViT without layer scale
    sd["head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "not_uni.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_uni(path, config=TINY_UNI)
    msg = str(err.value)
    assert "not_uni.pth" in msg and "ls1.gamma" in msg and "head.weight" in msg


def test_uni_shape_mismatch_and_bad_files(tmp_path):
    path = tmp_path / "uni.bin"
    torch.save(UNIEncoder(TINY_UNI).state_dict(), path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_uni(path, config=ViTConfig(img_size=32, embed_dim=48, depth=2, num_heads=4))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_uni(tmp_path / "missing.bin")
    bad = tmp_path / "weights.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="unsupported weights file type"):
        load_uni(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth: not a readable checkpoint"):
        load_uni(junk)


def _coca_checkpoint(src: ConchEncoder) -> dict:
    """A full CoCa-style state dict: vision tower under visual.*, plus unused parts."""
    sd = {f"visual.{k}": v for k, v in src.state_dict().items()}
    e = TINY_CONCH.embed_dim
    sd["visual.proj_contrast"] = torch.randn(e, e)
    sd["visual.attn_pool_caption.query"] = torch.randn(4, e)
    sd["visual.ln_caption.weight"] = torch.ones(e)
    sd["text.token_embedding.weight"] = torch.randn(20, e)
    sd["text_decoder.ln_final.weight"] = torch.ones(e)
    sd["logit_scale"] = torch.tensor(1.0)
    return sd


def test_conch_keys_and_tiny_checkpoint(tmp_path):
    torch.manual_seed(1)
    src = ConchEncoder(TINY_CONCH).eval()
    keys = set(src.state_dict())
    assert "trunk.blocks.0.attn.qkv.weight" in keys and "trunk.norm.weight" in keys
    assert not any(".ls1." in k for k in keys)  # CONCH's trunk has no layer scale
    assert {
        "attn_pool_contrast.query", "attn_pool_contrast.attn.q_proj_weight",
        "attn_pool_contrast.attn.k_proj_weight", "attn_pool_contrast.attn.v_proj_weight",
        "attn_pool_contrast.attn.in_proj_bias", "attn_pool_contrast.attn.out_proj.weight",
        "attn_pool_contrast.ln_q.weight", "attn_pool_contrast.ln_k.weight",
        "ln_contrast.weight", "ln_contrast.bias",
    } <= keys
    path = tmp_path / "pytorch_model.bin"
    torch.save(_coca_checkpoint(src), path)
    enc = load_conch(path, config=TINY_CONCH)
    assert enc.dim == 16 and enc.input_size == 48
    imgs = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    x = src.preprocess(imgs)
    with torch.no_grad():
        # reference pooling as written in CONCH: sequence-first nn.MultiheadAttention
        tokens = src.trunk(x)
        pool = src.attn_pool_contrast
        kv = pool.ln_k(tokens).permute(1, 0, 2)
        q = pool.ln_q(pool.query).unsqueeze(1).repeat(1, len(x), 1)
        mha = torch.nn.MultiheadAttention(16, 4, kdim=24, vdim=24)
        mha.load_state_dict(pool.attn.state_dict())
        ref = src.ln_contrast(mha(q, kv, kv, need_weights=False)[0].permute(1, 0, 2)[:, 0])
    np.testing.assert_allclose(enc.encode(imgs), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_conch_rejects_unknown_visual_keys(tmp_path):
    src = ConchEncoder(TINY_CONCH)
    sd = _coca_checkpoint(src)
    del sd["visual.ln_contrast.weight"]
    sd["visual.head.proj.weight"] = torch.zeros(2, 2)
    path = tmp_path / "conch_bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ValueError) as err:
        load_conch(path, config=TINY_CONCH)
    msg = str(err.value)
    assert "conch_bad.safetensors" in msg and "ln_contrast.weight" in msg and "head.proj" in msg


# --- registry and concatenation ---------------------------------------------------------------


def test_registry_errors():
    assert {"efficientnet-lite0", "uni", "conch"} <= set(list_encoders())
    with pytest.raises(KeyError, match="unknown encoder 'resnet'"):
        get_encoder("resnet")
    with pytest.raises(ValueError, match="needs the path of your local weights"):
        get_encoder("uni")
    with pytest.raises(ValueError, match="reserved"):
        register_encoder("a+b", lambda w: None)
    with pytest.raises(ValueError, match="mapping"):
        get_encoder("uni+conch", weights="one_file.bin")


def test_concat_via_registry(tmp_path, monkeypatch):
    torch.manual_seed(2)
    p_uni, p_conch = tmp_path / "uni.bin", tmp_path / "conch.bin"
    torch.save(UNIEncoder(TINY_UNI).state_dict(), p_uni)
    torch.save(_coca_checkpoint(ConchEncoder(TINY_CONCH)), p_conch)
    monkeypatch.setattr(encoders, "_REGISTRY", dict(encoders._REGISTRY))
    monkeypatch.setattr(encoders, "_NEEDS_WEIGHTS", set(encoders._NEEDS_WEIGHTS))
    register_encoder("tiny-uni", lambda w: load_uni(w, config=TINY_UNI), needs_weights=True)
    register_encoder("tiny-conch", lambda w: load_conch(w, config=TINY_CONCH), needs_weights=True)
    enc = get_encoder("tiny-uni+tiny-conch", weights={"tiny-uni": p_uni, "tiny-conch": p_conch})
    assert isinstance(enc, ConcatEncoder)
    assert enc.dim == 32 + 16 and enc.name == "uni+conch"
    assert not any(p.requires_grad for p in enc.parameters())
    imgs = np.random.default_rng(2).integers(0, 256, (3, 60, 60, 3), dtype=np.uint8)
    both = enc.encode(imgs, batch_size=2)
    np.testing.assert_allclose(both[:, :32], enc.members[0].encode(imgs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[:, 32:], enc.members[1].encode(imgs), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="not part of encoder"):
        get_encoder("tiny-uni+tiny-conch", weights={"other": p_uni})
