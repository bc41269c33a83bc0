"""The L2C reuse-cost diagnostic: exact on tiny models, and Spearman as scipy computes it."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ditcache.calibration.reuse_cost import average_ranks, ranking_report, reuse_cost_map, spearman
from ditcache.calibration.train_router import TrajectoryStates
from ditcache.sampling.loops import respaced_diffusion

from .test_train_router import loaded_tiny

STEPS = 6


def constant_attention(loaded, block=1):
    """Make block ``block``'s attention output its projection bias: the same at every step and input."""
    with torch.no_grad():
        proj = loaded.module.blocks[block].attn.proj
        proj.weight.zero_()
        proj.bias.normal_(0, 0.5)
    return loaded


def brute_force_cost(loaded, states, step, module):
    """Reuse ``module``'s output of step - 1 at ``step`` with plain forward hooks; the MSE against the full model."""
    diffusion = respaced_diffusion(STEPS, "ddim")
    x_prev = states.states[:, states.cache_steps.index(step)]
    y = states.labels
    previous = torch.full((len(y),), STEPS - step, dtype=torch.long)
    stored = {}
    handle = module.register_forward_hook(lambda m, i, o: stored.setdefault("out", o.detach()))
    with torch.no_grad():
        out_prev = loaded.forward(x_prev, diffusion.model_timesteps(previous), y)
    handle.remove()
    x = diffusion.ddim_step(out_prev, x_prev, previous, loaded.learn_sigma)
    t = diffusion.model_timesteps(previous - 1)
    with torch.no_grad():
        full = loaded.forward(x, t, y)
        handle = module.register_forward_hook(lambda m, i, o: stored["out"])
        reused = loaded.forward(x, t, y)
        handle.remove()
    return float((full - reused).double().pow(2).flatten(1).mean(1).mean())


def test_cost_map_is_the_brute_force_reuse_error_and_zero_for_a_constant_sublayer():
    loaded = constant_attention(loaded_tiny())
    states = TrajectoryStates(loaded, STEPS, 6, seed=0, batch_size=6)
    cost = reuse_cost_map(loaded, STEPS, states, batch_size=4)  # two batches (4 + 2) are averaged per sample
    assert cost.shape == (STEPS, 6)
    assert torch.isnan(cost[0::2]).all() and not torch.isnan(cost[1::2]).any()
    blocks = loaded.module.blocks
    for step in (1, 3, 5):
        assert cost[step, 2] == 0.0  # block 1's attention is constant: reusing it changes nothing, exactly
        for j, module in enumerate([m for b in blocks for m in (b.attn, b.mlp)]):
            # same float ops in a different order of batching: agreement to float64 rounding of a float32 MSE
            assert float(cost[step, j]) == pytest.approx(brute_force_cost(loaded, states, step, module), rel=1e-6)
        assert (cost[step, [0, 1, 3, 4, 5]] > 0).all()


def test_cost_in_context_of_an_all_computing_router_is_the_cost_alone_and_sums_exactly():
    loaded = constant_attention(loaded_tiny())
    states = TrajectoryStates(loaded, STEPS, 4, seed=0, batch_size=4)
    alone = reuse_cost_map(loaded, STEPS, states, batch_size=4)
    everything = torch.full((STEPS, 6), 50.0)  # β = 1 in float32: every other sub-layer computed
    context = reuse_cost_map(loaded, STEPS, states, batch_size=4, logits=everything)
    torch.testing.assert_close(context[1::2], alone[1::2], rtol=0, atol=0)
    nothing = torch.full((STEPS, 6), -50.0)  # β = 0: every other sub-layer reused
    reused = reuse_cost_map(loaded, STEPS, states, batch_size=4, logits=nothing)
    assert (reused[1::2, 2] == 0).all()  # the constant sub-layer costs nothing in any context
    assert not torch.allclose(reused[1::2], alone[1::2])  # reuse errors interact


def test_spearman_matches_scipy_with_ties_and_is_none_when_constant():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, 12).astype(float)  # many ties
        b = rng.normal(size=12)
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert average_ranks(np.array([5.0, 1.0, 5.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_ranking_report_per_cache_step():
    cost = torch.full((4, 4), float("nan"))
    cost[1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cost[3] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # β = sigmoid(logit) <= 0.1 iff logit <= -2.197
    logits = torch.tensor([[9.0] * 4, [-3.0, -2.0, 0.0, 5.0], [0.0] * 4, [-4.0, -3.0, -2.0, -1.0]])
    init = logits.clone()
    init[3] = torch.tensor([1.0, 2.0, 3.0, 4.0]).flip(0)
    rows = ranking_report(logits, cost, init, threshold=0.1)
    assert [r["step"] for r in rows] == [1, 3]
    assert rows[0]["spearman_cost"] == 1.0 and rows[0]["spearman_init"] == 1.0 and rows[0]["cached"] == 1
    assert rows[1]["spearman_cost"] == -1.0 and rows[1]["spearman_init"] == -1.0 and rows[1]["cached"] == 2
    with pytest.raises(ValueError, match="differ in shape"):
        ranking_report(logits[:, :2], cost)
