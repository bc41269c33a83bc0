"""Arguments and helpers shared by the subcommands that sample (sample, compare, bench, calibrate)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..correctors.base import CORRECTORS
from ..pipelines.sampling import SCHEDULERS, is_pipeline_folder
from ..policies.base import POLICIES
from ..registry import describe_registry, parse_spec
from ..sampling.generate import SampleConfig
from ..sampling.loops import SAMPLERS
from ..strict_json import dumps


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mnist",
                   help="'mnist' (the embedded default), an official DiT .pt checkpoint, our .safetensors, "
                        "or a diffusers DiT directory / hub id (default: mnist)")
    add_num_heads_arg(g)
    g.add_argument("--vae", default="ema", help="VAE for latent models: ema, mse or a local path (default: ema)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_num_heads_arg(p) -> None:
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of an official-format checkpoint (.pt) whose size is not an official "
                        "DiT-S/B/L/XL: the weights do not store it (default: the official size's count)")


def add_sampling_args(p: argparse.ArgumentParser, num_samples: int = 16) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim (eta 0) or ddpm (ancestral, learned sigma)")
    g.add_argument("--steps", type=int, default=20, help="sampling steps, respaced as the official DiT code (default: 20)")
    g.add_argument("--cfg-scale", type=float, default=1.5,
                   help="classifier-free guidance scale; 1 disables it (default: 1.5, the papers' FID setting)")
    g.add_argument("--labels", default=None,
                   help="comma-separated class labels, repeated to fill num-samples (default: uniform random)")
    g.add_argument("--seed", type=int, default=0, help="global seed; sample i's noise depends only on (seed, i)")
    g.add_argument("--num-samples", type=int, default=num_samples, help=f"images to sample (default: {num_samples})")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward batch (default: 64)")


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "diffusers pipelines", "With --model a diffusers pipeline folder (or hub id) and --prompt/--prompts or "
        "--scheduler, the pipeline's own __call__ and scheduler sample, with the cache enabled on it.")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt; repeatable")
    g.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    g.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="replace the pipeline's scheduler for this run (default: the pipeline's own)")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")


def wants_pipeline(args) -> bool:
    """Pipeline mode: prompts or a scheduler were given, or the model is a text-to-image pipeline folder."""
    if args.prompt or args.prompts or args.scheduler:
        return True
    if is_pipeline_folder(args.model):
        index = json.loads((Path(args.model) / "model_index.json").read_text())
        return "text_encoder" in index
    return False


def add_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "cache", "POLICY and CORRECTOR are 'name' or 'name:key=value,key=value'.\n"
        "policies:\n" + describe_registry(POLICIES) + "\ncorrectors:\n" + (describe_registry(CORRECTORS) or "  (none yet)"))
    g.add_argument("--policy", default="none", help="cache policy (default: none)")
    g.add_argument("--corrector", action="append", default=[], help="corrector applied to reused features; repeatable")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds when it was made with other settings (default: refuse)")


def sample_config(args) -> SampleConfig:
    labels = None
    if args.labels:
        try:
            labels = tuple(int(v) for v in args.labels.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    return SampleConfig(num_samples=args.num_samples, batch_size=args.batch_size, sampler=args.sampler,
                        steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, labels=labels)


def build_cache(policy_spec: str, corrector_specs=()):
    """(policy, [correctors]) from command-line specs."""
    policy = parse_spec(POLICIES, policy_spec)
    correctors = getattr(policy, "tuned_correctors", []) + [parse_spec(CORRECTORS, spec) for spec in corrector_specs]
    return policy, correctors


def cache_tag(policy, correctors) -> str:
    """'fora-interval3+eoc-gamma0.01', 'rule-steps1.3': a short run name from the options in use, made
    only of letters, digits and ``._+-`` so that it is one safe path component."""
    parts = []
    for d in [policy.describe()] + [c.describe() for c in correctors]:
        opts = []
        for k, v in d.items():
            if k == "name" or v is None or isinstance(v, dict):
                continue
            opts.append(f"{k}{'.'.join(str(x) for x in v) if isinstance(v, (list, tuple)) else v}")
        parts.append("-".join([d["name"], *opts]))
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "+".join(parts))


def print_json(obj) -> None:
    sys.stdout.write(dumps(obj, indent=1) + "\n")  # strict JSON: NaN / infinity print as null


def check_device(spec: str) -> None:
    """ValueError, in one line, for a device this PyTorch cannot use (``--device cuda`` on a CPU build)."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"--device {spec!r} is not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {spec}: no CUDA GPU is usable (PyTorch {torch.__version__} is {build}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: Apple MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {spec}: use cpu, cuda, cuda:N or mps")
