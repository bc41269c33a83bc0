"""The denoising loops: DDIM (eta 0) and ancestral DDPM, with classifier-free guidance and hooks.

These reproduce DiT's ``ddim_sample_loop`` and ``p_sample_loop`` as its ``sample_ddp.py`` drives them
(``clip_denoised=False``), including the random stream: given the same initial noise and a generator
seeded like the official global RNG, every step draws the same step noise the official script draws.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..finite import check_step
from ..types import RunInfo, StepInfo
from .diffusion import GaussianDiffusion, linear_betas, space_timesteps
from .guidance import ModelFn, cfg_model_fn

SAMPLERS = ("ddim", "ddpm")
TRAIN_TIMESTEPS = 1000  # DiT's training diffusion length; the linear schedule is defined over it


class SamplingHooks(Protocol):
    """What the sampler tells an observer (the caching engine) about the run and each step."""

    def begin_run(self, info: RunInfo) -> None:
        """Called once before the first step."""

    def begin_step(self, step: StepInfo) -> None:
        """Called before each model call."""


def respaced_diffusion(num_steps: int, sampler: str = "ddim") -> GaussianDiffusion:
    """The 1000-step linear-schedule diffusion respaced to ``num_steps`` by the plain "N" rule.

    Both samplers use "N" respacing (never "ddimN"): DiT's ``sample_ddp.py`` and every cache paper
    build ``create_diffusion(str(num_steps))`` for DDIM and DDPM alike, so 20 steps keep the original
    timesteps 0, 53, 105, ..., 946, 999.
    """
    _check_run(num_steps, sampler)
    return GaussianDiffusion(linear_betas(TRAIN_TIMESTEPS), space_timesteps(TRAIN_TIMESTEPS, str(num_steps)))


def sample(model_fn: ModelFn, noise: torch.Tensor, labels: torch.Tensor, *, sampler: str, num_steps: int,
           cfg_scale: float, null_class: int, learn_sigma: bool, guided_channels: Optional[int] = None,
           hooks: Optional[SamplingHooks] = None, generator: Optional[torch.Generator] = None,
           progress: bool = False) -> torch.Tensor:
    """Denoise ``noise`` (B, C, H, W) with class ``labels`` (B,) and return the final sample x_0.

    ``model_fn(x, t, y)`` is called with the original timesteps; with ``learn_sigma`` it returns
    (B', 2C, H, W) = [eps, v], else eps. ``cfg_scale != 1`` doubles the batch (see ``cfg_model_fn``).
    DDIM is deterministic; DDPM adds learned-variance noise at every step but the last.

    Step noise comes from ``generator`` (on the noise's device), or the global RNG when None. Every
    step draws it, DDIM included, even though DDIM with eta 0 and DDPM's last step never use it, and
    with guidance it is drawn for 2B rows of which the first B are used: the official script carries
    the doubled batch through the loop and calls ``randn_like`` on it at every step of both samplers,
    so this keeps our random stream, and so the samples of later batches, identical to it.
    """
    diffusion = respaced_diffusion(num_steps, sampler)
    if noise.dim() < 2 or labels.shape != (noise.shape[0],):
        raise ValueError(f"noise must be (B, C, ...) and labels (B,), got {tuple(noise.shape)} "
                         f"and {tuple(labels.shape)}")
    guided = cfg_model_fn(model_fn, cfg_scale, null_class, guided_channels, noise.shape[1])
    batch = noise.shape[0]
    noise_rows = batch if float(cfg_scale) == 1.0 else 2 * batch
    timesteps = tuple(int(s) for s in diffusion.timestep_map[::-1])  # original, in sampling order
    if hooks is not None:
        hooks.begin_run(RunInfo(num_steps=num_steps, depth=0, num_tokens=0, timesteps=timesteps,
                                sampler=sampler, cfg_scale=float(cfg_scale)))
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{sampler}-{num_steps}")
    x = noise  # (B, C, H, W)
    with torch.no_grad():
        for step in steps:
            index = torch.full((batch,), num_steps - 1 - step, dtype=torch.long, device=x.device)  # (B,)
            t_model = torch.full((batch,), timesteps[step], dtype=torch.long, device=x.device)  # (B,)
            if hooks is not None:
                hooks.begin_step(StepInfo(index=step, num_steps=num_steps, timestep=timesteps[step]))
            out = guided(x, t_model, labels)  # (B, C_out, H, W)
            check_step(out, step, timesteps[step], hooks)  # NaN/inf stops the run here, naming the culprit
            step_noise = torch.randn((noise_rows, *x.shape[1:]), generator=generator, device=x.device,
                                     dtype=x.dtype)[:batch]  # (B, C, H, W)
            if sampler == "ddim":
                x = diffusion.ddim_step(out, x, index, learn_sigma)
            else:
                x = diffusion.ddpm_step(out, x, index, learn_sigma, step_noise)
    return x  # (B, C, H, W)


def _check_run(num_steps: int, sampler: str) -> None:
    """Raise ValueError for an unknown sampler or a step count outside 1..1000."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be an integer in 1..{TRAIN_TIMESTEPS}, got {num_steps!r}")
