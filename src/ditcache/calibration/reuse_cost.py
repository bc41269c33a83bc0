"""What reusing each sub-layer costs at each cache step, and how far a router's ranking follows it.

A diagnostic for Learning-to-Cache (https://arxiv.org/abs/2406.01733, methods.md §3.3). On the
model's own uncached DDIM trajectories, for every cache step s and sub-layer j (2l: attention of
block l, 2l+1: its MLP), the *reuse cost* is

    cost[s, j] = mean( (ε_full(x_s) − ε_j(x_s))² )

where ε_j is the model at step s with only sub-layer j reusing its output of step s − 1 and every
other sub-layer computed. It is exactly the MSE term of the router's loss at β = 1 − e_j (one
sub-layer cached, the rest fresh), the same states, timesteps and no guidance, so it is the signal
a router is supposed to learn: with the L1 pull λ, a sub-layer whose cost is low should end with a
low β, one whose cost is high with a high β.

Reuse errors interact: with most sub-layers of a step reused, computing one of them fresh can make
the output *worse* (its fresh value no longer matches the stale ones around it), so what a
router's gradient sees is the *marginal cost in context*,

    context[s, j] = MSE(β with β_j = 0) − MSE(β with β_j = 1)        (the router's β elsewhere)

``context_cost_map`` measures it for a given router.

``ranking_report`` puts a router beside the maps: per cache step, the Spearman rank correlation of
its logits with the cost alone, with the cost in context, and with its initial logits (which
should be no higher than the chance correlation of the initial logits with the cost, or the
router only kept the ranking it was initialised with).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..policies.l2c import cache_steps
from ..sampling.loops import respaced_diffusion
from .artifact import Artifact, ArtifactKey
from .router import SubLayerBlend
from .train_router import teacher_step

COST_KIND = "l2c-reuse-cost"


def step_costs(forward, blend: SubLayerBlend, diffusion, x_prev: torch.Tensor, y: torch.Tensor, step: int,
               learn_sigma: bool) -> torch.Tensor:
    """Sum over the batch of the per-sample mean squared error of reusing each sub-layer alone: (2·depth,).

    ``x_prev`` (B, C, H, W) are states at ``step - 1``; ``blend`` is installed on the model that
    ``forward`` calls. Dividing by B gives the cost of this batch.
    """
    x, t, target = teacher_step(forward, blend, diffusion, x_prev, y, step, learn_sigma)
    width = 2 * blend.depth
    sums = torch.zeros(width, dtype=torch.float64)
    with torch.no_grad():
        for j in range(width):
            beta = torch.ones(width, device=x.device)
            beta[j] = 0.0  # only sub-layer j reuses: b·fresh + (1 − b)·cached = cached exactly
            with blend.blending(beta):
                pred = forward(x, t, y)  # (B, C_out, H, W)
            err = (target - pred).double().pow(2).flatten(1).mean(1)  # (B,)
            sums[j] = err.sum().cpu()
    return sums


def step_context_costs(forward, blend: SubLayerBlend, diffusion, x_prev: torch.Tensor, y: torch.Tensor, step: int,
                       learn_sigma: bool, beta: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each sub-layer's marginal reuse cost with the others blended at ``beta``: (2·depth,)."""
    x, t, target = teacher_step(forward, blend, diffusion, x_prev, y, step, learn_sigma)
    width = 2 * blend.depth
    sums = torch.zeros(width, dtype=torch.float64)

    def batch_err(b: torch.Tensor) -> torch.Tensor:
        with blend.blending(b.to(x.device)), torch.no_grad():
            pred = forward(x, t, y)  # (B, C_out, H, W)
        return (target - pred).double().pow(2).flatten(1).mean(1).sum().cpu()

    for j in range(width):
        reused, fresh = beta.clone(), beta.clone()
        reused[j], fresh[j] = 0.0, 1.0
        sums[j] = batch_err(reused) - batch_err(fresh)
    return sums


