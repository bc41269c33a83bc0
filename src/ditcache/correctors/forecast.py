"""Forecast: predict a reused feature from the polynomial through its last computed values.

GOC (``goc.py``, methods.md §5) extrapolates a reused feature one step along the difference of the
last two features *used*, whatever their distance in steps; TaylorSeer (methods.md §7) expands the
features *computed* at full steps with finite-difference derivatives. This corrector generalises
both. Per site it keeps the last ``order + 1`` history points (s_k, F_k), newest first, and at a
reuse step t returns

    used = F_0 + w * (P(t) - F_0)

where P is the polynomial of degree m through the points (Newton's divided differences over the
actual step positions s_k, so an interval-3 or -4 schedule extrapolates 2 or 3 steps ahead instead
of pretending the last change took one step):

    P(t) = F[s0] + F[s0,s1] (t - s0) + F[s0,s1,s2] (t - s0)(t - s1) + ...

- ``order`` m: 0 is plain reuse, 1 a straight line, 2 a parabola. With fewer points than m + 1
  (early in the run) the highest order the history allows is used.
- ``history``: ``computed`` keeps only features the model computed (COMPUTE, and PARTIAL, whose
  stored feature is the best estimate of that step there is); ``used`` keeps every feature the
  engine used, reused ones included, as GOC does. With ``used``, order 1, w and a reuse right after
  two consecutive steps, used = F_0 + w (F_0 - F_1): GOC's formula.
- ``w``: a weight on the whole correction (1 = the exact polynomial; < 1 damps it).
- ``axis``: ``step`` (the step index) or ``timestep`` (the model's timestep; for schedules whose
  timesteps are not evenly spaced).
- ``max_span``: no forecast further than this many steps past the newest point (0 = no limit).

A polynomial is exact on a polynomial trajectory of its degree: the tests check this, and that
order 0 is the stored feature, bit for bit.

What measurement says on the default model (DDIM-20, docs/results.md, issue 17): order 2 is the
best default at interval 2 (RM-50) and 3; at interval 4 (RM-75) order 1 keeps FID at the uncached
level where order 2 overshoots; ``history=used`` with order 3 feeds its own predictions back and
diverges (4.5-6.5 dB PSNR to uncached on 8 samples), so ``computed`` is the default.

Fitted on a prior (``prior=DIR,fit=site|step``; calibration/forecast_fit.py): the weight *and* the
order (0..``order``) are the least-squares choice on the uncached trajectories recorded by
``ditcache calibrate forecast-fit`` into the EOC prior at DIR, per site and reuse pattern (``site``:
the distances from the reused step to its points, pooled over steps) or per site, step and points
(``step``); ``w`` is then unused. The prior must have been made for this model, sampler, step count,
guidance scale and resolution (it is refused otherwise). A site the prior has no trajectory for (the
trunk) gets the unfitted forecast. ``fit=none`` (the default) is the forecast above, bit for bit.
Measured on the default model (docs/results.md, issue 17): the fit removes more of the squared
feature error than any fixed order, held out too, but it does *not* raise PSNR to uncached (fitted on
samples: 1.3-1.9 dB lower than order 2 at RM-50, S35 and RM-75; ``on=mean``: -0.7 to +0.55 dB), so it
is an option and the default stays order 2, w = 1.

Like GOC it replaces the reused feature by a prediction from its own history, so it must be the
first corrector (another corrector's output would be discarded); it checks this at the first reuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..types import Kind, RunInfo, Site, StepInfo
from .base import Corrector, register_corrector

FITS = ("none", "site", "step")
FIT_ON = ("samples", "mean")

HISTORIES = ("computed", "used")
AXES = ("step", "timestep")
ORDER_ERROR = ("forecast must be the first corrector: it predicts from its own history of features, so a "
               "corrector listed before it would be discarded; list forecast first")


@dataclass(frozen=True)
class ForecastConfig:
    order: int = 2  # polynomial degree m: 0 plain reuse, 1 linear, 2 quadratic, ...
    w: float = 1.0  # weight on the correction P(t) - F_0
    history: str = "computed"  # "computed" (TaylorSeer-like) or "used" (GOC-like)
    axis: str = "step"  # "step" or "timestep": the coordinate the polynomial is fitted over
    max_span: int = 0  # forecast at most this many steps past the newest point; 0: no limit
    prior: str = ""  # with fit: an EOC prior that `ditcache calibrate forecast-fit` was run on
    fit: str = "none"  # "none": order and w as given; site / step: least-squares order and weight from the prior
    on: str = "samples"  # fit on the recorded samples' trajectories, or on the prior's "mean" trajectory


def newton_increment(points: list[tuple[float, torch.Tensor]], t: float) -> torch.Tensor:
    """P(t) - F_0 for the polynomial P through ``points`` [(s_k, F_k)], newest first, any spacing.

    Returned as the increment over the newest point so that order 1 at unit spacing is, to the bit,
    GOC's F_0 - F_1 (the division and the product by 1.0 are exact)."""
    xs = [float(s) for s, _ in points]
    if len(points) < 2:
        raise ValueError("a forecast needs at least two points")
    if len(set(xs)) != len(xs):
        raise ValueError(f"forecast points must have distinct positions, got {xs}")
    # divided differences, updated in place: after round j, table[k] = F[s_k, ..., s_{k+j}]
    table = [f for _, f in points]  # each (B, N, C)
    increment = None
    basis = 1.0
    for j in range(1, len(points)):
        table = [(table[k] - table[k + 1]) / (xs[k] - xs[k + j]) for k in range(len(table) - 1)]
        basis *= t - xs[j - 1]
        term = basis * table[0]  # (B, N, C)
        increment = term if increment is None else increment + term
    return increment  # (B, N, C)


