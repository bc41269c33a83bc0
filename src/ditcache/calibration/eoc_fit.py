"""Fit EOC's weight γ on uncached trajectories and the prior's trend, and store it with the prior.

EOC (https://arxiv.org/abs/2501.19243, methods.md §4.4) corrects a feature C reused at step t
(computed at t − 1) into C ⊙ (1 + γT) ("mul", eq. 7) or C + γT ("add"), with T = P[t] − P[t−1]
the prior's trend. The paper fixes γ (0.01 for rule schedules). Here γ is the least-squares
weight: over K uncached samples, with F the feature the model computes at t,

    mul:  γ* = Σ <F − C, T ⊙ C> / Σ |T ⊙ C|²        add:  γ* = Σ <F − C, T> / Σ |T|²

and the squared reuse error left is Σ|F − C|² − 2γ Σ<F − C, ·> + γ² Σ|·|², so a γ's share of the
error removed is exact from five sums per (branch, step, block). Those sums are what is stored
(tensors ``fit_<mode>_num``, ``fit_<mode>_den``, ``fit_err`` of shape (2, S, L): branch attn/mlp,
step, block; step 0 has no pair and stays 0), so every pooling is derived at load time:

- ``branch``: one γ per branch (attention, MLP), pooled over steps and blocks;
- ``block``: one γ per branch and block, pooled over steps;
- ``step``: one γ per branch, step and block.

Only one-step pairs (t − 1 → t) are fitted, the gap of every interval-2 schedule (RM, L2C); a
reuse over a longer gap gets the γ of its step. CFG halves share one γ.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..correctors.base import Corrector
from ..types import BRANCHES, Kind, RunInfo, Site, StepInfo
from .artifact import Artifact, save_artifact
from .prior import Prior, load_prior

FIT_LEVELS = ("branch", "block", "step")
MODES = ("mul", "add")
SUMS = ("fit_mul_num", "fit_mul_den", "fit_add_num", "fit_add_den", "fit_err")


class FitRecorder(Corrector):
    """Observes an uncached run and accumulates the five least-squares sums per (branch, step, block)."""

    name = "eoc-fit-recorder"

    def __init__(self, prior: Prior):
        self.prior = prior
        steps, depth = prior.shape[:2]
        self.sums = {k: torch.zeros(2, steps, depth, dtype=torch.float64) for k in SUMS}
        self.count = 0
        self._previous: dict[Site, torch.Tensor] = {}
        self._rows = 0

    def reset(self, run: RunInfo) -> None:
        super().reset(run)
        self.prior.check_run(run)
        self._previous = {}

    def observe(self, step: StepInfo, site: Site, kind: Kind, used: torch.Tensor) -> None:
        if kind is not Kind.COMPUTE:
            raise ValueError("the EOC fit needs an uncached run (policy 'none')")
        if site.is_trunk:
            return
        t, branch = step.index, site.branch.value
        previous = self._previous.get(site)
        self._previous[site] = used.detach()
        if previous is None:
            return
        b = BRANCHES.index(site.branch)
        trend = self.prior.trend(branch, site.block, t, t - 1).to(used.device)  # (H, N, C)
        halves = trend.shape[0]
        f = used.detach().double().reshape(halves, -1, *used.shape[1:])  # (H, B, N, C)
        c = previous.double().reshape(f.shape)  # (H, B, N, C)
        trend = trend.double().unsqueeze(1)  # (H, 1, N, C)
        d, tc = f - c, trend * c  # (H, B, N, C)
        rows = f.shape[1]
        s = self.sums
        s["fit_mul_num"][b, t, site.block] += float((d * tc).sum())
        s["fit_mul_den"][b, t, site.block] += float((tc * tc).sum())
        s["fit_add_num"][b, t, site.block] += float((d * trend).sum())
        s["fit_add_den"][b, t, site.block] += rows * float((trend * trend).sum())
        s["fit_err"][b, t, site.block] += float((d * d).sum())
        self._rows = rows

    def end_batch(self) -> None:
        self.count += self._rows


def record_uncached(loaded, recorder, config, progress: bool = False, device: str = "cpu",
                    desc: str = "fit batches") -> None:
    """Sample ``config.num_samples`` uncached with ``recorder`` observing every site; ``recorder.end_batch()``
    after each batch. The sampling loop of every fit stored in a prior (EOC's γ, forecast's Gram)."""
    from ..engine import CacheEngine
    from ..policies import make_policy
    from ..sampling.generate import generate

    indices = list(range(config.num_samples))
    batches = [indices[i:i + config.batch_size] for i in range(0, len(indices), config.batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc)
    with CacheEngine(loaded.module, make_policy("none"), [recorder]) as engine:
        for batch in batches:
            generate(loaded, config, engine=engine, indices=batch, device=device)
            recorder.end_batch()


def record_fit_sums(loaded, prior: Prior, config, progress: bool = False, device: str = "cpu") -> tuple[dict, int]:
    """The five sums (each (2, S, L)) and the sample count over ``config.num_samples`` uncached samples."""
    recorder = FitRecorder(prior)
    record_uncached(loaded, recorder, config, progress, device, "eoc fit batches")
    return recorder.sums, recorder.count


def store_in_prior(prior_path, prior: Prior, tensors: dict, meta_key: str, meta: dict, replace=()) -> None:
    """Rewrite the prior artifact atomically with ``tensors`` added under ``meta[meta_key]`` (the names
    in ``replace`` and ``tensors`` dropped first: an earlier fit of the same kind is replaced)."""
    art = prior.artifact
    drop = set(replace) | set(tensors)
    kept = {k: v for k, v in art.tensors.items() if k not in drop}
    save_artifact(Artifact(art.kind, art.key, {**kept, **tensors}, {**art.meta, meta_key: meta}), prior_path)


def fit_prior(loaded, prior_path, config, progress: bool = False, device: str = "cpu") -> dict:
    """Record the fit sums on ``config`` (the prior's settings) and store them in the prior artifact.

    The artifact is rewritten atomically with the sums added (any earlier fit replaced); returns a
    report with the fitted γ per branch and the share of the error each variant removes in-sample.
    """
    prior = load_prior(prior_path)
    start = time.perf_counter()
    sums, count = record_fit_sums(loaded, prior, config, progress, device)
    seconds = time.perf_counter() - start
    store_in_prior(prior_path, prior, {k: v.float() for k, v in sums.items()}, "fit",
                   {"K": count, "seed": config.seed, "seconds": round(seconds, 1),
                    "stored": "(branch attn/mlp, step, block) sums of one-step pairs"}, replace=SUMS)
    return {"prior": str(prior_path), "K": count, "seconds": seconds,
            "gamma_branch": {m: fitted_gamma(sums, m, "branch")[:, 1, 0].tolist() for m in MODES}}


def has_fit(prior: Prior) -> bool:
    return all(k in prior.artifact.tensors for k in SUMS)


def stored_sums(prior: Prior) -> dict:
    if not has_fit(prior):
        raise ValueError("this prior has no fitted γ; run `ditcache calibrate eoc-fit --prior PATH` on it first")
    return {k: prior.artifact.tensors[k].double() for k in SUMS}


def fitted_gamma(sums: dict, mode: str, level: str, steps: Optional[list[int]] = None) -> torch.Tensor:
    """γ for every (branch, step, block), shape (2, S, L), pooled as ``level`` says over ``steps``.

    ``steps``: the steps whose pairs are pooled (default: all of 1..S-1). A pool with no error
    signal (denominator 0) gets γ = 0.
    """
    if mode not in MODES or level not in FIT_LEVELS:
        raise ValueError(f"fit needs mode in {MODES} and level in {FIT_LEVELS}, got {mode!r} and {level!r}")
    num, den = sums[f"fit_{mode}_num"].double(), sums[f"fit_{mode}_den"].double()  # (2, S, L)
    mask = torch.zeros(num.shape[1], dtype=torch.float64)
    mask[list(range(1, num.shape[1])) if steps is None else steps] = 1.0
    num, den = num * mask[None, :, None], den * mask[None, :, None]
    if level == "branch":
        num, den = num.sum((1, 2), keepdim=True), den.sum((1, 2), keepdim=True)
    elif level == "block":
        num, den = num.sum(1, keepdim=True), den.sum(1, keepdim=True)
    gamma = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return gamma.expand(2, mask.numel(), sums["fit_err"].shape[2]).clone()


def removed_share(sums: dict, mode: str, gamma: torch.Tensor, steps: list[int],
                  branches: tuple[str, ...] = ("attn", "mlp")) -> float:
    """Share of the squared reuse error at ``steps`` (both branches, all blocks) removed by ``gamma``.

    ``gamma`` is a number or (2, S, L). Exact: err − 2γ·num + γ²·den per (branch, step, block).
    """
    num, den, err = (sums[k].double() for k in (f"fit_{mode}_num", f"fit_{mode}_den", "fit_err"))
    g = torch.as_tensor(gamma, dtype=torch.float64).expand(num.shape)
    sel = torch.zeros(num.shape, dtype=torch.bool)
    for i, b in enumerate(BRANCHES):
        if b.value in branches:
            sel[i, steps] = True
    total = float(err[sel].sum())
    left = float((err - 2 * g * num + g * g * den)[sel].sum())
    return 0.0 if total == 0 else 1.0 - left / total


__all__ = ["FIT_LEVELS", "FitRecorder", "fit_prior", "fit_report", "fitted_gamma", "has_fit", "record_fit_sums",
           "record_uncached", "removed_share", "store_in_prior", "stored_sums"]


def fit_report(fit_sums: dict, eval_sums: dict, paper_gamma: float = 0.01) -> list[dict]:
    """Share of the reuse error removed on ``eval_sums`` by the paper's γ and by γ fitted on ``fit_sums``.

    One row per variant; ``odd`` pools the odd steps (the reused steps of RM-50 and L2C), ``all``
    every step 1..S-1. ``gamma`` is [attn, mlp] where the variant has one value per branch.
    """
    steps = fit_sums["fit_err"].shape[1]
    odd, every = list(range(1, steps, 2)), list(range(1, steps))
    rows = [{"name": f"paper mul γ={paper_gamma:g}", "gamma": [paper_gamma, paper_gamma],
             "odd": removed_share(eval_sums, "mul", paper_gamma, odd),
             "all": removed_share(eval_sums, "mul", paper_gamma, every)}]
    for mode in MODES:
        for level in FIT_LEVELS:
            gamma = fitted_gamma(fit_sums, mode, level)
            rows.append({"name": f"fit {mode} per {level}",
                         "gamma": gamma[:, 1, 0].tolist() if level == "branch" else None,
                         "odd": removed_share(eval_sums, mode, gamma, odd),
                         "all": removed_share(eval_sums, mode, gamma, every)})
    return rows
