"""The one MODEL:VERSION grammar, used by the CLI, the API and the service layer.

``NAME:VERSION`` where NAME follows the rule the agent checks too (``model_name_problem`` in
``agent/protocol/messages.py``) and VERSION is a positive decimal integer below 2**31, written
without a prefix (``digits:3``, not ``digits:v3``; version 0 is refused: catalog versions start at 1).
"""

from __future__ import annotations

from agent.protocol.messages import model_name_problem
from server.errors import InvalidRequestError

MAX_VERSION = 2**31 - 1


def parse_ref(ref: str, *, need_version: bool = False) -> tuple[str, int | None]:
    """``name:version`` (or ``name`` when ``need_version`` is False) -> (name, version | None)."""
    name, sep, ver = ref.strip().partition(":")
    if model_name_problem(name) is not None:
        raise InvalidRequestError(f"{ref!r}: model names are ASCII letters, digits, '.', '_' or '-' (up to 64, "
                                  "starting with a letter or digit, no '..')")
    if not sep:
        if need_version:
            raise InvalidRequestError(f"{ref!r}: give a version, as MODEL:VERSION (e.g. digits-cnn:3)")
        return name, None
    if not (ver.isascii() and ver.isdigit()) or len(ver) > 10 or not 1 <= int(ver) <= MAX_VERSION:
        raise InvalidRequestError(f"{ref!r} is not MODEL:VERSION: the version must be a positive integer "
                                  "(e.g. digits-cnn:3)")
    return name, int(ver)


def parse_model_ref(ref: str) -> tuple[str, int]:
    """``name:version`` -> (name, version); the version is required."""
    name, version = parse_ref(ref, need_version=True)
    assert version is not None  # need_version guarantees it
    return name, version
