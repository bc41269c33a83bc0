"""Token scores on hand-made inputs: s1 column sums, V-norm sign, cache age, 2x2 bonus, random, top-k."""

import warnings

import pytest
import torch

from ditcache.policies.token_scores import (
    TokenScorer,
    attention_received,
    attention_score,
    l2_normalise,
    random_score,
    spatial_bonus,
    top_k,
    value_norms,
    vnorm_score,
)

from ..conftest import tiny_dit


def test_attention_received_is_the_normalised_column_sum():
    probs = torch.tensor([[[0.5, 0.5, 0.0],
                           [0.0, 1.0, 0.0],
                           [0.25, 0.25, 0.5]]])  # (1, 3, 3), rows sum to 1
    col = torch.tensor([0.75, 1.75, 0.5])
    assert torch.equal(attention_received(probs), (col / col.norm()).unsqueeze(0))
    assert attention_received(probs).norm() == pytest.approx(1.0)


def test_attention_score_matches_the_modules_own_map_and_counts_its_macs():
    attn = tiny_dit().blocks[1].attn
    x = torch.randn(3, 16, 32)  # (B, N, C)
    score, macs = attention_score(attn, x)
    ref = attention_received(attn.attention_probs(x))  # the model's explicit map, fused qkv
    torch.testing.assert_close(score, ref, rtol=1e-5, atol=1e-6)  # sliced vs fused projection rounding
    assert macs == 3 * (2 * 16 * 32 * 32 + 16 * 16 * 32)  # q and k projections + QK^T, per sample


def test_attention_score_reads_diffusers_attention_the_same_way():
    from ditcache.models.diffusers_format import dit_to_diffusers

    ours = tiny_dit(hidden=32, heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dit_to_diffusers(ours)
    x = torch.randn(2, 16, 32)
    a, macs_a = attention_score(ours.blocks[0].attn, x)
    b, macs_b = attention_score(theirs.transformer_blocks[0].attn1, x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert macs_a == macs_b


def test_value_norms_are_per_head_and_token():
    attn = tiny_dit().blocks[0].attn
    x = torch.randn(2, 16, 32)
    norms, macs = value_norms(attn, x)
    _, _, v = attn._qkv(x)  # (B, H, N, Dh)
    torch.testing.assert_close(norms, v.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert norms.shape == (2, 2, 16) and macs == 2 * 16 * 32 * 32


def test_vnorm_sign_small_norms_are_recomputed_by_default():
    norms = torch.tensor([[[0.5, 2.0, 1.0, 3.0],
                           [0.5, 1.0, 1.0, 3.0]]])  # (B=1, H=2, N=4)
    raw = torch.tensor([1.0, -1.0, 0.0, -4.0])  # Σ_h (1 − ‖v‖)
    assert torch.allclose(vnorm_score(norms), (raw / raw.norm()).unsqueeze(0))
    assert top_k(vnorm_score(norms), 1).tolist() == [[0]]  # smallest norms
    assert top_k(vnorm_score(norms, "large"), 1).tolist() == [[3]]  # the flipped option
    with pytest.raises(ValueError, match="vnorm_recompute"):
        vnorm_score(norms, "big")


def test_spatial_bonus_multiplies_the_max_of_each_2x2_cell():
    score = torch.arange(16, dtype=torch.float).flip(0).reshape(1, 16)  # 15 .. 0 on a 4x4 grid
    out = spatial_bonus(score, 0.5)
    # cell maxima are the top-left token of each cell: grid positions 0, 2, 8, 10
    expected = score.clone()
    expected[0, [0, 2, 8, 10]] *= 1.5
    assert torch.equal(out, expected)


def test_spatial_bonus_can_change_the_selection():
    # the two best tokens share a cell; with the bonus the best of another cell overtakes the second
    score = torch.zeros(1, 16)
    score[0, [0, 1, 2]] = torch.tensor([1.0, 0.9, 0.8])  # 0 and 1 in cell (0,0), 2 in cell (0,1)
    assert top_k(score, 2).tolist() == [[0, 1]]
    assert sorted(top_k(spatial_bonus(score, 0.6), 2).tolist()[0]) == [0, 2]


def test_spatial_bonus_on_an_odd_grid_and_non_square_counts():
    score = torch.arange(9, dtype=torch.float).reshape(1, 9)  # 3x3 grid: edge cells are smaller
    expected = score.clone()
    expected[0, [4, 5, 7, 8]] *= 2.0
    assert torch.equal(spatial_bonus(score, 1.0), expected)
    with pytest.raises(ValueError, match="square"):
        spatial_bonus(torch.ones(1, 8), 0.6)
    assert torch.equal(spatial_bonus(torch.ones(1, 8), 0.0), torch.ones(1, 8))


def test_top_k_is_per_row_and_long():
    score = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.9, 0.1, 0.0, 0.5]])
    picked = top_k(score, 2)
    assert picked.dtype == torch.long and picked.shape == (2, 2)
    assert [sorted(r) for r in picked.tolist()] == [[1, 2], [0, 3]]
    assert top_k(score, 0).shape == (2, 0)


