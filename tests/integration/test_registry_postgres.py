"""The registry on a real PostgreSQL (tests/support/postgres.py): what SQLite has no counterpart for.

The owner modules' behaviour on both backends is tests/unit/server/test_fleet_registry.py's (parametrized)
and the whole integration and fault suite's under EDGEFLEET_TEST_REGISTRY=postgresql (scripts/test).
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg

from server.artifacts import ArtifactStore
from server.builds import StaticBuilds
from server.config import RegistrySection, ServerConfig
from server.registry.db import open_database
from server.registry.fleet import FleetRegistry, open_registry
from server.service import FleetService
from tests.support.postgres import PostgresServer
from tests.support.waiting import wait_progress


def _open(url: str) -> FleetRegistry:
    r = FleetRegistry(open_database(url, Path("unused")))
    r.migrate()
    return r


def test_schema_is_the_same_on_both_backends(tmp_path: Path, postgres_url: str) -> None:
    lite, pg = _open(f"sqlite:///{tmp_path / 'r.db'}"), _open(postgres_url)
    try:
        lite_tables = {r[0]: {c[1] for c in lite.db.connection().execute(f"PRAGMA table_info({r[0]})")}
                       for r in lite.db.connection().execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                       if not r[0].startswith("sqlite_")}
        pg_tables: dict[str, set[str]] = {}
        for table, column in pg.db.connection().execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"):
            pg_tables.setdefault(table, set()).add(column)
        assert pg_tables == lite_tables
        assert lite.migrate() == [] and pg.migrate() == []
    finally:
        lite.db.close()
        pg.db.close()


def test_a_waiting_reader_is_woken_by_notify(postgres_url: str) -> None:
    reader, writer = _open(postgres_url), _open(postgres_url)
    try:
        generation = reader.db.change_generation()
        assert reader.db.wait_change(generation, 0.2) == generation  # nothing changed: no wake-up
        done = threading.Event()

        def write() -> None:
            writer.server_event("test.ping", "wake up")
            done.set()

        threading.Thread(target=write).start()
        woke = reader.db.wait_change(generation, 60.0)  # the timeout only catches a missing NOTIFY
        assert woke != generation
        assert done.wait(60)
        assert [e.kind for e in reader.list_events(limit=10)] == ["test.ping"]
    finally:
        reader.db.close()
        writer.db.close()


def test_writers_take_turns_across_processes(postgres: PostgresServer, postgres_url: str) -> None:
    """``transaction()`` serialises writers as SQLite's BEGIN IMMEDIATE does: a second writer waits on the
    registry's advisory lock until the first commits, and then sees its row."""
    first, second = _open(postgres_url), _open(postgres_url)
    seen: list[int] = []
    try:
        with first.tx() as tx:
            first.add_device("w1", profile="rpi4", public_key=None, broker_hash=None, tx=tx)

            def write() -> None:
                with second.tx() as tx2:
                    seen.append(len(second.list_devices()))
                    second.add_device("w2", profile="rpi4", public_key=None, broker_hash=None, tx=tx2)

            t = threading.Thread(target=write)
            t.start()
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                waiting = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                wait_progress(lambda: admin.execute(waiting).fetchone()[0] == 1,  # type: ignore[index]
                              what="the second writer waiting on the lock", progress=lambda: len(seen),
                              describe=lambda: f"seen={seen}")
            assert seen == []
        t.join(60)
        assert seen == [1]  # it ran after the first committed, and saw w1
        assert {d.device_id for d in first.list_devices()} == {"w1", "w2"}
    finally:
        first.db.close()
        second.db.close()


def test_events_follow_is_woken_by_another_process_write(tmp_path: Path, postgres_url: str) -> None:
    """``events --follow``'s long poll (``FleetService.events(wait_s=...)``) returns the event another
    server process records while it waits, woken by NOTIFY."""
    config = ServerConfig(home=tmp_path / "home", registry=RegistrySection(url=postgres_url))
    registry = open_registry(config)
    writer = _open(postgres_url)
    service = FleetService(config, registry, builds=StaticBuilds(),
                           artifacts=ArtifactStore(config.paths.artifacts_dir, registry))
    try:
        cursor = service.events()["cursor"]
        generation = registry.db.change_generation()
        result: dict[str, object] = {}
        follower = threading.Thread(target=lambda: result.update(service.events(after=cursor, wait_s=60.0)))
        follower.start()
        writer.server_event("test.follow", "hello")
        follower.join(90)
        assert not follower.is_alive()
        assert [e["kind"] for e in result["events"]] == ["test.follow"]  # type: ignore[attr-defined]
        assert registry.db.change_generation() != generation  # the wake-up came from NOTIFY
    finally:
        registry.db.close()
        writer.db.close()
