"""EOC: Error-Optimized Cache: nudge a reused feature along the uncached trajectory's trend.

Qiu, Wang, Lu, Liu, Jiang, Hao 2025, "Accelerating Diffusion Transformer via Error-Optimized Cache",
https://arxiv.org/abs/2501.19243 (methods.md §4; its equations are reconstructions). A prior
(``ditcache calibrate eoc``) holds the mean pre-gate output P[t] of every site at every step. When a
site reuses at step t the feature it computed at step s:

    T      = P[t] - P[s]                                                  trend, eq. (5)
    E      = (mean|T_attn| + mean|T_mlp|) / 2                             block error magnitude
    S      = lam * E / E_ref + (1 - lam) * (1 - t / (N_s - 1))            score, eq. (6); optimise iff S > tau
    used   = cached * (1 + gamma * T)      (mode "mul", eq. 7)   or   cached + gamma * T   (mode "add")

gamma is the paper's fixed weight by default; ``fit=branch|block|step`` uses instead the
least-squares γ (sign included) fitted on uncached trajectories by ``ditcache calibrate eoc-fit``
and stored in the prior (calibration/eoc_fit.py), per branch, per branch and block, or per branch,
step and block.

s is tracked per site (``observe`` says when a feature is computed), so FORA or rm-75, whose reuse
can sit two or three steps after the computation, get the trend over the whole gap. The CFG halves of
T (conditional, unconditional) go to the matching halves of the batch [cond B; uncond B].

Choices where the paper's symbols are lost (methods.md §4.3):

- E_ref, the normaliser of E, is the largest one-step block error max_{t,l} E(t, l; s = t - 1) of the
  prior, not the largest over the run's cached blocks: a corrector does not see the policy's schedule
  (and ToCa / DuCa have none), so the score must not depend on it. Longer gaps can give E/E_ref > 1.
- lam = 0.2, tau = 0.5: S > 0.5 means 1 - t/(N_s - 1) > 0.625 - 0.25 E/E_ref, so a block with no
  trend is optimised up to 37.5% of the trajectory and one with the largest one-step trend up to
  62.5% (t <= 7 and t <= 11 at 20 steps): "the cached blocks of roughly the first half", the
  practical default of §4.3 that Figure 5 supports, with the error term moving the cut-off by
  about two steps either way. ``max_step=k`` overrides the score with the paper's own ablation rule
  "optimise cached sites at steps <= k".
- Attention and MLP share their block's score; ``branches`` limits which of them are corrected
  (the paper needs both, Table 2).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..calibration.artifact import ArtifactKey
from ..calibration.eoc_fit import FIT_LEVELS, fitted_gamma, stored_sums
from ..calibration.prior import Prior, load_prior
from ..types import BRANCHES, Kind, RunInfo, Site, StepInfo
from .base import Corrector, register_corrector

MODES = ("mul", "add")
FUSED_DEVICES = ("cuda",)  # where correct_step fuses a step's sites into one torch._foreach_mul / _add
BRANCH_CHOICES = {"both": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}


@dataclass(frozen=True)
class EocConfig:
    prior: str = ""  # a prior artifact from `ditcache calibrate eoc` for this model and sampler setting
    gamma: float = 0.01  # eq. 7 weight: 0.01 for rule/FORA schedules (the paper used 0.005 with L2C)
    mode: str = "mul"  # "mul": cached * (1 + gamma T) (eq. 7); "add": cached + gamma T (ablation)
    branches: str = "both"  # which sub-layers are corrected: both, attn or mlp
    lam: float = 0.2  # weight of the error magnitude in the score (the rest is the step position)
    tau: float = 0.5  # optimise a cached block iff its score exceeds this
    max_step: Optional[int] = None  # if set: optimise every cached site at steps <= max_step, ignore the score
    fit: str = "none"  # "none": gamma as given; branch / block / step: the prior's fitted γ (replaces gamma)


@dataclass(frozen=True)
class PlanEntry:
    """One cached (step, block) of a schedule: its score and whether EOC corrects it."""

    step: int
    block: int
    score: float
    optimised: bool
    branches: tuple[str, ...]  # the branches EOC corrects here (empty when not optimised)


def trend_factor(trend: torch.Tensor, gamma: float, mode: str) -> torch.Tensor:
    """What eq. 7 applies to the cached feature: 1 + gamma T ("mul") or gamma T ("add"), (H, N, C)."""
    # one new tensor, updated in place: the same operations in the same order as 1 + gamma * trend
    factor = torch.mul(trend, gamma)  # (H, N, C)
    return factor.add_(1) if mode == "mul" else factor


def apply_factor(cached: torch.Tensor, factor: torch.Tensor, mode: str) -> torch.Tensor:
    """cached (H*B, N, C) times (mul) or plus (add) a ``trend_factor`` (H, N, C), per CFG half."""
    halves, rows = factor.shape[0], cached.shape[0]
    if rows % halves:
        raise ValueError(f"a batch of {rows} rows does not split into the prior's {halves} CFG halves")
    x = cached.reshape(halves, rows // halves, *cached.shape[1:]).float()  # (H, B, N, C)
    f = factor.to(x.device).unsqueeze(1)  # (H, 1, N, C)
    out = x * f if mode == "mul" else x + f  # (H, B, N, C): one new tensor
    return out.reshape(cached.shape).to(cached.dtype)  # (H*B, N, C)


def apply_trend(cached: torch.Tensor, trend: torch.Tensor, gamma: float, mode: str) -> torch.Tensor:
    """Eq. 7 on a batch [cond B; uncond B]: cached (H*B, N, C), trend (H, N, C) -> (H*B, N, C)."""
    return apply_factor(cached, trend_factor(trend.to(cached.device), gamma, mode), mode)


class EocCorrector(Corrector):
    name = "eoc"
    ahead = True  # reads the steps computed before this one, and the prior

    def __init__(self, config: EocConfig):
        if not config.prior:
            raise ValueError("eoc needs prior=PATH, an artifact made by `ditcache calibrate eoc`")
        if not (Path(config.prior) / "manifest.json").is_file():
            raise FileNotFoundError(f"eoc prior {config.prior} is not an artifact; make one with `ditcache calibrate eoc`")
        if config.mode not in MODES:
            raise ValueError(f"eoc mode must be one of {MODES}, got {config.mode!r}")
        if config.branches not in BRANCH_CHOICES:
            raise ValueError(f"eoc branches must be one of {sorted(BRANCH_CHOICES)}, got {config.branches!r}")
        if not math.isfinite(config.gamma):
            raise ValueError(f"eoc gamma must be a finite number, got {config.gamma}")
        if config.fit != "none" and config.fit not in FIT_LEVELS:
            raise ValueError(f"eoc fit must be 'none' or one of {FIT_LEVELS}, got {config.fit!r}")
        if not 0.0 <= config.lam <= 1.0:
            raise ValueError(f"eoc lam must be in [0, 1], got {config.lam}")
        self.config = config
        self.branches = BRANCH_CHOICES[config.branches]
        self.prior: Optional[Prior] = None
        self._error_ref: Optional[float] = None  # E_ref, made when a score is first needed
        self._gamma: Optional[torch.Tensor] = None  # fitted γ (2, S, L) when fit != "none"
        self._computed: dict[Site, list[int]] = {}  # steps at which each site's stored feature was computed
        # (branch, block, t, s) -> mean|T| and (t, block, since) -> (score, optimise); both depend on the
        # prior only, so they outlive a run and later batches skip the device syncs
        self._errors: dict[tuple, float] = {}
        self._decisions: dict[tuple, tuple[float, bool]] = {}
        self._factors: dict[tuple, torch.Tensor] = {}  # (branch, block, t, s) -> trend_factor, (H, N, C)

    # -- the corrector protocol ---------------------------------------------------------------
    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        if self.prior is None:
            self.prior = load_prior(self.config.prior, ArtifactKey.from_run(run))
            if self.config.fit != "none":
                self._gamma = fitted_gamma(stored_sums(self.prior), self.config.mode, self.config.fit)
        self.prior.check_run(run)
        self._computed = {}

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        if kind is not Kind.REUSE:  # COMPUTE or PARTIAL refresh the stored feature
            self._computed.setdefault(site, []).append(step.index)

    def correct(self, step: StepInfo, site: Site, cached: torch.Tensor) -> torch.Tensor:
        factor = self._factor(step, site, cached)
        return cached if factor is None else apply_factor(cached, factor, self.config.mode)

    def correct_step(self, step: StepInfo, sites: list[Site], features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every corrected site of the step: on a GPU in one fused product (``torch._foreach_mul``),
        elsewhere site by site (``correct``); the same operation per element either way."""
        if not features or features[0].device.type not in FUSED_DEVICES:
            return super().correct_step(step, sites, features)
        out = list(features)
        picked, xs, fs = [], [], []
        for i, (site, cached) in enumerate(zip(sites, features)):
            factor = self._factor(step, site, cached)  # (H, N, C) or None
            if factor is None:
                continue
            halves, rows = factor.shape[0], cached.shape[0]
            if rows % halves:
                return super().correct_step(step, sites, features)  # apply_factor names the mismatch
            picked.append(i)
            xs.append(cached.reshape(halves, rows // halves, *cached.shape[1:]).float())  # (H, B, N, C)
            fs.append(factor.to(cached.device).unsqueeze(1))  # (H, 1, N, C)
        if picked:
            made = torch._foreach_mul(xs, fs) if self.config.mode == "mul" else torch._foreach_add(xs, fs)
            for i, x in zip(picked, made):
                out[i] = x.reshape(features[i].shape).to(features[i].dtype)  # (H*B, N, C)
        return out

    def _factor(self, step: StepInfo, site: Site, cached: torch.Tensor) -> Optional[torch.Tensor]:
        """The eq. 7 factor (H, N, C) for ``site`` at ``step``, or None where EOC leaves it alone."""
        if site.is_trunk or site.branch.value not in self.branches:
            return None
        since = {b: self._last_before(Site(site.block, b), step.index) for b in BRANCHES}
        if not self._optimises(step.index, site.block, since):
            return None
        if self.prior.means["attn"].device != cached.device:
            self.prior.to(cached.device)
            self._factors.clear()  # made on the old device
        key = (site.branch.value, site.block, step.index, since[site.branch])
        factor = self._factors.get(key)
        if factor is None:
            # I keep 1 + gamma T per (site, step, since): it depends on the prior only, and later
            # batches and runs then spend one element-wise pass, the product itself, per correction
            factor = trend_factor(self.prior.trend(*key), self.gamma(site, step.index), self.config.mode)  # (H, N, C)
            self._factors[key] = factor
        return factor

    def gamma(self, site: Site, step: int) -> float:
        """The weight used at a site and step: the config's, or the fitted one."""
        if self._gamma is None:
            return self.config.gamma
        return float(self._gamma[BRANCHES.index(site.branch), step, site.block])

    def memory_bytes(self) -> int:
        """The prior means and the trend factors this corrector holds (on the features' device)."""
        factors = sum(f.numel() * f.element_size() for f in self._factors.values())
        return (self.prior.nbytes if self.prior is not None else 0) + factors

    # -- cache optimization determination (eq. 6) ---------------------------------------------
    def plan(self, schedule) -> list[PlanEntry]:
        """Every cached (step, block) of a static schedule with its score and whether EOC corrects it."""
        if self.prior is None:
            raise RuntimeError("reset(run) the corrector (it loads the prior) before asking for a plan")
        schedule.check_fits(self.run.num_steps, self.run.depth)
        entries = []
        for t in range(schedule.num_steps):
            for block in range(schedule.depth):
                cached = schedule.cached[t, block]  # (2,) attn, mlp
                if not cached.any():
                    continue
                since = {b: max((s for s in range(t) if not schedule.cached[s, block, i]), default=None)
                         for i, b in enumerate(BRANCHES)}
                score, optimise = self._decide(t, block, since)
                fixed = tuple(b.value for i, b in enumerate(BRANCHES) if cached[i] and b.value in self.branches)
                entries.append(PlanEntry(t, block, score, optimise, fixed if optimise else ()))
        return entries

    def score(self, step: int, block: int, since: dict) -> float:
        """S of eq. 6 for a cached block whose branches were last computed at ``since[branch]``."""
        errors = [self._error(b.value, block, step, s) for b, s in since.items() if s is not None]
        error = sum(errors) / len(errors) if errors else 0.0
        if self._error_ref is None:
            self._error_ref = self._one_step_max()
        normalised = error / self._error_ref if self._error_ref > 0 else 0.0
        position = 1.0 - step / (self.run.num_steps - 1) if self.run.num_steps > 1 else 1.0
        return self.config.lam * normalised + (1.0 - self.config.lam) * position

    def _optimises(self, step: int, block: int, since: dict) -> bool:
        """Whether EOC corrects this cached block; with ``max_step`` no score is computed (the
        errors behind it read the prior, a pass and a device sync per site and step)."""
        if self.config.max_step is not None:
            return step <= self.config.max_step
        return self._decide(step, block, since)[1]

    def _decide(self, step: int, block: int, since: dict) -> tuple[float, bool]:
        key = (step, block, tuple(since.items()))
        if key not in self._decisions:
            s = self.score(step, block, since)
            optimise = step <= self.config.max_step if self.config.max_step is not None else s > self.config.tau
            self._decisions[key] = (s, optimise)
        return self._decisions[key]

    def _error(self, branch: str, block: int, step: int, since: int) -> float:
        key = (branch, block, step, since)
        if key not in self._errors:
            self._errors[key] = float(self.prior.trend(branch, block, step, since).abs().mean())
        return self._errors[key]

    def _one_step_max(self) -> float:
        steps, depth = self.prior.shape[:2]
        best = 0.0
        for t in range(1, steps):
            for block in range(depth):
                pair = [self._error(b.value, block, t, t - 1) for b in BRANCHES]
                best = max(best, sum(pair) / 2)
        return best

    def _last_before(self, site: Site, step: int) -> Optional[int]:
        """The last step < ``step`` at which ``site`` was computed ("as of the start of the step")."""
        for s in reversed(self._computed.get(site, ())):
            if s < step:
                return s
        return None


def eoc_plan(config: EocConfig, run: RunInfo, schedule) -> list[PlanEntry]:
    """Which cached (step, block) of ``schedule`` EOC would correct in ``run`` (for inspection)."""
    corrector = EocCorrector(config)
    corrector.reset(run)
    return corrector.plan(schedule)


def plan_text(entries: list[PlanEntry], num_steps: int, depth: int) -> str:
    """A step x block map: 'o' corrected, 'c' cached but left alone, '.' computed."""
    grid = [["."] * depth for _ in range(num_steps)]
    for e in entries:
        grid[e.step][e.block] = "o" if e.optimised else "c"
    lines = ["step  " + "".join(str(b % 10) for b in range(depth))]
    lines += [f"{t:4d}  " + "".join(row) for t, row in enumerate(grid)]
    return "\n".join(lines)


@register_corrector("eoc", EocConfig,
                    "EOC trend correction from a prior (ditcache calibrate eoc): gamma 0.01 for rule/FORA, "
                    "the paper used 0.005 with L2C; fit=branch|block|step uses the γ fitted by `calibrate eoc-fit`; "
                    "max_step=k corrects steps <= k only")
def _eoc(config: EocConfig) -> EocCorrector:
    return EocCorrector(config)


__all__ = ["EocConfig", "EocCorrector", "PlanEntry", "apply_factor", "apply_trend", "trend_factor", "eoc_plan", "plan_text"]
