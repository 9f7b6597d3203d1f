"""Event kinds: the ``kind`` of every ``Event`` a device publishes and of the server's own events.

One enum for both sides (CONTRACTS.md section 4). Members are strings: they compare, hash and
format as their value, so a kind read back from the wire or the database (a plain ``str``) finds
the member's entries in a dict and equals it. ``error.<code>`` events carry an open set of codes
(``agent.errors``): build their kind with ``error_kind``.
"""

from __future__ import annotations

from enum import Enum


class EventKind(str, Enum):
    # a signed desired state (device)
    DESIRED_ACCEPTED = "desired.accepted"
    DESIRED_REJECTED = "desired.rejected"
    DESIRED_EXPIRED = "desired.expired"
    # the transfer (device)
    DOWNLOAD_STARTED = "download.started"
    DOWNLOAD_PROGRESS = "download.progress"
    DOWNLOAD_COMPLETED = "download.completed"
    # a delta offer (device; agent/runtime/delta.py): applied, or the full artifact fetched instead
    DELTA_APPLIED = "delta.applied"
    DELTA_FALLBACK = "delta.fallback"
    # the update lifecycle (device; agent.core.lifecycle)
    LIFECYCLE_VERIFYING = "lifecycle.verifying"
    LIFECYCLE_STAGED = "lifecycle.staged"
    LIFECYCLE_WARMING = "lifecycle.warming"
    LIFECYCLE_PROBATION = "lifecycle.probation"
    LIFECYCLE_COMMITTED = "lifecycle.committed"
    LIFECYCLE_ROLLED_BACK = "lifecycle.rolled_back"
    LIFECYCLE_FAILED = "lifecycle.failed"
    LIFECYCLE_UNSERVED = "lifecycle.unserved"
    # the answer to a signed command (device)
    COMMAND_RESULT = "command.result"
    # the server's own events about a device
    DEVICE_REGISTERED = "device.registered"
    DEVICE_ENROLLED = "device.enrolled"
    DEVICE_REVOKED = "device.revoked"
    DEVICE_ONLINE = "device.online"
    DEVICE_OFFLINE = "device.offline"

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)

    def __hash__(self) -> int:
        return str.__hash__(self)


ERROR_PREFIX = "error."


def error_kind(code: str) -> str:
    """The kind of an ``error.<code>`` event."""
    return f"{ERROR_PREFIX}{code}"


__all__ = ["ERROR_PREFIX", "EventKind", "error_kind"]
