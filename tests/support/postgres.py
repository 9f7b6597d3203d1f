"""A private PostgreSQL for tests: initdb in a temporary data directory, one loopback port.

Debian's binaries (``/usr/lib/postgresql/<version>/bin``, installed by scripts/setup); nothing
system-wide is started or changed. PostgreSQL refuses to run as root, so under root the server
runs as the ``postgres`` account the Debian package creates (``setpriv``), else as ``nobody``; the
data directory belongs to that account. ``close()`` stops it (fast shutdown, then SIGKILL); if the test
process dies without closing it (SIGKILL, a timeout), the kernel kills the server (parent-death signal).

``python -m tests.support.postgres`` starts one in the foreground and prints its URL (manual runs).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from server.broker import free_port


def _psycopg() -> Any:
    """psycopg, imported when a PostgreSQL is used: the agent-only Python 3.10 check loads this conftest without
    the server's extras."""
    import psycopg

    return psycopg


PG_VERSIONS = ("17", "16", "15", "14", "13")


def find_bin(name: str) -> Path:
    for version in PG_VERSIONS:
        p = Path(f"/usr/lib/postgresql/{version}/bin/{name}")
        if p.exists():
            return p
    found = shutil.which(name)
    if found:
        return Path(found)
    raise FileNotFoundError(f"PostgreSQL's {name} not found (scripts/setup installs Debian's postgresql package)")


def available() -> bool:
    try:
        find_bin("initdb")
        find_bin("postgres")
    except FileNotFoundError:
        return False
    return True


def _run_as() -> tuple[list[str], int, int]:
    """The setpriv prefix and the uid/gid that own the data directory. ``--pdeathsig KILL`` (set after the
    switch of account, which would clear it): if this process dies, even by SIGKILL, PostgreSQL dies too."""
    setpriv = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
    if os.geteuid() != 0:
        return setpriv, os.getuid(), os.getgid()
    if not setpriv:
        raise RuntimeError("running as root without setpriv (util-linux): cannot run PostgreSQL as another account")
    for user in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            continue
        return ([*setpriv, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"],
                pw.pw_uid, pw.pw_gid)
    raise RuntimeError("running as root and there is neither a postgres nor a nobody account for PostgreSQL")


class PostgresServer:
    """``with PostgresServer() as pg: url = pg.create_database()``."""

    def __init__(self, workdir: Path | None = None, *, max_connections: int = 400) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-")) if workdir is None else workdir
        self.max_connections = max_connections
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._n = 0

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 120.0) -> PostgresServer:
        prefix, uid, gid = _run_as()
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        for d in (self.workdir, data):
            d.mkdir(exist_ok=True)
            os.chown(d, uid, gid)
        os.chmod(data, 0o700)
        os.chmod(self.workdir, 0o755)
        tmp = Path(tempfile.gettempdir())
        if tmp.stat().st_mode & 0o001 == 0:  # the service account must reach the data directory
            raise RuntimeError(f"{tmp} is not world-searchable: PostgreSQL's account cannot reach {data}")
        subprocess.run([*prefix, str(find_bin("initdb")), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, timeout=timeout)
        self.port = free_port()
        log = (self.workdir / "postgres.log").open("ab")
        os.chown(self.workdir / "postgres.log", uid, gid)
        self.proc = subprocess.Popen(
            [*prefix, str(find_bin("postgres")), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(data), "-c", f"max_connections={self.max_connections}", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "shared_buffers=64MB"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with _psycopg().connect(self.admin_url, connect_timeout=2):
                    return self
            except _psycopg().OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # polling the server's readiness, not guessing a duration

    def log_tail(self) -> str:
        try:
            return (self.workdir / "postgres.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database (a copy of ``template0``, whatever ``template1`` holds); returns its URL."""
        self._n += 1
        name = name or f"t{os.getpid()}_{self._n}"
        with _psycopg().connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def migrate_template(self) -> float:
        """Apply the registry's migrations (fleet, access, measurements, catalog) to ``template1``, so each
        database a server home creates on first use (``CREATE DATABASE`` copies ``template1``) starts migrated
        and its server's own ``migrate()`` finds nothing to do. For the test suite's PostgreSQL pass: one
        migration run per session instead of one per server home. Returns the seconds it took."""
        from server.registry.catalog import MIGRATIONS as CATALOG
        from server.registry.fleet import FleetRegistry
        from server.registry.pg import PgDatabase

        started = time.monotonic()
        db = PgDatabase(self.url("template1"))
        try:
            FleetRegistry(db).migrate()
            db.migrate(CATALOG)
        finally:
            db.close()  # CREATE DATABASE needs template1 without connections
        return time.monotonic() - started

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[-1]
        with _psycopg().connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    with PostgresServer() as pg:
        print(pg.create_database("edgefleet"), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
