"""Schedule, respacing, posterior and loss maths of ditcache.sampling.diffusion."""

import math

import numpy as np
import pytest
import torch

from ditcache.sampling.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, linear_betas,
                                         normal_kl, space_timesteps)

STEPS_20 = [0, 53, 105, 158, 210, 263, 315, 368, 421, 473, 526, 578, 631, 684, 736, 789, 841, 894, 946, 999]
BASE_ACP = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # written out independently


def test_linear_betas_endpoints_and_rescaling():
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    short = linear_betas(250)  # scale 4: 4e-4 .. 0.08
    assert math.isclose(short[0], 4e-4) and math.isclose(short[-1], 0.08)


def test_twenty_steps_are_the_official_list():
    assert space_timesteps(1000, "20") == STEPS_20
    assert space_timesteps(1000, [20]) == STEPS_20


@pytest.mark.parametrize("count", [10, 50, 100, 250])
def test_common_counts_follow_the_rounded_stride(count):
    expected = sorted({round(i * 999 / (count - 1)) for i in range(count)})
    assert space_timesteps(1000, str(count)) == expected
    assert len(expected) == count


def test_stride_is_accumulated_like_the_official_code():
    # 999/20 * 10 is exactly 499.5 (round-half-even: 500), but ten additions give 499.4999... -> 499.
    assert space_timesteps(1000, "21")[10] == 499


def test_ddim_striding_and_sections():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")
    half = [round(k * 499 / 9) for k in range(10)]
    assert space_timesteps(1000, "10,10") == half + [500 + s for s in half]
    # 10 steps in 3 sections: sizes 4, 3, 3; the first section keeps 0, round(1.5) = 2, 3.
    assert space_timesteps(10, "3,3,3") == [0, 2, 3, 4, 5, 6, 7, 8, 9]


def test_respacing_rejects_bad_requests():
    with pytest.raises(ValueError):
        space_timesteps(1000, "twenty")
    with pytest.raises(ValueError):
        space_timesteps(100, "60,60")
    with pytest.raises(ValueError):
        GaussianDiffusion(linear_betas(), [0, 1000])


@pytest.mark.parametrize("respacing", ["20", "50", "ddim25", "10,10"])
def test_respaced_process_matches_base_at_kept_timesteps(respacing):
    kept = space_timesteps(1000, respacing)
    diffusion = GaussianDiffusion(linear_betas(), kept)
    assert diffusion.timestep_map.tolist() == kept
    # Betas are recomputed and alphas_cumprod re-multiplied (as the official code does), so float64
    # agrees to a few ulps and the float32 values the sampler uses agree exactly.
    np.testing.assert_allclose(diffusion.alphas_cumprod, BASE_ACP[kept], rtol=1e-14, atol=0)
    assert np.array_equal(diffusion.alphas_cumprod.astype(np.float32), BASE_ACP[kept].astype(np.float32))
    previous = np.append(1.0, BASE_ACP[kept][:-1])
    np.testing.assert_allclose(diffusion.betas, 1.0 - BASE_ACP[kept] / previous, rtol=1e-12)


def test_posterior_quantities():
    diffusion = GaussianDiffusion(linear_betas(), STEPS_20)
    acp, prev, betas = diffusion.alphas_cumprod, diffusion.alphas_cumprod_prev, diffusion.betas
    assert prev[0] == 1.0 and diffusion.posterior_variance[0] == 0.0
    # Posterior precision is the sum of the two Gaussian precisions.
    precision = (1.0 - betas[1:]) / betas[1:] + 1.0 / (1.0 - prev[1:])
    np.testing.assert_allclose(diffusion.posterior_variance[1:], 1.0 / precision, rtol=1e-12)
    logs = diffusion.posterior_log_variance_clipped
    assert logs[0] == logs[1] and np.allclose(logs[1:], np.log(diffusion.posterior_variance[1:]))
    np.testing.assert_allclose(diffusion.posterior_mean_coef1, betas * np.sqrt(prev) / (1 - acp), rtol=1e-12)


def test_values_are_cast_to_the_input_dtype():
    diffusion = GaussianDiffusion(linear_betas(), STEPS_20)
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([19, 3])
    out = diffusion.q_sample(x0, t, noise)
    assert out.dtype == torch.float32
    acp = BASE_ACP[[999, 158]]  # float64 maths, then one cast to float32, like the official extraction
    root = torch.from_numpy(np.sqrt(acp)).float().view(2, 1, 1, 1)
    root_rest = torch.from_numpy(np.sqrt(1 - acp)).float().view(2, 1, 1, 1)
    assert torch.equal(out, root * x0 + root_rest * noise)
    assert torch.allclose(diffusion.predict_xstart_from_eps(out, t, noise), x0, atol=1e-4)


