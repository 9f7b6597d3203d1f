"""Read-only queries the web console needs beyond the fleet registry's own (``server.console``).

Each is one statement over the registry's read connection; nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.registry.fleet import FleetRegistry


@dataclass(frozen=True)
class LastRollout:
    """A device's most recent row in any deployment."""

    deployment_id: str
    state: str
    code: str | None
    reason: str | None
    updated_at: float


class ConsoleQueries:
    def __init__(self, registry: FleetRegistry) -> None:
        self.registry = registry

    def last_rollouts(self) -> dict[str, LastRollout]:
        """Per device, its newest deployment row (what its last update did)."""
        rows = self.registry.db.connection().execute(
            "SELECT device_id, deployment_id, state, code, reason, updated_at FROM ("
            " SELECT device_id, deployment_id, state, code, reason, updated_at, ROW_NUMBER() OVER ("
            "  PARTITION BY device_id ORDER BY updated_at DESC, rowid DESC) AS rn FROM deployment_devices)"
            " WHERE rn = 1"
        ).fetchall()
        return {r["device_id"]: LastRollout(r["deployment_id"], r["state"], r["code"], r["reason"], r["updated_at"])
                for r in rows}

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
