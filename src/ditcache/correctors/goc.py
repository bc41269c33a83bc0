"""GOC: Gradient-Optimized Cache: extrapolate a reused feature along its own recent change.

Qiu, Liu, Wang, Lu, Chen, Hao 2025, "Accelerating Diffusion Transformer via Gradient-Optimized
Cache", https://arxiv.org/abs/2503.05156 (methods.md §5).

Cached Gradient Propagation (§5.1): every site keeps a two-slot queue of the features it actually
*used* at its last two calls, Q0 (newest) and Q1, whether computed, partially computed or reused and
corrected; ``observe`` hands exactly those over. At a reuse step where compensation is allowed:

    used = Q0 + w * (Q0 - Q1)

and plain reuse otherwise (also while the queue holds fewer than two entries). w = 1.2 with rule /
FORA schedules, 0.8 with L2C (the released code's values), the same for every site.

Which reused sites are compensated (``branches``):
- ``both`` (default): only in blocks whose attention *and* MLP are both reused at that step, as the
  released L2C path does (GOC_ICCV2025 ``DiT/models/dynamic_models.py``: the gradient is formed only
  when both reused features and both older ones exist, lines 126-131; a block reusing one branch
  reuses it plainly, lines 141-148 and 156-163). It reads the policy's static schedule, which the
  engine hands over (``bind``); with a dynamic policy (ToCa, DuCa) it is an error at the first reuse.
  On the published DDIM-20 L2C schedule that is 168 compensated sub-layers of the 191 reused at
  the published steps.
- ``each``: every reused sub-layer (our earlier reading; 191 there). On the default model it recovers
  more of the reuse error on a learned schedule (docs/results.md: about +4 dB PSNR to uncached), so
  it stays as an option.
On rule / FORA schedules a block always reuses both branches together, so the two are the same.

Inflection-Aware Optimization (§5.2): compensation is allowed only at some steps, from one of
- ``steps="3/5/7/9"``: an explicit set;
- ``preset``: the published DDIM-20 sets (rm-50, rm-25, l2c);
- ``prior``: detected on the uncached trajectory of a prior artifact (``ditcache calibrate eoc``).
  Per site, D_v = P[v] - P[v-1] is the step-v change of the mean feature; the statistic
  c_v = mean over sites of cos(D_{v+1}, D_v) is the cosine between the change into and out of step
  v. Step v is an inflection when c_v < 0: most sites turn back there. GOC's gradient at a cached
  step t spans the features used at t-2 and t-1 and predicts t, so it is disabled at every t whose
  window [t-2, t] holds an inflection. The published rm-50 set {3..15, 19} is this rule with one
  inflection at v = 16 (it removes 16, 17, 18, of which only 17 is cached); ``ditcache calibrate
  goc --prior PATH`` prints c_v and the excluded steps so this can be checked for any model.
- none of them: every step.

Composition with EOC: list GOC first (``--corrector goc:... --corrector eoc:...``), giving
``used = (Q0 + w (Q0 - Q1)) * (1 + gamma T)``. GOC does not transform its input: it replaces the
reused feature by an extrapolation of its queue, so anything a corrector did before it would be
silently thrown away. EOC's eq. 7 is a relative correction of "the cache information" handed to the
block, so it applies as well to GOC's better estimate as to the raw cache, and its result enters
GOC's queue like any used feature. The other order is refused: GOC checks that its input is the
feature the engine stored, and raises a ValueError naming the fix at the first reuse it differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..calibration.artifact import Artifact, ArtifactKey
from ..calibration.prior import PRIOR_KIND, Prior, load_prior
from ..types import Kind, RunInfo, Site, StepInfo
from .base import Corrector, register_corrector

PRESET_STEPS = 20  # the published sets are for DDIM-20
PRESETS = {
    "rm-50": (3, 5, 7, 9, 11, 13, 15, 19),
    "rm-25": (3, 5, 7, 9),
    "l2c": (3, 5, 7, 9, 11, 13, 15, 19),
}
BRANCH_RULES = ("both", "each")
FUSED_DEVICES = ("cuda",)  # where correct_step fuses a step's sites into torch._foreach_* calls
NEEDS_SCHEDULE = ("goc branches=both compensates only blocks that reuse attention and MLP together, which needs a "
                  "static schedule (fora, rule, l2c); with a dynamic policy give goc:branches=each")
ORDER_ERROR = ("goc must be the first corrector: it extrapolates from its own queue of used features, so a "
               "corrector before it would be discarded; list goc before eoc (--corrector goc:... --corrector eoc:...)")


@dataclass(frozen=True)
class GocConfig:
    w: float = 1.2  # gradient weight: 1.2 for rule/FORA schedules, 0.8 with L2C (the released code's values)
    steps: Optional[tuple[int, ...]] = None  # steps where compensation is allowed, e.g. "3/5/7/9"
    preset: Optional[str] = None  # a published DDIM-20 set: rm-50, rm-25 or l2c
    prior: Optional[str] = None  # a prior artifact: detect inflection steps and skip them
    branches: str = "both"  # compensate only blocks reusing both branches (released L2C code) | each reused site


# -- the inflection statistic -------------------------------------------------------------------
def direction_cosines(prior: Prior) -> list[Optional[float]]:
    """c[v] = mean over sites of cos(P[v+1] - P[v], P[v] - P[v-1]) for v = 1..S-2; None at the ends."""
    steps, depth = prior.shape[:2]
    out: list[Optional[float]] = [None] * steps
    for v in range(1, steps - 1):
        total = 0.0
        for means in prior.means.values():  # (S, L, H, N, C) per branch
            before = (means[v].double() - means[v - 1].double()).reshape(depth, -1)  # (L, X)
            after = (means[v + 1].double() - means[v].double()).reshape(depth, -1)  # (L, X)
            # I use float64 so that the sign of a near-zero cosine is not decided by rounding; a site
            # that does not move has no direction and counts as 0
            total += float(F.cosine_similarity(after, before, dim=1, eps=1e-30).sum())
        out[v] = total / (depth * len(prior.means))
    return out


def inflection_steps(cosines: list[Optional[float]]) -> list[int]:
    """Steps where the mean direction turns back (c_v < 0)."""
    return [v for v, c in enumerate(cosines) if c is not None and c < 0]


def excluded_steps(inflections: list[int], num_steps: int) -> list[int]:
    """Steps t whose history window [t-2, t] holds an inflection."""
    return sorted({t for v in inflections for t in (v, v + 1, v + 2) if t < num_steps})


def inflection_report(prior: Prior) -> dict:
    """The statistic, the inflections and the excluded steps of a prior (``ditcache calibrate goc``)."""
    cosines = direction_cosines(prior)
    inflections = inflection_steps(cosines)
    return {"num_steps": prior.shape[0], "cosine": cosines, "inflections": inflections,
            "excluded": excluded_steps(inflections, prior.shape[0])}


# -- the corrector --------------------------------------------------------------------------------
class GocCorrector(Corrector):
    name = "goc"
    ahead = True  # reads its queue as of the end of the previous step

    def __init__(self, config: GocConfig):
        if not math.isfinite(config.w):
            raise ValueError(f"goc w must be a finite number, got {config.w}")
        given = [k for k in ("steps", "preset", "prior") if getattr(config, k) is not None]
        if len(given) > 1:
            raise ValueError(f"goc takes at most one of steps, preset and prior; got {given}")
        if config.branches not in BRANCH_RULES:
            raise ValueError(f"goc branches must be one of {BRANCH_RULES}, got {config.branches!r}")
        if config.preset is not None and config.preset not in PRESETS:
            raise ValueError(f"unknown goc preset {config.preset!r}; choose from {sorted(PRESETS)}")
        if config.prior is not None and not (Path(config.prior) / "manifest.json").is_file():
            raise FileNotFoundError(f"goc prior {config.prior} is not an artifact; make one with `ditcache calibrate eoc`")
        self.config = config
        self._detected: Optional[tuple[Artifact, frozenset]] = None  # (prior's key holder, allowed steps)
        self._queue: dict[Site, list[torch.Tensor]] = {}  # site -> [Q1, Q0], oldest first
        self._stored: dict[Site, torch.Tensor] = {}  # site -> the feature the engine stored (last computed)
        self._reused: set[Site] = set()
        self._schedule = None  # the policy's static Schedule, from bind

    def bind(self, schedule) -> None:
        self._schedule = schedule

    def allowed_steps(self, run: RunInfo) -> Optional[frozenset]:
        """The steps where compensation is allowed in ``run``; None means every step."""
        c = self.config
        if c.steps is not None:
            bad = [s for s in c.steps if not 0 <= s < run.num_steps]
            if bad:
                raise ValueError(f"goc steps {bad} are outside 0..{run.num_steps - 1}")
            return frozenset(c.steps)
        if c.preset is not None:
            if run.num_steps != PRESET_STEPS:
                raise ValueError(f"goc preset {c.preset!r} is the published {PRESET_STEPS}-step set; this run has "
                                 f"{run.num_steps} steps (give steps=... or prior=... instead)")
            return frozenset(PRESETS[c.preset])
        if c.prior is not None:
            key = ArtifactKey.from_run(run)
            if self._detected is None:
                prior = load_prior(c.prior, key)
                report = inflection_report(prior)
                allowed = frozenset(range(run.num_steps)) - set(report["excluded"])
                self._detected = (Artifact(PRIOR_KIND, prior.key, {}), allowed)
            self._detected[0].check(PRIOR_KIND, key)
            return self._detected[1]
        return None

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        self.allowed = self.allowed_steps(run)
        self._queue, self._stored, self._reused = {}, {}, set()

    def correct(self, step: StepInfo, site: Site, cached: torch.Tensor) -> torch.Tensor:
        return self._extrapolate(site) if self._compensates(step, site, cached) else cached

    def _extrapolate(self, site: Site) -> torch.Tensor:
        q1, q0 = self._queue[site]  # (B, N, C) each
        # q0 + w * (q0 - q1) with one new tensor instead of three: the same operations in the same
        # order, so the result is bit-identical; the queue's tensors are never written
        out = torch.sub(q0, q1)  # (B, N, C)
        out.mul_(self.config.w)
        return out.add_(q0)  # (B, N, C)

    def correct_step(self, step: StepInfo, sites: list[Site], features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every compensated site of the step. On a GPU in three fused calls (``torch._foreach_*``:
        a few kernels for the step where ``correct`` launches three per site); elsewhere site by
        site, which keeps each site's intermediate in the CPU caches. Both do the operations of
        ``correct`` in its order: the same bits."""
        if not features or features[0].device.type not in FUSED_DEVICES:
            return super().correct_step(step, sites, features)
        picked = [i for i, (site, cached) in enumerate(zip(sites, features)) if self._compensates(step, site, cached)]
        out = list(features)
        if not picked:
            return out
        q1s = [self._queue[sites[i]][0] for i in picked]  # (B, N, C) each
        q0s = [self._queue[sites[i]][1] for i in picked]  # (B, N, C) each
        made = torch._foreach_sub(q0s, q1s)  # q0 - q1
        torch._foreach_mul_(made, self.config.w)  # w (q0 - q1)
        torch._foreach_add_(made, q0s)  # q0 + w (q0 - q1)
        for i, feature in zip(picked, made):
            out[i] = feature
        return out

    def _compensates(self, step: StepInfo, site: Site, cached: torch.Tensor) -> bool:
        """Whether ``site`` is extrapolated at ``step`` (else plainly reused); checks the order."""
        if cached is not self._stored.get(site):
            raise ValueError(ORDER_ERROR)
        self._reused.add(site)
        if len(self._queue.get(site, ())) < 2 or (self.allowed is not None and step.index not in self.allowed):
            return False
        return self.config.branches != "both" or self._block_reused(step.index, site.block)

    def _block_reused(self, step: int, block: int) -> bool:
        """True when the schedule reuses both the attention and the MLP of ``block`` at ``step``."""
        if self._schedule is None:
            raise ValueError(NEEDS_SCHEDULE)
        return bool(self._schedule.cached[step, block].all())

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        if kind is not Kind.REUSE:
            self._stored[site] = used
        queue = self._queue.setdefault(site, [])
        queue.append(used)
        if len(queue) > 2:
            queue.pop(0)

    def memory_bytes(self) -> int:
        """Bytes of the queued features, each counted once.

        Right after a COMPUTE, Q0 is the very tensor the engine stores and counts. I leave it out for
        sites that have been reused in this run (so the engine surely stores them) and count it for
        the others, whose stored copy the engine may not keep (a site the policy never reuses).
        """
        seen: dict[int, int] = {}
        for site, queue in self._queue.items():
            for t in queue:
                if site in self._reused and t is self._stored.get(site):
                    continue
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def describe(self) -> dict:
        d = super().describe()
        if d.get("steps") is not None:
            d["steps"] = "/".join(str(s) for s in d["steps"])  # the spec syntax, and a tidy run name
        return d


@register_corrector("goc", GocConfig,
                    "GOC gradient extrapolation Q0 + w (Q0 - Q1): w 1.2 for rule/FORA, 0.8 with L2C; allowed steps "
                    "from steps=3/5/7, preset=rm-50|rm-25|l2c, or prior=PATH (skips detected inflections); "
                    "branches=both (default: only blocks reusing attention and MLP, as the released L2C code) "
                    "or each; list it before eoc")
def _goc(config: GocConfig) -> GocCorrector:
    return GocCorrector(config)
