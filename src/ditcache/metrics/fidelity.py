"""Fidelity of a cached sampler to the uncached one from identical noise and labels.

Both batches hold the same images up to the caching error, so the comparison is pixel to pixel:
PSNR, SSIM (Wang et al. 2004, https://doi.org/10.1109/TIP.2003.819861), max and mean absolute error.
Images are uint8 (N, H, W) or (N, H, W, C) in 0..255 unless ``data_range`` says otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# SSIM constants of Wang et al. 2004
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, per_image: bool = False) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB; inf where the images are identical.

    By default one number from the mean squared error over the whole batch (so one identical image
    cannot make the batch inf); ``per_image=True`` gives an (N,) array instead.
    """
    mse = squared_error(a, b)  # (N,)
    return psnr_of_mse(mse if per_image else mse.mean(), data_range)


def squared_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared pixel error of each image pair: (N,). Every image has the same pixel count, so
    their mean is the batch's mean squared error."""
    a, b = _pair(a, b)
    return np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))


def psnr_of_mse(mse: float | np.ndarray, data_range: float = 255.0) -> float | np.ndarray:
    """PSNR in dB of a mean squared error (scalar or array); inf where it is 0."""
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / np.asarray(mse, np.float64))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region only (as Wang et al.'s reference code): (N, C, H-10, W-10)."""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # along H
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # along W


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, per_image: bool = False) -> float | np.ndarray:
    """Mean structural similarity: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03.

    Computed per channel and averaged over channels, pixels of the valid region and images
    (``per_image=True`` keeps one value per image).
    """
    a, b = _pair(a, b)
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]  # (N, H, W, 1)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1:3]}")
    x = torch.from_numpy(a).permute(0, 3, 1, 2)  # (N, C, H, W)
    y = torch.from_numpy(b).permute(0, 3, 1, 2)  # (N, C, H, W)
    g = _gaussian_window()
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x**2
    var_y = _blur(y * y, g) - mu_y**2
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per = smap.mean(dim=(1, 2, 3)).numpy()  # (N,)
    return per if per_image else float(per.mean())


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute pixel difference over the batch, in pixel units."""
    a, b = _pair(a, b)
    return float(np.abs(a - b).max())


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference over the batch, in pixel units."""
    a, b = _pair(a, b)
    return float(np.abs(a - b).mean())


def fidelity(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> dict[str, float]:
    """All four fidelity numbers of batch ``a`` (e.g. cached) against ``b`` (uncached)."""
    return {
        "psnr": float(psnr(a, b, data_range)),
        "ssim": ssim(a, b, data_range),
        "max_abs_error": max_abs_error(a, b),
        "mean_abs_error": mean_abs_error(a, b),
    }
