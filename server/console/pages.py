"""The data behind each console page, read through the service layer and the registry's methods.

Synchronous (SQLite): the web layer runs these in worker threads. Each returns a dict for a template.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from server.console import charts
from server.console.fleetview import (
    DevicePage,
    DeviceQuery,
    DeviceRow,
    collapse,
    device_row,
    issues,
    overview_counts,
    pages_of,
)
from server.errors import NotFoundError, ServerError
from server.registry.console import ConsoleQueries, TableQuery
from server.registry.db import RegistryDatabase
from server.service import FleetService

log = logging.getLogger("edgefleet.console")

LIVE_STATUSES = ("running", "rolling_back")


def _budgets() -> dict[str, float]:
    try:
        from server.profiles import load_profiles  # noqa: PLC0415

        return {name: p.latency_budget_ms for name, p in load_profiles().items()}
    except (ServerError, OSError, ValueError) as exc:
        log.warning("device profiles not loaded (no latency budgets on the console): %s", exc)
        return {}


class PageData:
    def __init__(self, service: FleetService, *, stale_after_s: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.registry = service.registry
        self.queries = ConsoleQueries(service.registry)
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._budgets: dict[str, float] | None = None

    @property
    def budgets(self) -> dict[str, float]:
        if self._budgets is None:
            self._budgets = _budgets()
        return self._budgets

    def _rows(self, now: float, query: TableQuery) -> tuple[list[DeviceRow], int]:
        rows, matched = self.queries.devices(query, now=now, stale_after_s=self.stale_after_s)
        return [device_row(r, self.budgets) for r in rows], matched

    def change_stamp(self) -> str:
        return self.queries.change_stamp()

    @property
    def database(self) -> RegistryDatabase:
        """The registry's database (its ``wait_change`` wakes the live-update streams)."""
        return self.queries.registry.db

    # -- pages --------------------------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        now = self.clock()
        rows, _ = self._rows(now, TableQuery(limit=None))
        pending = self.service.pending_enrollments()
        live = [self._progress(d) for d in self.service.list_deployments(limit=50) if d["status"] in LIVE_STATUSES]
        events = [e.to_dict() for e in self.registry.list_events(limit=200, newest=True)]
        return {
            "counts": overview_counts(rows, now=now, stale_after_s=self.stale_after_s),
            "pending": len(pending),
            "live": live,
            "issues": issues(rows, pending, now=now, stale_after_s=self.stale_after_s),
            "events": collapse(list(reversed(events)), 15),
            "now": now,
        }

    def devices(self, params: Mapping[str, str]) -> dict[str, Any]:
        now = self.clock()
        query = DeviceQuery.parse(params)
        rows, matched = self._rows(now, query.table())
        pages = pages_of(matched, query.size)
        if query.page > pages:  # past the end: the last page
            rows, matched = self._rows(now, query.table(pages))
        facets = self.queries.facets()
        total = int(facets.pop("total")[0])
        return {"page": DevicePage(rows, total, matched, min(query.page, pages), pages, query, facets), "now": now}

    def device(self, device_id: str) -> dict[str, Any]:
        now = self.clock()
        detail = self.service.device_detail(device_id)
        found, _ = self._rows(now, TableQuery(q=detail["device_id"], limit=None))
        row = next((r for r in found if r.device_id == detail["device_id"]), None)
        audit = self.queries.device_audit(detail["device_id"])
        rollouts = [r.to_dict() for r in self.registry.device_rows(detail["device_id"])]
        return {"d": detail, "row": row, "charts": charts.telemetry_charts(detail["telemetry"], now=now),
                "events": collapse(list(reversed(detail["events"])), 20), "audit": audit,
                "rollouts": sorted(rollouts, key=lambda r: -r["updated_at"])[:20], "now": now}

    def deployments(self) -> dict[str, Any]:
        return {"deployments": [self._progress(d) for d in self.service.list_deployments(limit=200)],
                "now": self.clock()}

    def deployment(self, deployment_id: str, show_all: bool = False, cap: int = 200) -> dict[str, Any]:
        detail = self.service.deployment_detail(deployment_id)
        wire: dict[str, int] = {}
        for profile, b in detail["builds"].items():
            try:
                wire[profile] = self.registry.get_artifact(b["artifact_id"]).wire_bytes
            except NotFoundError:
                continue
        delivered = sum(wire.get(d["profile"], 0) for d in detail["devices"]
                        if d["state"] in ("installing", "probation", "committed"))
        total = sum(wire.get(d["profile"], 0) for d in detail["devices"] if d["state"] not in ("skipped",))
        # what needs attention first: failures, then devices at work, waiting, done
        rank = {"failed": 0, "rolled_back": 1, "rolling_back": 2, "probation": 3, "installing": 4, "downloading": 5,
                "accepted": 6, "dispatched": 7, "pending": 8}
        ordered = sorted(detail["devices"], key=lambda d: (rank.get(d["state"], 9), d["wave"], d["device_id"]))
        shown = ordered if show_all else ordered[:cap]
        return {"dep": detail, "wire": wire, "events": collapse(list(reversed(detail["events"])), 20),
                "delivered": delivered, "to_deliver": total, "shown": shown, "hidden": len(ordered) - len(shown),
                "summary": self._progress(detail), "now": self.clock()}

    def models(self) -> dict[str, Any]:
        from server import model_ops  # noqa: PLC0415 - the compression stack loads on first use

        try:
            versions = model_ops.list_models(self.service.config.home)
        except ServerError as exc:
            return {"versions": [], "error": exc.message}
        return {"versions": versions, "error": None}

    def model(self, ref: str) -> dict[str, Any]:
        from server import model_ops  # noqa: PLC0415

        return {"m": model_ops.show_model(self.service.config.home, ref)}

    def enrollment(self) -> dict[str, Any]:
        return {"pending": self.service.pending_enrollments(), "now": self.clock()}

    def audit(self, params: Mapping[str, str]) -> dict[str, Any]:
        actor = (params.get("actor") or "").strip()[:64] or None
        action = (params.get("action") or "").strip()[:64] or None
        raw = params.get("limit") or ""
        limit = min(max(int(raw), 1), 5000) if raw.isdigit() else 200
        rows = self.service.audit(limit=limit, actor=actor, action=action)
        return {"rows": list(reversed(rows)), "chain": self.registry.verify_audit().to_dict(),
                "actor": actor or "", "action": action or "", "limit": limit}

    # -- helpers ------------------------------------------------------------------------------------------

    def _progress(self, d: Mapping[str, Any]) -> dict[str, Any]:
        """A deployment with its committed/failed/in-flight totals (from counts or its device rows)."""
        counts: dict[str, int] = dict(d.get("counts") or {})
        if not counts and "devices" in d:
            for r in d["devices"]:
                counts[r["state"]] = counts.get(r["state"], 0) + 1
        total = sum(n for s, n in counts.items() if s not in ("skipped", "superseded", "cancelled"))
        committed = counts.get("committed", 0)
        failed = counts.get("failed", 0) + counts.get("rolled_back", 0)
        out = dict(d)
        out.update(total=total, committed=committed, failed_n=failed,
                   in_flight=max(total - committed - failed - counts.get("pending", 0), 0),
                   percent=round(100.0 * committed / total) if total else 0, counts=counts)
        return out
