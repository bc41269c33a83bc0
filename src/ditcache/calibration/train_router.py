"""Train a Learning-to-Cache router for one model and DDIM step count.

Ma, Fang, Mi & Wang, "Learning-to-Cache", https://arxiv.org/abs/2406.01733 (methods.md §3.3, §3.5).

One iteration, in this project's count-up step convention (the cache steps are the odd steps):

1. draw one cache step s (per process) and a batch of states x at step s − 1 with labels (each
   dropped to the null class with probability 0.1; no guidance in training);
2. teacher (no grad): the full model at s − 1, recording every block's pre-gate A and M as the
   cache, then one DDIM step (eta 0) to x at step s;
3. target (no grad): the full model at s, ε_full;
4. prediction: the model at s with every sub-layer blended β·fresh + (1 − β)·cached, β = router s;
5. loss = mean((ε_full − ε_β)²) over all output channels (the variance ones too) + λ·Σ β_s;
   AdamW (weight decay 0) on the router only, then the logits are clamped to [−5, 5].

That is the ``paper`` recipe. The default ``ranked`` recipe changes what kept the paper's from
learning on the default model (RouterConfig says why; docs/results.md has the measurements):
λ·Σβ_s² in step 5, sign descent with a linearly falling lr instead of AdamW, logits in [−10, 10],
and in step 1 every cache step (each with its own batch) instead of one.

States come from real images noised to step s − 1 (``images``, the paper's way; here MNIST for
pixel models) or from the model's own uncached DDIM trajectories from random noise and labels
(``trajectories``: image-free, for users with a checkpoint but no data). On a diffusers pipeline
``pipelines/router.py`` trains inside the pipeline's own call and scheduler instead.

Data-parallel under ``torchrun``: each process draws its own step and batch, the router's
gradients are averaged over processes, and process 0 writes checkpoints and the artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..adapters import adapter_for
from ..checkpoints import load_resumable, save_checkpoint
from ..finite import NonFiniteError
from ..policies.l2c import ARTIFACT_KIND, DEFAULT_THRESHOLD, cache_steps, check_threshold
from ..sampling.diffusion import GaussianDiffusion
from ..sampling.loops import respaced_diffusion, sample
from .artifact import Artifact, ArtifactKey, save_artifact
from .optim import Signum
from .router import INITS, Router, SubLayerBlend

DATA_MODES = ("images", "trajectories")
PENALTIES = ("l1", "l2")  # λ·Σβ (the paper) or λ·Σβ²
STEP_DRAWS = ("one", "all")
OPTIMIZERS = ("adamw", "sign")  # the paper's AdamW, or sign descent (calibration/optim.py says why)  # one random cache step per process per iteration (the paper), or every one
# λ of the authors' DiT-XL/2 256 routers by step count (methods.md §3.5); other counts get 5e-6
PAPER_L1 = {10: 1e-6, 20: 5e-6, 50: 1e-6}
FALLBACK_L1 = 5e-6
RANKED_L2 = 1e-3  # λ of the "ranked" recipe: at θ = 0.1 it caches sub-layers whose reuse costs < λ/9
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "threshold")  # none changes the maths


def default_l1(num_steps: int) -> float:
    return PAPER_L1.get(num_steps, FALLBACK_L1)


@dataclass(frozen=True)
class RouterConfig:
    """Router training settings. Defaults are the "ranked" recipe (RECIPES); "paper" is the authors'.

    Why the defaults differ from the paper (docs/results.md, "Learning-to-Cache"): with λ·Σβ the
    pull on every logit is the same, and on this model it is larger than the error signal at most
    cache steps, so AdamW (which scales each logit's step by its own gradient size) moves every
    logit by the same amount and the router keeps the ranking of its random initialisation; with
    only ~1/10 of the iterations reaching each router it never gets far. The fixes: λ·Σβ², whose
    fixed point for a sub-layer whose reuse costs c is β = c / (c + λ), i.e. logit = log(c / λ)
    (ordered by cost at every step, whatever the start); sign descent, which reaches it whatever
    the gradient's scale; every cache step in every iteration; a decaying learning rate; and every
    logit starting at 0, so the router has no initial ranking to keep (with N(0, 1) logits the
    learned ranking is the cost's, which by chance correlates with a random start at some steps).
    """

    steps: int = 20  # DDIM steps the router is for
    cfg_scale: float = 1.5  # guidance of the inference runs it is meant for (key only: training has none)
    data: str = "images"  # "images" (the paper) or "trajectories" (image-free)
    data_dir: Optional[str] = None  # MNIST folder for images; None: $DITCACHE_MNIST or the shared folder
    trajectories: int = 1024  # per process: uncached DDIM trajectories in the image-free pool
    batch_size: int = 8  # global, per cache step drawn (the paper: 64, 8 per GPU on 8 GPUs)
    lr: float = 0.15  # per-update move of a logit at the start (the paper: AdamW at 1e-3 over ~11k updates per router)
    l1: Optional[float] = None  # λ; None: RANKED_L2 for "l2", the authors' value for the step count for "l1"
    iterations: int = 200  # each updates every router (the paper: 20000 ≈ 1 ImageNet epoch at batch 64)
    null_prob: float = 0.1  # labels dropped to the null class, as in DiT training
    threshold: float = DEFAULT_THRESHOLD  # θ, only for the progress bar's skip fraction
    seed: int = 0
    checkpoint_every: int = 20
    penalty: str = "l2"  # "l1": λ·Σβ (the paper); "l2": λ·Σβ²
    step_draw: str = "all"  # "one": one random cache step per process per iteration (the paper); "all": every one
    logit_bound: float = 10.0  # logits clamped to [-bound, bound] after every update (the paper: 5)
    optimizer: str = "sign"  # "adamw" (the paper, weight decay 0) or "sign": every logit moves by lr·sign(grad)
    lr_final: float = 0.05  # lr falls linearly to lr·lr_final at the last iteration (the paper: 1, constant)
    init: str = "constant"  # initial logits: "normal" N(0, 1) (the paper) or "constant" (all 0: no ranking to keep)

    def validate(self, world: int) -> None:
        if self.steps < 2:
            raise ValueError(f"L2C needs at least 2 steps (step 1 is the first cache step), got {self.steps}")
        if self.data not in DATA_MODES:
            raise ValueError(f"unknown data mode {self.data!r}; choose from {list(DATA_MODES)}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {self.penalty!r}; choose from {list(PENALTIES)}")
        if self.step_draw not in STEP_DRAWS:
            raise ValueError(f"unknown step draw {self.step_draw!r}; choose from {list(STEP_DRAWS)}")
        if self.batch_size < world or self.batch_size % world:
            raise ValueError(f"global batch {self.batch_size} must be a positive multiple of the {world} processes")
        if self.iterations < 0 or self.checkpoint_every < 1 or self.trajectories < 1:
            raise ValueError("iterations must be >= 0, checkpoint_every and trajectories >= 1")
        if not self.lr > 0 or (self.l1 is not None and not self.l1 >= 0):
            raise ValueError(f"lr must be > 0 and l1 >= 0, got {self.lr} and {self.l1}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {list(OPTIMIZERS)}")
        if not 0 < self.lr_final <= 1:
            raise ValueError(f"lr_final must be in (0, 1], got {self.lr_final}")
        if self.init not in INITS:
            raise ValueError(f"unknown router init {self.init!r}; choose from {list(INITS)}")
        if not self.logit_bound > 0:
            raise ValueError(f"logit_bound must be > 0, got {self.logit_bound}")
        if not 0 <= self.null_prob <= 1:
            raise ValueError(f"null_prob must be in [0, 1], got {self.null_prob}")
        check_threshold(self.threshold)

    @property
    def lam(self) -> float:
        if self.l1 is not None:
            return self.l1
        return default_l1(self.steps) if self.penalty == "l1" else RANKED_L2


# named settings; any field can still be overridden (the paper's: methods.md §3.3, §3.5)
RECIPES = {
    "ranked": {},
    "paper": dict(batch_size=64, lr=1e-3, l1=None, iterations=20000, checkpoint_every=500, penalty="l1",
                  step_draw="one", logit_bound=5.0, optimizer="adamw", lr_final=1.0, init="normal"),
}


def recipe_config(recipe: str = "ranked", **overrides) -> RouterConfig:
    """A RouterConfig from a named recipe; ``overrides`` whose value is None keep the recipe's."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown router recipe {recipe!r}; choose from {sorted(RECIPES)}")
    fields = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    return RouterConfig(**fields)


def _seed(*parts) -> int:
    """A 63-bit seed from any parts, kept apart from the sampling seeds of generate.py."""
    return int(hashlib.sha256(":".join(["ditcache-l2c", *map(str, parts)]).encode()).hexdigest()[:15], 16)


def data_seed(seed: int, rank: int) -> int:
    """The seed of one process's stream of steps, batches, noise and label drops."""
    return _seed("data", seed, rank)


# -- where the states x at step s - 1 come from ------------------------------------------------------

class ImageStates:
    """Real images (N, C, H, W) in [-1, 1] with labels (N,), noised to the step before a cache step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                             f"and {tuple(labels.shape)}")
        self.images, self.labels = images, labels

    def draw(self, step: int, batch: int, gen: torch.Generator, diffusion: GaussianDiffusion):
        """x at step ``step - 1`` (B, C, H, W) and labels (B,), on the CPU."""
        idx = torch.randint(0, len(self.images), (batch,), generator=gen)  # (B,)
        x0 = self.images[idx]  # (B, C, H, W)
        noise = torch.randn(x0.shape, generator=gen)
        previous = torch.full((batch,), diffusion.num_timesteps - step, dtype=torch.long)  # respaced index of s-1
        return diffusion.q_sample(x0, previous, noise), self.labels[idx]


def mnist_states(loaded, folder: Optional[str] = None) -> ImageStates:
    """The MNIST test split as states for a pixel model of 1 x 28 x 28 images and >= 10 classes."""
    from ..data.mnist import load_mnist

    if loaded.is_latent or loaded.in_channels != 1 or loaded.latent_size != 28 or loaded.num_classes < 10:
        raise ValueError(f"--data images reads MNIST (1 x 28 x 28 pixels, 10 classes), but {loaded.name} takes "
                         f"{loaded.in_channels} x {loaded.latent_size} x {loaded.latent_size} "
                         f"{'latents' if loaded.is_latent else 'pixels'} with {loaded.num_classes} classes; "
                         "use --data trajectories (image-free) for it")
    images, labels = load_mnist(folder)
    x = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]
    return ImageStates(x, torch.from_numpy(labels).long())


class TrajectoryStates:
    """A pool of the model's own uncached DDIM trajectories (no guidance) from random noise and labels.

    I keep only the states that training uses, x at step s − 1 for every cache step s: a pool of
    ``count`` trajectories holds (count, cache steps, C, H, W) values. Noise and labels of
    trajectory i come from a seed of (seed, rank, i), so a resumed run rebuilds the same pool.
    """

    def __init__(self, loaded, num_steps: int, count: int, seed: int = 0, rank: int = 0,
                 batch_size: int = 64, progress: bool = False):
        self.cache_steps = cache_steps(num_steps)
        keep = {s - 1: j for j, s in enumerate(self.cache_steps)}  # step of a kept state -> its slot
        shape = (loaded.in_channels, loaded.latent_size, loaded.latent_size)
        device = next(loaded.module.parameters()).device
        self.states = torch.empty(count, len(keep), *shape)  # (K, S_cache, C, H, W)
        self.labels = torch.empty(count, dtype=torch.long)  # (K,)
        starts = range(0, count, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="trajectory pool", unit="batch")
        for start in starts:
            rows = range(start, min(count, start + batch_size))
            noise, labels = [], []
            for i in rows:
                g = torch.Generator().manual_seed(_seed("trajectory", seed, rank, i))
                noise.append(torch.randn(shape, generator=g))  # (C, H, W)
                labels.append(int(torch.randint(0, loaded.num_classes, (1,), generator=g)))
            y = torch.tensor(labels, dtype=torch.long)
            calls = []

            def record(x, t, labels_, _rows=rows, _calls=calls):
                # the sampler calls the model once per step, in order: call k sees x at step k
                if len(_calls) in keep:
                    self.states[_rows.start:_rows.stop, keep[len(_calls)]] = x.cpu()
                _calls.append(None)
                return loaded.forward(x, t, labels_)

            # DDIM (eta 0) draws step noise it never uses; a private generator keeps the global RNG untouched
            sample(record, torch.stack(noise).to(device), y.to(device), sampler="ddim", num_steps=num_steps,
                   cfg_scale=1.0, null_class=loaded.null_class, learn_sigma=loaded.learn_sigma,
                   generator=torch.Generator(device=device).manual_seed(0))
            self.labels[rows.start:rows.stop] = y

    def draw(self, step: int, batch: int, gen: torch.Generator, diffusion: GaussianDiffusion):
        """x at step ``step - 1`` (B, C, H, W) and labels (B,), on the CPU."""
        idx = torch.randint(0, len(self.states), (batch,), generator=gen)  # (B,)
        return self.states[idx, self.cache_steps.index(step)], self.labels[idx]


# -- the objective ---------------------------------------------------------------------------------

def teacher_step(forward, blend: SubLayerBlend, diffusion: GaussianDiffusion, x_prev: torch.Tensor,
                 y: torch.Tensor, step: int, learn_sigma: bool):
    """Steps 2-3 of an iteration, without gradients: (x, t, target) at cache step ``step``.

    The full model at ``step - 1`` on ``x_prev`` (B, C, H, W) records every sub-layer's output in
    ``blend`` as the cache; one DDIM step gives x (B, C, H, W) at ``step``, t (B,) its model
    timesteps, and target (B, C_out, H, W) the full model's output there.
    """
    num_steps = diffusion.num_timesteps
    if not 1 <= step < num_steps or step % 2 != 1:
        raise ValueError(f"step {step} is not a cache step of a {num_steps}-step router")
    batch, device = x_prev.shape[0], x_prev.device
    previous = torch.full((batch,), num_steps - step, dtype=torch.long, device=device)  # respaced s-1
    with torch.no_grad():
        with blend.recording():
            out_prev = forward(x_prev, diffusion.model_timesteps(previous), y)  # (B, C_out, H, W)
        x = diffusion.ddim_step(out_prev, x_prev, previous, learn_sigma)  # (B, C, H, W) at step s
        t = diffusion.model_timesteps(previous - 1)  # (B,) respaced index of s
        target = forward(x, t, y)  # (B, C_out, H, W)
    return x, t, target


def router_loss(forward, blend: SubLayerBlend, router: Router, diffusion: GaussianDiffusion,
                x_prev: torch.Tensor, y: torch.Tensor, step: int, learn_sigma: bool, l1: float,
                penalty: str = "l1") -> dict:
    """L2C's loss at cache step ``step`` from states ``x_prev`` (B, C, H, W) at step ``step - 1``.

    ``forward(x, t, y)`` is the model with ``blend`` installed; ``diffusion`` is respaced to the
    router's step count. ``penalty`` "l1" adds λ·Σβ (the paper), "l2" λ·Σβ². Returns
    dict(loss, mse, penalty) with gradients only to ``router``.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; choose from {list(PENALTIES)}")
    if router.num_steps != diffusion.num_timesteps:
        raise ValueError(f"a {router.num_steps}-step router cannot train on a {diffusion.num_timesteps}-step sampler")
    x, t, target = teacher_step(forward, blend, diffusion, x_prev, y, step, learn_sigma)
    with torch.enable_grad():
        beta = router.beta(step)  # (2 * depth,)
        with blend.blending(beta):
            pred = forward(x, t, y)  # (B, C_out, H, W)
        mse = ((target - pred) ** 2).mean()
        term = beta.sum() if penalty == "l1" else (beta ** 2).sum()
        return {"loss": mse + l1 * term, "mse": mse, "penalty": term}


# -- data parallel -----------------------------------------------------------------------------------

def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_router_grads(router: Router, world: int) -> None:
    """Average the router's gradients over processes, as DistributedDataParallel would.

    A step's logits keep grad None only when no process drew that step, so AdamW leaves them (and
    their moment estimates) alone, as it does in the authors' runs.
    """
    if world == 1:
        return
    params = list(router.logits)
    grads = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])  # (S, 2L)
    used = torch.tensor([float(p.grad is not None) for p in params], device=grads.device)  # (S,)
    dist.all_reduce(grads)
    dist.all_reduce(used)
    for p, g, u in zip(params, grads, used):
        p.grad = g / world if u > 0 else None


