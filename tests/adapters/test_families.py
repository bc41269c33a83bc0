"""The diffusers adapter: the engine works on DiTTransformer2DModel exactly as on our DiT."""

import torch

from ditcache.adapters import DIFFUSERS_DIT, DIT, adapter_for
from ditcache.engine import CacheEngine
from ditcache.models.diffusers_format import dit_to_diffusers
from ditcache.policies import make_policy
from ditcache.types import RunInfo, StepInfo

from ..conftest import tiny_dit
from ..engine.test_engine import STEPS


def run(call, model, engine=None, steps=STEPS):
    """The engine test's sampling-like loop, for any model call convention."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.randint(0, 5, (2,), generator=g)
    if engine is not None:
        engine.begin_run(RunInfo(num_steps=steps, depth=0, num_tokens=0))
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 999 - 150 * i)
            if engine is not None:
                engine.begin_step(StepInfo(i, steps, int(t[0])))
            out = call(x, t, y)
            outs.append(out)
            x = x - 0.1 * out[:, :4]
    return outs


def test_adapters_are_found_by_structure():
    ours = tiny_dit()
    theirs = dit_to_diffusers(ours)
    assert adapter_for(ours) is DIT and adapter_for(theirs) is DIFFUSERS_DIT
    a, b = DIT.dims(ours), DIFFUSERS_DIT.dims(theirs)
    assert (a.depth, a.hidden, a.mlp_hidden, a.num_tokens) == (b.depth, b.hidden, b.mlp_hidden, b.num_tokens)
    assert a.attn_macs() == b.attn_macs() and a.mlp_macs() == b.mlp_macs()
    # diffusers embeds t and y in every block and again for the final layer: more fixed MACs
    assert b.forward_macs - a.forward_macs == a.depth * a.embed_macs


def test_none_on_diffusers_is_bit_for_bit_and_fora_matches_our_dit():
    ours = tiny_dit()
    theirs = dit_to_diffusers(ours).eval()
    call_theirs = lambda x, t, y: theirs(x, timestep=t, class_labels=y).sample
    bare = run(call_theirs, theirs)
    with CacheEngine(theirs, make_policy("none")) as engine:
        for a, b in zip(bare, run(call_theirs, theirs, engine)):
            assert torch.equal(a, b)
    with CacheEngine(theirs, make_policy("fora", interval=2)) as engine:
        fora_theirs = run(call_theirs, theirs, engine)
        report_theirs = engine.report()
    with CacheEngine(ours, make_policy("fora", interval=2)) as engine:
        fora_ours = run(ours, ours, engine)
        report_ours = engine.report()
    assert report_theirs["per_step_compute_fraction"] == report_ours["per_step_compute_fraction"]
    for a, b in zip(fora_theirs, fora_ours):
        # same weights, different kernels (separate q/k/v projections, attention processor):
        # float32 rounding only, compounded over 6 steps
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(fora_ours[-1], run(ours, ours)[-1])  # caching did change the result
