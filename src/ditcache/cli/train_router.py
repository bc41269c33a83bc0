"""`ditcache train-router`: train a Learning-to-Cache router (https://arxiv.org/abs/2406.01733).

Runs in one process, or data-parallel under torchrun:
``torchrun --nproc_per_node=8 -m ditcache.cli.main train-router --model ... --device cuda``.
On a diffusers pipeline (``--model FOLDER --prompts FILE [--scheduler ...]``) it trains inside the
pipeline's own call and scheduler, in one process (``pipelines/router.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path

from ..calibration.router import INITS
from ..calibration.train_router import (DATA_MODES, OPTIMIZERS, PAPER_L1, PENALTIES, RANKED_L2, RECIPES, STEP_DRAWS, RouterConfig,
                                        RouterTrainer, recipe_config)
from ..models.loading import load_model
from ..outdir import claim
from ..sampling.sharded import barrier
from .common import add_num_heads_arg, add_overwrite_arg, add_pipeline_args, print_json, wants_pipeline


def add_parser(sub) -> None:
    d = RouterConfig()
    p = sub.add_parser(
        "train-router", help="train a Learning-to-Cache router for a model and DDIM step count",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Learn which attention/MLP sub-layers each odd DDIM step may reuse from the step before "
                    "(L2C). Writes OUT/checkpoint.pt (resumed automatically), OUT/train_log.csv and the "
                    "router artifact OUT/router, used with --policy l2c:router=OUT/router.\n"
                    "Data-parallel: torchrun --nproc_per_node=N -m ditcache.cli.main train-router ...\n"
                    "On a diffusers pipeline (--model FOLDER with --prompt/--prompts or --scheduler) the router "
                    "trains inside the pipeline's own call: its scheduler (a copy) steps between s-1 and s, the "
                    "states are its own uncached trajectories at --cfg-scale guidance, each iteration on "
                    "--batch-size fresh samples (prompts in order); one process. PixArt routers have three "
                    "logits per block (attn, mlp, cross) and give three-column schedules.")
    p.add_argument("--model", default="mnist",
                   help="model to train the router for: a DiT (see 'ditcache sample --help') or a diffusers "
                        "pipeline folder / hub id (default: mnist)")
    add_num_heads_arg(p)
    p.add_argument("--device", default="cpu", help="torch device; under torchrun 'cuda' means cuda:LOCAL_RANK")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"DDIM steps, or the pipeline scheduler's (default: {d.steps})")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                   help=f"guidance scale the router is meant for; recorded in its key. A DiT trains without "
                        f"guidance; a pipeline's trajectories are guided as the pipeline runs them (default: {d.cfg_scale})")
    p.add_argument("--data", choices=DATA_MODES, default=None,
                   help="images: real images noised to the step (the paper; MNIST for pixel models); "
                        f"trajectories: the model's own DDIM trajectories, no data needed (default: {d.data}; "
                        "a pipeline: always its own trajectories)")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $DITCACHE_MNIST or the shared folder)")
    p.add_argument("--trajectories", type=int, default=d.trajectories,
                   help=f"trajectories in the image-free pool, per process (default: {d.trajectories})")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="ranked",
                   help="ranked: λ·Σβ², sign descent, every cache step each iteration, decaying lr (learns the "
                        "ranking of reuse costs on a CPU); paper: the authors' λ·Σβ, one step per iteration, "
                        "lr 1e-3, 20000 iterations, logits in [-5, 5]. The flags below override it (default: ranked)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch per cache step drawn, split over processes (ranked: {d.batch_size}, paper: 64)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (ranked: {d.lr}, paper: 1e-3)")
    p.add_argument("--l1", type=float, default=None,
                   help=f"λ of the sparsity term (ranked: {RANKED_L2}; paper: the authors' value for the step "
                        f"count {PAPER_L1}, else 5e-6)")
    p.add_argument("--penalty", choices=PENALTIES, default=None,
                   help="sparsity term: l1 = λ·Σβ (paper), l2 = λ·Σβ² (ranked)")
    p.add_argument("--step-draw", choices=STEP_DRAWS, default=None,
                   help="one: one random cache step per process per iteration (paper); all: every cache step (ranked)")
    p.add_argument("--logit-bound", type=float, default=None,
                   help=f"clamp the logits to [-B, B] after each update (ranked: {d.logit_bound:g}, paper: 5)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw (paper) or sign: every logit moves by lr·sign(gradient) (ranked)")
    p.add_argument("--lr-final", type=float, default=None,
                   help=f"lr falls linearly to lr·LR_FINAL at the last iteration (ranked: {d.lr_final:g}; paper: 1)")
    p.add_argument("--iterations", type=int, default=None, help=f"(ranked: {d.iterations}, paper: 20000)")
    p.add_argument("--init", choices=INITS, default=None,
                   help="initial logits: constant (all 0, β = 0.5: no ranking to start from; ranked) or "
                        "normal (N(0, 1) from --seed; paper)")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"θ for the reported skip fraction (default: {d.threshold})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"iterations between checkpoints (ranked: {d.checkpoint_every}, paper: 500)")
    p.add_argument("--out", default=None,
                   help="run folder (default: runs/l2c-<model>-ddim<steps>-<data>, or -<scheduler><steps>-cfg<scale>)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    add_overwrite_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--no-progress", action="store_true")
    add_pipeline_args(p)
    p.set_defaults(func=run)


def _distributed(device: str) -> tuple[str, bool]:
    """Join the torchrun process group if there is one; the device this process uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device, True


