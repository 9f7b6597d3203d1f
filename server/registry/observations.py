"""Observations: device and server events and the telemetry rollup (tables ``events`` and
``telemetry``), and the ingest batch that writes one round of device messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.measurement import Measurement
from agent.protocol.messages import Event, StateReport, Telemetry
from server.registry.base import Record, TableOwner
from server.registry.base import now as _now
from server.registry.base import to_json as _json
from server.registry.db import Connection, Row, execute_each, matching

_INSERT_DEVICE_EVENT = (
    "INSERT INTO events (device_id, event_id, ts, received_at, kind, severity, message, code,"
    " deployment_id, model, version, command_id, data, source)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'device')"
    " ON CONFLICT (device_id, event_id) DO NOTHING RETURNING id"
)


@dataclass(frozen=True)
class EventRecord(Record):
    id: int
    device_id: str | None
    event_id: str | None
    ts: float
    received_at: float
    kind: str
    severity: str
    message: str
    code: str | None
    deployment_id: str | None
    model: str | None
    version: int | None
    command_id: str | None
    data: Mapping[str, Any]
    source: str


@dataclass
class IngestBatch:
    """Device messages decoded by the ingest shell, written in one transaction."""

    states: list[StateReport] = field(default_factory=list)
    telemetry: list[Telemetry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    #: server-side observations: (device_id | None, kind, severity, message, code, data)
    server_events: list[tuple[str | None, str, str, str, str | None, Mapping[str, Any]]] = field(
        default_factory=list
    )
    #: state reports of devices not registered (yet): kept so that approving or registering a device that is
    #: already connected shows it online at once instead of after its next report
    unregistered_states: list[StateReport] = field(default_factory=list)
    #: what devices measured of the variants they installed or probed (``registry.measurements``)
    measurements: list[Measurement] = field(default_factory=list)

    def __len__(self) -> int:
        return (len(self.states) + len(self.telemetry) + len(self.events) + len(self.server_events)
                + len(self.unregistered_states) + len(self.measurements))


class ObservationTables(TableOwner):
    """Events and telemetry."""

    # -- writing (the ingest batch in ``FleetRegistry.write_ingest`` calls these) ------------------

    @staticmethod
    def insert_device_events(conn: Connection, events: Sequence[Event], now: float) -> list[int | None]:
        """Record device events, in order; each one's row id, or None for a QoS 1 duplicate (already recorded
        and applied). PostgreSQL gets them in one round trip (``db.execute_each``)."""
        rows = execute_each(conn, _INSERT_DEVICE_EVENT, [(
            ev.device_id,
            ev.event_id,
            ev.ts,
            now,
            ev.kind,
            ev.severity,
            ev.message,
            ev.code,
            ev.deployment_id,
            ev.model.name if ev.model else None,
            ev.model.version if ev.model else None,
            ev.command_id,
            _json(dict(ev.data)),
        ) for ev in events])
        return [None if row is None else int(row[0]) for row in rows]

    @classmethod
    def insert_device_event(cls, conn: Connection, ev: Event, now: float) -> int | None:
        """Record a device event; None when it is a QoS 1 duplicate (already recorded and applied)."""
        return cls.insert_device_events(conn, [ev], now)[0]

    @staticmethod
    def insert_telemetry(conn: Connection, t: Telemetry, bucket_s: float) -> None:
        """Add a sample to its time bucket of the rollup."""
        p95 = t.latency_ms.get("p95")
        bucket = (t.ts // bucket_s) * bucket_s
        conn.execute(
            "INSERT INTO telemetry (device_id, bucket, samples, cpu_sum, memory_sum, rss_max, p95_sum, p95_samples,"
            " p95_max, requests, errors, temperature_max) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (device_id, bucket) DO UPDATE SET samples = telemetry.samples + 1,"
            " cpu_sum = telemetry.cpu_sum + excluded.cpu_sum, memory_sum = telemetry.memory_sum + excluded.memory_sum,"
            " rss_max = MAX(telemetry.rss_max, excluded.rss_max), p95_sum = telemetry.p95_sum + excluded.p95_sum,"
            " p95_samples = telemetry.p95_samples + excluded.p95_samples,"
            " p95_max = MAX(COALESCE(telemetry.p95_max, excluded.p95_max), COALESCE(excluded.p95_max,"
            " telemetry.p95_max)), requests = telemetry.requests + excluded.requests,"
            " errors = telemetry.errors + excluded.errors,"
            " temperature_max = MAX(COALESCE(telemetry.temperature_max, excluded.temperature_max),"
            " COALESCE(excluded.temperature_max, telemetry.temperature_max))",
            (
                t.device_id,
                bucket,
                t.cpu_percent,
                t.memory_percent,
                t.rss_bytes,
                p95 or 0.0,
                1 if p95 is not None else 0,
                p95,
                t.requests,
                t.errors,
                t.temperature_c,
            ),
        )

    def _server_event(  # noqa: PLR0917 - mirrors the tuple layout of IngestBatch.server_events
        self,
        conn: Connection,
        device_id: str | None,
        kind: str,
        severity: str,
        message: str,
        code: str | None,
        data: Mapping[str, Any],
        *,
        deployment_id: str | None = None,
        now: float,
        returning: bool = True,
    ) -> int:
        """The new event's row id (0 without ``returning``: then nothing waits for the statement's result)."""
        sql = ("INSERT INTO events (device_id, event_id, ts, received_at, kind, severity, message, code, deployment_id,"
               " data, source) VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, 'server')")
        params = (device_id, now, now, kind, severity, message, code, deployment_id, _json(dict(data)))
        if not returning:
            conn.execute(sql, params)
            return 0
        return int(conn.execute(sql + " RETURNING id", params).fetchone()[0])

    def server_event(
        self,
        kind: str,
        message: str,
        *,
        device_id: str | None = None,
        severity: str = "info",
        code: str | None = None,
        deployment_id: str | None = None,
        data: Mapping[str, Any] | None = None,
        tx: Connection | None = None,
        now: float | None = None,
    ) -> int:
        with self._maybe_tx(tx) as conn:
            return self._server_event(conn, device_id, kind, severity, message, code, data or {},
                                      deployment_id=deployment_id, now=now or _now())

    # -- reading observations ----------------------------------------------------------------------

    def list_events(
        self,
        *,
        after: int = 0,
        device_id: str | None = None,
        deployment_id: str | None = None,
        kind_prefix: str | None = None,
        limit: int = 200,
        newest: bool = False,
    ) -> list[EventRecord]:
        clauses, args = matching(
            ("device_id = ?", device_id),
            ("deployment_id = ?", deployment_id),
            ("kind LIKE ?", kind_prefix.replace("%", "") + "%" if kind_prefix else None),
        )
        where = " AND ".join(["id > ?", *clauses])
        args = [after, *args]
        if newest:
            sql = f"SELECT * FROM (SELECT * FROM events WHERE {where} ORDER BY id DESC LIMIT ?) AS newest ORDER BY id"
        else:
            sql = f"SELECT * FROM events WHERE {where} ORDER BY id LIMIT ?"
        rows = self._read().execute(sql, (*args, limit)).fetchall()
        return [EventRecord(**{**dict(r), "data": json.loads(r["data"])}) for r in rows]

    def delta_outcomes(self) -> dict[str, Row]:
        """``delta.applied``/``delta.fallback`` -> a row of ``n`` (events retained) and ``saved`` (bytes devices
        did not fetch). ``json_extract`` is SQLite's; PostgreSQL reads ``(data::json ->> 'full_bytes')``."""
        rows = self._read().execute(
            "SELECT kind, COUNT(*) AS n, SUM(COALESCE(json_extract(data, '$.full_bytes'), 0)"
            " - COALESCE(json_extract(data, '$.delta_bytes'), 0)) AS saved"
            " FROM events WHERE kind IN ('delta.applied', 'delta.fallback') GROUP BY kind"
        ).fetchall()
        return {r["kind"]: r for r in rows}

    def last_event_id(self) -> int:
        row = self._read().execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def telemetry_series(self, device_id: str, *, since: float = 0.0) -> list[dict[str, Any]]:
        rows = self._read().execute(
            "SELECT * FROM telemetry WHERE device_id = ? AND bucket >= ? ORDER BY bucket", (device_id, since)
        ).fetchall()
        out = []
        for r in rows:
            n = r["samples"]
            out.append({
                "bucket": r["bucket"],
                "samples": n,
                "cpu_percent": r["cpu_sum"] / n,
                "memory_percent": r["memory_sum"] / n,
                "rss_max": r["rss_max"],
                "p95_ms_avg": r["p95_sum"] / r["p95_samples"] if r["p95_samples"] else None,
                "p95_ms_max": r["p95_max"],
                "requests": r["requests"],
                "errors": r["errors"],
                "temperature_max": r["temperature_max"],
            })
        return out

    def prune_observations(self, conn: Connection, *, telemetry_before: float,
                           events_before: float) -> tuple[int, int]:
        t = conn.execute("DELETE FROM telemetry WHERE bucket < ?", (telemetry_before,)).rowcount
        e = conn.execute("DELETE FROM events WHERE received_at < ?", (events_before,)).rowcount
        return t, e
