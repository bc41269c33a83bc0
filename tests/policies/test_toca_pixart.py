"""ToCa / DuCa with the authors' PixArt settings: step types, token counts and the cross-attention score."""

import math

import numpy as np
import pytest
import torch

from ditcache.policies.toca_pixart import (CrossAttentionScorer, interval_after, mixed_entropy, pixart_fresh_counts,
                                           pixart_step_types, tile_bonus)
from ditcache.types import Branch


def test_toca_step_types_at_20_steps_follow_the_per_layer_threshold():
    # N = 3, R = 0.3, steps counted up. Step 0: full; I = round(3 / 0.8) = 4. Steps 1-3: s mod 4 != 0.
    # Step 4: 4 mod 4 = 0, layer 0 full, I = round(3 / 0.88) = 3; 4 mod 3 = 1, so layers 1.. partial: 'P'.
    # Step 5: 5 mod 3 = 2 -> p. Step 6: full, I = round(3 / 0.92) = 3 -> f in every layer; from there
    # I stays 3 (3 / 1.16 at step 18 still rounds to 3): full at 9, 12, 15, 18.
    assert interval_after(0, 20, 3, 0.3, False) == 4 and interval_after(4, 20, 3, 0.3, False) == 3
    assert pixart_step_types(20, 3, 0.3) == "fpppPpfppfppfppfppfp"


def test_duca_uses_the_base_interval_and_alternates_partial_and_aggressive():
    # DuCa's force scheduler has step weight 0: I = N = 3; s mod 3 = 1 partial, 2 aggressive
    assert pixart_step_types(20, 3, 0.75, dual=True) == "fpa" * 6 + "fp"


def test_fresh_counts_follow_the_toca_ratio_scheduler():
    types = pixart_step_types(20, 3, 0.3)
    counts = pixart_fresh_counts(types, depth=28, num_tokens=256, ratio=0.3)
    assert counts[Branch.MLP].shape == (20, 28)
    # step 1, layer 27: 0.3 * (1.9 - 1.8/20) * (1.6 - 1.2) * m
    share = 0.3 * (1.9 - 1.8 / 20) * 0.4
    assert counts[Branch.CROSS][1, 27] == int(share * 0.6 * 256)
    assert counts[Branch.MLP][1, 27] == int(share * 1.6 * 256)
    assert counts[Branch.MLP][1, 0] == 256  # 0.3 * 1.81 * 1.6 * 1.6 > 1: clamped to every token
    assert counts[Branch.MLP][0].sum() == 0 and counts[Branch.CROSS][6].sum() == 0  # full steps
    assert counts[Branch.MLP][4, 0] == 0 and counts[Branch.MLP][4, 1] > 0  # 'P': layer 0 full, the rest partial


def test_tile_bonus_multiplies_the_best_token_of_each_4x4_tile():
    score = torch.arange(64, dtype=torch.float32).reshape(1, 64)  # an 8 x 8 grid, 4 tiles
    out = tile_bonus(score, 0.4, 4)
    best = [27, 31, 59, 63]  # the bottom-right token of each tile
    expected = score.clone()
    expected[0, best] *= 1.4
    assert torch.equal(out, expected)


def test_mixed_entropy_is_ln2_plus_the_mean_of_the_halves():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 6, 5, generator=g).softmax(dim=-1)  # (B = 2 pairs, N, T)
    h = -(probs * probs.log()).sum(-1)  # (4, 6)
    mixed = mixed_entropy(probs, guided=True)
    # each half's probabilities at weight 0.5 on its own caption tokens; 1e-7 inside the log moves it
    # by less than 1e-5 here
    assert torch.allclose(mixed, math.log(2) + 0.5 * (h[:2] + h[2:]), atol=1e-5)