def _scorer(kind="attention", **kw):
    args = dict(interval=3, freq_weight=0.25, bonus=0.0)
    args.update(kw)
    return TokenScorer(kind, **args)


def test_cache_age_counts_partial_steps_and_resets_on_compute():
    s = _scorer()
    like = torch.zeros(2, 4, 1)  # (B, N, ...)
    s.computed(0, like)
    assert s.age[0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    s.computed(0, like, torch.tensor([[1], [2]]))  # a partial step: rows pick their own tokens
    assert s.age[0].tolist() == [[1, 0, 1, 1], [1, 1, 0, 1]]
    s.computed(0, like, torch.zeros(2, 0, dtype=torch.long))  # plain reuse: everyone ages
    assert s.age[0].tolist() == [[2, 1, 2, 2], [2, 2, 1, 2]]
    s.computed(0, like)  # a full step
    assert s.age[0].sum() == 0
    with pytest.raises(RuntimeError, match="before any full one"):
        s.computed(1, like, torch.tensor([[0], [0]]))


def test_score_adds_lambda3_times_age_over_the_interval_exactly():
    s = _scorer(freq_weight=0.25, interval=4)
    s.base[0] = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    s.age[0] = torch.tensor([[8, 0, 4, 0]])
    # 0.25 * 8 / 4 and 0.25 * 4 / 4 are exact in float32
    assert torch.equal(s.score(0), s.base[0] + torch.tensor([[0.5, 0.0, 0.25, 0.0]]))
    assert sorted(s.select(0, 2).tolist()[0]) == [0, 2]  # the old tokens overtake the fresher ones


def test_full_step_scoring_uses_the_module():
    attn = tiny_dit().blocks[0].attn
    x = torch.randn(2, 16, 32)
    s = _scorer("vnorm", bonus=0.8)
    macs = s.score_full_step(0, attn, x)
    s.computed(0, x)
    assert macs == 2 * 16 * 32 * 32
    assert torch.equal(s.score(0), spatial_bonus(vnorm_score(value_norms(attn, x)[0]), 0.8))
    assert _scorer("random").score_full_step(0, attn, x) == 0


def test_random_selection_is_reproducible_per_seed():
    def picks(seed):
        s = _scorer("random", seed=seed)
        s.computed(3, torch.zeros(2, 16))
        return [s.select(3, 4) for _ in range(3)]

    a, b, c = picks(0), picks(0), picks(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # fresh draws at every step


def test_random_scores_are_raw_uniform_and_shared_by_the_guidance_halves():
    """As the authors' score_evaluate: torch.rand(B/2, N), the same draw for [cond; uncond], no normalising."""
    g = torch.Generator().manual_seed(0)
    expected = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))  # (B/2, N)
    shared = random_score(4, 16, g, shared_halves=True)
    assert torch.equal(shared, torch.cat([expected, expected]))  # raw values: rows do not have unit norm
    own = random_score(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(own[:2], expected) and not torch.equal(own[:2], own[2:])  # no guidance: a row each
    with pytest.raises(ValueError, match="two equal halves"):
        random_score(3, 16, g, shared_halves=True)
    # through the scorer: with equal cache ages, both halves of a sample recompute the same tokens
    s = TokenScorer("random", 3, 0.25, 0.8, shared_halves=True)
    s.computed(0, torch.zeros(4, 16))
    picks = s.select(0, 5)
    assert torch.equal(picks[:2], picks[2:]) and not torch.equal(picks[0], picks[1])


def test_unknown_scores_and_missing_state_are_clear_errors():
    with pytest.raises(ValueError, match="unknown token score"):
        TokenScorer("entropy", 3, 0.25, 0.6)
    s = _scorer()
    with pytest.raises(RuntimeError, match="never computed"):
        s.score(0)
    s.computed(0, torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="no attention score"):
        s.score(0)


def test_l2_normalise_is_per_row():
    out = l2_normalise(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
