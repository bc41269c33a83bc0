"""The DDIM / DDPM loops: hand-computed steps, guidance, hooks, random stream, validation."""

import math

import numpy as np
import pytest
import torch

from ditcache.sampling.loops import SAMPLERS, respaced_diffusion, sample
from ditcache.types import RunInfo, StepInfo

ACP = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # the base schedule, by hand
NULL = 1000


def _run(model, noise, labels, **kwargs):
    options = dict(sampler="ddim", num_steps=2, cfg_scale=1.0, null_class=NULL, learn_sigma=True)
    options.update(kwargs)
    return sample(model, noise, labels, **options)


def half_x_model(x, t, y):
    """eps = x / 2, with variance channels that DDIM must ignore."""
    return torch.cat([0.5 * x, torch.rand_like(x) * 2 - 1], 1)  # (B, 2C, H, W)


def test_two_ddim_steps_by_hand():
    noise = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    out = _run(half_x_model, noise, torch.tensor([1, 2]))
    x = noise
    for a, a_prev in [(ACP[999], ACP[0]), (ACP[0], 1.0)]:  # "2" keeps timesteps 999 and 0
        eps = 0.5 * x
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_one_guided_ddim_step_guides_three_channels():
    def label_model(x, t, y):
        eps = (y.to(x.dtype) + 1).view(-1, 1, 1, 1) * torch.arange(1.0, 5.0, dtype=x.dtype).view(1, 4, 1, 1)
        return torch.cat([eps.expand_as(x), torch.zeros_like(x)], 1)  # (B, 8, H, W)

    noise, labels = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([3, 7])
    out = _run(label_model, noise, labels, num_steps=1, cfg_scale=4.0, guided_channels=3)
    cond = label_model(noise, None, labels)[:, :4]
    uncond = label_model(noise, None, torch.full_like(labels, NULL))[:, :4]
    eps = torch.cat([uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], 1)
    a = ACP[0]  # one step keeps only timestep 0
    torch.testing.assert_close(out, (noise - math.sqrt(1 - a) * eps) / math.sqrt(a), rtol=1e-12, atol=1e-12)


def zero_model(x, t, y):
    """eps = 0 (used with learn_sigma False: fixed small variance)."""
    return torch.zeros_like(x)


def test_ddpm_with_guidance_uses_first_half_of_doubled_noise():
    noise, labels = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    out = _run(zero_model, noise, labels, sampler="ddpm", cfg_scale=1.5, learn_sigma=False,
               generator=torch.Generator().manual_seed(7))
    z = torch.randn((4, 1, 2, 2), generator=torch.Generator().manual_seed(7), dtype=torch.float64)[:2]
    a, a_prev = ACP[999], ACP[0]
    beta = 1 - a / a_prev
    x0 = noise / math.sqrt(a)
    mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * noise
    x1 = mean + math.sqrt(beta * (1 - a_prev) / (1 - a)) * z
    torch.testing.assert_close(out, x1 / math.sqrt(ACP[0]), rtol=1e-12, atol=1e-12)  # last step: no noise


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg_scale, rows", [(1.0, 2), (1.5, 4)])
def test_every_step_draws_noise_like_the_official_loop(sampler, cfg_scale, rows):
    generator, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    _run(zero_model, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), sampler=sampler, num_steps=3,
         cfg_scale=cfg_scale, learn_sigma=False, generator=generator)
    for _ in range(3):
        torch.randn((rows, 1, 2, 2), generator=reference)
    assert torch.equal(torch.randn(5, generator=generator), torch.randn(5, generator=reference))


class Recorder:
    def __init__(self):
        self.events = []

    def begin_run(self, info):
        self.events.append(("run", info))

    def begin_step(self, step):
        self.events.append(("step", step))

    def model(self, x, t, y):
        self.events.append(("model", t.tolist(), x.shape[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_hooks_see_every_step_in_order(sampler):
    hooks = Recorder()
    _run(hooks.model, torch.randn(1, 4, 2, 2), torch.tensor([5]), sampler=sampler, num_steps=5, cfg_scale=1.5,
         hooks=hooks)
    timesteps = (999, 749, 500, 250, 0)  # 999 / 4 strides: 249.75, 499.5 (half to even), 749.25
    assert hooks.events[0] == ("run", RunInfo(num_steps=5, depth=0, num_tokens=0, timesteps=timesteps,
                                              sampler=sampler, cfg_scale=1.5))
    expected = []
    for index, timestep in enumerate(timesteps):
        expected += [("step", StepInfo(index=index, num_steps=5, timestep=timestep)), ("model", [timestep] * 2, 2)]
    assert hooks.events[1:] == expected


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_noise_same_sample(sampler):
    noise, labels = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])

    def run(seed):
        return _run(half_x_model_seeded, noise, labels, sampler=sampler, num_steps=3, cfg_scale=2.0,
                    generator=torch.Generator().manual_seed(seed), progress=True)

    assert torch.equal(run(0), run(0))
    assert torch.equal(run(0), run(1)) == (sampler == "ddim")


def half_x_model_seeded(x, t, y):
    """Deterministic learned-sigma output: eps = x / 2, v = tanh(x)."""
    return torch.cat([0.5 * x, torch.tanh(x)], 1)


def test_respaced_diffusion_uses_plain_n_for_both_samplers():
    for sampler in SAMPLERS:
        assert respaced_diffusion(20, sampler).timestep_map.tolist()[:4] == [0, 53, 105, 158]


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(num_steps=1001), dict(num_steps=2.0),
                                    dict(sampler="euler"), dict(cfg_scale=-1.0)])
def test_invalid_runs_are_rejected(kwargs):
    with pytest.raises(ValueError) as error:
        _run(half_x_model, torch.randn(1, 4, 2, 2), torch.tensor([0]), **kwargs)
    if "sampler" in kwargs:
        assert "ddim, ddpm" in str(error.value)


def test_labels_must_match_the_batch():
    with pytest.raises(ValueError, match="labels"):
        _run(half_x_model, torch.randn(2, 4, 2, 2), torch.tensor([0]))
