"""SQLite connection and named, ordered migrations.

Rules that keep the registry safe with several server processes (DESIGN.md, "Scale past one
machine"): WAL journal, a busy timeout instead of in-process locks, every multi-statement
change inside one ``transaction()`` (BEGIN IMMEDIATE), counters advanced with
``UPDATE ... RETURNING`` rather than read-modify-write in Python, and no state kept only in
process memory. SQL sticks to what PostgreSQL also accepts (no ``INSERT OR REPLACE``:
use ``INSERT ... ON CONFLICT``).

Migrations are ``(name, sql)`` pairs grouped by owner module. Applied names are recorded in
``schema_migrations``; each runs once, in list order, inside its own transaction.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from server.errors import RegistryError

Migration = tuple[str, str]

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
)
"""


class Database:
    """One registry database. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # 0600 from the start: SQLite gives -wal/-shm the same mode
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=True
                )
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception): one writer at a time, across processes."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def migrate(self, migrations: Sequence[Migration]) -> list[str]:
        """Apply the migrations not yet recorded; returns the names applied now."""
        conn = self.connection()
        conn.execute(_BOOTSTRAP)
        applied: list[str] = []
        for name, sql in migrations:
            with self.transaction() as tx:
                if tx.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
                    continue
                for statement in _split_sql(sql):
                    tx.execute(statement)
                tx.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
                applied.append(name)
        return applied

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _split_sql(sql: str) -> list[str]:
    """Split a migration script on semicolons at line ends (migrations contain no string literals with ';')."""
    return [s.strip() for s in sql.split(";\n") if s.strip() and s.strip() != ";"]
