"""Applying device reports to deployment rows, inside the ingest transaction.

The ingest writes an event (or a state report) and calls these hooks with the same
connection, so an event is never stored without its effect on the rollout, nor the other way
round, whichever server process received it. The phase rules themselves are pure
(``planner.observe_event`` / ``observe_state``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any

from agent.protocol.events import EventKind
from agent.protocol.messages import Event, StateReport
from server.registry.db import Connection
from server.registry.rollouts import NOT_WATCHED, RolloutTables
from server.rollout.planner import IN_FLIGHT, TERMINAL, Observation, Phase, observe_event, observe_state


class ProgressTracker:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        #: set by the driver: called after a commit that changed any deployment row
        self.changed = False
        #: inside ``prefetch``: the batch's devices' progress rows, kept up to date by ``_apply``
        self._rows: dict[str, list[dict[str, Any]]] | None = None

    @contextmanager
    def prefetch(self, conn: Connection, device_ids: Collection[str]) -> Iterator[None]:
        """For one ingest batch (``FleetRegistry.write_ingest``, inside its transaction, whose writer lock keeps
        the rows as read): the progress rows of ``device_ids`` in one query instead of one per message."""
        found = RolloutTables.progress_rows_of(conn, device_ids)
        self._rows = {d: [dict(r) for r in found.get(d, [])] for d in device_ids}
        try:
            yield
        finally:
            self._rows = None

    def _progress_rows(self, conn: Connection, device_id: str) -> list[Any]:
        if self._rows is not None and device_id in self._rows:
            return [r for r in self._rows[device_id] if r["state"] not in NOT_WATCHED]
        return RolloutTables.progress_rows(conn, device_id)

    def _apply(self, conn: Connection, deployment_id: str, device_id: str, obs: Observation) -> None:
        RolloutTables.set_device_progress(
            conn, deployment_id, device_id, state=obs.phase.value, reason=obs.reason, code=obs.code,
            progress=obs.progress if obs.phase is not Phase.COMMITTED else 1.0, finished=obs.phase in TERMINAL,
            now=self._clock(),
        )
        for row in (self._rows or {}).get(device_id, []):
            if row["deployment_id"] == deployment_id:
                row["state"], row["code"] = obs.phase.value, obs.code
        self.changed = True

    def on_event(self, conn: Connection, ev: Event, event_row: int) -> None:
        rows = self._progress_rows(conn, ev.device_id)
        for r in rows:
            phase = Phase(r["state"])
            about_this = (ev.deployment_id is not None and ev.deployment_id == r["deployment_id"]) or (
                ev.deployment_id is None
                and ev.model is not None
                and ev.model.name == r["model"]
                and (ev.model.version == r["version"] or phase is Phase.ROLLING_BACK)
            )
            if ev.kind == EventKind.COMMAND_RESULT and phase is Phase.ROLLING_BACK:
                active = ev.data.get("active")
                if (
                    ev.data.get("ok") is True
                    and isinstance(active, dict)
                    and active.get("name") == r["model"]
                    and active.get("version") == r["previous_version"]
                ):
                    self._apply(conn, r["deployment_id"], ev.device_id,
                                Observation(Phase.ROLLED_BACK, reason=f"confirmed: running {r['previous_version']}"))
                continue
            if not about_this:
                continue
            obs = observe_event(phase, r["code"], ev.kind, message=ev.message, code=ev.code, data=ev.data)
            if obs is not None:
                self._apply(conn, r["deployment_id"], ev.device_id, obs)

    def on_state(self, conn: Connection, report: StateReport) -> None:
        if not report.online:
            return
        rows = self._progress_rows(conn, report.device_id)
        now = self._clock()
        for r in rows:
            phase = Phase(r["state"])
            active = report.active
            same_model = active is not None and active.name == r["model"]
            obs = observe_state(
                phase,
                r["code"],
                version=r["version"],
                previous_version=r["previous_version"],
                active_version=active.version if same_model and active else None,
                active_state=active.state if same_model and active else None,
            )
            if obs is not None:
                self._apply(conn, r["deployment_id"], report.device_id, obs)
            elif phase in IN_FLIGHT:
                # a device that just came back (or moved on) is making progress: restart its timeout
                RolloutTables.touch_device_row(conn, r["deployment_id"], report.device_id, now)

