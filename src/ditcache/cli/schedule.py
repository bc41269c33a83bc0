"""`ditcache schedule`: show which sub-layers a static policy reuses, as a step x block map.

For any static policy spec ("l2c:preset=dit-xl2-ddim20", "rule:preset=rm-50", "fora:interval=3",
"l2c:router=PATH"): text (Schedule.to_text), the schedule's JSON (--json) or a picture (--png).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..adapters import adapter_for
from ..policies.base import POLICIES
from ..policies.schedule import Schedule
from ..registry import describe_registry, parse_spec
from ..sampling.loops import SAMPLERS, respaced_diffusion
from ..types import RunInfo
from .common import add_num_heads_arg, print_json


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser(
        "schedule", help="print a static policy's schedule as a step x block map",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print which attention / MLP sub-layers a static policy reuses at each step.\n"
                    "Map: '#' both reused, 'a' attention only, 'm' MLP only, '.' computed.\n"
                    "policies:\n" + describe_registry(POLICIES))
    p.add_argument("--policy", required=True, help="policy spec, e.g. l2c:preset=dit-xl2-ddim20 or fora:interval=3")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: a preset's or file's own count, else 20)")
    p.add_argument("--depth", type=int, default=None,
                   help="number of blocks; without it the depth of --model is used")
    p.add_argument("--model", default="mnist", help="model whose depth (and key, for routers) to use (default: mnist)")
    add_num_heads_arg(p)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler of the run (default: ddim)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the run (default: 1.5)")
    p.add_argument("--json", action="store_true", help="print the schedule's JSON instead of the map")
    p.add_argument("--png", default=None, help="also write a picture here: attention and MLP panels")
    p.set_defaults(func=run)


def run_info(args, policy) -> RunInfo:
    """The run the schedule is for: --depth, else a fixed schedule's own size, else the model's depth and key."""
    fixed = getattr(policy, "fixed_schedule", lambda: None)()
    if args.steps is None:
        args.steps = fixed.num_steps if fixed is not None else 20
    diffusion = respaced_diffusion(args.steps, args.sampler)
    timesteps = tuple(int(t) for t in diffusion.timestep_map[::-1])
    common = dict(num_steps=args.steps, num_tokens=0, timesteps=timesteps, sampler=args.sampler,
                  cfg_scale=float(args.cfg_scale))
    if args.depth is None and fixed is not None:
        # a published preset or a schedule file has its own size: show it as it is, no model needed
        return RunInfo(depth=fixed.depth, **common)
    if args.depth is not None:
        if args.depth < 1:
            raise ValueError(f"--depth must be at least 1, got {args.depth}")
        artifact = getattr(policy, "artifact", None)
        if artifact is None:
            return RunInfo(depth=args.depth, **common)
        # no model to check a trained artifact against: show it for the model it was made for
        print(f"note: no model given; showing the artifact for its own model {artifact.key.model_fingerprint}",
              file=sys.stderr)
        return RunInfo(depth=args.depth, fingerprint=artifact.key.model_fingerprint,
                       resolution=artifact.key.resolution, **common)
    from ..models.loading import load_model

    try:
        loaded = load_model(args.model, vae=None, num_heads=args.num_heads)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (or pass --depth to show a schedule without a model)") from None
    depth = len(adapter_for(loaded.module).blocks(loaded.module))
    return RunInfo(depth=depth, fingerprint=loaded.fingerprint, resolution=loaded.image_size, **common)


def policy_schedule(spec: str, info_for) -> Schedule:
    """Build the policy from its spec, reset it for the run ``info_for(policy)`` and return its schedule."""
    policy = parse_spec(POLICIES, spec)
    policy.reset(info_for(policy))
    schedule = policy.schedule()
    if schedule is None:
        raise ValueError(f"policy {policy.name!r} decides as it samples; it has no static schedule to show")
    return schedule


def save_png(schedule: Schedule, path: str) -> Path:
    """Two panels, attention and MLP: steps down the y axis, blocks along x, reused cells dark."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = 1.5 + 0.18 * schedule.num_steps
    width = 2.0 + 2 * max(2.5, 0.16 * schedule.depth)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for b, (ax, title) in enumerate(zip(axes, ("attention", "MLP"))):
        ax.imshow(schedule.cached[:, :, b], cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        reused = schedule.cached[:, :, b].mean()
        ax.set_title(f"{title} ({reused:.1%} reused)")
        ax.set_xlabel("block")
    axes[0].set_ylabel("step (0 = first, noisiest)")
    fig.suptitle(f"{schedule.name}: {schedule.cached_fraction:.1%} of sub-layer calls reused")
    fig.savefig(path, dpi=100)
    return path


def run(args) -> int:
    schedule = policy_schedule(args.policy, lambda policy: run_info(args, policy))
    if args.png:
        save_png(schedule, args.png)
    if args.json:
        print_json(schedule.to_json())
    else:
        print(schedule.to_text())
        if args.png:
            print(f"wrote {args.png}")
    return 0
