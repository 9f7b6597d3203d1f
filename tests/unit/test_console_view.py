"""The console's pure parts: device states, the device table's query, issues, charts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from server.console.charts import Series, line_chart
from server.console.fleetview import (
    DeviceQuery,
    collapse,
    device_rows,
    device_state,
    issues,
    overview_counts,
    select_devices,
)
from server.registry.console import LastRollout

NOW = 1_000_000.0


def dev(i: int, **kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "device_id": f"d-{i:04d}", "groups": ("g",), "profile": "rpi4", "active_model": "m", "active_version": 1,
        "online": True, "p95_ms": float(i % 7), "cpu_percent": float(i % 50), "memory_percent": 30.0,
        "temperature_c": None if i % 3 == 0 else 40.0 + i % 10, "last_seen": NOW - 5, "lifecycle": "idle",
        "status": "active", "public_key": "k"}
    base.update(kw)
    return SimpleNamespace(**base)


def last(state: str) -> LastRollout:
    return LastRollout("d-x", state, "health.latency" if state == "failed" else None, "too slow", NOW - 10)


def test_the_most_pressing_state_wins() -> None:
    assert device_state(dev(1, status="revoked"), last("failed"), now=NOW, stale_after_s=60) == "revoked"
    assert device_state(dev(1, public_key=None), None, now=NOW, stale_after_s=60) == "pending"
    assert device_state(dev(1, lifecycle="downloading"), last("committed"), now=NOW, stale_after_s=60) == "updating"
    assert device_state(dev(1), last("downloading"), now=NOW, stale_after_s=60) == "updating"
    assert device_state(dev(1, online=False), last("failed"), now=NOW, stale_after_s=60) == "failed"
    assert device_state(dev(1), last("rolled_back"), now=NOW, stale_after_s=60) == "rolled_back"
    assert device_state(dev(1, online=False, last_seen=NOW - 30), None, now=NOW, stale_after_s=60) == "offline"
    assert device_state(dev(1, online=False, last_seen=NOW - 61), None, now=NOW, stale_after_s=60) == "stale"
    assert device_state(dev(1, online=False, last_seen=None), None, now=NOW, stale_after_s=60) == "stale"
    assert device_state(dev(1), last("committed"), now=NOW, stale_after_s=60) == "online"


def rows(n: int = 1000) -> list[Any]:
    devices = [dev(i, groups=("g", "even") if i % 2 == 0 else ("g",), profile="jetson" if i % 4 == 0 else "rpi4")
               for i in range(n)]
    return device_rows(devices, {"d-0007": last("failed")}, {"rpi4": 5.0}, now=NOW, stale_after_s=60)


def test_the_device_table_filters_sorts_and_pages_on_the_server() -> None:
    all_rows = rows()
    page = select_devices(all_rows, DeviceQuery.parse({"group": "even", "profile": "jetson", "sort": "cpu",
                                                       "dir": "desc", "page": "2", "size": "100"}))
    assert page.total == 1000 and page.matched == 250 and page.pages == 3 and page.page == 2
    cpus = [r.cpu_percent for r in page.rows]
    assert cpus == sorted(cpus, reverse=True) and len(page.rows) == 100
    assert all("even" in r.groups and r.profile == "jetson" for r in page.rows)
    # missing values sort last whichever the direction
    for direction in ("asc", "desc"):
        temps = [r.temperature_c for r in select_devices(all_rows, DeviceQuery.parse(
            {"sort": "temperature", "dir": direction, "size": "500", "page": "2"})).rows]
        assert temps[-1] is None and temps[0] is not None
    assert [r.device_id for r in select_devices(all_rows, DeviceQuery.parse({"state": "failed"})).rows] == ["d-0007"]
    assert select_devices(all_rows, DeviceQuery.parse({"q": "D-099"})).matched == 10
    # a page past the end is the last page; junk parameters fall back to defaults
    q = DeviceQuery.parse({"page": "999", "size": "-5", "sort": "nope;drop", "state": "<x>"})
    assert (q.sort, q.state, q.size) == ("device", "", 50)
    assert select_devices(all_rows, q).page == 20
    assert q.args(page=3) == {"sort": "device", "dir": "asc", "page": "3"}


def test_overview_counts_and_issues() -> None:
    devices = [dev(0), dev(1, online=False, last_seen=NOW - 7200), dev(2, p95_ms=9.0), dev(3, public_key=None)]
    r = device_rows(devices, {"d-0000": last("failed")}, {"rpi4": 5.0}, now=NOW, stale_after_s=3600)
    counts = overview_counts(r, now=NOW, stale_after_s=3600)
    assert counts == {"devices": 3, "online": 2, "stale": 1, "updating": 0, "failed": 1, "rolled_back": 0}
    found = issues(r, [{"device_id": "new-1", "fingerprint": "ab:cd"}], now=NOW, stale_after_s=3600)
    assert [(i.device_id, i.kind) for i in found] == [
        ("d-0000", "failed update"), ("d-0001", "stale"), ("d-0002", "latency over budget"),
        ("new-1", "pending enrollment")]
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
