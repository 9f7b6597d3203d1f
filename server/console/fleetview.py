"""What the console shows about devices, computed from registry rows: pure functions, no I/O.

A device has one *state* for the table (the most pressing of: revoked, pending, updating, failed,
rolled back, stale, offline, online) and the overview counts each condition on its own (a device can
be online and have failed its last update).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.registry.console import LastRollout

STATES = ("online", "offline", "stale", "updating", "failed", "rolled_back", "pending", "revoked")
IN_FLIGHT = frozenset({"dispatched", "accepted", "downloading", "installing", "probation", "rolling_back"})
SORT_KEYS = ("device", "group", "profile", "model", "state", "p95", "cpu", "memory", "temperature", "last_seen")
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    groups: tuple[str, ...]
    profile: str
    model: str | None
    version: int | None
    state: str
    online: bool
    p95_ms: float | None
    cpu_percent: float | None
    memory_percent: float | None
    temperature_c: float | None
    last_seen: float | None
    lifecycle: str | None
    last_rollout: LastRollout | None
    budget_ms: float | None

    @property
    def model_ref(self) -> str:
        return f"{self.model}:{self.version}" if self.model else ""

    @property
    def over_budget(self) -> bool:
        return self.p95_ms is not None and self.budget_ms is not None and self.p95_ms > self.budget_ms


def device_state(d: Any, last: LastRollout | None, *, now: float, stale_after_s: float) -> str:
    """``d`` is a registry ``Device``."""
    if d.status == "revoked":
        return "revoked"
    if not d.public_key:
        return "pending"
    if (d.lifecycle not in (None, "idle")) or (last is not None and last.state in IN_FLIGHT):
        return "updating"
    if last is not None and last.state == "failed":
        return "failed"
    if last is not None and last.state == "rolled_back":
        return "rolled_back"
    if d.online:
        return "online"
    if d.last_seen is None or now - d.last_seen > stale_after_s:
        return "stale"
    return "offline"


def device_rows(devices: Sequence[Any], last: Mapping[str, LastRollout], budgets: Mapping[str, float], *,
                now: float, stale_after_s: float) -> list[DeviceRow]:
    return [
        DeviceRow(d.device_id, tuple(d.groups), d.profile, d.active_model, d.active_version,
                  device_state(d, last.get(d.device_id), now=now, stale_after_s=stale_after_s), d.online, d.p95_ms,
                  d.cpu_percent, d.memory_percent, d.temperature_c, d.last_seen, d.lifecycle, last.get(d.device_id),
                  budgets.get(d.profile))
        for d in devices
    ]


@dataclass(frozen=True)
class DeviceQuery:
    q: str = ""
    group: str = ""
    profile: str = ""
    state: str = ""
    model: str = ""
    sort: str = "device"
    desc: bool = False
    page: int = 1
    size: int = PAGE_SIZE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> DeviceQuery:
        def text(name: str) -> str:
            return str(params.get(name) or "")[:128].strip()

        def number(name: str, default: int, hi: int) -> int:
            raw = text(name)
            return min(max(int(raw), 1), hi) if raw.isdigit() else default

        sort = text("sort") or "device"
        state = text("state")
        return cls(q=text("q"), group=text("group"), profile=text("profile"),
                   state=state if state in STATES else "", model=text("model"),
                   sort=sort if sort in SORT_KEYS else "device", desc=text("dir") == "desc",
                   page=number("page", 1, 1 << 20), size=number("size", PAGE_SIZE, MAX_PAGE_SIZE))

    def args(self, **changes: Any) -> dict[str, str]:
        """Query parameters of this query with some changed (for links)."""
        merged = {"q": self.q, "group": self.group, "profile": self.profile, "state": self.state,
                  "model": self.model, "sort": self.sort, "dir": "desc" if self.desc else "asc",
                  "page": str(self.page), "size": str(self.size)}
        merged.update({k: str(v) for k, v in changes.items()})
        return {k: v for k, v in merged.items() if v and not (k == "size" and v == str(PAGE_SIZE))}


def _sort_value(row: DeviceRow, key: str) -> tuple[int, Any]:
    value: Any = {
        "device": row.device_id, "group": ",".join(row.groups), "profile": row.profile, "model": row.model_ref,
        "state": STATES.index(row.state), "p95": row.p95_ms, "cpu": row.cpu_percent, "memory": row.memory_percent,
        "temperature": row.temperature_c, "last_seen": row.last_seen,
    }[key]
    return (1, 0) if value is None or value == "" else (0, value)


@dataclass
class DevicePage:
    rows: list[DeviceRow]
    total: int
    matched: int
    page: int
    pages: int
    query: DeviceQuery
    facets: dict[str, list[str]] = field(default_factory=dict)


def select_devices(rows: Sequence[DeviceRow], query: DeviceQuery) -> DevicePage:
    q = query.q.lower()
    hits = [
        r for r in rows
        if (not q or q in r.device_id.lower())
        and (not query.group or query.group in r.groups)
        and (not query.profile or r.profile == query.profile)
        and (not query.state or r.state == query.state)
        and (not query.model or query.model in (r.model_ref, r.model))
    ]
    hits.sort(key=lambda r: r.device_id)
    if query.sort != "device" or query.desc:
        # missing values sort last in either direction
        present = [r for r in hits if _sort_value(r, query.sort)[0] == 0]
        missing = [r for r in hits if _sort_value(r, query.sort)[0] == 1]
        present.sort(key=lambda r: _sort_value(r, query.sort)[1], reverse=query.desc)
        hits = present + missing
    pages = max(1, -(-len(hits) // query.size))
    page = min(query.page, pages)
    start = (page - 1) * query.size
    facets = {
        "group": sorted({g for r in rows for g in r.groups}),
        "profile": sorted({r.profile for r in rows}),
        "model": sorted({r.model_ref for r in rows if r.model}),
    }
    return DevicePage(hits[start:start + query.size], len(rows), len(hits), page, pages, query, facets)


@dataclass(frozen=True)
class Issue:
    device_id: str
    kind: str
    detail: str


def overview_counts(rows: Sequence[DeviceRow], *, now: float, stale_after_s: float) -> dict[str, int]:
    live = [r for r in rows if r.state not in ("revoked", "pending")]
    return {
        "devices": len(live),
        "online": sum(r.online for r in live),
        "stale": sum(1 for r in live if not r.online and (r.last_seen is None or now - r.last_seen > stale_after_s)),
        "updating": sum(r.state == "updating" for r in live),
        "failed": sum(r.last_rollout is not None and r.last_rollout.state == "failed" for r in live),
        "rolled_back": sum(r.last_rollout is not None and r.last_rollout.state == "rolled_back" for r in live),
    }


def issues(rows: Sequence[DeviceRow], pending: Sequence[Mapping[str, Any]], *, now: float, stale_after_s: float,
           limit: int = 50) -> list[Issue]:
    """Devices an operator should look at, most pressing first."""
    out: list[Issue] = []
    for r in rows:
        if r.state in ("revoked", "pending"):
            continue
        last = r.last_rollout
        if last is not None and last.state in ("failed", "rolled_back"):
            why = last.reason or last.code or last.state
            out.append(Issue(r.device_id, "failed update", f"{last.deployment_id}: {why}"))
        if not r.online and (r.last_seen is None or now - r.last_seen > stale_after_s):
            seen = "never seen" if r.last_seen is None else f"last seen {ago(now - r.last_seen)} ago"
            out.append(Issue(r.device_id, "stale", seen))
        if r.over_budget:
            out.append(Issue(r.device_id, "latency over budget",
                             f"p95 {r.p95_ms:.1f} ms > {r.budget_ms:.0f} ms ({r.profile})"))
    for p in pending:
        out.append(Issue(str(p["device_id"]), "pending enrollment", f"fingerprint {p['fingerprint']}"))
    return out[:limit]


def collapse(events: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Newest-first events with runs of the same (kind, device, message) shown once with a count."""
    out: list[dict[str, Any]] = []
    for e in events:
        prev = out[-1] if out else None
        if prev is not None and (prev["kind"], prev["device_id"], prev["message"]) == (
                e["kind"], e["device_id"], e["message"]):
            prev["repeats"] += 1
            continue
        if len(out) == limit:
            break
        out.append({**e, "repeats": 1})
    return out


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"
