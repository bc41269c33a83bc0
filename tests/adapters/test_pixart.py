"""The PixArt adapter: cross-attention as a site of its own, MACs that match what torch counts, and
token-wise work on cross-attention."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditcache.adapters import PIXART, adapter_for
from ditcache.engine import CacheEngine
from ditcache.pipelines.toy import pixart_transformer
from ditcache.policies import Policy, Schedule, make_policy
from ditcache.policies.rule import schedule_policy
from ditcache.types import COMPUTE, REUSE, WITH_CROSS, Action, Branch, RunInfo, Site, StepInfo

TEXT = 5


def call(model, x, t, text):
    return model(x, encoder_hidden_states=text, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, TEXT, 32, generator=g)  # latent, caption


def test_pixart_is_found_with_three_sites_per_block_in_call_order():
    model = pixart_transformer(depth=3)
    assert adapter_for(model) is PIXART
    assert PIXART.branches(model) == WITH_CROSS
    sites = list(PIXART.site_modules(model))
    assert sites[:3] == [Site(0, Branch.ATTN), Site(0, Branch.CROSS), Site(0, Branch.MLP)]
    assert len(sites) == 9 and PIXART.site_modules(model)[Site(2, Branch.CROSS)] is model.transformer_blocks[2].attn2


def test_site_macs_equal_the_flops_torch_counts():
    model = pixart_transformer(depth=2, hidden=32, heads=2)
    x, text = inputs(batch=3)
    dims = PIXART.dims(model)
    dims = type(dims)(**{**dims.__dict__, "text_tokens": TEXT})
    # the math kernel runs attention as matmuls, which the counter sees (the fused CPU kernel it does not)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        call(model, x, torch.full((3,), 500), text)
    per_module = counter.get_flop_counts()
    block = "PixArtTransformer2DModel.transformer_blocks.0"
    macs = {name: sum(per_module[f"{block}.{name}"].values()) // 2 for name in ("attn1", "attn2", "ff")}
    assert macs["attn1"] == 3 * dims.attn_macs()
    assert macs["attn2"] == 3 * dims.cross_macs()
    assert macs["ff"] == 3 * dims.mlp_macs()


class CrossPartial(Policy):
    """Step 1 recomputes the given cross-attention tokens; everything else computes."""

    def __init__(self, tokens):
        self.tokens = tokens

    def action(self, step, site):
        if step.index == 1 and site.branch is Branch.CROSS:
            return REUSE if self.tokens is None else Action.partial(self.tokens)
        return COMPUTE

    def may_reuse(self, site):
        return site.branch is Branch.CROSS


def two_steps(model, engine=None):
    x, text = inputs()
    if engine is not None:
        engine.begin_run(RunInfo(num_steps=2, depth=0, num_tokens=0))
    outs = []
    with torch.no_grad():
        for i in range(2):
            if engine is not None:
                engine.begin_step(StepInfo(i, 2, 900 - 400 * i))
            outs.append(call(model, x, torch.full((2,), 900 - 400 * i), text))
            x = x - 0.1 * outs[-1][:, :4]
    return outs


def test_partial_cross_attention_with_every_token_equals_compute_and_with_none_equals_reuse():
    model = pixart_transformer(depth=2)
    bare = two_steps(model)
    every = torch.arange(16).expand(2, 16)  # (B, N): all 16 tokens
    with CacheEngine(model, CrossPartial(every)) as engine:
        assert torch.allclose(two_steps(model, engine)[1], bare[1], atol=1e-6)  # gather/scatter reorders no sums
        assert engine.report()["compute_fraction"] == 1.0
    with CacheEngine(model, CrossPartial(None)) as engine:
        reused = two_steps(model, engine)[1]
    with CacheEngine(model, CrossPartial(torch.zeros(2, 0, dtype=torch.long))) as engine:
        assert torch.equal(two_steps(model, engine)[1], reused)
    assert not torch.equal(reused, bare[1])


def test_a_schedule_without_a_cross_column_is_refused_on_pixart():
    model = pixart_transformer(depth=2)
    two_columns = Schedule(np.zeros((2, 2, 2), dtype=bool), "dit-made")
    with CacheEngine(model, schedule_policy(two_columns)) as engine:
        with pytest.raises(ValueError, match="columns attn/mlp, but this model's blocks have attn/mlp/cross"):
            two_steps(model, engine)
    with CacheEngine(model, make_policy("rule", steps=(1,))) as engine:
        two_steps(model, engine)
        assert engine.policy.schedule().cached.shape == (2, 2, 3)
        assert engine.report()["per_step_compute_fraction"] == [1.0, 0.0]


def test_schedule_files_keep_the_cross_column(tmp_path):
    cached = np.zeros((3, 2, 3), dtype=bool)
    cached[1, 0, 2] = cached[2, 1] = True
    Schedule(cached, "x").save(tmp_path / "x.json")
    again = Schedule.load(tmp_path / "x.json")
    assert np.array_equal(again.cached, cached) and again.branches == WITH_CROSS
    assert again.to_text().splitlines()[3:] == ["   1  +.", "   2  .#"]


def test_an_unknown_model_names_its_block_classes():
    class Block(nn.Module):
        pass

    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match=r"Mystery \(block lists found: layers: Block\).*register_adapter"):
        adapter_for(Mystery())
