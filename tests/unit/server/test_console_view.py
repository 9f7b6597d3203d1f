"""The console's pure parts and its registry queries: device states, the device table, issues, charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.console.charts import Series, line_chart
from server.console.fleetview import DeviceQuery, collapse, device_row, issues, overview_counts, pages_of
from server.registry.console import ConsoleQueries, TableQuery
from server.registry.db import Database
from server.registry.fleet import FleetRegistry, NewDeployment

NOW = 1_000_000.0


@pytest.fixture
def registry(tmp_path: Path) -> FleetRegistry:
    reg = FleetRegistry(Database(tmp_path / "registry.db"))
    reg.migrate()
    return reg


def add(reg: FleetRegistry, n: int) -> None:
    with reg.tx() as tx:
        for i in range(n):
            reg.add_device(f"d-{i:04d}", profile="jetson" if i % 4 == 0 else "rpi4", public_key="k" * 44,
                           broker_hash=None, groups=["g", "even"] if i % 2 == 0 else ["g"], tx=tx, now=NOW)
        tx.executemany(  # what telemetry and presence reports would have written
            "UPDATE devices SET online = 1, lifecycle = 'idle', active_model = 'm', active_version = 1, p95_ms = ?,"
            " cpu_percent = ?, memory_percent = 30, temperature_c = ?, last_seen = ? WHERE device_id = ?",
            [(float(i % 7), float(i % 50), None if i % 3 == 0 else 40.0 + i % 10, NOW - 5, f"d-{i:04d}")
             for i in range(n)])


def rollout(reg: FleetRegistry, dep: str, states: dict[str, str]) -> None:
    reg.create_deployment(NewDeployment(
        deployment_id=dep, model="m", version=2, target="group:g", canary_percent=0, wave_percent=100,
        max_failures_percent=0, probation_s=1.0, created_by="t", builds=[],
        devices=[(d, "rpi4", 0, None) for d in states], wave_count=1), now=NOW - 100)
    with reg.tx() as tx:
        tx.executemany("UPDATE deployment_devices SET state = ?, updated_at = ?, reason = 'too slow'"
                       " WHERE deployment_id = ? AND device_id = ?",
                       [(s, NOW - 50, dep, d) for d, s in states.items()])
        tx.execute("UPDATE deployments SET status = 'halted' WHERE deployment_id = ?", (dep,))


def states(reg: FleetRegistry, stale_after_s: float = 60) -> dict[str, str]:
    rows, _ = ConsoleQueries(reg).devices(TableQuery(limit=None), now=NOW, stale_after_s=stale_after_s)
    return {r["device_id"]: r["state"] for r in rows}


def test_the_most_pressing_state_wins(registry: FleetRegistry) -> None:
    add(registry, 10)
    rollout(registry, "d-1", {"d-0001": "failed", "d-0002": "rolled_back", "d-0003": "downloading",
                              "d-0004": "committed", "d-0005": "failed", "d-0006": "pending"})
    with registry.tx() as tx:
        tx.execute("UPDATE devices SET online = 0 WHERE device_id IN ('d-0001', 'd-0007', 'd-0008', 'd-0009')")
        tx.execute("UPDATE devices SET last_seen = ? WHERE device_id = 'd-0007'", (NOW - 30,))
        tx.execute("UPDATE devices SET last_seen = ? WHERE device_id = 'd-0008'", (NOW - 61,))
        tx.execute("UPDATE devices SET last_seen = NULL WHERE device_id = 'd-0009'")
        tx.execute("UPDATE devices SET status = 'revoked' WHERE device_id = 'd-0005'")
        tx.execute("UPDATE devices SET public_key = NULL WHERE device_id = 'd-0000'")
        tx.execute("UPDATE devices SET lifecycle = 'probation' WHERE device_id = 'd-0004'")
    assert states(registry) == {
        "d-0000": "pending", "d-0001": "failed", "d-0002": "rolled_back", "d-0003": "updating",
        "d-0004": "updating", "d-0005": "revoked", "d-0006": "online", "d-0007": "offline", "d-0008": "stale",
        "d-0009": "stale",
    }
    # a newer rollout row is what counts
    rollout(registry, "d-2", {"d-0001": "committed"})
    assert states(registry)["d-0001"] == "offline"


def page(reg: FleetRegistry, params: dict[str, str]) -> tuple[list[dict[str, Any]], int, DeviceQuery]:
    q = DeviceQuery.parse(params)
    rows, matched = ConsoleQueries(reg).devices(q.table(), now=NOW, stale_after_s=60)
    return rows, matched, q


def test_the_device_table_filters_sorts_and_pages_in_sql(registry: FleetRegistry) -> None:
    add(registry, 1000)
    rows, matched, q = page(registry, {"group": "even", "profile": "jetson", "sort": "cpu", "dir": "desc",
                                       "page": "2", "size": "100"})
    assert matched == 250 and pages_of(matched, q.size) == 3 and len(rows) == 100
    cpus = [r["cpu_percent"] for r in rows]
    assert cpus == sorted(cpus, reverse=True)
    assert all("even" in r["groups"].split(",") and r["profile"] == "jetson" for r in rows)
    # missing values sort last whichever the direction
    for direction in ("asc", "desc"):
        rows, _, _ = page(registry, {"sort": "temperature", "dir": direction, "size": "500", "page": "2"})
        assert rows[-1]["temperature_c"] is None and rows[0]["temperature_c"] is not None
    assert page(registry, {"q": "D-099"})[1] == 10
    assert page(registry, {"model": "m:1"})[1] == 1000 and page(registry, {"model": "m:2"})[1] == 0
    # junk parameters fall back to defaults; a page past the end is empty (the page layer shows the last)
    q = DeviceQuery.parse({"page": "999", "size": "-5", "sort": "nope;drop", "state": "<x>"})
    assert (q.sort, q.state, q.size) == ("device", "", 50)
    assert q.args(page=3) == {"sort": "device", "dir": "asc", "page": "3"}
    rows, matched, _ = page(registry, {"page": "999"})
    assert rows == [] and matched == 1000
    first, _, _ = page(registry, {})
    assert [r["device_id"] for r in first] == [f"d-{i:04d}" for i in range(50)]


def test_overview_counts_and_issues(registry: FleetRegistry) -> None:
    add(registry, 4)
    rollout(registry, "d-x", {"d-0000": "failed"})
    with registry.tx() as tx:
        tx.execute("UPDATE devices SET online = 0, last_seen = ? WHERE device_id = 'd-0001'", (NOW - 7200,))
        tx.execute("UPDATE devices SET p95_ms = 9 WHERE device_id = 'd-0002'")
        tx.execute("UPDATE devices SET public_key = NULL WHERE device_id = 'd-0003'")
    raw, _ = ConsoleQueries(registry).devices(TableQuery(limit=None), now=NOW, stale_after_s=3600)
    r = [device_row(x, {"rpi4": 5.0, "jetson": 5.0}) for x in raw]
    counts = overview_counts(r, now=NOW, stale_after_s=3600)
    assert counts == {"devices": 3, "online": 2, "stale": 1, "updating": 0, "failed": 1, "rolled_back": 0}
    found = issues(r, [{"device_id": "new-1", "fingerprint": "ab:cd"}], now=NOW, stale_after_s=3600)
    assert [(i.device_id, i.kind) for i in found] == [
        ("d-0000", "failed update"), ("d-0001", "stale"), ("d-0002", "latency over budget"),
        ("new-1", "pending enrollment")]
    assert "d-x: too slow" in found[0].detail
    assert "last seen 2 h ago" in found[1].detail and "9.0 ms > 5 ms" in found[2].detail


def test_charts_are_svg_with_escaped_labels_and_gaps() -> None:
    svg = line_chart('<b>"t"</b>', "ms", [Series("a<", [(NOW - 600, 1.0), (NOW - 300, None), (NOW - 60, 4.0),
                                                         (NOW - 30, 3.0)], "s1")], now=NOW)
    assert svg.startswith("<svg") and "<b>" not in svg and "&lt;b&gt;&quot;t&quot;&lt;/b&gt;" in svg
    assert svg.count("<circle") == 1 and svg.count("<polyline") == 1, "a gap splits the line"
    empty = line_chart("cpu", "%", [Series("cpu", [], "s1")], now=NOW)
    assert "no data" in empty and "<polyline" not in empty


def test_runs_of_the_same_event_are_shown_once_with_a_count() -> None:
    def ev(kind: str, device: str | None, message: str = "") -> dict[str, Any]:
        return {"kind": kind, "device_id": device, "message": message}

    rejected = ev("ingest.rejected", "x", "unknown")
    events = [rejected, rejected, rejected, ev("lifecycle.committed", "a"), rejected, ev("download.started", "b"),
              ev("download.started", "c")]
    out = collapse(events, 3)
    assert [(e["kind"], e["device_id"], e["repeats"]) for e in out] == [
        ("ingest.rejected", "x", 3), ("lifecycle.committed", "a", 1), ("ingest.rejected", "x", 1)]
