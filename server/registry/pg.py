"""PostgreSQL as the registry (``[registry] url = "postgresql://..."``), through psycopg 3.

The owner modules keep one SQL text (``dialect`` rewrites it); this module gives them what
``db.Database`` gives them on SQLite:

- a connection per thread (autocommit: a read outside ``transaction()`` is its own statement),
  rows readable by name and by index, ``numeric`` results (``SUM`` of integers) as int/float and
  Python booleans stored as 0/1 like SQLite;
- ``transaction()``: ``BEGIN`` plus ``pg_advisory_xact_lock`` on one registry-wide key, so writers
  run one at a time across every process exactly as ``BEGIN IMMEDIATE`` makes them on SQLite
  (readers are never blocked; read-modify-write inside a transaction stays safe, and leases keep
  their semantics); the lock goes with COMMIT/ROLLBACK, also when a process dies;
- migrations under that lock (several servers may start at once), DDL types mapped;
- ``wait_change()``: ``LISTEN edgefleet_changes`` on one connection per process, woken by the
  ``NOTIFY`` that statement triggers on the watched tables send (migration ``fleet_pg_notify``);
  ``events --follow`` and the console's live updates wait on it instead of polling.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import psycopg
import psycopg.sql
from psycopg.adapt import Dumper, Loader
from psycopg.pq import Format

from server.errors import RegistryError
from server.registry.dialect import postgres_ddl, postgres_sql
from server.registry.migrate import apply_migration

#: the advisory lock key every writer takes ("edgefleet" as a 63-bit number)
WRITER_LOCK = 0x656467656666
CHANNEL = "edgefleet_changes"

_BOOTSTRAP = ("CREATE TABLE IF NOT EXISTS schema_migrations"
              " (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")


class Row(tuple[Any, ...]):
    """A result row readable like ``sqlite3.Row``: ``row[0]``, ``row["name"]``, ``dict(row)``. A tuple (built at C
    speed: the rollout driver reads every row of a 10,000-device deployment each tick); each result shape gets a
    subclass holding its column index (``_row_class``)."""

    __slots__ = ()
    _index: ClassVar[dict[str, int]] = {}
    _keys: ClassVar[list[str]] = []

    def __getitem__(self, key: Any) -> Any:
        if type(key) is str:
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return self._keys

    def __repr__(self) -> str:
        return f"Row({ {k: self[k] for k in self._keys}!r})"


@functools.lru_cache(maxsize=1024)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        index.setdefault(name, i)
    return type("Row", (Row,), {"__slots__": (), "_index": index, "_keys": list(index)})


def _rows(cursor: Any) -> Any:
    desc = cursor.description
    if desc is None:
        return tuple
    return _row_class(tuple(column.name for column in desc))


class _NumberLoader(Loader):
    """``numeric`` (what SUM/AVG of integers give) as int when whole, else float, like SQLite."""

    def load(self, data: Any) -> Any:
        text = bytes(data)
        if text.lstrip(b"-").isdigit():
            return int(text)
        return float(text)


class _BoolAsInt(Dumper):
    """Python booleans as SQLite has them: ``1``/``0`` of no declared type, so PostgreSQL reads them as the
    column's integer in ``flag = ?`` or an INSERT, and as a boolean in ``CASE WHEN ? THEN``."""

    format = Format.TEXT
    oid = 0  # "unknown": the type comes from where the parameter stands

    def dump(self, obj: Any) -> bytes:
        return b"1" if obj else b"0"