class ForecastCorrector(Corrector):
    name = "forecast"
    ahead = True  # reads its history as of the end of the previous step

    def __init__(self, config: ForecastConfig):
        if isinstance(config.order, bool) or not isinstance(config.order, int) or not 0 <= config.order <= 4:
            raise ValueError(f"forecast order must be an integer 0..4, got {config.order!r}")
        if not math.isfinite(config.w):
            raise ValueError(f"forecast w must be a finite number, got {config.w}")
        if config.history not in HISTORIES:
            raise ValueError(f"forecast history must be one of {HISTORIES}, got {config.history!r}")
        if config.axis not in AXES:
            raise ValueError(f"forecast axis must be one of {AXES}, got {config.axis!r}")
        if isinstance(config.max_span, bool) or not isinstance(config.max_span, int) or config.max_span < 0:
            raise ValueError(f"forecast max_span must be an integer >= 0, got {config.max_span!r}")
        if config.fit not in FITS:
            raise ValueError(f"forecast fit must be one of {FITS}, got {config.fit!r}")
        if config.fit != "none":
            if not config.prior:
                raise ValueError("forecast fit needs prior=PATH, a prior that `ditcache calibrate forecast-fit` ran on")
            if config.on not in FIT_ON:
                raise ValueError(f"forecast on must be one of {FIT_ON}, got {config.on!r}")
            if config.history != "computed":
                raise ValueError("forecast fit is made for history=computed (the fit sees computed features only)")
        self.config = config
        self._prior = None  # the loaded prior, with fit
        self._grams: dict = {}  # branch -> (L, S, S) float64 Gram sums, with fit
        self._choices: dict[tuple, tuple[int, float]] = {}  # fit key -> (order, weight); depends on the prior only
        self._points: dict[Site, list[tuple[int, torch.Tensor]]] = {}  # site -> [(step, F)], newest first
        self._stored: dict[Site, torch.Tensor] = {}  # site -> the feature the engine stored

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        if self.config.axis == "timestep" and len(run.timesteps) != run.num_steps:
            raise ValueError("forecast axis=timestep needs the run's timesteps; this sampler gives none")
        self._points, self._stored = {}, {}
        if self.config.fit != "none":
            from ..calibration.artifact import ArtifactKey
            from ..calibration.forecast_fit import mean_grams, stored_grams
            from ..calibration.prior import load_prior

            if self._prior is None:
                self._prior = load_prior(self.config.prior, ArtifactKey.from_run(run))
                self._grams = (stored_grams if self.config.on == "samples" else mean_grams)(self._prior)
            self._prior.check_run(run)

    def _position(self, step: int) -> float:
        return float(step) if self.config.axis == "step" else float(self.run.timesteps[step])

    def correct(self, step: StepInfo, site: Site, cached: torch.Tensor) -> torch.Tensor:
        if cached is not self._stored.get(site):
            raise ValueError(ORDER_ERROR)
        points = self._points.get(site, [])
        c = self.config
        if c.order == 0 or len(points) < 2 or (c.max_span and step.index - points[0][0] > c.max_span):
            return cached
        if c.fit != "none" and site.branch.value in self._grams:
            return self._fitted(step, site, points, cached)
        at = [(self._position(s), f) for s, f in points]
        increment = newton_increment(at, self._position(step.index))  # P(t) - F_0, (B, N, C)
        newest = points[0][1]  # F_0: the stored feature, or with history=used the last one used
        return newest + (increment if c.w == 1.0 else c.w * increment)

    def fitted_choice(self, step: int, site: Site, steps: list[int]) -> tuple[int, float]:
        """(order, weight) the fit gives a reuse at ``step`` from points at ``steps`` (newest first)."""
        from ..calibration.forecast_fit import best_order, pooled_sums

        offsets = tuple(step - s for s in steps)
        key = (site, offsets) if self.config.fit == "site" else (site, step, offsets)
        choice = self._choices.get(key)
        if choice is None:
            gram = self._grams[site.branch.value][site.block]  # (S, S)
            order, w, _ = best_order(pooled_sums(gram, step, steps, self.config.fit, self._position))
            choice = self._choices[key] = (order, float(w))
        return choice

    def _fitted(self, step: StepInfo, site: Site, points: list, cached: torch.Tensor) -> torch.Tensor:
        order, w = self.fitted_choice(step.index, site, [s for s, _ in points])
        if order == 0:
            return cached
        at = [(self._position(s), f) for s, f in points[:order + 1]]
        return points[0][1] + w * newton_increment(at, self._position(step.index))  # (B, N, C)

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        if kind is not Kind.REUSE:
            self._stored[site] = used
        elif self.config.history == "computed":
            return
        points = self._points.setdefault(site, [])
        if points and points[0][0] == step.index:
            points.pop(0)  # a site seen twice in one step keeps its last feature
        points.insert(0, (step.index, used))
        del points[self.config.order + 1:]

    def memory_bytes(self) -> int:
        """Bytes of the history, without the newest computed feature (the engine stores that one)."""
        seen: dict[int, int] = {}
        for site, points in self._points.items():
            for _, t in points:
                if t is not self._stored.get(site):
                    seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())


@register_corrector("forecast", ForecastConfig,
                    "polynomial forecast of a reused feature through its last order+1 history points at their "
                    "real step distances: order=2 (0 = reuse), w=1, history=computed|used, axis=step|timestep, "
                    "max_span=0, prior=DIR with fit=site|step (order and weight fitted by `calibrate forecast-fit`); "
                    "list it first")
def _forecast(config: ForecastConfig) -> ForecastCorrector:
    return ForecastCorrector(config)
