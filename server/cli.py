"""``edgefleet``: the operator's command line.

Subcommands live in ``server.commands.*`` modules, each with ``register(subparsers)``, so
the command groups (models and builds, fleet control, simulation) grow independently.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from server.config import default_home

#: Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "server.commands.admin",
    "server.commands.fleet",
    "server.commands.rollouts",
    "server.commands.models",
    "server.commands.simulate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description=(
            "Operate an edgefleet: register models, build compressed per-device variants behind an "
            "accuracy gate, deploy them to devices over MQTT in canary waves, watch the fleet, roll back."
        ),
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="server state directory (registry, models, builds, keys); default $EDGEFLEET_HOME or "
        "~/.local/share/edgefleet",
    )
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
    if args.home is None:
        args.home = default_home()
    try:
        return int(handler(args))
    except KeyboardInterrupt:  # Ctrl-C in a command that does not handle it itself: one line, no traceback
        print("interrupted", file=sys.stderr, flush=True)
        return 130
