"""Discrete Gaussian diffusion maths for DiT: the linear schedule, respacing, posteriors, losses.

The conventions are those of the official DiT / ADM diffusion code (read, not copied): eps
prediction, the ``LEARNED_RANGE`` variance when the model also outputs a variance interpolation
``v``, a respaced process whose betas are recomputed from the base ``alphas_cumprod``, and a model
that is always called with the *original* timestep. Schedules are float64 numpy arrays; values
picked for a batch are cast to the dtype of the tensor they multiply, which for a float32 sampler
is exactly what the official code does (it extracts in float64 and calls ``.float()``).

In this module ``t`` is a LongTensor (B,) of *respaced* indices, ``0`` being the least noisy kept
timestep. The sampler converts to the original timestep with ``GaussianDiffusion.model_timesteps``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """The DDPM / DiT linear beta schedule: 1e-4 to 0.02 over 1000 steps, rescaled for other lengths."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)  # (T,)


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> list[int]:
    """The original timesteps kept by a respacing, sorted ascending.

    ``section_counts`` is a list of counts or a string ``"10,15,20"``: the ``num_timesteps`` steps are
    cut into that many equal sections (the first ``num_timesteps % len`` ones one step longer) and
    each section keeps ``count`` evenly spread steps. I walk the fractional stride by repeated
    addition and round with Python's ``round`` (half to even), as the official code does: this
    differs from ``round(i * stride)`` for some counts (for 21 steps of 1000, index 10 is 499 not 500).
    ``"ddimN"`` instead keeps ``range(0, num_timesteps, k)`` for the integer stride ``k`` that gives
    exactly N steps (DDIM paper striding).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_striding(num_timesteps, int(section_counts[len("ddim"):]))
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"respacing must be 'N', 'N1,N2,...' or 'ddimN', got {section_counts!r}") from None
    sections = list(section_counts)
    if not sections:
        raise ValueError("respacing needs at least one section")
    size_per, extra = divmod(num_timesteps, len(sections))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def _ddim_striding(num_timesteps: int, count: int) -> list[int]:
    """``range(0, T, k)`` for the smallest integer stride k >= 1 that yields exactly ``count`` steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} timesteps")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation DiT was trained with (kept so loss values match)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log P(x) for data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)).

    A bin is [x - 1/255, x + 1/255]; the two edge bins extend to -inf and +inf.
    Probabilities are clamped at 1e-12 before the log.
    """
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_minus = _approx_std_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


class GaussianDiffusion:
    """A Gaussian diffusion over the kept timesteps of a base beta schedule.

    ``use_timesteps`` (default: all) are original timesteps; the process steps between consecutive
    kept ones, so its betas are ``1 - acp[t_i] / acp[t_{i-1}]`` with ``acp`` the base cumulative
    product (and 1 before the first). ``timestep_map[i]`` is the original timestep of respaced index i.
    """

    def __init__(self, base_betas, use_timesteps: Optional[Iterable[int]] = None):
        base_betas = np.asarray(base_betas, dtype=np.float64)  # (T,)
        if base_betas.ndim != 1 or not ((base_betas > 0) & (base_betas <= 1)).all():
            raise ValueError("base_betas must be a 1-D array with values in (0, 1]")
        total = len(base_betas)
        kept = list(range(total)) if use_timesteps is None else sorted(set(int(s) for s in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= total:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{total - 1}")
        base_acp = np.cumprod(1.0 - base_betas)  # (T,)
        betas, last = [], 1.0
        for step in kept:
            betas.append(1.0 - base_acp[step] / last)
            last = base_acp[step]
        self.original_num_timesteps = total
        self.timestep_map = np.array(kept, dtype=np.int64)  # (S,) respaced index -> original timestep
        self._set_schedule(np.array(betas, dtype=np.float64))

    def _set_schedule(self, betas: np.ndarray) -> None:
        """Derive every per-step quantity from the respaced betas, all float64 arrays of shape (S,)."""
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at index 0; the log uses index 1's value there instead.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

    @staticmethod
    def _at(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as a tensor of like's dtype and device, shaped (B, 1, ..., 1) to broadcast."""
        picked = torch.from_numpy(values)[t.cpu()].to(like.dtype)  # (B,)
        return picked.to(like.device).view(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps (B,) the model must see for respaced indices t (B,)."""
        return torch.from_numpy(self.timestep_map)[t.cpu()].to(t.device)  # (B,)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(acp) x0, (1 - acp) I)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(
            self.sqrt_one_minus_alphas_cumprod, t, x0) * noise  # (B, C, H, W)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(
            self.posterior_mean_coef2, t, x_t) * x_t  # (B, C, H, W)
        variance = self._at(self.posterior_variance, t, x_t)
        return mean, variance, self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = x_t / sqrt(acp) - sqrt(1 / acp - 1) eps."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)  # (B, C, H, W)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps that maps x_t to x0: (x_t / sqrt(acp) - x0) / sqrt(1 / acp - 1)."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t)  # (B, C, H, W)

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        learn_sigma: bool, clip_denoised: bool = False) -> dict:
        """The model's Gaussian p(x_{t-1} | x_t): dict(mean, variance, log_variance, pred_xstart).

        With ``learn_sigma`` the output is (B, 2C, ...) = [eps, v] and v in [-1, 1] interpolates the
        log variance between the clipped posterior log variance (v = -1) and log beta (v = +1).
        Otherwise the output is eps (B, C, ...) and the variance is the fixed posterior ("small") one.
        """
        channels = x.shape[1]
        _check_output(model_output, x, learn_sigma)
        eps = model_output[:, :channels]  # (B, C, H, W)
        if learn_sigma:
            min_log = self._at(self.posterior_log_variance_clipped, t, x)
            max_log = self._at(np.log(self.betas), t, x)
            frac = (model_output[:, channels:] + 1) / 2  # (B, C, H, W)
            log_variance = frac * max_log + (1 - frac) * min_log  # (B, C, H, W)
            variance = torch.exp(log_variance)
        else:
            variance = self._at(self.posterior_variance, t, x)
            log_variance = self._at(self.posterior_log_variance_clipped, t, x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def ddim_step(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, learn_sigma: bool,
                  eta: float = 0.0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One DDIM update x_t -> x_{t-1} (clip_denoised False). ``noise`` is needed only when eta > 0.

        The eps is re-derived from pred_xstart, as the official sampler does.
        """
        pred_xstart = self.p_mean_variance(model_output, x, t, learn_sigma)["pred_xstart"]
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self._at(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._at(self.alphas_cumprod_prev, t, x)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        if eta == 0:
            return mean  # (B, C, H, W)
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        return mean + _nonzero_mask(t, x) * sigma * noise  # (B, C, H, W)

    def ddpm_step(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, learn_sigma: bool,
                  noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step x_{t-1} = mean + sigma * noise; no noise is added at respaced index 0."""
        out = self.p_mean_variance(model_output, x, t, learn_sigma)
        return out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise  # (B, C, H, W)

    def training_losses(self, model_fn: Callable, x0: torch.Tensor, t: torch.Tensor,
                        noise: Optional[torch.Tensor] = None, *, learn_sigma: bool = True) -> dict:
        """Per-sample losses (B,) for ``model_fn(x_t, original_t) -> output``: dict(loss, mse, vb).

        ``mse`` is the eps error averaged over non-batch dims. With ``learn_sigma``, ``vb`` is the
        variational-bound term in bits, KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) or at t = 0 the
        decoder NLL, computed with the eps half detached so it trains only the variance (Improved
        DDPM's hybrid loss). It is scaled by num_timesteps / 1000 like ADM's RESCALED_MSE (1 for the
        full 1000-step process). Bind labels with a closure: ``lambda x, s: model(x, s, y)``.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)  # (B, C, H, W)
        output = model_fn(x_t, self.model_timesteps(t))  # (B, C or 2C, H, W)
        _check_output(output, x0, learn_sigma)
        channels = x0.shape[1]
        mse = mean_flat((noise - output[:, :channels]) ** 2)  # (B,)
        if learn_sigma:
            frozen = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)  # (B, 2C, H, W)
            vb = self._vb_bits(frozen, x0, x_t, t) * (self.num_timesteps / 1000.0)  # (B,)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_bits(self, model_output, x0, x_t, t) -> torch.Tensor:
        """The variational-bound term for one timestep in bits per dimension, (B,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, learn_sigma=True)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)  # (B,)
        return torch.where(t.to(kl.device) == 0, nll, kl)  # (B,)


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t != 0 else 0, shaped (B, 1, ..., 1) in x's dtype."""
    return (t != 0).to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _check_output(output: torch.Tensor, x: torch.Tensor, learn_sigma: bool) -> None:
    """Raise unless the model output is (B, 2C, ...) with learn_sigma or (B, C, ...) without."""
    channels = x.shape[1] * (2 if learn_sigma else 1)
    expected = (x.shape[0], channels, *x.shape[2:])
    if tuple(output.shape) != expected:
        raise ValueError(f"model output has shape {tuple(output.shape)}, expected {expected} "
                         f"(learn_sigma={learn_sigma})")
