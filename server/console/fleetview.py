"""What the console shows about devices, computed from registry rows: pure functions, no I/O.

A device has one *state* for the table (the most pressing of: revoked, pending, updating, failed,
rolled back, stale, offline, online; computed in SQL by ``server.registry.console``) and the overview
counts each condition on its own (a device can be online and have failed its last update).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.registry.console import SORTS, STATES, DeviceFilter, TableQuery

SORT_KEYS = tuple(SORTS)
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class LastRollout:
    """A device's most recent row in any deployment."""

    deployment_id: str
    state: str
    code: str | None
    reason: str | None
    updated_at: float


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


def device_row(r: Mapping[str, Any], budgets: Mapping[str, float]) -> DeviceRow:
    """A row of ``ConsoleQueries.devices``."""
    last = None
    if r["last_deployment"] is not None:
        last = LastRollout(r["last_deployment"], r["last_state"], r["last_code"], r["last_reason"], r["last_at"])
    return DeviceRow(r["device_id"], tuple(g for g in (r["groups"] or "").split(",") if g), r["profile"],
                     r["active_model"], r["active_version"], r["state"], bool(r["online"]), r["p95_ms"],
                     r["cpu_percent"], r["memory_percent"], r["temperature_c"], r["last_seen"], r["lifecycle"], last,
                     budgets.get(r["profile"]))


@dataclass(frozen=True)
class DeviceQuery(DeviceFilter):
    """The device table's query string, validated."""

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

    def table(self, page: int | None = None) -> TableQuery:
        return TableQuery(q=self.q, group=self.group, profile=self.profile, state=self.state, model=self.model,
                          sort=self.sort, desc=self.desc, offset=((page or self.page) - 1) * self.size,
                          limit=self.size)

    def args(self, **changes: Any) -> dict[str, str]:
        """Query parameters of this query with some changed (for links)."""
        merged = {"q": self.q, "group": self.group, "profile": self.profile, "state": self.state,
                  "model": self.model, "sort": self.sort, "dir": "desc" if self.desc else "asc",
                  "page": str(self.page), "size": str(self.size)}
        merged.update({k: str(v) for k, v in changes.items()})
        return {k: v for k, v in merged.items() if v and not (k == "size" and v == str(PAGE_SIZE))}


@dataclass
class DevicePage:
    rows: list[DeviceRow]
    total: int
    matched: int
    page: int
    pages: int
    query: DeviceQuery
    facets: dict[str, list[str]] = field(default_factory=dict)


def pages_of(matched: int, size: int) -> int:
    return max(1, -(-matched // size))


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