def _all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# -- the run ---------------------------------------------------------------------------------------

class RouterTrainer:
    """One router training run in a folder: ``checkpoint.pt`` (resumable), ``train_log.csv``, ``router/``.

    ``loaded`` is a LoadedModel (its weights are frozen here). ``states`` overrides the data source
    that ``config.data`` names (an object with ``draw(step, batch, generator, diffusion)``).
    """

    def __init__(self, loaded, config: RouterConfig, out: str | os.PathLike, states=None, progress: bool = False):
        self.rank, self.world = rank_and_world()
        config.validate(self.world)
        self.loaded = loaded
        self.identity = loaded.fingerprint  # what a checkpoint must have been made on to be resumed
        self._setup(loaded.module, config, out)
        self.diffusion = respaced_diffusion(config.steps, "ddim")
        if states is None:
            if config.data == "images":
                states = mnist_states(loaded, config.data_dir)
            else:
                states = TrajectoryStates(loaded, config.steps, config.trajectories, config.seed, self.rank,
                                          progress=progress and self.rank == 0)
        self.states = states
        if self.ckpt_path.exists():
            self._resume()

    def _setup(self, module, config: RouterConfig, out) -> None:
        """What every router run has: the frozen model, the router, its optimiser, the data stream."""
        self.config = config
        self.out = Path(out)
        self.ckpt_path = self.out / "checkpoint.pt"
        module = module.eval().requires_grad_(False)
        self.device = next(module.parameters()).device
        adapter = adapter_for(module)
        self.depth = len(adapter.blocks(module))
        self.branches = tuple(b.value for b in adapter.branches(module))  # router columns per block
        self.cache_steps = cache_steps(config.steps)
        # the same initial router on every process (same seed), then each its own data stream
        self.router = Router(config.steps, self.depth, torch.Generator().manual_seed(config.seed),
                             columns=len(self.branches), init=config.init).to(self.device)
        self.init_logits = self.router.stacked().cpu().clone()  # kept in the artifact for `calibrate reuse-cost`
        if config.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.router.parameters(), lr=config.lr, weight_decay=0.0)
        else:
            self.opt = Signum(self.router.parameters(), lr=config.lr, momentum=0.0)
        self.batch = config.batch_size // self.world  # per process
        self.gen = torch.Generator().manual_seed(data_seed(config.seed, self.rank))
        self.blend = SubLayerBlend(module)
        self.iteration, self.seconds = 0, 0.0

    # -- checkpoints --------------------------------------------------------------------------------
    def _resume(self) -> None:
        # with a decaying lr the schedule depends on the iteration target, so that must not change then
        may_change = RESUMABLE_CHANGES if self.config.lr_final == 1.0 else tuple(
            k for k in RESUMABLE_CHANGES if k != "iterations")
        state = load_resumable(self.ckpt_path, self.config, may_change)
        if state["world"] != self.world or state["fingerprint"] != self.identity:
            raise ValueError(f"{self.ckpt_path} was made by {state['world']} processes on model "
                             f"{state['fingerprint']}; this run has {self.world} on {self.identity}")
        self.router.load_logits(state["logits"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gens"][self.rank])
        self.iteration, self.seconds = state["iteration"], state["seconds"]

    def _kept(self) -> str:
        return (f"{self.ckpt_path} keeps the last checkpointed state" if self.ckpt_path.is_file()
                else "no checkpoint was written yet")

    def save_checkpoint(self) -> None:
        """Every process hands over its random state; process 0 writes, atomically."""
        gens = _all_gather(self.gen.get_state(), self.world)
        if self.rank != 0:
            return
        state = {"config": dataclasses.asdict(self.config), "logits": self.router.stacked().cpu(),
                 "opt": self.opt.state_dict(), "gens": gens, "iteration": self.iteration,
                 "seconds": self.seconds, "world": self.world, "fingerprint": self.identity}
        save_checkpoint(state, self.ckpt_path)

    # -- training -----------------------------------------------------------------------------------
    def local_step(self) -> dict:
        """Draw this process's cache step(s) and batches, and add their gradients to the router's.

        With ``step_draw`` "one" a single random cache step (the paper), with "all" every cache
        step, each with its own batch: every router then gets an update every iteration.
        """
        c = self.config
        if c.step_draw == "one":
            steps = [self.cache_steps[int(torch.randint(0, len(self.cache_steps), (1,), generator=self.gen))]]
        else:
            steps = self.cache_steps
        totals = {"loss": 0.0, "mse": 0.0, "penalty": 0.0}
        with self.blend:
            for step in steps:
                x_prev, y = self.states.draw(step, self.batch, self.gen, self.diffusion)  # (B, C, H, W), (B,)
                drop = torch.rand(self.batch, generator=self.gen) < c.null_prob  # (B,)
                y = torch.where(drop, torch.full_like(y, self.loaded.null_class), y)
                out = router_loss(self.loaded.forward, self.blend, self.router, self.diffusion,
                                  x_prev.to(self.device), y.to(self.device), step, self.loaded.learn_sigma, c.lam,
                                  c.penalty)
                out["loss"].backward()  # each step's logits get only their own step's gradient
                for k in totals:
                    totals[k] += float(out[k].detach()) / len(steps)
        return {"step": steps[0] if len(steps) == 1 else -1, **totals}

    def train_step(self) -> dict:
        """One iteration: local gradients, averaged over processes, AdamW, clamp."""
        self.opt.zero_grad(set_to_none=True)
        stats = self.local_step()
        if not math.isfinite(stats["loss"]):  # already a float: no extra synchronisation
            raise NonFiniteError(f"router training iteration {self.iteration + 1}: the loss is {stats['loss']}; "
                                 f"stopped before the update; {self._kept()}")
        average_router_grads(self.router, self.world)
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate()
        self.opt.step()
        self.router.clamp_(self.config.logit_bound)
        self.iteration += 1
        return stats

    def learning_rate(self) -> float:
        """lr at this iteration: linear from lr to lr·lr_final over the run (constant when lr_final is 1)."""
        c = self.config
        done = min(self.iteration / max(c.iterations, 1), 1.0)
        return c.lr * (1.0 - (1.0 - c.lr_final) * done)

    def skip_fraction(self) -> float:
        """Fraction of all sub-layer calls the router skips at θ (the schedule's cached fraction)."""
        return self.router.schedule(self.config.threshold).cached_fraction

    def _should_stop(self, deadline: Optional[float]) -> bool:
        """Past the time budget, decided by process 0 so that every process stops together."""
        if deadline is None:
            return False
        flag = torch.tensor([float(time.perf_counter() > deadline)], device=self.device)
        if self.world > 1:
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def train(self, max_minutes: Optional[float] = None, progress: bool = True) -> Artifact:
        """Train until ``iterations`` (or the time budget), checkpointing as it goes; returns the artifact."""
        from tqdm.auto import tqdm

        c = self.config
        log = self.out / "train_log.csv"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not log.exists():
                log.write_text("iteration,loss,mse,skip_fraction,seconds\n")
        bar = tqdm(total=c.iterations, initial=self.iteration, disable=not progress or self.rank != 0,
                   desc=f"l2c router {self.label()}", unit="it")
        deadline = None if max_minutes is None else time.perf_counter() + 60 * max_minutes
        window, saved_at = [], None
        while self.iteration < c.iterations:
            t0 = time.perf_counter()
            stats = self.train_step()
            self.seconds += time.perf_counter() - t0
            window.append((stats["loss"], stats["mse"]))
            skip = self.skip_fraction()
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean([w[0] for w in window[-50:]]):.3g}", skip=f"{skip:.1%}")
            stop = self._should_stop(deadline)
            if self.iteration % c.checkpoint_every == 0 or self.iteration == c.iterations or stop:
                self.save_checkpoint()
                if self.rank == 0:
                    loss, mse = np.mean(window, axis=0)
                    with log.open("a") as f:
                        f.write(f"{self.iteration},{loss:.6g},{mse:.6g},{skip:.4f},{self.seconds:.1f}\n")
                    save_artifact(self.artifact(), self.out / "router")
                saved_at = self.iteration
                window = []
            if stop:
                break
        bar.close()
        artifact = self.artifact()
        if self.rank == 0 and saved_at != self.iteration:
            save_artifact(artifact, self.out / "router")
        return artifact

    def label(self) -> str:
        """The sampler and step count, for the progress bar."""
        return f"ddim{self.config.steps}"

    def key(self) -> ArtifactKey:
        """What the router is valid for: this model under DDIM at this step count and CFG scale."""
        return ArtifactKey.for_run(self.loaded, "ddim", self.config.steps, self.config.cfg_scale)

    def meta(self) -> dict:
        """The artifact's record of how the router was trained."""
        c = self.config
        meta = {"l1": c.lam, "penalty": c.penalty, "step_draw": c.step_draw, "logit_bound": c.logit_bound,
                "optimizer": c.optimizer, "lr_final": c.lr_final, "lr": c.lr, "init": c.init,
                "iterations": self.iteration, "data": c.data, "seconds": round(self.seconds, 1),
                "batch_size": c.batch_size, "processes": self.world, "seed": c.seed, "depth": self.depth,
                "branches": list(self.branches), "skip_fraction_at_threshold": {str(c.threshold): self.skip_fraction()}}
        if c.data == "trajectories":
            meta["trajectories_per_process"] = c.trajectories
        return meta

    def artifact(self) -> Artifact:
        """The router as an "l2c-router" artifact, keyed by ``key()``."""
        return Artifact(ARTIFACT_KIND, self.key(), {"logits": self.router.stacked().cpu(),
                                                    "init_logits": self.init_logits}, self.meta())
