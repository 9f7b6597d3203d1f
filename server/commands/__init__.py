"""Operator subcommands. Each module exposes ``register(subparsers)``; server.cli lists them."""
