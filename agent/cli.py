"""``edgefleet-agent``: the device-side command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description=(
            "The edgefleet device agent: receives signed, encrypted models over MQTT, verifies and "
            "hot-swaps them, serves local inference (Open Inference Protocol on 127.0.0.1), reports "
            "telemetry and rolls back on command or when a new model misbehaves."
        ),
    )
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = getattr(args, "handler", None)
    if handler is None:  # pragma: no cover - every subcommand sets a handler
        parser.error(f"no handler for {args.command}")
    return int(handler(args))