class PgCursor:
    """What the owner modules use of a cursor: fetchone/fetchall/iteration/rowcount. In a pipelined
    transaction a statement's result is waited for only when it is read (``_settle``)."""

    def __init__(self, cursor: psycopg.Cursor[Any], pipeline: psycopg.Pipeline | None = None) -> None:
        self._cursor = cursor
        self._pipeline = pipeline

    def _settle(self) -> None:
        if self._pipeline is not None and self._cursor.description is None and self._cursor.rowcount < 0:
            self._pipeline.sync()  # send what is queued, wait for every result (this one's included)
        self._pipeline = None

    @property
    def rowcount(self) -> int:
        self._settle()
        return self._cursor.rowcount

    def fetchone(self) -> Any:
        self._settle()
        return self._cursor.fetchone() if self._cursor.description is not None else None

    def fetchall(self) -> list[Any]:
        self._settle()
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def _params(params: Any, order: tuple[int, ...] | None) -> Sequence[Any]:
    values = tuple(params or ())
    return values if order is None else tuple(values[i] for i in order)


class PgConnection:
    """A psycopg connection that speaks the registry's (SQLite) SQL."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn
        #: set inside ``PgDatabase.transaction(pipelined=True)``: statements are sent without waiting
        self.pipeline: psycopg.Pipeline | None = None

    def execute(self, sql: str, params: Any = (), /) -> PgCursor:
        text, order = postgres_sql(sql)
        cur = self.raw.cursor()
        cur.execute(text.encode(), _params(params, order))
        return PgCursor(cur, self.pipeline)

    def executemany(self, sql: str, seq: Any, /) -> PgCursor:
        text, order = postgres_sql(sql)
        cur = self.raw.cursor()
        cur.executemany(text.encode(), [_params(p, order) for p in seq])
        return PgCursor(cur, self.pipeline)

    def execute_each(self, sql: str, seq: Sequence[Any], /) -> list[Any]:
        """``sql`` once per parameter set, sent together (one round trip, libpq's pipeline); each one's first
        result row or None (``db.execute_each``)."""
        if not seq:
            return []
        text, order = postgres_sql(sql)
        cur = self.raw.cursor()
        cur.executemany(text.encode(), [_params(p, order) for p in seq], returning=True)
        out = []
        while True:
            out.append(cur.fetchone() if cur.description is not None else None)
            if not cur.nextset():
                return out

    def close(self) -> None:
        self.raw.close()


class PgDatabase:
    """The registry on PostgreSQL. Thread-safe: each thread gets its own connection."""

    dialect = "postgresql"

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, create_missing: bool = False) -> None:
        self.url = url
        self.create_missing = create_missing
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: weakref.WeakSet[PgConnection] = weakref.WeakSet()  # a dead thread's goes with it
        self._lock = threading.Lock()
        self._changes = threading.Condition()
        self._generation = 0
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def description(self) -> str:
        return f"PostgreSQL {psycopg.conninfo.conninfo_to_dict(self.url).get('dbname', '')}"

    def _connect(self) -> psycopg.Connection[Any]:
        for attempt in (1, 2):
            try:
                conn = psycopg.connect(self.url, autocommit=True, row_factory=_rows,
                                       connect_timeout=max(1, int(self.busy_timeout_s)),
                                       options=f"-c lock_timeout={int(self.busy_timeout_s * 1000)}")
                break
            except psycopg.OperationalError as exc:
                if attempt == 1 and self.create_missing and "does not exist" in str(exc):
                    self._create_database()
                    continue
                raise RegistryError(f"cannot open registry {_redacted(self.url)}: {exc}") from exc
            except psycopg.Error as exc:
                raise RegistryError(f"cannot open registry {_redacted(self.url)}: {exc}") from exc
        conn.adapters.register_loader("numeric", _NumberLoader)
        conn.adapters.register_dumper(bool, _BoolAsInt)
        return conn

    def _create_database(self) -> None:
        """CREATE DATABASE (from the ``postgres`` maintenance database); a concurrent creator is fine."""
        name = str(psycopg.conninfo.conninfo_to_dict(self.url)["dbname"])
        with psycopg.connect(self.url, dbname="postgres", autocommit=True) as admin:
            admin.execute("SELECT pg_advisory_lock(%s)", (WRITER_LOCK,))  # creators take turns (template1 copy)
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))

    def connection(self) -> PgConnection:
        conn: PgConnection | None = getattr(self._local, "conn", None)
        if conn is None or conn.raw.closed or conn.raw.broken:  # a lost connection is replaced
            conn = PgConnection(self._connect())
            self._local.conn = conn
            with self._lock:
                self._all.add(conn)
        return conn

    def table_names(self) -> list[str]:
        return [r[0] for r in self.connection().execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            " AND table_type = 'BASE TABLE' ORDER BY table_name")]

    @contextmanager
    def transaction(self, *, pipelined: bool = False) -> Iterator[PgConnection]:
        """BEGIN; one writer at a time across processes (the registry-wide advisory lock); COMMIT
        (ROLLBACK on any exception).

        ``pipelined``: the statements go out without waiting for their results (libpq's pipeline mode); a
        result is waited for only when it is read, and an error surfaces there or at COMMIT. The lock is held
        for the transaction's round trips, not one per statement: what the ingest batch uses (on a busy
        machine each round trip costs the holder a trip through the scheduler while the other servers wait).
        """
        conn = self.connection()
        with conn.raw.transaction():
            conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            if not pipelined:
                yield conn
                return
            with conn.raw.pipeline() as pipeline:
                conn.pipeline = pipeline
                try:
                    yield conn
                finally:
                    conn.pipeline = None

    @contextmanager
    def atomic(self) -> Iterator[PgConnection]:
        """One statement that is atomic on its own (a conditional UPDATE, an upsert: a lease taken or renewed),
        without the writer lock: row locks order it against every other writer. SQLite: ``transaction()``."""
        yield self.connection()

    def migrate(self, migrations: Sequence[tuple[str, str | dict[str, str]]]) -> list[str]:
        applied: list[str] = []
        with self.transaction() as tx:
            tx.raw.execute(_BOOTSTRAP)
        for name, sql in migrations:
            with self.transaction() as tx:
                if apply_migration(tx, (name, sql), self.dialect, functools.partial(_run_ddl, tx)):
                    applied.append(name)
        return applied

    # -- change notifications --------------------------------------------------------------------------

    def change_generation(self) -> int:
        self._start_listener()
        with self._changes:
            return self._generation

    def wait_change(self, generation: int, timeout: float, poll_s: float = 0.0) -> int:
        """Block until a NOTIFY moved the generation past ``generation`` or ``timeout`` passed
        (``poll_s`` is SQLite's: here nothing polls)."""
        self._start_listener()
        with self._changes:
            self._changes.wait_for(lambda: self._generation != generation or self._closed.is_set(),
                                   timeout=max(0.0, timeout))
            return self._generation

    def _start_listener(self) -> None:
        with self._lock:
            if self._listener is not None or self._closed.is_set():
                return
            ready = threading.Event()
            self._listener = threading.Thread(target=self._listen, args=(ready,), name="registry-listen", daemon=True)
            self._listener.start()
        ready.wait(timeout=self.busy_timeout_s)

    def _listen(self, ready: threading.Event) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._bump()  # anything may have changed while no one listened
                    ready.set()
                    while not self._closed.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5)):
                            self._bump()
            except psycopg.Error:
                ready.set()
                self._bump()  # waiters fall back to re-reading; reconnect after a pause
                self._closed.wait(1.0)

    def _bump(self) -> None:
        with self._changes:
            self._generation += 1
            self._changes.notify_all()

    def close(self) -> None:
        """Close every connection this object opened (all threads) and stop the listener."""
        self._closed.set()
        self._bump()
        with self._lock:
            conns, self._all = list(self._all), weakref.WeakSet()
            listener, self._listener = self._listener, None
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self._local = threading.local()
        if listener is not None:
            listener.join(timeout=5.0)
        self._closed.clear()


def _redacted(url: str) -> str:
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://..."
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in info.items())


def _run_ddl(tx: PgConnection, statement: str) -> None:
    tx.raw.execute(postgres_ddl(statement).encode())
