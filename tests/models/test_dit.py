"""Our DiT: official key names and shapes, forward maths, label dropout and the cache-site contract."""

import math

import pytest
import torch

from ditcache.models.dit import (
    DIT_CONFIGS,
    DiT,
    build_dit,
    sincos_pos_embed_2d,
    timestep_features,
)

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny(**overrides) -> DiT:
    """A tiny DiT whose every trainable weight is random (the zero init would hide most bugs)."""
    torch.manual_seed(0)
    model = DiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, 0.2)
    return model


def inputs(n=3, c=4, size=8):
    torch.manual_seed(1)
    return torch.randn(n, c, size, size), torch.tensor([0, 500, 999])[:n], torch.tensor([1, 5, 9])[:n]


def official_keys(depth: int) -> list[str]:
    """Every parameter name of an official DiT checkpoint of the given depth (written out from the spec)."""
    keys = [
        "pos_embed",
        "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    ]
    for i in range(depth):
        for mod in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys += [f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"]
    return keys


def test_state_dict_keys_and_shapes_match_official_layout():
    sd = DiT(**TINY).state_dict()
    assert sorted(sd) == sorted(official_keys(2))
    expected = {
        "pos_embed": (1, 16, 64),
        "x_embedder.proj.weight": (64, 4, 2, 2),
        "t_embedder.mlp.0.weight": (64, 256),
        "t_embedder.mlp.2.weight": (64, 64),
        "y_embedder.embedding_table.weight": (11, 64),
        "blocks.1.attn.qkv.weight": (192, 64),
        "blocks.1.attn.proj.weight": (64, 64),
        "blocks.1.mlp.fc1.weight": (256, 64),
        "blocks.1.mlp.fc2.weight": (64, 256),
        "blocks.1.adaLN_modulation.1.weight": (384, 64),
        "final_layer.linear.weight": (2 * 2 * 8, 64),
        "final_layer.adaLN_modulation.1.weight": (128, 64),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected


def test_xl2_preset_has_the_official_parameter_count():
    with torch.device("meta"):
        model = build_dit("DiT-XL/2")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # printed by the official train.py
    assert sorted(model.state_dict()) == sorted(official_keys(28))
    assert not model.pos_embed.requires_grad


def test_layer_norms_are_plain_with_eps_1e6():
    norms = [m for m in DiT(**TINY).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    assert all(m.eps == 1e-6 and not m.elementwise_affine for m in norms)


def test_presets_and_build_overrides():
    assert len(DIT_CONFIGS) == 12
    assert {k: (v["depth"], v["hidden_size"], v["num_heads"]) for k, v in DIT_CONFIGS.items() if "/2" in k} == {
        "DiT-XL/2": (28, 1152, 16), "DiT-L/2": (24, 1024, 16), "DiT-B/2": (12, 768, 12), "DiT-S/2": (12, 384, 6)}
    model = build_dit("DiT-S/8", depth=1, input_size=16)
    assert (model.depth, model.hidden_size, model.patch_size, model.num_patches) == (1, 384, 8, 4)
    with pytest.raises(KeyError, match="DiT-XL/2"):
        build_dit("DiT-M/2")


def test_attributes_and_config_rebuild():
    model = DiT(**TINY, learn_sigma=False, mlp_ratio=2.0)
    assert (model.out_channels, model.mlp_hidden, model.num_patches, model.null_class) == (4, 128, 16, 10)
    assert model.config == {**TINY, "mlp_ratio": 2.0, "class_dropout_prob": 0.1, "learn_sigma": False,
                            "freq_shift": 0.0}
    twin = DiT(**model.config)
    twin.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("learn_sigma, out", [(True, 8), (False, 4)])
def test_forward_shape(learn_sigma, out):
    x, t, y = inputs()
    assert tiny(learn_sigma=learn_sigma)(x, t, y).shape == (3, out, 8, 8)


def test_one_channel_28px_patch4():
    model = tiny(input_size=28, patch_size=4, in_channels=1, learn_sigma=False)
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.tensor([3, 7]), torch.tensor([0, 9]))
    assert out.shape == (2, 1, 28, 28) and model.num_patches == 49


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected input \(N, 4, 8, 8\)"):
        tiny()(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_adaln_zero_init_outputs_zero_and_blocks_are_identity():
    torch.manual_seed(0)
    model = DiT(**TINY).eval()
    x, t, y = inputs()
    assert torch.count_nonzero(model(x, t, y)) == 0
    h = torch.randn(3, 16, 64)
    c = torch.randn(3, 64)
    assert torch.equal(model.blocks[0](h, c), h)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_unpatchify_inverts_patch_order():
    model = tiny(learn_sigma=False)
    img = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(1, 4, 8, 8)
    p = 2
    tokens = img.reshape(1, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(1, 16, p * p * 4)  # (N, T, p*p*C)
    assert torch.equal(model.unpatchify(tokens), img)


def test_timestep_features_formula():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_features(t)
    i, half = 5, 128
    f = math.exp(-math.log(10000) * i / half)
    assert emb.shape == (3, 256)
    assert emb[2, i].item() == pytest.approx(math.cos(999 * f), abs=1e-4)
    assert emb[2, half + i].item() == pytest.approx(math.sin(999 * f), abs=1e-4)
    shifted = timestep_features(t, freq_shift=1.0)
    f1 = math.exp(-math.log(10000) * i / (half - 1))
    assert shifted[2, i].item() == pytest.approx(math.cos(999 * f1), abs=1e-4)


def test_pos_embed_matches_an_independent_reference():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ours = sincos_pos_embed_2d(64, 4)
    ref = get_2d_sincos_pos_embed(64, 4, base_size=4).float()
    assert torch.allclose(ours, ref, atol=1e-6)
    # token (row 1, col 2) = index 6: first half encodes the column (2), second half the row (1)
    assert ours[6, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert ours[6, 32].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert torch.equal(DiT(**TINY).pos_embed[0], ours)


def test_label_dropout_and_null_class():
    model = tiny()
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    assert model.y_embedder.embedding_table.num_embeddings == 11 and model.null_class == 10
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        assert not torch.allclose(cond, uncond)
        forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
        assert torch.equal(forced[[0, 2]], uncond[[0, 2]]) and torch.equal(forced[1], cond[1])
        model.train()
        model.y_embedder.dropout_prob = 1.0
        assert torch.equal(model(x, t, y), uncond)
        model.eval()  # eval mode never drops, whatever the probability
        assert torch.equal(model(x, t, y), cond)


def test_no_dropout_means_no_null_row():
    model = DiT(**TINY, class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 10
    model.train()
    x, t, y = inputs()
    model(x, t, y)
    with pytest.raises(ValueError, match="null class"):
        model(x, t, y, force_drop_ids=torch.tensor([1, 0, 0]))


def test_attention_matches_explicit_softmax_and_probs():
    attn = tiny().blocks[0].attn
    x = torch.randn(2, 16, 64)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh) each
    probs = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)  # (B, H, N, N)
    ref = attn.proj((probs @ v).transpose(1, 2).reshape(2, 16, 64))  # (B, N, C)
    assert torch.allclose(attn(x), ref, atol=1e-5)
    got = attn.attention_probs(x)
    assert got.shape == (2, 16, 16)
    assert torch.allclose(got, probs.mean(1), atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2, 16), atol=1e-5)


def test_block_calls_submodules_and_applies_gate_pre_gate():
    """The engine overrides ``attn.forward`` / ``mlp.forward`` per instance: the block must honour it."""
    block = tiny().blocks[1]
    h = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    gate_msa = block.adaLN_modulation(c).chunk(6, dim=1)[2]  # (N, D)
    block.attn.forward = lambda x: torch.ones_like(x)
    block.mlp.forward = lambda x: torch.zeros_like(x)
    assert torch.allclose(block(h, c), h + gate_msa.unsqueeze(1), atol=1e-6)
    seen = []
    block.mlp.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    block(h, c)
    assert seen == [(2, 16, 64)]
