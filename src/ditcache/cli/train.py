"""`ditcache train`: train the embedded default model (a pixel-space DiT on MNIST)."""

from __future__ import annotations

import dataclasses

from ..training.train_dit import TrainConfig, Trainer


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
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    trainer = Trainer(config, args.out)
    trainer.train(max_minutes=args.max_minutes, progress=not args.no_progress)
    if args.export:
        path = trainer.export(args.export)
        print(f"exported step {trainer.step} EMA weights to {path}")
    return 0