def _config(args, **fixed) -> RouterConfig:
    return recipe_config(args.recipe, **{**dict(
        steps=args.steps, cfg_scale=args.cfg_scale, data=args.data, data_dir=args.data_dir,
        trajectories=args.trajectories, batch_size=args.batch_size, lr=args.lr, l1=args.l1, penalty=args.penalty,
        step_draw=args.step_draw, logit_bound=args.logit_bound, optimizer=args.optimizer, lr_final=args.lr_final,
        iterations=args.iterations, threshold=args.threshold, seed=args.seed, init=args.init,
        checkpoint_every=args.checkpoint_every), **fixed})


def run_pipeline(args) -> int:
    """Train on a diffusers pipeline: its call, its (chosen) scheduler, prompts from --prompt/--prompts."""
    from ..pipelines.router import PipelineRouterTrainer
    from ..pipelines.sampling import PipelineJob
    from .sample_pipeline import open_pipeline, pipeline_name, pipeline_prompts

    if args.data == "images":
        raise ValueError("a pipeline has no image dataset: its router trains on its own trajectories (omit --data)")
    config = _config(args, data="trajectories")
    progress = not (args.no_progress or args.json)
    job = PipelineJob(seed=args.seed, prompts=pipeline_prompts(args), height=args.height, width=args.width)
    pipe, scheduler = open_pipeline(args, progress=False)  # one bar: the router's
    out = Path(args.out or f"runs/l2c-{pipeline_name(args.model)}-{scheduler}{config.steps}-cfg{config.cfg_scale:g}")
    with claim(out, None, args.overwrite):
        trainer = PipelineRouterTrainer(pipe, job, config, out, device=args.device)
        artifact = trainer.train(max_minutes=args.max_minutes, progress=progress)
    size = f" --height {args.height}" if args.height else ""
    size += f" --width {args.width}" if args.width else ""
    scheduler = f" --scheduler {args.scheduler}" if args.scheduler else ""
    _report(args, trainer, artifact, out, config, f" with --model {args.model}{scheduler}{size}")
    return 0


def run(args) -> int:
    if wants_pipeline(args):
        return run_pipeline(args)
    config = _config(args)
    device, distributed = _distributed(args.device)
    try:
        loaded = load_model(args.model, vae=None, device=device, num_heads=args.num_heads)
        out = Path(args.out or f"runs/l2c-{loaded.name}-ddim{config.steps}-{config.data}")
        with claim(out, None, args.overwrite) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
            barrier()  # no rank reads the folder before rank 0 has emptied it (--overwrite)
            trainer = RouterTrainer(loaded, config, out, progress=not (args.no_progress or args.json))
            artifact = trainer.train(max_minutes=args.max_minutes, progress=not (args.no_progress or args.json))
        if trainer.rank != 0:
            return 0
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    _report(args, trainer, artifact, out, config)
    return 0


def _report(args, trainer, artifact, out: Path, config: RouterConfig, where: str = "") -> None:
    skip = trainer.skip_fraction()
    summary = {"router": str(out / "router"), "iterations": trainer.iteration, "seconds": round(trainer.seconds, 1),
               "skip_fraction": skip, "threshold": config.threshold, "key": dataclasses.asdict(artifact.key), "meta": artifact.meta}
    if args.json:
        print_json(summary)
    else:
        print(f"router after {trainer.iteration} iterations ({trainer.seconds:.0f} s) skips {skip:.1%} of "
              f"sub-layer calls at θ = {config.threshold:g}; wrote {out / 'router'}\n"
              f"use it with --policy l2c:router={out / 'router'} --steps {config.steps} --cfg-scale {config.cfg_scale:g}"
              f"{where}")
