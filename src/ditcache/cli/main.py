"""The `ditcache` command: one subcommand per module in this package.

Each subcommand module defines ``add_parser(subparsers)`` (which registers its arguments and sets
``func``) and keeps its work in the library, so the Python API and the CLI share one code path.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name of the module in ditcache.cli for each subcommand, in the order --help lists them
SUBCOMMANDS = ["sample", "eval", "compare", "tune", "train", "calibrate", "train_router", "schedule", "bench"]


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
        if getattr(args, "device", None):
            from .common import check_device

            check_device(args.device)
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as err:
        if isinstance(err, BrokenPipeError):
            return _broken_pipe()
        # bad input or an unusable file: one clear line, no traceback
        print(f"ditcache {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nditcache {args.command}: interrupted; {_kept(args)}", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[1:-1] if isinstance(err, KeyError) and text.startswith("'") else text


def _broken_pipe() -> int:
    """The reader of our output went away (``--json | head``): stop quietly, as coreutils do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
    return 141  # 128 + SIGPIPE


def _kept(args) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    from ..outdir import describe_kept

    out = getattr(args, "out", None)
    if args.command in ("eval", "compare") and (getattr(args, "fid", True)):
        note = "reference features already computed are kept in chunks under $DITCACHE_CACHE; "
    else:
        note = ""
    if out and Path(out).is_dir():
        return f"{note}{describe_kept(Path(out))}; run the same command again to resume"
    return f"{note}run the same command again to resume" if note else "nothing was written"


if __name__ == "__main__":
    sys.exit(main())
