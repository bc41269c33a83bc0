"""ditcache.enable on real diffusers pipelines (tiny, random weights, built here): exactness, the steps
the engine sees under each scheduler, and clean enable / disable / consecutive calls."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

import ditcache
from ditcache.pipelines.toy import dit_pipeline, pixart_pipeline
from ditcache.policies.base import Policy
from ditcache.types import COMPUTE, Branch

PROMPTS = ["a photo of a cat", "a red car on the beach"]


def run_dit(pipe, steps=5, labels=(1, 7), scale=1.5, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=scale, generator=g,
                output_type="np", **kw).images  # (B, H, W, 3)


def run_pixart(pipe, steps=4, prompts=PROMPTS, per_prompt=1, scale=4.5, **kw):
    g = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=scale, generator=g, height=16, width=16,
                num_images_per_prompt=per_prompt, use_resolution_binning=False, clean_caption=False,
                output_type="np", **kw).images


@pytest.fixture(scope="module")
def dit_pipe():
    pipe = dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart_pipe():
    return pixart_pipeline()


class Recorder(Policy):
    """Computes everything and records the (step index, timestep, site) the engine asks about."""

    name = "recorder"

    def __init__(self):
        self.calls = []
        self.runs = []

    def reset(self, run):
        super().reset(run)
        self.runs.append(run)

    def action(self, step, site):
        self.calls.append((step.index, step.num_steps, step.timestep, site))
        return COMPUTE


def test_caching_off_equals_the_pipeline_bit_for_bit(dit_pipe, pixart_pipe):
    bare_dit, bare_pixart = run_dit(dit_pipe), run_pixart(pixart_pipe, per_prompt=2)
    with ditcache.enable(dit_pipe, "none"):
        cached_dit = run_dit(dit_pipe)
    with ditcache.enable(pixart_pipe, "none"):
        cached_pixart = run_pixart(pixart_pipe, per_prompt=2)
    assert np.array_equal(bare_dit, cached_dit)
    assert np.array_equal(bare_pixart, cached_pixart)


def check_steps_seen(recorder, scheduler, steps, branches):
    expected = [t.item() for t in scheduler.timesteps]  # the schedule the loop really stepped through
    assert len(expected) == steps
    per_step = 2 * len(branches)  # 2 blocks
    assert [c[0] for c in recorder.calls] == [i for i in range(steps) for _ in range(per_step)]
    assert {c[1] for c in recorder.calls} == {steps}
    assert [recorder.calls[i * per_step][2] for i in range(steps)] == pytest.approx(expected)
    assert recorder.runs[-1].timesteps == pytest.approx(expected)
    assert {c[3].branch for c in recorder.calls} == set(branches)


@pytest.mark.parametrize("make", [
    lambda: DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False),
    lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
], ids=["ddim", "dpm++"])
def test_the_engine_sees_the_pipelines_own_scheduler_steps(pixart_pipe, make):
    scheduler = make()
    original = pixart_pipe.scheduler
    pixart_pipe.scheduler = scheduler  # swapped after nothing was enabled: the call's scheduler counts
    recorder = Recorder()
    try:
        with ditcache.enable(pixart_pipe, recorder) as handle:
            run_pixart(pixart_pipe, steps=6)
    finally:
        pixart_pipe.scheduler = original
    check_steps_seen(recorder, scheduler, 6, (Branch.ATTN, Branch.MLP, Branch.CROSS))
    assert handle.report()["scheduler"].startswith(type(scheduler).__name__)
    assert handle.report()["cfg_scale"] == 4.5


def test_flow_matching_euler_in_a_users_loop(pixart_pipe):
    # PixArt-alpha's pipeline is written for DDPM-family schedulers (it reads init_noise_sigma), so the
    # flow-matching Euler scheduler is driven here by the user's own loop on the same transformer
    transformer = pixart_pipe.transformer
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))  # (B, T, D) caption features
    recorder = Recorder()
    with ditcache.enable(transformer, recorder, scheduler=scheduler, guidance_scale=1.0):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        scheduler.set_timesteps(7)
        for t in scheduler.timesteps:
            out = transformer(x, encoder_hidden_states=text, timestep=t.expand(2),
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            x = scheduler.step(out[:, :4], t, x).prev_sample
    check_steps_seen(recorder, scheduler, 7, (Branch.ATTN, Branch.MLP, Branch.CROSS))
    assert not float(scheduler.timesteps[1]).is_integer()  # sigma * 1000: float timesteps, kept as such


def reference_with_hooks(pipe, cached_steps, run):
    """An independent reference: forward hooks replace every sub-layer's output by the one stored at
    the last computed step, on the steps listed; the step comes from the pipeline's callback (PixArt)
    or is counted per transformer call (DiT)."""
    blocks = pipe.transformer.transformer_blocks
    modules = [m for b in blocks for m in (b.attn1, b.ff, getattr(b, "attn2", None)) if m is not None]
    store, state = {}, {"step": 0}

    def hook(module, args, output):
        if state["step"] in cached_steps:
            return store[module]
        store[module] = output
        return output

    def count(module, args, output):
        state["step"] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    handles.append(pipe.transformer.register_forward_hook(count))
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


def test_fora_and_rule_equal_an_independent_reference(dit_pipe, pixart_pipe):
    # FORA N=2 at 5 steps: respaced index r = 4..0, full iff first step or r even -> steps 1 and 3 reuse
    ref = reference_with_hooks(dit_pipe, {1, 3}, lambda: run_dit(dit_pipe))
    with ditcache.enable(dit_pipe, "fora:interval=2") as handle:
        out = run_dit(dit_pipe)
    assert np.array_equal(out, ref)
    assert handle.report()["per_step_compute_fraction"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    # RM-50 at 6 steps reuses the odd steps; two prompts, two images each (batch 4, 8 with guidance)
    ref = reference_with_hooks(pixart_pipe, {1, 3, 5}, lambda: run_pixart(pixart_pipe, steps=6, per_prompt=2))
    with ditcache.enable(pixart_pipe, "rule:preset=rm-50") as handle:
        out = run_pixart(pixart_pipe, steps=6, per_prompt=2)
    assert np.array_equal(out, ref)
    assert not np.array_equal(out, run_pixart(pixart_pipe, steps=6, per_prompt=2))  # caching changed something
    assert handle.report()["compute_fraction"] == 0.5


def test_consecutive_calls_with_other_step_counts_do_not_leak(pixart_pipe):
    with ditcache.enable(pixart_pipe, "fora:interval=2") as handle:
        run_pixart(pixart_pipe, steps=4)
        second = run_pixart(pixart_pipe, steps=7)
        assert [r["steps"] for r in handle.reports] == [4, 7]
    with ditcache.enable(pixart_pipe, "fora:interval=2"):
        fresh = run_pixart(pixart_pipe, steps=7)
    assert np.array_equal(second, fresh)


def test_a_call_that_fails_midway_leaves_nothing_behind(pixart_pipe):
    def stop(i, t, latents):  # PixArt-alpha's step callback
        if i == 2:
            raise KeyboardInterrupt

    with ditcache.enable(pixart_pipe, "fora:interval=3") as handle:
        with pytest.raises(KeyboardInterrupt):
            run_pixart(pixart_pipe, steps=6, callback=stop)
        assert not handle.engine.store and not handle.reports
        after = run_pixart(pixart_pipe, steps=6)
    with ditcache.enable(pixart_pipe, "fora:interval=3"):
        assert np.array_equal(after, run_pixart(pixart_pipe, steps=6))


def test_disable_restores_the_pipeline_exactly_and_re_enable_works(pixart_pipe):
    cls, transformer, scheduler = type(pixart_pipe), pixart_pipe.transformer, pixart_pipe.scheduler
    bare = run_pixart(pixart_pipe)
    handle = ditcache.enable(pixart_pipe, "rule:preset=rm-50")
    assert type(pixart_pipe) is not cls and type(pixart_pipe).__name__ == cls.__name__
    first = run_pixart(pixart_pipe)
    handle.disable()
    assert type(pixart_pipe) is cls
    assert "forward" not in transformer.__dict__
    assert not any("forward" in m.__dict__ for m in transformer.modules())
    assert "step" not in scheduler.__dict__ and "set_timesteps" not in scheduler.__dict__
    assert "_ditcache_handle" not in pixart_pipe.__dict__
    assert np.array_equal(run_pixart(pixart_pipe), bare)
    with ditcache.enable(pixart_pipe, "rule:preset=rm-50"):
        assert np.array_equal(run_pixart(pixart_pipe), first)


def test_one_handle_at_a_time(pixart_pipe):
    with ditcache.enable(pixart_pipe, "none"):
        with pytest.raises(RuntimeError, match="already"):
            ditcache.enable(pixart_pipe, "none")


def test_a_bare_transformer_in_the_users_own_loop(dit_pipe):
    transformer = dit_pipe.transformer
    with pytest.raises(ValueError, match="scheduler="):
        ditcache.enable(transformer, "fora:interval=2")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)

    def loop():
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        scheduler.set_timesteps(5)
        for t in scheduler.timesteps:
            eps = transformer(x, timestep=t.expand(2), class_labels=torch.tensor([1, 2])).sample[:, :4]
            x = scheduler.step(eps, t, x).prev_sample
        return x

    ref = reference_with_hooks(dit_pipe, {1, 3}, loop)
    with ditcache.enable(transformer, "fora:interval=2", scheduler=scheduler, guidance_scale=1.0) as handle:
        out = loop()
    assert torch.equal(out, ref)
    assert handle.report()["steps"] == 5 and handle.report()["cfg_scale"] == 1.0


def test_two_transformer_calls_in_one_step_are_refused(dit_pipe):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    transformer = dit_pipe.transformer
    with ditcache.enable(transformer, "fora:interval=2", scheduler=scheduler):
        scheduler.set_timesteps(4)
        x, t = torch.randn(1, 4, 8, 8), scheduler.timesteps[0]
        transformer(x, timestep=t.expand(1), class_labels=torch.tensor([1]))
        with pytest.raises(RuntimeError, match="twice in step 0"):
            transformer(x, timestep=t.expand(1), class_labels=torch.tensor([0]))


def test_options_and_objects_are_both_accepted(dit_pipe):
    with ditcache.enable(dit_pipe, "rule:preset=rm-50", correctors=["goc:w=1.2"]) as handle:
        run_dit(dit_pipe)
    report = handle.report()
    assert report["policy"]["name"] == "rule" and report["correctors"][0]["name"] == "goc"
    assert report["compute_fraction"] == pytest.approx(3 / 5)  # steps 1, 3 of 0..4 reused


def test_a_non_finite_output_stops_the_call_naming_the_step(dit_pipe):
    block = dit_pipe.transformer.transformer_blocks[1]
    saved = block.ff.net[2].bias.detach().clone()
    with torch.no_grad():
        block.ff.net[2].bias.fill_(float("nan"))
    try:
        with ditcache.enable(dit_pipe, "fora:interval=2"):
            with pytest.raises(ValueError, match="sampling step 0 .*the model output is non-finite"):
                run_dit(dit_pipe)
    finally:
        with torch.no_grad():
            block.ff.net[2].bias.copy_(saved)
