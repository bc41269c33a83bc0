"""Bootstrap intervals for FID and PSNR, and for the difference of two sample sets drawn from the same noise.

What varies: the samples. Each replicate draws n sample indices with replacement and recomputes FID
of the drawn features against the *fixed* reference statistics (an ADM batch's statistics are
fixed by construction; a 10,000-image reference adds less variance than a few hundred samples).
Replicate r uses the same indices for every configuration (the same seed), so when configurations
share noise and labels index by index, as ``ditcache compare`` makes them, the difference of their
replicate FIDs is a *paired* bootstrap of the FID difference.

Intervals are the replicates' spread placed around the point estimate t:
``[t + q_lo - m, t + q_hi - m]`` with ``q`` the 2.5% / 97.5% quantiles of the replicates and ``m``
their mean. I remove the replicates' own shift because a resample with duplicates holds only ~63%
distinct images and FID grows as a sample shrinks: on MNIST features every replicate can exceed t,
so the plain percentile interval would not contain the estimate, and the basic (reverse-percentile)
interval would over-correct into an interval for the infinite-sample FID. This one describes how
FID at this sample count varies with the draw of samples. A difference is significant at 95% when
its interval excludes 0.

PSNR to the uncached samples resamples the same way: replicate r is the PSNR of the pooled mean
squared error of the drawn images (``fidelity.psnr``'s definition: one PSNR of the batch's MSE, not a
mean of per-image PSNRs), with the same draws as FID's, so PSNR differences pair as FID's do.

Cost: with n <= D (500 samples, D = 2048) each replicate's trace term comes from the eigenvalues of
an n x n matrix (below), milliseconds; with n > D it is a D x D eigenproblem, seconds on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ditcache.metrics.fid import features_to_stats, frechet_distance, psd_sqrt
from ditcache.metrics.fidelity import psnr_of_mse

REPLICATES = 1000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def centred_interval(value: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """``value`` with the central ``level`` spread of its replicates (R,) around their mean moved onto it."""
    reps = np.asarray(replicates, np.float64)
    alpha = (1.0 - level) / 2.0
    q_lo, q_hi = np.quantile(reps, [alpha, 1.0 - alpha])
    shift = value - reps.mean()
    return Interval(float(value), float(q_lo + shift), float(q_hi + shift))


def draw_counts(n: int, replicates: int = REPLICATES, seed: int = SEED):
    """Yield, per replicate, how often each of n indices was drawn: (n,) int, summing to n."""
    rng = np.random.default_rng(seed)
    for _ in range(replicates):
        yield np.bincount(rng.integers(0, n, n), minlength=n)


class FIDBootstrap:
    """Replicate FIDs of sample features against fixed reference statistics (mu (D,), sigma (D, D))."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, replicates: int = REPLICATES, seed: int = SEED):
        if replicates < 2:
            raise ValueError(f"need at least 2 bootstrap replicates, got {replicates}")
        self.mu = np.asarray(mu, np.float64)
        self.sigma = np.asarray(sigma, np.float64)
        self.replicates = replicates
        self.seed = seed
        self._sqrt_sigma = None  # sigma^(1/2), only needed when n > D

    def fid(self, feats: np.ndarray) -> float:
        """The point estimate: FID of all features (N, D)."""
        mu, sigma = features_to_stats(feats)
        return frechet_distance(mu, sigma, self.mu, self.sigma)

    def _trace_sqrt(self, x: np.ndarray, kernel: np.ndarray | None, counts: np.ndarray, mu_b: np.ndarray) -> float:
        """tr sqrt(sigma_ref sigma_b), sigma_b the covariance of the resample (rows of x (N, D) drawn
        ``counts`` times); ``kernel`` is x sigma_ref x^T (N, N), given when N <= D."""
        keep = counts > 0
        w, total = counts[keep].astype(np.float64), float(counts.sum())
        if kernel is not None:
            # sigma_ref^(1/2) sigma_b sigma_ref^(1/2) = Z^T Z, Z = diag(sqrt w) xc sigma_ref^(1/2) / sqrt(total - 1),
            # whose nonzero eigenvalues are those of Z Z^T = diag(sqrt w) xc sigma_ref xc^T diag(sqrt w) / (total - 1);
            # with xc = x - mu_b and mu_b = x^T counts / total, xc sigma_ref xc^T comes from the kernel alone
            kw = kernel @ counts / total  # (N,): x sigma_ref mu_b
            centred = kernel - kw[:, None] - kw[None, :] + counts @ kw / total  # (N, N)
            sw = np.sqrt(w)
            g = centred[np.ix_(keep, keep)] * np.outer(sw, sw) / (total - 1.0)  # (n, n), n distinct rows
            lam = np.linalg.eigvalsh((g + g.T) / 2.0)
        else:
            if self._sqrt_sigma is None:
                self._sqrt_sigma = psd_sqrt(self.sigma)
            xc = x[keep] - mu_b  # (n, D)
            cov = (xc * w[:, None]).T @ xc / (total - 1.0)  # (D, D)
            m = self._sqrt_sigma @ cov @ self._sqrt_sigma
            lam = np.linalg.eigvalsh((m + m.T) / 2.0)
        return float(np.sqrt(np.clip(lam, 0.0, None)).sum())

    def kernel(self, feats: np.ndarray) -> np.ndarray | None:
        """x sigma_ref x^T (N, N) when N <= D (the fast path), else None."""
        n, d = feats.shape
        return feats @ self.sigma @ feats.T if n <= d else None

    def replicate(self, feats: np.ndarray, counts: np.ndarray, kernel: np.ndarray | None = None) -> float:
        """FID of the resample in which row i of ``feats`` (N, D) appears ``counts[i]`` times: the same
        number as ``frechet_distance`` of ``features_to_stats`` of that resample, up to round-off.
        Pass ``kernel(feats)`` when calling many times."""
        feats = np.asarray(feats, np.float64)
        if kernel is None and len(feats) <= feats.shape[1]:
            kernel = self.kernel(feats)
        total = float(counts.sum())
        mu_b = counts @ feats / total  # (D,)
        sq = (feats * feats).sum(axis=1)  # (N,)
        trace_b = float((counts @ sq - total * (mu_b @ mu_b)) / (total - 1.0))
        diff = mu_b - self.mu
        return float(diff @ diff + np.trace(self.sigma) + trace_b - 2.0 * self._trace_sqrt(feats, kernel, counts, mu_b))

    def replicates_of(self, feats: np.ndarray) -> np.ndarray:
        """Replicate FIDs (R,) of features (N, D); the same draws for every call with the same N."""
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2 or len(feats) < 3:
            raise ValueError(f"need features (N >= 3, D) to bootstrap FID, got {feats.shape}")
        kernel = self.kernel(feats)
        return np.array([self.replicate(feats, c, kernel) for c in draw_counts(len(feats), self.replicates, self.seed)])

    def interval(self, feats: np.ndarray, value: float | None = None,
                 level: float = LEVEL) -> tuple[Interval, np.ndarray]:
        """FID (``value`` if already computed) with its interval, and the replicates (R,) for paired
        differences."""
        reps = self.replicates_of(feats)
        return centred_interval(self.fid(feats) if value is None else value, reps, level), reps


