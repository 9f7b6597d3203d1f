"""What every owner module of the registry shares: the database handle and transaction helpers.

Each owner module (``devices``, ``rollouts``, ``outbox``, ``observations``, ``access``) is a mixin
over ``TableOwner``; ``fleet.FleetRegistry`` combines them. A method that takes a ``tx``
connection runs inside the caller's transaction (so the service layer can compose several
owners' steps into one); one without opens its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from server.registry.db import Connection, RegistryDatabase


def now() -> float:
    return time.time()


def to_json(value: Any) -> str:
    """Canonical JSON for a TEXT column (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def placeholders(values: Sequence[Any]) -> str:
    """``?, ?, ?`` for an ``IN (...)`` list of ``values``."""
    return ", ".join("?" * len(values))


class Record:
    """A registry row as a frozen dataclass; ``to_dict`` is its columns by name (what the API and console send)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TableOwner:
    """Base of the registry's owner mixins: one ``Database`` shared by all of them."""

    db: RegistryDatabase

    def tx(self) -> AbstractContextManager[Connection]:
        return self.db.transaction()

    def atomic(self) -> AbstractContextManager[Connection]:
        """For one statement that is atomic on its own (a lease taken, renewed or released): on PostgreSQL it
        does not wait for the registry-wide writer lock (``pg.PgDatabase.atomic``)."""
        return self.db.atomic()

    def _read(self) -> Connection:
        return self.db.connection()

    def _maybe_tx(self, tx: Connection | None) -> AbstractContextManager[Connection]:
        if tx is not None:
            return _Borrowed(tx)
        return self.db.transaction()


class _Borrowed(AbstractContextManager[Connection]):
    """Context manager that hands back a caller's open transaction without committing it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        return None


def iter_chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