def test_learned_range_variance_by_hand():
    diffusion = GaussianDiffusion(linear_betas(), STEPS_20)
    i, (t_now, t_prev) = 10, (526, 473)
    beta = 1 - BASE_ACP[t_now] / BASE_ACP[t_prev]
    posterior = beta * (1 - BASE_ACP[t_prev]) / (1 - BASE_ACP[t_now])
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    v = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1).expand(3, 2, 2, 2)
    out = diffusion.p_mean_variance(torch.cat([torch.zeros_like(x), v], 1), x, torch.full((3,), i), True)
    expected = torch.tensor([math.log(posterior), 0.5 * (math.log(posterior) + math.log(beta)), math.log(beta)],
                            dtype=torch.float64)
    torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], expected, rtol=1e-12, atol=0)
    fixed = diffusion.p_mean_variance(torch.zeros_like(x), x, torch.full((3,), i), False)
    assert math.isclose(fixed["variance"][0, 0, 0, 0].item(), posterior, rel_tol=1e-12)
    with pytest.raises(ValueError):
        diffusion.p_mean_variance(torch.zeros_like(x), x, torch.full((3,), i), True)


def _model_output(shape, seed, learned):
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(shape, generator=generator)
    return torch.cat([eps, torch.rand(shape, generator=generator) * 2 - 1], 1) if learned else eps


def test_ddim_step_matches_diffusers_on_constant_stride():
    # diffusers' DDIMScheduler steps back by a constant T // N, so it matches only "ddimN" respacing;
    # on DiT's "N" respacing (999 -> 946 -> ...) it would step 999 -> 949, which is why the loops use ours.
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                                        steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(950, -1, -50))
    diffusion = GaussianDiffusion(linear_betas(), space_timesteps(1000, "ddim20"))
    x = torch.randn(2, 4, 4, 4)
    for i, timestep in [(19, 950), (7, 350), (0, 0)]:
        output = _model_output(x.shape, i, learned=True)
        theirs = scheduler.step(output[:, :4], timestep, x, eta=0.0).prev_sample
        ours = diffusion.ddim_step(output.double(), x.double(), torch.full((2,), i), learn_sigma=True)
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_ddpm_step_matches_diffusers_on_dit_timesteps(variance):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", clip_sample=False, variance_type=variance)
    scheduler.set_timesteps(timesteps=STEPS_20[::-1])
    diffusion = GaussianDiffusion(linear_betas(), STEPS_20)
    learned = variance == "learned_range"
    x = torch.randn(2, 4, 4, 4)
    for i in [19, 10, 1, 0]:
        output = _model_output(x.shape, i, learned)
        theirs = scheduler.step(output, STEPS_20[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        ours = diffusion.ddpm_step(output.double(), x.double(), torch.full((2,), i), learned, noise.double())
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)


def test_normal_kl_and_decoder_likelihood():
    m1, m2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    l1, l2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                                  torch.distributions.Normal(m2, (0.5 * l2).exp()))
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), reference)
    # The 256 bins partition the real line, so their probabilities sum to one for any Gaussian.
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.1, -2.0), (-0.7, -4.0), (0.0, 0.5)]:
        means, log_scales = torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        log_p = discretized_gaussian_log_likelihood(bins, means, log_scales)
        assert math.isclose(log_p.exp().sum().item(), 1.0, rel_tol=1e-9)


def test_training_losses_zero_model_and_stop_gradient():
    diffusion = GaussianDiffusion(linear_betas())
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 500, 999])
    seen = []

    def zero_model(x, s):
        seen.append(s.clone())
        return torch.zeros(x.shape[0], 4, *x.shape[2:])

    terms = diffusion.training_losses(zero_model, x0, t, noise)
    assert torch.equal(seen[0], t)  # unrespaced: original timestep == index
    assert all(terms[k].shape == (3,) and torch.isfinite(terms[k]).all() for k in ("loss", "mse", "vb"))
    torch.testing.assert_close(terms["mse"], (noise ** 2).mean(dim=(1, 2, 3)))
    assert (terms["vb"] >= 0).all() and torch.equal(terms["loss"], terms["mse"] + terms["vb"])
    # At t = 0 the term is the decoder NLL of x0 under N(x_0 / sqrt(acp_0), e^logvar), v = 0 here.
    x_t = math.sqrt(BASE_ACP[0]) * x0[:1] + math.sqrt(1 - BASE_ACP[0]) * noise[:1]
    posterior_1 = (1 - BASE_ACP[1] / BASE_ACP[0]) * (1 - BASE_ACP[0]) / (1 - BASE_ACP[1])
    log_var = 0.5 * (math.log(posterior_1) + math.log(1 - BASE_ACP[0]))
    mean = x_t / math.sqrt(BASE_ACP[0])
    nll = -discretized_gaussian_log_likelihood(x0[:1], mean, torch.full_like(x_t, log_var / 2))
    torch.testing.assert_close(terms["vb"][:1], nll.mean(dim=(1, 2, 3)) / math.log(2.0), rtol=1e-4, atol=1e-5)

    w_eps, w_v = torch.tensor(0.3, requires_grad=True), torch.tensor(0.2, requires_grad=True)
    linear = lambda x, s: torch.cat([w_eps * x, w_v * torch.ones_like(x)], 1)  # noqa: E731
    terms = diffusion.training_losses(linear, x0, t, noise)
    terms["vb"].sum().backward()
    assert w_eps.grad is None or w_eps.grad == 0  # the vb term cannot move the eps prediction
    assert w_v.grad != 0
    plain = diffusion.training_losses(lambda x, s: torch.zeros_like(x), x0, t, noise, learn_sigma=False)
    assert torch.equal(plain["vb"], torch.zeros(3)) and torch.equal(plain["loss"], plain["mse"])
