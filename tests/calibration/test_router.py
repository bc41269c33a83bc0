"""The L2C router and the blended forward: exact at β = 1 and β = 0, gradients only to the router."""

import numpy as np
import pytest
import torch

from ditcache.calibration.router import LOGIT_BOUND, Router, SubLayerBlend, sublayer_index
from ditcache.engine import CacheEngine
from ditcache.policies.rule import schedule_policy
from ditcache.policies.schedule import step_schedule
from ditcache.types import Branch, RunInfo, Site, StepInfo

from ..conftest import tiny_dit


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x0, x1, torch.full((batch,), 600), torch.full((batch,), 500), y


def blended(model, beta):
    x0, x1, t0, t1, y = inputs(model)
    with SubLayerBlend(model) as blend, torch.no_grad():
        with blend.recording():
            model(x0, t0, y)
        with blend.blending(beta):
            return model(x1, t1, y)


def test_beta_one_is_the_full_model():
    model = tiny_dit()
    _, x1, _, t1, y = inputs(model)
    with torch.no_grad():
        full = model(x1, t1, y)
    assert torch.equal(blended(model, torch.ones(2 * model.depth)), full)


def test_beta_zero_is_plain_reuse():
    model = tiny_dit()
    x0, x1, t0, t1, y = inputs(model)
    policy = schedule_policy(step_schedule(2, model.depth, [1], "reuse-all"))
    with CacheEngine(model, policy) as engine, torch.no_grad():
        engine.begin_run(RunInfo(num_steps=2, depth=0, num_tokens=0))
        engine.begin_step(StepInfo(0, 2))
        model(x0, t0, y)
        engine.begin_step(StepInfo(1, 2))
        reused = model(x1, t1, y)
    assert torch.equal(blended(model, torch.zeros(2 * model.depth)), reused)


def test_mixed_beta_is_the_convex_blend_of_each_sublayer():
    # with only block 0's MLP soft, the output follows a hand-written block stack
    model = tiny_dit(depth=2)
    beta = torch.tensor([1.0, 0.3, 1.0, 1.0])
    x0, x1, t0, t1, y = inputs(model)
    with torch.no_grad():
        stored = {}
        model.blocks[0].mlp.register_forward_hook(lambda m, i, o: stored.setdefault("m", o))
        model(x0, t0, y)
        model.blocks[0].mlp._forward_hooks.clear()
        from ditcache.models.dit import modulate

        h, c = model.embed(x1, t1, y)
        for index, block in enumerate(model.blocks):
            sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
            h = h + g1.unsqueeze(1) * block.attn(modulate(block.norm1(h), sh1, sc1))
            m = block.mlp(modulate(block.norm2(h), sh2, sc2))
            if index == 0:
                m = 0.3 * m + 0.7 * stored["m"]
            h = h + g2.unsqueeze(1) * m
        expected = model.unpatchify(model.final_layer(h, c))
    torch.testing.assert_close(blended(model, beta), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_router():
    model = tiny_dit().requires_grad_(False)
    router = Router(4, model.depth, torch.Generator().manual_seed(0))
    x0, x1, t0, t1, y = inputs(model)
    with SubLayerBlend(model) as blend:
        with blend.recording(), torch.no_grad():
            model(x0, t0, y)
        with blend.blending(router.beta(1)):
            out = model(x1, t1, y)
    out.square().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert router.logits[1].grad is not None and router.logits[1].grad.abs().sum() > 0
    assert all(router.logits[i].grad is None for i in (0, 2, 3))


def test_remove_restores_the_model_and_refuses_a_second_interception():
    model = tiny_dit()
    with CacheEngine(model):
        with pytest.raises(RuntimeError, match="already has an interception"):
            SubLayerBlend(model).install()
    blend = SubLayerBlend(model).install()
    assert "forward" in model.blocks[0].attn.__dict__
    with pytest.raises(RuntimeError, match="already has an interception"):
        SubLayerBlend(model).install()
    blend.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not hasattr(model, "_ditcache_blend")


def test_blend_errors():
    model = tiny_dit()
    with SubLayerBlend(model) as blend:
        with pytest.raises(ValueError, match="needs a cache"):
            with blend.blending(torch.ones(2 * model.depth)):
                pass
        with pytest.raises(ValueError, match=r"beta must have shape \(6,\)"):
            with blend.blending(torch.ones(4)):
                pass


def test_router_shapes_clamp_and_schedule():
    router = Router(6, 3, torch.Generator().manual_seed(0))
    assert router.stacked().shape == (6, 6)
    assert sublayer_index(Site(2, Branch.ATTN)) == 4 and sublayer_index(Site(2, Branch.MLP)) == 5
    router.load_logits(torch.linspace(-9, 9, 36).reshape(6, 6))
    router.clamp_(8.0)  # the ranked recipe's wider bound
    assert router.stacked().min() == -8.0 and router.stacked().max() == 8.0
    router.clamp_()
    assert router.stacked().min() == -LOGIT_BOUND and router.stacked().max() == LOGIT_BOUND
    logits = torch.full((6, 6), 5.0)
    logits[3, 1] = -5.0  # block 0's MLP at step 3
    schedule = Router.from_logits(logits).schedule(0.1)
    expected = np.zeros((6, 3, 2), dtype=bool)
    expected[3, 0, 1] = True
    assert np.array_equal(schedule.cached, expected)
    same = Router(6, 3, torch.Generator().manual_seed(0))
    assert torch.equal(Router(6, 3, torch.Generator().manual_seed(0)).stacked(), same.stacked())


def test_three_column_routers_index_attn_mlp_cross_per_block():
    assert [sublayer_index(Site(1, b), 3) for b in (Branch.ATTN, Branch.MLP, Branch.CROSS)] == [3, 4, 5]
    assert sublayer_index(Site(1, Branch.MLP)) == 3  # the two-column layout is unchanged
    with pytest.raises(ValueError, match="no logit"):
        sublayer_index(Site(0, Branch.CROSS))
    router = Router(4, 2, torch.Generator().manual_seed(0), columns=3)
    assert router.stacked().shape == (4, 6) and router.schedule(0.5).cached.shape == (4, 2, 3)
    assert torch.equal(Router.from_logits(router.stacked(), columns=3).stacked(), router.stacked())
    with pytest.raises(ValueError, match="3 \\* depth"):
        Router.from_logits(torch.zeros(4, 4), columns=3)
    with pytest.raises(ValueError, match="2 columns"):
        Router(4, 2, columns=4)


def test_the_blend_takes_three_columns_on_a_pixart_transformer():
    from ditcache.pipelines.toy import pixart_transformer

    model = pixart_transformer(depth=2)
    blend = SubLayerBlend(model)
    assert (blend.columns, blend.depth) == (3, 2)
    with pytest.raises(ValueError, match="shape \\(6,\\)"):
        with blend.blending(torch.ones(4)):
            pass
