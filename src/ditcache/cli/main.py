"""The `ditcache` command: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) and keeps its work in the library, so the Python API and the CLI share one code path.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name of the module in ditcache.cli for each subcommand, in the order --help lists them
SUBCOMMANDS = ["sample", "eval", "compare", "train", "calibrate", "train_router", "schedule", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditcache",
        description="Feature caching for Diffusion Transformers, measured honestly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"ditcache.cli.{name}")
        except ModuleNotFoundError as err:  # a subcommand not written yet
            if err.name == f"ditcache.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # bad input: one clear line, no traceback
        print(f"ditcache {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
