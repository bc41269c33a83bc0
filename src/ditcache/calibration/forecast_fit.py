"""Fit the forecast corrector's weight and order per site on uncached trajectories (issue 17).

``forecast`` (correctors/forecast.py) predicts a feature reused at step t from its site's last
computed features F_k at steps s_0 > s_1 > ... as ``F_0 + w (P(t) - F_0)``, P the polynomial of
degree m through the newest m + 1 points. P(t) - F_0 is linear in the features:

    P(t) - F_0 = sum_k c_k F_k,    c_k = L_k(t) - [k = 0],  L_k the Lagrange basis of the positions

so every squared error of such a forecast is a quadratic form in the site's trajectory. What is
stored is that trajectory's Gram matrix, summed over K uncached samples (both CFG halves, every
token and channel):

    G[l][s, s'] = sum_samples <F_s, F_s'>                 (S, S) per (branch, block), float64

With a = e_t - e_{s_0} (plain reuse's error) and b = sum_k c_k e_{s_k} (the forecast's increment),

    err = a'Ga,   num = a'Gb,   den = b'Gb,   w* = num / den,   error left = err - 2 w num + w^2 den

so one (S, S) matrix per site answers every schedule, order, distance and weight exactly, without
sampling again. Fit levels (the ``fit=`` of the corrector):

- ``site``: per site and per *pattern* (the offsets t - s_k of the reuse from its points), pooled
  over every step of the trajectory where that pattern fits: one weight per (site, reuse distance,
  spacing of the points), whatever the schedule;
- ``step``: per site, step and exact points (no pooling over steps).

At each level the order is fitted too: among 0 (plain reuse) .. the configured order, the one whose
fitted weight leaves the least error on the calibration trajectories. The fit is open-loop (the
points are the uncached trajectory's features, not a cached run's), as EOC's γ fit is.

Why float64 sums of float64 products: the errors are small differences of large quadratic forms
(|F_t - F_s|^2 can be 1e-4 of |F|^2, a second-order residual 1e-6); float32 dot products would
leave rounding of 1e-7 |F|^2 in every entry.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..correctors.base import Corrector
from ..types import Kind, RunInfo, Site, StepInfo
from .eoc_fit import record_uncached, store_in_prior
from .prior import Prior, load_prior

GRAM_PREFIX = "forecast_gram_"  # + branch value: tensors (L, S, S) float64 in the prior artifact
META_KEY = "forecast_fit"
LEVELS = ("site", "step")


class GramRecorder(Corrector):
    """Observes an uncached run and adds every site's trajectory Gram matrix into float64 sums."""

    name = "forecast-gram-recorder"

    def __init__(self, prior: Optional[Prior] = None):
        self.prior = prior
        self.grams: dict[str, torch.Tensor] = {}  # branch -> (L, S, S) float64, lower triangle filled
        self.count = 0
        self._rows = 0

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        if self.prior is not None:
            self.prior.check_run(run)
        self._history: dict[Site, torch.Tensor] = {}  # site -> (S, rows * N * C) float64, filled up to the step

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        if kind is not Kind.COMPUTE:
            raise ValueError("the forecast fit needs an uncached run (policy 'none')")
        if site.is_trunk:
            return
        t, steps = step.index, self.run.num_steps
        flat = used.detach().reshape(-1).double()  # (rows * N * C,)
        history = self._history.get(site)
        if history is None:
            history = self._history[site] = torch.zeros(steps, flat.numel(), dtype=torch.float64, device=flat.device)
        history[t] = flat
        gram = self.grams.get(site.branch.value)
        if gram is None:
            gram = self.grams[site.branch.value] = torch.zeros(self.run.depth, steps, steps, dtype=torch.float64)
        gram[site.block, t, :t + 1] += (history[:t + 1] @ flat).cpu()  # (t + 1,): <F_t, F_s> for s <= t
        self._rows = used.shape[0] // (2 if self.run.cfg_scale != 1.0 else 1)

    def end_batch(self) -> None:
        self.count += self._rows
        self._history = {}

    def symmetric(self) -> dict[str, torch.Tensor]:
        """The full Gram matrices (L, S, S) from the lower triangles summed so far."""
        out = {}
        for branch, lower in self.grams.items():
            diag = torch.diagonal(lower, dim1=1, dim2=2)  # (L, S)
            out[branch] = lower + lower.transpose(1, 2) - torch.diag_embed(diag)
        return out


