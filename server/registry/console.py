"""Read-only queries the web console needs beyond the fleet registry's own (``server.console``).

The device table is filtered, sorted and paged here, in SQL, so a page of 50 costs the same with
10 or 10,000 devices in Python; each device's console *state* is computed here too (one CASE, the
only definition of it). Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.registry.fleet import FleetRegistry

#: the states of the device table, in the order "sort by state" uses
STATES = ("online", "offline", "stale", "updating", "failed", "rolled_back", "pending", "revoked")
#: rollout phases in which a device is working on an update
IN_FLIGHT = ("dispatched", "accepted", "downloading", "installing", "probation", "rolling_back")

#: sort key -> SQL expressions (NULLs last in either direction)
SORTS: dict[str, tuple[str, ...]] = {
    "device": ("device_id",), "group": ("groups",), "profile": ("profile",),
    "model": ("active_model", "active_version"), "state": ("state_rank",), "p95": ("p95_ms",),
    "cpu": ("cpu_percent",), "memory": ("memory_percent",), "temperature": ("temperature_c",),
    "last_seen": ("last_seen",),
}

_FLIGHT = ", ".join(f"'{p}'" for p in IN_FLIGHT)
_RANK = " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(STATES))

# ? 1: now, ? 2: stale after (s)
_TABLE = f"""
WITH t0 AS (
  SELECT d.device_id, d.profile, d.status, d.public_key IS NOT NULL AS has_key, d.active_model, d.active_version,
         d.online, d.p95_ms, d.cpu_percent, d.memory_percent, d.temperature_c, d.last_seen, d.lifecycle,
         (SELECT group_concat(group_name, ',') FROM (SELECT group_name FROM device_groups g
            WHERE g.device_id = d.device_id ORDER BY group_name) AS gs) AS groups,
         l.deployment_id AS last_deployment, l.state AS last_state, l.code AS last_code, l.reason AS last_reason,
         l.updated_at AS last_at
  FROM devices d
  LEFT JOIN deployment_devices l ON l.device_id = d.device_id AND l.deployment_id = (
      SELECT x.deployment_id FROM deployment_devices x
      WHERE x.device_id = d.device_id ORDER BY x.updated_at DESC, x.deployment_id DESC LIMIT 1)
), t1 AS (
  SELECT *, CASE
      WHEN status = 'revoked' THEN 'revoked'
      WHEN NOT has_key THEN 'pending'
      WHEN (lifecycle IS NOT NULL AND lifecycle != 'idle') OR last_state IN ({_FLIGHT}) THEN 'updating'
      WHEN last_state = 'failed' THEN 'failed'
      WHEN last_state = 'rolled_back' THEN 'rolled_back'
      WHEN online = 1 THEN 'online'
      WHEN last_seen IS NULL OR ?1 - last_seen > ?2 THEN 'stale'
      ELSE 'offline' END AS state
  FROM t0
), t AS (SELECT *, CASE state {_RANK} END AS state_rank FROM t1)
"""


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices, in which order (``sort`` is a key of SORTS)."""

    q: str = ""
    group: str = ""
    profile: str = ""
    state: str = ""
    model: str = ""
    sort: str = "device"
    desc: bool = False


@dataclass(frozen=True)
class TableQuery(DeviceFilter):
    """A filter and a window of its rows (``limit=None``: all of them)."""

    offset: int = 0
    limit: int | None = 50


class ConsoleQueries:
    def __init__(self, registry: FleetRegistry) -> None:
        self.registry = registry

    def devices(self, query: TableQuery, *, now: float, stale_after_s: float) -> tuple[list[dict[str, Any]], int]:
        """One page of the device table and how many devices match."""
        if query.sort not in SORTS:
            raise ValueError(f"unknown sort key {query.sort!r}")
        clauses: list[str] = []
        args: list[Any] = [now, stale_after_s]
        if query.q:
            clauses.append("instr(lower(device_id), ?) > 0")
            args.append(query.q.lower())
        if query.group:
            clauses.append("EXISTS (SELECT 1 FROM device_groups g WHERE g.device_id = t.device_id"
                           " AND g.group_name = ?)")
            args.append(query.group)
        if query.profile:
            clauses.append("profile = ?")
            args.append(query.profile)
        if query.state:
            clauses.append("state = ?")
            args.append(query.state)
        if query.model:
            clauses.append("(active_model = ? OR active_model || ':' || active_version = ?)")
            args += [query.model, query.model]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        direction = "DESC" if query.desc else "ASC"
        order = ", ".join(f"{c} IS NULL, {c} {direction}" for c in SORTS[query.sort]) + ", device_id"
        page = "" if query.limit is None else " LIMIT ? OFFSET ?"
        if query.limit is not None:
            args += [query.limit, query.offset]
        rows = self.registry.db.connection().execute(
            f"{_TABLE} SELECT *, COUNT(*) OVER () AS matched FROM t{where} ORDER BY {order}{page}", args
        ).fetchall()
        matched = int(rows[0]["matched"]) if rows else 0
        if not rows and query.offset:
            matched = int(self.registry.db.connection().execute(
                f"{_TABLE} SELECT COUNT(*) FROM t{where}", args[:-2]).fetchone()[0])
        return [dict(r) for r in rows], matched

    def facets(self) -> dict[str, list[str]]:
        conn = self.registry.db.connection()
        return {
            "group": [r[0] for r in conn.execute("SELECT DISTINCT group_name FROM device_groups ORDER BY 1")],
            "profile": [r[0] for r in conn.execute("SELECT DISTINCT profile FROM devices ORDER BY 1")],
            "model": [r[0] for r in conn.execute(
                "SELECT m FROM (SELECT DISTINCT active_model, active_version,"
                " active_model || ':' || active_version AS m FROM devices WHERE active_model IS NOT NULL) AS models"
                " ORDER BY active_model, active_version")],
            "total": [str(conn.execute("SELECT COUNT(*) FROM devices").fetchone()[0])],
        }

    def device_audit(self, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The newest audit rows naming this device as their target."""
        rows = self.registry.db.connection().execute(
            "SELECT id, ts, actor, action, outcome, detail FROM audit WHERE target = ? ORDER BY id DESC LIMIT ?",
            (f"device:{device_id}", limit),
        ).fetchall()
        return [dict(r) for r in rows]

    def online_of(self, device_ids: Sequence[str]) -> dict[str, bool]:
        conn = self.registry.db.connection()
        out: dict[str, bool] = {}
        for i in range(0, len(device_ids), 500):
            part = list(device_ids[i:i + 500])
            marks = ",".join("?" * len(part))
            out.update({r[0]: bool(r[1]) for r in conn.execute(
                f"SELECT device_id, online FROM devices WHERE device_id IN ({marks})", part)})
        return out

    def change_stamp(self) -> str:
        """Changes whenever anything a console page shows may have changed (events, rollout rows,
        presence, telemetry, enrollments, audit)."""
        row = self.registry.db.connection().execute(
            "SELECT (SELECT MAX(id) FROM events), (SELECT MAX(updated_at) FROM deployment_devices),"
            " (SELECT MAX(updated_at) FROM deployments), (SELECT MAX(COALESCE(telemetry_at, 0)) FROM devices),"
            " (SELECT SUM(online) FROM devices), (SELECT COUNT(*) FROM devices),"
            " (SELECT COUNT(*) FROM enroll_requests WHERE status = 'pending'), (SELECT MAX(id) FROM audit)"
        ).fetchone()
        return ":".join("" if v is None else str(v) for v in row)