def psnr_replicates(mse: np.ndarray, replicates: int = REPLICATES, seed: int = SEED,
                    data_range: float = 255.0) -> np.ndarray:
    """Replicate PSNRs (R,) from per-image mean squared errors (N,) (``fidelity.squared_error``): the
    PSNR of each resample's pooled MSE, drawn as ``FIDBootstrap`` draws (same seed and N, same indices)."""
    mse = np.asarray(mse, np.float64)
    if mse.ndim != 1 or len(mse) < 2:
        raise ValueError(f"need per-image errors (N >= 2,) to bootstrap PSNR, got {mse.shape}")
    if replicates < 2:
        raise ValueError(f"need at least 2 bootstrap replicates, got {replicates}")
    counts = np.stack(list(draw_counts(len(mse), replicates, seed)))  # (R, N)
    return psnr_of_mse(counts @ mse / len(mse), data_range)  # (R,)


def psnr_interval(mse: np.ndarray, value: float | None = None, replicates: int = REPLICATES, seed: int = SEED,
                  level: float = LEVEL) -> tuple[Interval, np.ndarray]:
    """PSNR of per-image errors (N,) (``value`` if already computed) with its interval, and the
    replicates (R,) for paired differences. Identical images (inf dB) give [inf, inf]."""
    reps = psnr_replicates(mse, replicates, seed)
    value = float(psnr_of_mse(np.mean(mse))) if value is None else float(value)
    if not np.all(np.isfinite(reps)):  # some resamples hold identical images only (inf dB): percentiles
        low = value if not np.isfinite(value) else float(np.quantile(reps, (1.0 - level) / 2.0))
        return Interval(value, low, math.inf), reps
    return centred_interval(value, reps, level), reps


def paired_difference(value_a: float, reps_a: np.ndarray, value_b: float, reps_b: np.ndarray,
                      level: float = LEVEL) -> Interval:
    """Interval of a - b (FID or PSNR) from replicates drawn with the same indices (same seed, same N)."""
    if np.shape(reps_a) != np.shape(reps_b):
        raise ValueError(f"paired replicates differ in number: {np.shape(reps_a)} vs {np.shape(reps_b)}")
    reps_a, reps_b = np.asarray(reps_a, np.float64), np.asarray(reps_b, np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(reps_a == reps_b, 0.0, reps_a - reps_b)  # equal infinities (identical images) differ by 0
        value = 0.0 if value_a == value_b else value_a - value_b
    if not np.all(np.isfinite(diff)) or not math.isfinite(value):  # one side identical to uncached somewhere
        return Interval(float(value), math.nan, math.nan)
    return centred_interval(value, diff, level)


def interval_columns(value: float, reps: np.ndarray, base: tuple[float, np.ndarray] | None = None) -> dict:
    """A result row's FID interval keys (``fid_ci_low``, ``fid_ci_high``) and, given the ``base`` row's
    (FID, replicates) drawn with the same indices, its paired difference FID - base FID
    (``fid_diff``, ``fid_diff_ci_low``, ``fid_diff_ci_high``, ``fid_diff_significant``)."""
    interval = centred_interval(value, reps)
    row = {"fid_ci_low": interval.low, "fid_ci_high": interval.high}
    if base is not None:
        diff = paired_difference(value, reps, base[0], base[1])
        row.update(fid_diff=diff.value, fid_diff_ci_low=diff.low, fid_diff_ci_high=diff.high,
                   fid_diff_significant=diff.excludes_zero)
    return row
