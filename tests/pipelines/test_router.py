"""L2C inside diffusers pipelines (tiny, random weights, built here): router training on the pipeline's
own call and scheduler, three-column PixArt routers, exactness where the maths says so, and keys."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import ditcache
from ditcache.calibration.artifact import Artifact, load_artifact, save_artifact
from ditcache.calibration.train_router import recipe_config
from ditcache.pipelines.calibration import pipeline_key
from ditcache.pipelines.router import PipelineRouterTrainer
from ditcache.pipelines.sampling import PipelineJob, sample_batch
from ditcache.pipelines.toy import dit_pipeline, pixart_pipeline
from ditcache.types import WITH_CROSS

PROMPTS = ("a photo of a cat", "a red car on the beach")
STEPS, SCALE = 4, 4.5
JOB = PipelineJob(prompts=PROMPTS, height=16, width=16, steps=STEPS, guidance_scale=SCALE, num_samples=2,
                  batch_size=2)


@pytest.fixture(scope="module")
def pipe():
    return pixart_pipeline()


def trainer(pipe, out, job=JOB, **overrides):
    config = recipe_config("ranked", **{"steps": STEPS, "cfg_scale": SCALE, "data": "trajectories", "batch_size": 2,
                                        "iterations": 2, **overrides})
    return PipelineRouterTrainer(pipe, job, config, out)


def call(pipe, steps=STEPS, scale=SCALE, height=16):
    g = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(list(PROMPTS), num_inference_steps=steps, guidance_scale=scale, generator=g, height=height,
                width=height, use_resolution_binning=False, clean_caption=False, output_type="latent").images


def hand_router(pipe, path, logits, branches=("attn", "mlp", "cross")):
    """An l2c-router artifact with the given logits (steps, columns * depth), keyed for JOB's runs."""
    return save_artifact(Artifact("l2c-router", pipeline_key(pipe, JOB), {"logits": logits},
                                  {"branches": list(branches)}), path)


def test_a_pixart_router_has_three_columns_and_caches_exactly_the_sites_below_theta(pipe, tmp_path):
    trained = trainer(pipe, tmp_path / "run", init="normal")  # 2 updates from 0 could leave every logit equal
    trained.train(progress=False)
    artifact = load_artifact(tmp_path / "run" / "router", "l2c-router")
    logits = artifact.tensors["logits"]  # (steps, 3 * depth)
    assert logits.shape == (STEPS, 3 * 2) and artifact.meta["branches"] == ["attn", "mlp", "cross"]
    assert artifact.meta["prompts"] == list(PROMPTS) and artifact.meta["trajectories"] == 4
    assert not torch.equal(logits, artifact.tensors["init_logits"])  # it learned something
    beta = torch.sigmoid(logits[1::2])  # the cache steps' β
    theta = float(beta.median())  # some sites on each side
    expected = np.zeros((STEPS, 2, 3), dtype=bool)
    for step in (1, 3):
        for block in range(2):
            for column, _ in enumerate(WITH_CROSS):
                expected[step, block, column] = float(torch.sigmoid(logits[step, 3 * block + column])) <= theta
    assert 0 < expected.sum() < 12
    with ditcache.enable(pipe, f"l2c:router={tmp_path / 'run' / 'router'},threshold={theta!r}") as handle:
        call(pipe)
    schedule = handle.engine.policy.schedule()
    assert schedule.cached.shape == (STEPS, 2, 3) and np.array_equal(schedule.cached, expected)
    report = handle.report()
    assert report["compute_fraction"] == pytest.approx(1 - expected.mean())
    assert report["per_step_compute_fraction"] == pytest.approx(list(1 - expected.mean(axis=(1, 2))))


