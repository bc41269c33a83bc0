"""Router training on tiny models: the loss falls, λ pushes β down, resuming changes nothing."""

import pytest
import torch

from ditcache.calibration.artifact import load_artifact
from ditcache.calibration.router import Router, SubLayerBlend
from ditcache.calibration.train_router import (RANKED_L2, ImageStates, RouterConfig, RouterTrainer, TrajectoryStates,
                                               default_l1, mnist_states, recipe_config, router_loss)
from ditcache.models.loading import LoadedModel, fingerprint
from ditcache.sampling.loops import respaced_diffusion

from ..conftest import tiny_dit

STEPS = 6


def loaded_tiny(**kw) -> LoadedModel:
    m = tiny_dit(**kw)
    return LoadedModel(module=m, family="dit", name="tiny", image_size=m.input_size, latent_size=m.input_size,
                       in_channels=m.in_channels, num_classes=m.num_classes, null_class=m.num_classes,
                       learn_sigma=m.learn_sigma, guided_channels=None, vae=None, fingerprint=fingerprint(m))


def random_images(n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return ImageStates(torch.rand(n, 4, 8, 8, generator=g) * 2 - 1, torch.randint(0, 5, (n,), generator=g))


def config(**kw):
    base = dict(steps=STEPS, batch_size=4, lr=0.2, l1=0.0, iterations=12, checkpoint_every=100, data="images")
    return RouterConfig(**{**base, **kw})


def fixed_mse(trainer, seed=9):
    """The objective's MSE on a fixed batch, summed over the cache steps."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with trainer.blend:
        for step in trainer.cache_steps:
            x_prev, y = trainer.states.draw(step, 4, g, trainer.diffusion)
            out = router_loss(trainer.loaded.forward, trainer.blend, trainer.router, trainer.diffusion,
                              x_prev, y, step, True, 0.0)
            total += float(out["mse"].detach())
    return total


def test_training_reduces_the_loss(tmp_path):
    trainer = RouterTrainer(loaded_tiny(), config(), tmp_path, states=random_images())
    before = fixed_mse(trainer)
    trainer.train(progress=False)
    after = fixed_mse(trainer)
    assert after < 0.5 * before
    assert all(p.grad is None for p in trainer.loaded.module.parameters())


def test_l1_pushes_beta_down_only_at_cache_steps(tmp_path):
    trainer = RouterTrainer(loaded_tiny(), config(l1=10.0, iterations=10), tmp_path, states=random_images())
    start = trainer.router.stacked().clone()
    trainer.train(progress=False)
    end = trainer.router.stacked()
    trained = sorted({1, 3, 5} & {i for i in range(STEPS) if not torch.equal(start[i], end[i])})
    assert trained  # some cache step was drawn
    for i in trained:
        assert torch.sigmoid(end[i]).mean() < torch.sigmoid(start[i]).mean()
    for i in (0, 2, 4):  # never a cache step: never touched
        assert torch.equal(start[i], end[i])
    assert end.abs().max() <= 5.0


def test_resume_equals_an_uninterrupted_run(tmp_path):
    model = loaded_tiny()
    # AdamW (whose moments the checkpoint must carry) at a constant lr, which lets a resumed run raise its target
    whole = RouterTrainer(model, config(iterations=6, checkpoint_every=3, lr_final=1.0, optimizer="adamw"), tmp_path / "a",
                          states=random_images())
    whole.train(progress=False)
    first = RouterTrainer(model, config(iterations=3, checkpoint_every=3, lr_final=1.0, optimizer="adamw"), tmp_path / "b",
                          states=random_images())
    first.train(progress=False)
    resumed = RouterTrainer(model, config(iterations=6, checkpoint_every=3, lr_final=1.0, optimizer="adamw"), tmp_path / "b",
                            states=random_images())
    assert resumed.iteration == 3
    resumed.train(progress=False)
    assert torch.equal(whole.router.stacked(), resumed.router.stacked())
    assert torch.equal(whole.gen.get_state(), resumed.gen.get_state())
    for a, b in zip(whole.opt.state_dict()["state"].values(), resumed.opt.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    artifact = load_artifact(tmp_path / "b" / "router", "l2c-router")
    assert torch.equal(artifact.tensors["logits"], resumed.router.stacked())
    assert artifact.meta["iterations"] == 6 and artifact.meta["data"] == "images"
    assert (artifact.key.sampler, artifact.key.steps, artifact.key.cfg_scale) == ("ddim", STEPS, 1.5)
    assert artifact.key.model_fingerprint == model.fingerprint and artifact.key.resolution == 8
    lines = (tmp_path / "b" / "train_log.csv").read_text().splitlines()
    assert lines[0].startswith("iteration,") and [l.split(",")[0] for l in lines[1:]] == ["3", "6"]
    with pytest.raises(ValueError, match="another config"):
        RouterTrainer(model, config(iterations=6, lr=0.1, lr_final=1.0, optimizer="adamw"), tmp_path / "b", states=random_images())


def test_a_decaying_lr_resumes_exactly_but_refuses_a_new_iteration_target(tmp_path):
    model = loaded_tiny()
    whole = RouterTrainer(model, config(iterations=4, checkpoint_every=2), tmp_path / "a", states=random_images())
    whole.train(progress=False)
    part = RouterTrainer(model, config(iterations=4, checkpoint_every=2), tmp_path / "b", states=random_images())
    part.train_step(), part.train_step()
    part.save_checkpoint()
    resumed = RouterTrainer(model, config(iterations=4, checkpoint_every=2), tmp_path / "b", states=random_images())
    assert resumed.iteration == 2 and resumed.learning_rate() == pytest.approx(0.2 * (1 - 0.95 * 0.5))
    resumed.train(progress=False)
    assert torch.equal(whole.router.stacked(), resumed.router.stacked())
    with pytest.raises(ValueError, match="another config"):
        RouterTrainer(model, config(iterations=8, checkpoint_every=2), tmp_path / "b", states=random_images())


def test_loss_is_the_blend_mse_plus_l1_sum():
    model = loaded_tiny()
    router = Router(STEPS, 3, torch.Generator().manual_seed(1))
    diffusion = respaced_diffusion(STEPS)
    x_prev, y = random_images().draw(3, 4, torch.Generator().manual_seed(0), diffusion)
    with SubLayerBlend(model.module) as blend:
        out = router_loss(model.forward, blend, router, diffusion, x_prev, y, 3, True, 0.01)
    out = {k: float(v.detach()) for k, v in out.items()}
    assert out["loss"] == pytest.approx(out["mse"] + 0.01 * float(torch.sigmoid(router.logits[3].detach()).sum()))
    router.load_logits(torch.full((STEPS, 6), 1e4))  # β = 1 exactly: the blend is the full model
    with SubLayerBlend(model.module) as blend:
        assert float(router_loss(model.forward, blend, router, diffusion, x_prev, y, 3, True, 0.0)["mse"].detach()) == 0.0
        with pytest.raises(ValueError, match="not a cache step"):
            router_loss(model.forward, blend, router, diffusion, x_prev, y, 2, True, 0.0)


def test_image_states_are_noised_to_the_previous_step():
    states, diffusion = random_images(), respaced_diffusion(STEPS)
    x, y = states.draw(3, 4, torch.Generator().manual_seed(0), diffusion)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (4,), generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    acp = diffusion.alphas_cumprod[STEPS - 3]  # step 2 = respaced index 3
    expected = acp ** 0.5 * states.images[idx] + (1 - acp) ** 0.5 * noise
    torch.testing.assert_close(x, expected.float())
    assert torch.equal(y, states.labels[idx])


def test_trajectory_pool_holds_the_models_own_ddim_states():
    model = loaded_tiny()
    pool = TrajectoryStates(model, STEPS, count=3, seed=0, batch_size=2)
    assert pool.states.shape == (3, 3, 4, 8, 8)  # x before the cache steps 1, 3, 5: steps 0, 2, 4
    again = TrajectoryStates(model, STEPS, count=3, seed=0, batch_size=2)
    assert torch.equal(pool.states, again.states) and torch.equal(pool.labels, again.labels)
    rebatched = TrajectoryStates(model, STEPS, count=3, seed=0, batch_size=3)  # same up to float rounding
    torch.testing.assert_close(pool.states, rebatched.states, rtol=1e-4, atol=1e-4)
    diffusion = respaced_diffusion(STEPS)
    x, y = pool.states[:1, 0], pool.labels[:1]  # step 0: pure noise
    with torch.no_grad():
        for step in (0, 1):
            r = torch.tensor([STEPS - 1 - step])
            x = diffusion.ddim_step(model.forward(x, diffusion.model_timesteps(r), y), x, r, True)
    torch.testing.assert_close(x, pool.states[:1, 1], rtol=1e-5, atol=1e-4)  # the state at step 2 (batch 1 vs 2)
    other_rank = TrajectoryStates(model, STEPS, count=3, seed=0, rank=1)
    assert not torch.equal(other_rank.states, pool.states)


def test_config_errors_and_defaults(tmp_path):
    assert default_l1(20) == 5e-6 and default_l1(50) == 1e-6 and RouterConfig().lam == RANKED_L2
    paper = recipe_config("paper")
    assert paper.lam == 5e-6 and recipe_config("paper", steps=50).lam == 1e-6 and RouterConfig(l1=0.0).lam == 0.0
    assert (paper.penalty, paper.optimizer, paper.step_draw, paper.lr, paper.iterations) == ("l1", "adamw", "one", 1e-3,
                                                                                            20000)
    assert recipe_config("paper", lr=0.5, l1=None).lr == 0.5  # None keeps the recipe's value
    with pytest.raises(ValueError, match="unknown router recipe"):
        recipe_config("fast")
    for bad in (dict(steps=1), dict(data="latents"), dict(batch_size=0), dict(lr=0.0), dict(penalty="l3"),
                dict(step_draw="some"), dict(optimizer="sgd"), dict(lr_final=0.0), dict(logit_bound=0.0)):
        with pytest.raises(ValueError):
            RouterTrainer(loaded_tiny(), config(**bad), tmp_path, states=random_images())
    with pytest.raises(ValueError, match="--data trajectories"):
        mnist_states(loaded_tiny())


def test_images_mode_reads_mnist_for_a_28px_model():
    model = loaded_tiny(size=28, patch=7, channels=1, classes=10)
    states = mnist_states(model)
    assert states.images.shape == (10000, 1, 28, 28) and states.images.min() == -1 and states.images.max() == 1



def test_the_ranked_recipe_ranks_a_constant_sublayer_first_whatever_its_start(tmp_path):
    """Block 1's attention outputs a constant, so reusing it costs exactly 0: the router must learn that.

    Its initial logit is the largest at every step (the paper's recipe keeps such an initial order);
    after training it must be the smallest (at the lower bound), and the other logits must sit near
    their fixed point log(cost / λ) of the λ·Σβ² objective.
    """
    from ditcache.calibration.reuse_cost import ranking_report, reuse_cost_map

    from .test_reuse_cost import constant_attention

    loaded = constant_attention(loaded_tiny())
    pool = TrajectoryStates(loaded, STEPS, 32, seed=0, batch_size=32)
    cost = reuse_cost_map(loaded, STEPS, pool, 32)
    cfg = RouterConfig(steps=STEPS, batch_size=8, iterations=60, lr=0.5, l1=1e-6, data="trajectories",
                       checkpoint_every=1000)
    trainer = RouterTrainer(loaded, cfg, tmp_path, states=pool)
    init = torch.randn(STEPS, 6, generator=torch.Generator().manual_seed(5))
    init[:, 2] = 3.0  # the constant sub-layer starts as the one most worth computing
    trainer.router.load_logits(init)
    trainer.init_logits = init
    trainer.train(progress=False)
    logits = trainer.router.stacked()
    for step in (1, 3, 5):
        assert logits[step, 2] == -cfg.logit_bound
        assert (logits[step, [0, 1, 3, 4, 5]] > -cfg.logit_bound).all()
        # the fixed point log(c / λ) of the diagonal objective; 1.5 allows for the interactions between
        # sub-layers that the one-at-a-time cost leaves out and the last updates' ±lr·lr_final jitter
        expected = torch.log(cost[step, [0, 1, 3, 4, 5]] / cfg.l1).clamp(-cfg.logit_bound, cfg.logit_bound)
        assert (logits[step, [0, 1, 3, 4, 5]].double() - expected).abs().max() < 1.5
    rows = ranking_report(logits, cost, init)
    assert all(r["spearman_cost"] > 0.7 for r in rows[:2]) and all(r["spearman_init"] < 0 for r in rows)


def test_the_l2_penalty_is_the_sum_of_squared_betas():
    model = loaded_tiny()
    router = Router(STEPS, 3, torch.Generator().manual_seed(1))
    diffusion = respaced_diffusion(STEPS)
    x_prev, y = random_images().draw(3, 4, torch.Generator().manual_seed(0), diffusion)
    with SubLayerBlend(model.module) as blend:
        out = router_loss(model.forward, blend, router, diffusion, x_prev, y, 3, True, 0.01, penalty="l2")
        with pytest.raises(ValueError, match="unknown penalty"):
            router_loss(model.forward, blend, router, diffusion, x_prev, y, 3, True, 0.01, penalty="l0")
    beta = torch.sigmoid(router.logits[3].detach())
    out = {k: v.detach() for k, v in out.items()}
    assert float(out["penalty"]) == pytest.approx(float((beta ** 2).sum()))
    assert float(out["loss"]) == pytest.approx(float(out["mse"]) + 0.01 * float((beta ** 2).sum()))


def test_the_ranked_recipe_starts_every_logit_at_zero_and_the_paper_recipe_from_a_normal_draw(tmp_path):
    """A constant start has no ranking, so the ranking a ranked router ends with was learned."""
    ranked = RouterTrainer(loaded_tiny(), recipe_config("ranked", steps=STEPS, batch_size=4, iterations=0),
                           tmp_path / "r", states=random_images())
    assert ranked.config.init == "constant" and torch.equal(ranked.init_logits, torch.zeros(STEPS, 6))
    paper = RouterTrainer(loaded_tiny(), recipe_config("paper", steps=STEPS, batch_size=4, iterations=0),
                          tmp_path / "p", states=random_images())
    expected = Router(STEPS, 3, torch.Generator().manual_seed(0)).stacked()
    assert paper.config.init == "normal" and torch.equal(paper.init_logits, expected)
    assert ranked.artifact().meta["init"] == "constant"
    with pytest.raises(ValueError, match="unknown router init"):
        RouterConfig(init="uniform").validate(1)


def test_routers_from_different_random_starts_learn_the_same_ranking(tmp_path):
    """The seed-invariance check behind `calibrate reuse-cost --router A --router B`: two N(0, 1)
    starts that share no ranking end ranked alike, because the ranked recipe's fixed point log(c / λ)
    does not depend on the start."""
    from ditcache.calibration.reuse_cost import agreement_report

    loaded = loaded_tiny()
    pool = TrajectoryStates(loaded, STEPS, 32, seed=0, batch_size=32)
    routers = []
    for seed in (0, 1):
        cfg = RouterConfig(steps=STEPS, batch_size=8, iterations=60, lr=0.5, l1=1e-6, data="trajectories",
                           checkpoint_every=1000, init="normal", seed=seed)
        trainer = RouterTrainer(loaded, cfg, tmp_path / str(seed), states=pool)
        trainer.train(progress=False)
        routers.append((trainer.router.stacked(), trainer.init_logits))
    rows = agreement_report(routers[0][0], routers[1][0], routers[0][1], routers[1][1])
    # 6 sub-layers per step; at step 5 the two starts rank them in exactly opposite orders
    assert all(r["spearman"] > 0.8 for r in rows) and min(r["spearman_init"] for r in rows) < 0