def test_selection_is_shared_by_the_halves_and_ages_reset_where_computed():
    scorer = CrossAttentionScorer(interval=3, freq_weight=1.0, guided=True, bonus=0.0)
    probs = torch.full((2, 16, 4), 0.25)  # uniform: maximal entropy everywhere ...
    probs[:, 5] = torch.tensor([1.0, 0, 0, 0])  # ... except token 5, fully attending one word
    scorer.full(0, Branch.MLP, probs, batch=2, tokens=16)
    chosen = scorer.select(0, Branch.MLP, 15)
    assert torch.equal(chosen[0], chosen[1]) and 5 not in chosen[0].tolist()
    ages = scorer.ages[(0, Branch.MLP)]
    assert ages[0, 5] == 1 and (ages[0, chosen[0]] == 0).all()
    # normalised 1 + entropy: 0.256 for the 15 uniform tokens, 0.141 for token 5; its age adds 1.0 * 1/3,
    # so the next selection takes token 5
    assert scorer.select(0, Branch.MLP, 1)[0].item() == 5


# -- the policy on a PixArt pipeline ------------------------------------------------------------------
import ditcache  # noqa: E402
from ditcache.pipelines.toy import pixart_pipeline, pixart_transformer  # noqa: E402
from ditcache.policies import make_policy  # noqa: E402
from ditcache.types import Kind  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return pixart_pipeline(depth=3)


def run(pipe, steps=20):
    g = torch.Generator().manual_seed(0)
    return pipe(["a photo of a cat", "a red car"], num_inference_steps=steps, guidance_scale=4.5, generator=g,
                height=16, width=16, use_resolution_binning=False, clean_caption=False, output_type="np").images


class Spy:
    """Wraps a policy's action to record every decision."""

    def __init__(self, policy):
        self.policy, self.actions = policy, []
        original = policy.action

        def action(step, site):
            chosen = original(step, site)
            self.actions.append((step.index, site, chosen))
            return chosen

        policy.action = action


@pytest.mark.parametrize("name", ["toca", "duca"])
def test_pixart_runs_compute_exactly_the_planned_tokens(pipe, name):
    policy = make_policy(name)
    spy = Spy(policy)
    with ditcache.enable(pipe, policy) as handle:
        run(pipe)
    plan = policy.pixart
    n, depth, batch = 16, 3, 4  # 8x8 latent / patch 2; 2 prompts with guidance
    expected = 0.0
    for step, code in enumerate(plan.types):
        if code == "a":
            continue  # aggressive: the whole trunk is reused, no site runs
        for layer in range(depth):
            kind = plan.layer_type(code, layer)
            if kind == "f":
                expected += 3
            elif kind == "p":
                expected += (plan.fresh[Branch.CROSS][step, layer] + plan.fresh[Branch.MLP][step, layer]) / n
    report = handle.report()
    assert report["sites_total"] == 20 * depth * 3 * batch
    assert report["sites_run"] == pytest.approx(expected * batch)
    partial = [(s, site, a) for s, site, a in spy.actions if a.kind is Kind.PARTIAL]
    assert partial and {site.branch for _, site, _ in partial} == {Branch.CROSS, Branch.MLP}
    for _, _, a in partial:  # both guidance halves recompute the same tokens
        assert torch.equal(a.tokens[:2], a.tokens[2:])
    assert all(a.kind is not Kind.PARTIAL for _, site, a in spy.actions if site.branch is Branch.ATTN)


def test_cross_attention_probabilities_equal_diffusers_own():
    model = pixart_transformer(depth=1)
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(4)
    x, text = torch.randn(2, 16, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    bias = torch.zeros(2, 1, 5)
    bias[1, 0, 3:] = -10000.0  # the second caption has 3 real tokens, as PixArt hands attn2 its mask
    ours, macs = CrossAttentionScorer(3).probs(attn, x, text, bias)
    q = attn.head_to_batch_dim(attn.to_q(x))
    k = attn.head_to_batch_dim(attn.to_k(text))
    mask = attn.prepare_attention_mask(bias, 5, 2)
    theirs = attn.get_attention_scores(q, k, mask).reshape(2, attn.heads, 16, 5).mean(dim=1)  # (B, N, T)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert macs == 2 * (16 * 32 * 32 + 5 * 32 * 32 + 16 * 5 * 32)


def test_pixart_settings_refuse_the_dit_knobs(pipe):
    with ditcache.enable(pipe, "toca:ratio=0.5"):
        with pytest.raises(ValueError, match="pixart_ratio"):
            run(pipe, steps=4)
    with ditcache.enable(pipe, "toca:settings=dit,ratio=0.5") as handle:  # the DiT code's behaviour, on request
        run(pipe, steps=6)
    assert handle.engine.policy.pixart is None
