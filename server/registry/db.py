"""SQLite connection and named, ordered migrations.

Rules that keep the registry safe with several server processes (DESIGN.md, "Scale past one
machine"): WAL journal, a busy timeout instead of in-process locks, every multi-statement
change inside one ``transaction()`` (BEGIN IMMEDIATE), counters advanced with
``UPDATE ... RETURNING`` rather than read-modify-write in Python, and no state kept only in
process memory. SQL sticks to what PostgreSQL also accepts (no ``INSERT OR REPLACE``:
use ``INSERT ... ON CONFLICT``).

Migrations are ``(name, sql)`` pairs grouped by owner module. Applied names are recorded in
``schema_migrations``; each runs once, in list order, inside its own transaction. ``sql`` is one
text for both backends (``dialect.postgres_ddl`` maps the column types) or a ``{dialect: sql}``
mapping for what only one backend has (PostgreSQL's NOTIFY triggers).

``open_database(url, default_path)`` picks the backend: empty or ``sqlite:///PATH`` = this module,
``postgresql://...`` = ``server.registry.pg``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from server.errors import ConfigError, RegistryError
from server.registry.migrate import apply_migration

Migration = tuple[str, "str | dict[str, str]"]

#: PostgreSQL: the function statement triggers call to wake ``wait_change`` (``pg.CHANNEL``)
CHANGE_NOTIFY_FUNCTION = (
    "CREATE FUNCTION edgefleet_notify() RETURNS trigger LANGUAGE plpgsql AS"
    " $$BEGIN PERFORM pg_notify('edgefleet_changes', TG_TABLE_NAME); RETURN NULL; END$$;\n"
)


def change_notify_trigger(table: str) -> str:
    """PostgreSQL DDL: NOTIFY once per statement that changes ``table``."""
    return (f"CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION edgefleet_notify();\n")


#: how often a SQLite reader re-reads for changes (``wait_change``): SQLite has no notifications
POLL_S = 0.2


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Any: ...


class Connection(Protocol):
    """What the owner modules use of a connection: ``sqlite3.Connection`` or ``pg.PgConnection``."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...


#: a result row: ``sqlite3.Row`` or ``pg.Row`` (``row[0]``, ``row["name"]``, ``dict(row)``)
Row = Any

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
)
"""


class Database:
    """One registry database. Thread-safe: each thread gets its own connection."""

    dialect = "sqlite"

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
    def transaction(self, *, pipelined: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception): one writer at a time, across processes.
        ``pipelined`` is PostgreSQL's (``pg.PgDatabase.transaction``): SQLite has no round trips to save."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def atomic(self) -> AbstractContextManager[sqlite3.Connection]:
        """One statement atomic on its own (PostgreSQL runs it without the writer lock): here a transaction."""
        return self.transaction()

    def migrate(self, migrations: Sequence[Migration]) -> list[str]:
        """Apply the migrations not yet recorded; returns the names applied now."""
        conn = self.connection()
        conn.execute(_BOOTSTRAP)
        applied: list[str] = []
        for name, sql in migrations:
            with self.transaction() as tx:
                if apply_migration(tx, (name, sql), self.dialect, tx.execute):
                    applied.append(name)
        return applied

    @property
    def description(self) -> str:
        return str(self.path)

    def table_names(self) -> list[str]:
        return [r[0] for r in self.connection().execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]

    def change_generation(self) -> int:
        return 0

    def wait_change(self, generation: int, timeout: float, poll_s: float = POLL_S) -> int:
        """SQLite has no change notifications: wait ``poll_s`` (at most ``timeout``) and report a
        possible change, so the caller re-reads. (PostgreSQL: woken by NOTIFY, see ``pg``.)"""
        time.sleep(max(0.0, min(timeout, poll_s)))
        return generation + 1

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def execute_each(conn: Connection, sql: str, seq: Sequence[Any]) -> list[Any]:
    """``sql`` (a statement with RETURNING) once per parameter set, in order; each one's first row or None.
    PostgreSQL sends them together (``pg.PgConnection.execute_each``: one round trip); SQLite runs them in turn."""
    each = getattr(conn, "execute_each", None)
    if each is not None:
        return list(each(sql, seq))
    return [conn.execute(sql, params).fetchone() for params in seq]


def matching(*conditions: tuple[str, Any]) -> tuple[list[str], list[Any]]:
    """The SQL conditions (``"column = ?"``, value) whose value is set, and their values: a list filter's
    WHERE parts (an empty or None filter leaves its condition out)."""
    chosen = [(sql, value) for sql, value in conditions if value]
    return [sql for sql, _ in chosen], [value for _, value in chosen]


class RegistryDatabase(Protocol):
    """``Database`` (SQLite) or ``pg.PgDatabase``: what the owner modules and the service use."""

    dialect: str

    @property
    def description(self) -> str: ...
    def connection(self) -> Connection: ...
    def table_names(self) -> list[str]: ...
    def transaction(self, *, pipelined: bool = False) -> AbstractContextManager[Connection]: ...
    def atomic(self) -> AbstractContextManager[Connection]: ...
    def migrate(self, migrations: Sequence[Migration]) -> list[str]: ...
    def change_generation(self) -> int: ...
    def wait_change(self, generation: int, timeout: float, poll_s: float = POLL_S) -> int: ...
    def close(self) -> None: ...


#: in a PostgreSQL URL's database name: a database of this server home's own (``home_database_name``)
HOME_PLACEHOLDER = "{home}"


def home_database_name(home: Path) -> str:
    """``edgefleet_`` + 16 hex digits of the home's absolute path: one database per home on one server."""
    return "edgefleet_" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]


def open_database(url: str, default_path: Path) -> RegistryDatabase:
    """The registry database ``url`` names: empty = SQLite at ``default_path`` (``HOME/registry.db``),
    ``sqlite:///PATH``, or ``postgresql://...`` / ``postgres://...``. A PostgreSQL URL whose database is
    ``{home}`` gets a database of the home's own, created when missing (several homes on one server:
    the test suite's PostgreSQL pass)."""
    if not url:
        return Database(default_path)
    if url.startswith("sqlite:///"):
        return Database(Path(url[len("sqlite:///"):]))  # sqlite:////abs/path or sqlite:///relative/path
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from server.registry.pg import PgDatabase  # noqa: PLC0415 - psycopg only when PostgreSQL is used
        except ImportError as exc:
            raise ConfigError(f"[registry] url is PostgreSQL but psycopg is not installed ({exc}): "
                              "pip install 'edgefleet[postgresql]'", field="registry.url") from exc
        if HOME_PLACEHOLDER in url:  # one database per server home, created on first use
            return PgDatabase(url.replace(HOME_PLACEHOLDER, home_database_name(default_path.parent)),
                              create_missing=True)
        return PgDatabase(url)
    raise ConfigError("[registry] url must be empty, sqlite:///PATH or postgresql://...", field="registry.url")