def record_grams(loaded, prior: Prior, config, progress: bool = False, device: str = "cpu") -> tuple[dict, int]:
    """{branch: (L, S, S)} Gram sums and the sample count over ``config.num_samples`` uncached samples."""
    recorder = GramRecorder(prior)
    record_uncached(loaded, recorder, config, progress, device, "forecast fit batches")
    return recorder.symmetric(), recorder.count


def fit_forecast_prior(loaded, prior_path, config, progress: bool = False, device: str = "cpu") -> dict:
    """Record the Gram sums on ``config`` (the prior's settings) and store them in the prior artifact."""
    prior = load_prior(prior_path)
    start = time.perf_counter()
    grams, count = record_grams(loaded, prior, config, progress, device)
    seconds = time.perf_counter() - start
    old = [k for k in prior.artifact.tensors if k.startswith(GRAM_PREFIX)]
    store_in_prior(prior_path, prior, {GRAM_PREFIX + b: g for b, g in grams.items()}, META_KEY,
                   {"K": count, "seed": config.seed, "seconds": round(seconds, 1),
                    "stored": "per branch (block, step, step) Gram sums of the uncached trajectories"}, replace=old)
    return {"prior": str(prior_path), "K": count, "seconds": seconds, "branches": sorted(grams)}


def stored_grams(prior: Prior) -> dict[str, np.ndarray]:
    """{branch: (L, S, S) float64} from a prior that ``calibrate forecast-fit`` has been run on."""
    grams = {k[len(GRAM_PREFIX):]: v.double().numpy() for k, v in prior.artifact.tensors.items()
             if k.startswith(GRAM_PREFIX)}
    if not grams:
        raise ValueError("this prior has no forecast fit; run `ditcache calibrate forecast-fit --prior PATH` on it first")
    return grams


def mean_grams(prior: Prior) -> dict[str, np.ndarray]:
    """{branch: (L, S, S) float64}: the Gram matrices of the prior's *mean* trajectory (its per-step
    means, both CFG halves), for a fit of the systematic part of the trajectories only; no sampling."""
    out = {}
    for branch, means in prior.means.items():  # (S, L, H, N, C)
        x = means.double().flatten(2).transpose(0, 1)  # (L, S, H*N*C)
        out[branch] = (x @ x.transpose(1, 2)).numpy()  # (L, S, S)
    return out


# -- the least-squares fit -----------------------------------------------------------------------
def increment_coefficients(positions: Sequence[float], t: float) -> np.ndarray:
    """c (m + 1,) with P(t) - F_0 = sum_k c_k F_k for the polynomial through the points at ``positions``
    (newest first), from the Lagrange basis."""
    xs = [float(x) for x in positions]
    c = np.empty(len(xs))
    for k, xk in enumerate(xs):
        c[k] = np.prod([(t - xj) / (xk - xj) for j, xj in enumerate(xs) if j != k])
    c[0] -= 1.0
    return c


def forecast_sums(gram: np.ndarray, t: int, steps: Sequence[int], position: Callable[[int], float]) -> np.ndarray:
    """(err, num, den) of forecasts of every order 0..len(steps) - 1 at step ``t`` from the points at
    ``steps`` (newest first), on one site's Gram (S, S): shape (m + 1, 3); order 0 has num = den = 0."""
    size = gram.shape[0]
    a = np.zeros(size)
    a[t] += 1.0
    a[steps[0]] -= 1.0
    err = a @ gram @ a
    out = np.zeros((len(steps), 3))
    out[:, 0] = err
    for m in range(1, len(steps)):
        b = np.zeros(size)
        b[list(steps[:m + 1])] = increment_coefficients([position(s) for s in steps[:m + 1]], position(t))
        gb = gram @ b
        out[m, 1], out[m, 2] = a @ gb, b @ gb
    return out


