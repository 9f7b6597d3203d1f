"""``edgefleet``: the operator's command line.

Subcommands live in ``server.commands.*`` modules, each with ``register(subparsers)``, so
the command groups (models and builds, fleet control, simulation) grow independently.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from agent import __version__

#: Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description=(
            "Operate an edgefleet: register models, build compressed per-device variants behind an "
            "accuracy gate, deploy them to devices over MQTT in canary waves, watch the fleet, roll back."
        ),
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    return int(handler(args))