def reuse_cost_map(loaded, num_steps: int, states, batch_size: int = 64, progress: bool = False,
                   logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reuse cost (num_steps, 2·depth) float64 over a pool of trajectory states; NaN at non-cache steps.

    ``states`` is a ``TrajectoryStates`` pool (x at s − 1 for every cache step s, with labels).
    With router ``logits`` (num_steps, 2·depth) it is the marginal cost in that router's context.
    """
    module = loaded.module.eval().requires_grad_(False)
    device = next(module.parameters()).device
    diffusion = respaced_diffusion(num_steps, "ddim")
    steps = cache_steps(num_steps)
    count = len(states.labels)
    blend = SubLayerBlend(module)
    costs = torch.full((num_steps, 2 * blend.depth), float("nan"), dtype=torch.float64)
    jobs = [(s, start) for s in steps for start in range(0, count, batch_size)]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="reuse cost" if logits is None else "cost in context", unit="batch")
    totals = {s: torch.zeros(2 * blend.depth, dtype=torch.float64) for s in steps}
    with blend:
        for s, start in jobs:
            rows = slice(start, min(count, start + batch_size))
            x_prev = states.states[rows, states.cache_steps.index(s)].to(device)  # (B, C, H, W)
            y = states.labels[rows].to(device)  # (B,)
            if logits is None:
                totals[s] += step_costs(loaded.forward, blend, diffusion, x_prev, y, s, loaded.learn_sigma)
            else:
                beta = torch.sigmoid(torch.as_tensor(logits[s]).float())
                totals[s] += step_context_costs(loaded.forward, blend, diffusion, x_prev, y, s, loaded.learn_sigma,
                                                beta)
    for s in steps:
        costs[s] = totals[s] / count
    return costs


def cost_artifact(loaded, num_steps: int, costs: torch.Tensor, meta: dict) -> Artifact:
    """The map as an artifact keyed like the router it diagnoses (DDIM, no guidance in the measurement)."""
    key = ArtifactKey.for_run(loaded, "ddim", num_steps, meta.get("cfg_scale", 1.5))
    return Artifact(COST_KIND, key, {"cost": costs.float()}, meta)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values`` (n,), ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> Optional[float]:
    """Spearman's rank correlation (Pearson on average ranks); None when either side is constant."""
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return None if denom == 0 else float((ra * rb).sum() / denom)


def ranking_report(logits: torch.Tensor, cost: torch.Tensor, init: Optional[torch.Tensor] = None,
                   threshold: float = 0.1, context: Optional[torch.Tensor] = None) -> list[dict]:
    """Per cache step: Spearman of the router's logits with the cost, the cost in context and ``init``.

    logits, cost, init and context are (steps, 2·depth). ``init_cost`` is the Spearman of ``init``
    with the cost: what a router that ranked exactly by cost would score against its init by
    chance. ``cached`` counts the sub-layers with β <= θ.
    """
    logits = torch.as_tensor(logits).double().cpu()
    cost = torch.as_tensor(cost).double().cpu()
    if logits.shape != cost.shape:
        raise ValueError(f"router logits {tuple(logits.shape)} and cost map {tuple(cost.shape)} differ in shape")
    rows = []
    for s in cache_steps(logits.shape[0]):
        row = {"step": s, "spearman_cost": spearman(logits[s].numpy(), cost[s].numpy()),
               "cached": int((torch.sigmoid(logits[s]) <= threshold).sum()), "width": int(logits.shape[1])}
        if init is not None:
            start = torch.as_tensor(init)[s].double().numpy()
            row["spearman_init"] = spearman(logits[s].numpy(), start)
            row["init_cost"] = spearman(start, cost[s].numpy())
        if context is not None:
            row["spearman_context"] = spearman(logits[s].numpy(), torch.as_tensor(context)[s].double().numpy())
        rows.append(row)
    return rows


def agreement_report(logits_a: torch.Tensor, logits_b: torch.Tensor, init_a: Optional[torch.Tensor] = None,
                     init_b: Optional[torch.Tensor] = None) -> list[dict]:
    """Per cache step: Spearman of two routers' logits with each other, and of their initial logits.

    Two routers trained from different random starts that learned the same thing agree with each
    other (``spearman``) while their starts do not (``spearman_init``): the seed-invariance check of
    "the ranking comes from the cost, not from the initialisation".
    """
    a, b = torch.as_tensor(logits_a).double().cpu(), torch.as_tensor(logits_b).double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"routers of different shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    rows = []
    for s in cache_steps(a.shape[0]):
        row = {"step": s, "spearman": spearman(a[s].numpy(), b[s].numpy())}
        if init_a is not None and init_b is not None:
            row["spearman_init"] = spearman(torch.as_tensor(init_a)[s].double().numpy(),
                                            torch.as_tensor(init_b)[s].double().numpy())
        rows.append(row)
    return rows


def router_logits(path) -> tuple[Artifact, torch.Tensor, torch.Tensor]:
    """(artifact, logits, initial logits) of an l2c-router artifact.

    Routers trained before the initial logits were stored get them rebuilt from the seed and depth
    in their manifest (``Router`` draws them from ``torch.Generator().manual_seed(seed)``).
    """
    from ..policies.l2c import ARTIFACT_KIND
    from .artifact import load_artifact
    from .router import Router

    artifact = load_artifact(path, ARTIFACT_KIND)
    logits = artifact.tensors["logits"]
    init = artifact.tensors.get("init_logits")
    if init is None:
        seed = artifact.meta.get("seed")
        if seed is None:
            raise ValueError(f"router {path} stores neither its initial logits nor the seed they came from")
        init = Router(logits.shape[0], logits.shape[1] // 2, torch.Generator().manual_seed(int(seed)),
                      init=artifact.meta.get("init", "normal")).stacked()
    return artifact, logits, init


def check_pair(router: Artifact, key: ArtifactKey, router_path) -> None:
    """A router and a cost map (its key) must be for the same model and step count."""
    for field in ("model_fingerprint", "steps"):
        a, b = getattr(router.key, field), getattr(key, field)
        if a != b:
            raise ValueError(f"router {router_path} was trained for {field} {a!r}, the cost map is for {b!r}")
