"""`ditcache train`: train the embedded default model (a pixel-space DiT on MNIST)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ..models.loading import EMBEDDED, _embedded_path
from ..outdir import claim
from ..training.train_dit import RESUMABLE_CHANGES, TrainConfig, Trainer
from .common import add_overwrite_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a class-conditional DiT on MNIST (the embedded default model)",
        description="Train our DiT on the MNIST digits with DiT's objective (eps MSE + learned-variance "
                    "bound, label dropout for guidance, EMA). Checkpoints atomically into --out and resumes "
                    "from there; --export writes the EMA weights as a model every command can load.")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        kind = str if f.name == "data" else type(getattr(defaults, f.name))
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=getattr(defaults, f.name),
                       help=f"(default: {getattr(defaults, f.name)})")
    p.add_argument("--out", default="runs/train-mnist", help="run folder: checkpoint.pt, train_log.csv")
    p.add_argument("--export", default=None, help="write the EMA model here (.safetensors) when done")
    p.add_argument("--name", default=None,
                   help="the exported model's name, which names its default run folders (default: --export's stem)")
    add_overwrite_arg(p)
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def export_name(path: str, name: Optional[str]) -> str:
    """The exported model's own name: --name, else the file's stem; never the built-in 'mnist' by
    accident, since names pick default run folders (runs/<name>-...) and would collide with its runs."""
    name = name or Path(path).stem
    embedded = Path(path).resolve() == _embedded_path("mnist")
    if name in EMBEDDED and not embedded:
        raise ValueError(f"--name {name!r} is the built-in model's name; give the exported model its own")
    return "mnist" if embedded else name


def check_export(path: str, config: TrainConfig, overwrite: bool) -> None:
    """An existing export is replaced only by the same training (a longer run of it) or with --overwrite."""
    target = Path(path)
    if not target.exists() or overwrite:
        return
    from safetensors import safe_open

    try:
        with safe_open(str(target), framework="pt") as f:
            made = json.loads((f.metadata() or {}).get("train_config", "null"))
    except Exception:
        made = None
    now = dataclasses.asdict(config)
    if made is None or {k: v for k, v in made.items() if k not in RESUMABLE_CHANGES} != \
            {k: v for k, v in now.items() if k not in RESUMABLE_CHANGES}:
        raise ValueError(f"--export {path} exists and was not made by this training; pass --overwrite to replace "
                         "it, or export elsewhere")


def run(args) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    name = export_name(args.export, args.name) if args.export else None
    if args.export:
        check_export(args.export, config, args.overwrite)
    with claim(args.out, None, args.overwrite):
        trainer = Trainer(config, args.out)
        trainer.train(max_minutes=args.max_minutes, progress=not args.no_progress)
    if args.export:
        path = trainer.export(args.export, name=name)
        print(f"exported step {trainer.step} EMA weights as model {name!r} to {path}")
    return 0
