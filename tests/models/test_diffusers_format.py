"""Weight conversion between our DiT and diffusers' DiTTransformer2DModel."""

import warnings

import pytest
import torch

from ditcache.models.diffusers_format import diffusers_to_dit, dit_to_diffusers
from ditcache.models.dit import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)

# Both models run the same float32 operations on the same weights; only the attention projection is
# one fused qkv matmul on our side and three matmuls on diffusers', which may round differently.
# Outputs are O(10), float32 eps is 1.2e-7, two blocks: 1e-5 absolute is ~100 ulps of slack.
ATOL = 1e-5


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every trainable weight with noise so each one influences the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return model.eval()


def tiny(**overrides) -> DiT:
    return randomize(DiT(**{**TINY, **overrides}))


def inputs():
    torch.manual_seed(1)
    return torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 5, 10])


@torch.no_grad()
def outputs(ours, theirs):
    x, t, y = inputs()
    return ours(x, t, y), theirs(x, timestep=t, class_labels=y).sample


def test_ours_to_diffusers_same_output():
    ours = tiny()
    a, b = outputs(ours, dit_to_diffusers(ours))
    assert a.abs().max() > 1.0  # the weights really act on the output
    assert torch.allclose(a, b, atol=ATOL, rtol=0)


def test_round_trip_is_identical():
    ours = tiny()
    back = diffusers_to_dit(dit_to_diffusers(ours))
    assert back.config == ours.config
    sd, back_sd = ours.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(back_sd)
    assert all(torch.equal(sd[k], back_sd[k]) for k in sd)


def test_diffusers_to_ours_same_output_and_reads_freq_shift():
    from diffusers import DiTTransformer2DModel

    theirs = randomize(DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                             out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                             num_embeds_ada_norm=10, norm_eps=1e-6))
    for block in theirs.transformer_blocks[1:]:  # diffusers' copies of the embedders must agree
        block.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    ours = diffusers_to_dit(theirs)
    assert ours.config["freq_shift"] == 1.0
    a, b = outputs(ours, theirs)
    assert torch.allclose(a, b, atol=ATOL, rtol=0)


def test_freq_shift_is_what_makes_them_agree():
    ours = tiny()
    theirs = dit_to_diffusers(ours)
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1  # diffusers' default
    a, b = outputs(ours, theirs)
    assert (a - b).abs().max() > 1e-3


def test_no_dropout_model_converts_with_a_zero_null_row():
    ours = tiny(class_dropout_prob=0.0)
    theirs = dit_to_diffusers(ours)
    table = theirs.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (11, 64) and torch.count_nonzero(table[10]) == 0
    x, t, _ = inputs()
    y = torch.tensor([1, 5, 9])
    with torch.no_grad():
        assert torch.allclose(ours(x, t, y), theirs(x, timestep=t, class_labels=y).sample, atol=ATOL)


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="mlp_ratio"):
        dit_to_diffusers(DiT(**TINY, mlp_ratio=2.0))
    theirs = dit_to_diffusers(tiny())
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="block 1"):
        diffusers_to_dit(theirs)


def test_other_norm_eps_warns():
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                   num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.warns(UserWarning, match="eps"):
        diffusers_to_dit(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffusers_to_dit(dit_to_diffusers(tiny()))
