"""The ``echolvfm`` command.

Each subcommand lives in its own module under :mod:`echolvfm_core.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed namespace and returning
an exit code). Command modules import heavy libraries inside ``func`` so that ``echolvfm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands
from .commands import CommandError
from .echo import EchoLoadError

__all__ = ["main", "build_parser", "CommandError"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echolvfm",
        description="EchoLVFM Studio: EF counterfactual echocardiograms, EF instruments and realism studies.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (EchoLoadError, CommandError, FileNotFoundError) as exc:
        msg = str(exc) if not isinstance(exc, FileNotFoundError) else f"No such file or folder: {exc.filename}."
        print(f"echolvfm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