def test_training_follows_the_pipelines_uncached_trajectory_on_a_copy_of_its_scheduler(pipe, tmp_path):
    seen = []

    def spy(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    call(pipe, steps=6)  # the user's scheduler now holds a 6-step run
    scheduler = pipe.scheduler
    before = (scheduler.num_inference_steps, scheduler.timesteps.clone(), scheduler.step_index)
    hook = pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        run = trainer(pipe, tmp_path / "run")
        run.local_step()  # samples 0 and 1, trained at cache steps 1 and 3
        assert pipe.scheduler is scheduler  # stepped was a copy: the user's is as it was
        assert (scheduler.num_inference_steps, scheduler.step_index) == (before[0], before[2])
        assert torch.equal(scheduler.timesteps, before[1])
        trained, seen[:] = list(seen), []
        sample_batch(pipe, JOB, [0, 1], decode=False)  # the same samples, uncached
    finally:
        hook.remove()
    assert len(trained) == STEPS and len(seen) == STEPS  # training stops after its last cache step
    for a, b in zip(trained, seen):
        assert torch.equal(a, b)  # (2B, C, H, W): the same guided states, step after step


def test_the_loss_is_zero_where_every_beta_is_one(pipe, tmp_path):
    run = trainer(pipe, tmp_path / "run")
    run.router.load_logits(torch.full((STEPS, 6), 50.0))  # β = sigmoid(50) = 1 in float32: the fresh output
    stats = run.local_step()
    assert stats["mse"] == 0.0 and stats["penalty"] == pytest.approx(6.0)
    run.router.load_logits(torch.full((STEPS, 6), -50.0))  # β ~ 0: everything reused, a real error
    assert run.local_step()["mse"] > 0


def test_a_router_with_every_logit_high_equals_the_uncached_pipeline_and_low_equals_the_rule(pipe, tmp_path):
    uncached = call(pipe)
    high = hand_router(pipe, tmp_path / "high", torch.full((STEPS, 6), 10.0))
    with ditcache.enable(pipe, f"l2c:router={high}") as handle:
        cached = call(pipe)
    assert handle.report()["compute_fraction"] == 1.0 and torch.equal(cached, uncached)
    low = hand_router(pipe, tmp_path / "low", torch.full((STEPS, 6), -10.0))
    with ditcache.enable(pipe, f"l2c:router={low}") as handle:
        everything = call(pipe)
    with ditcache.enable(pipe, "rule:steps=1/3"):
        rule = call(pipe)
    assert handle.report()["compute_fraction"] == 0.5 and torch.equal(everything, rule)


def test_a_router_is_refused_for_another_scheduler_step_count_guidance_or_layout(pipe, tmp_path):
    router = hand_router(pipe, tmp_path / "r", torch.zeros(STEPS, 6))
    spec = f"l2c:router={router}"
    for kwargs, field in (({"steps": 6}, "steps"), ({"scale": 2.0}, "cfg_scale"), ({"height": 32}, "resolution")):
        with ditcache.enable(pipe, spec), pytest.raises(ValueError, match=field):
            call(pipe, **kwargs)
    user = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(user.config)
    try:
        with ditcache.enable(pipe, spec), pytest.raises(ValueError, match="sampler"):
            call(pipe)
    finally:
        pipe.scheduler = user
    two = hand_router(pipe, tmp_path / "two", torch.zeros(STEPS, 4), branches=("attn", "mlp"))
    with ditcache.enable(pipe, f"l2c:router={two}"), pytest.raises(ValueError, match="columns attn/mlp"):
        call(pipe)


def test_a_class_conditional_pipeline_gets_a_two_column_router(tmp_path):
    dit = dit_pipeline(scheduler=None)
    dit.set_progress_bar_config(disable=True)
    job = PipelineJob(labels=(1, 7), steps=STEPS, guidance_scale=1.5)
    run = trainer(dit, tmp_path / "run", job=job, cfg_scale=1.5, iterations=1)
    artifact = run.train(progress=False)
    assert artifact.tensors["logits"].shape == (STEPS, 4) and artifact.meta["branches"] == ["attn", "mlp"]
    assert artifact.key.sampler.startswith("DDIMScheduler") and artifact.meta["labels"] == [1, 7]
    with ditcache.enable(dit, f"l2c:router={tmp_path / 'run' / 'router'}") as handle:
        dit(class_labels=[1, 7], num_inference_steps=STEPS, guidance_scale=1.5, output_type="latent")
    assert handle.report()["steps"] == STEPS


def test_pipeline_training_refuses_images_and_resumes_from_its_checkpoint(pipe, tmp_path):
    with pytest.raises(ValueError, match="trajectories"):
        trainer(pipe, tmp_path / "x", data="images")
    first = trainer(pipe, tmp_path / "run", iterations=1, lr_final=1.0)
    first.train(progress=False)
    resumed = trainer(pipe, tmp_path / "run", iterations=2, lr_final=1.0)
    assert resumed.iteration == 1 and torch.equal(resumed.router.stacked(), first.router.stacked())
    resumed.train(progress=False)
    straight = trainer(pipe, tmp_path / "straight", iterations=2, lr_final=1.0)
    straight.train(progress=False)
    assert torch.equal(resumed.router.stacked(), straight.router.stacked())
    with pytest.raises(ValueError, match="made by"):
        trainer(pipe, tmp_path / "run", job=PipelineJob(prompts=("a dog",), height=16, width=16), iterations=2,
                lr_final=1.0)


def test_one_drawn_step_trains_only_its_logits_and_stops_the_call_there(pipe, tmp_path):
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(None))
    try:
        run = trainer(pipe, tmp_path / "run", step_draw="one", seed=3)
        run.opt.zero_grad(set_to_none=True)
        stats = run.local_step()
    finally:
        hook.remove()
    step = stats["step"]
    assert step in (1, 3) and len(calls) == step + 1  # the pipeline's evaluations up to the drawn step
    assert [s for s, p in enumerate(run.router.logits) if p.grad is not None] == [step]
