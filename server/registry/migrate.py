"""One migration step, the same for both registry backends (``db.Database`` and ``pg.PgDatabase``).

Its own module so that the PostgreSQL backend need not import ``db`` (which opens ``pg`` on demand).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol


class _Executes(Protocol):
    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


def apply_migration(
    tx: _Executes, migration: tuple[str, str | dict[str, str]], dialect: str, run: Callable[[str], object]
) -> bool:
    """Apply one migration in ``tx`` (each statement through ``run``) unless schema_migrations records it;
    True when it ran now."""
    name, sql = migration
    if tx.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
        return False
    text = sql.get(dialect, "") if isinstance(sql, dict) else sql
    for statement in split_sql(text):
        run(statement)
    tx.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
    return True


def split_sql(sql: str) -> list[str]:
    """Split a migration script on semicolons at line ends (migrations contain no string literals with ';')."""
    return [s.strip() for s in sql.split(";\n") if s.strip() and s.strip() != ";"]