def pooled_sums(gram: np.ndarray, t: int, steps: Sequence[int], level: str,
                position: Callable[[int], float]) -> np.ndarray:
    """``forecast_sums`` at ``t`` (level step) or summed over every step where the same offsets fit
    (level site): (m + 1, 3)."""
    if level not in LEVELS:
        raise ValueError(f"forecast fit level must be one of {LEVELS}, got {level!r}")
    if level == "step":
        return forecast_sums(gram, t, steps, position)
    offsets = [t - s for s in steps]
    total = np.zeros((len(steps), 3))
    for u in range(offsets[-1], gram.shape[0]):
        total += forecast_sums(gram, u, [u - o for o in offsets], position)
    return total


def best_order(sums: np.ndarray) -> tuple[int, float, float]:
    """(order, weight, share of plain reuse's error left) minimising the error left, from (m + 1, 3) sums."""
    err = sums[0, 0]
    best = (0, 0.0, err)
    for m in range(1, len(sums)):
        num, den = sums[m, 1], sums[m, 2]
        w = num / den if den > 0 else 0.0
        left = err - 2 * w * num + w * w * den
        if left < best[2]:
            best = (m, w, left)
    return best[0], best[1], (best[2] / err if err > 0 else 1.0)


def error_left(sums: np.ndarray, order: int, w: float) -> float:
    """Squared error left by order ``order`` with weight ``w``, from (m + 1, 3) sums."""
    err, num, den = sums[order] if order else (sums[0, 0], 0.0, 0.0)
    return float(err - 2 * w * num + w * w * den)


# -- how much of the reuse error a fit removes ------------------------------------------------------
def interval_schedule(steps: int, interval: int) -> tuple[list[int], list[int]]:
    """(computed, reused) steps of a schedule that computes every ``interval``-th step from step 0."""
    computed = [s for s in range(steps) if s % interval == 0]
    return computed, [s for s in range(steps) if s % interval]


def fit_report(fit_grams: dict, eval_grams: dict, intervals: Sequence[int] = (2, 3, 4), order: int = 2) -> list[dict]:
    """Share of plain reuse's squared feature error removed, on ``eval_grams``, at every reused step
    of an every-N-th-step schedule (all sites): by the unfitted forecast of each order up to ``order``
    (w = 1) and by ``fit=site`` / ``fit=step`` fitted on ``fit_grams``. One row per interval."""
    position = float
    rows = []
    for interval in intervals:
        plain, left = 0.0, {}
        for branch, grams in eval_grams.items():
            for block in range(grams.shape[0]):
                g_eval, g_fit = grams[block], fit_grams[branch][block]
                computed, reused = interval_schedule(g_eval.shape[0], interval)
                for t in reused:
                    steps = [s for s in reversed(computed) if s < t][:order + 1]
                    sums = forecast_sums(g_eval, t, steps, position)
                    plain += sums[0, 0]
                    for m in range(1, order + 1):
                        left[f"order {m}"] = left.get(f"order {m}", 0.0) + error_left(sums, min(m, len(steps) - 1), 1.0)
                    for level in LEVELS:
                        m, w, _ = best_order(pooled_sums(g_fit, t, steps, level, position))
                        left[f"fit={level}"] = left.get(f"fit={level}", 0.0) + error_left(sums, m, w)
        rows.append({"interval": interval, "plain_error": plain,
                     "removed": {name: (1.0 - v / plain if plain > 0 else 0.0) for name, v in left.items()}})
    return rows


__all__ = ["GramRecorder", "LEVELS", "best_order", "error_left", "fit_forecast_prior", "fit_report", "forecast_sums",
           "increment_coefficients", "interval_schedule", "mean_grams", "pooled_sums", "record_grams", "stored_grams"]
