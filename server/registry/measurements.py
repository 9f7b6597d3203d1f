"""Device latency measurements and probe grants (tables ``device_measurements``, ``probe_artifacts``).

One row per device, model version, variant and source (``warmup``, ``probe``, ``service``): a newer
report of the same replaces the older one, so the table holds the latest figure of each build on each
device. The device's profile is copied in when the row is written (what it ran as then). A probe
(``server/probe.py``) records which device may fetch which candidate artifact until when (the chunk
scheduler's authorization asks ``probe_names_artifact``). Plain SQL that
SQLite and PostgreSQL both accept (``ON CONFLICT ... DO UPDATE``, no engine-specific functions).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.measurement import Measurement
from server.registry.base import Record, TableOwner, iter_chunks, placeholders
from server.registry.base import now as _now
from server.registry.base import to_json as _json
from server.registry.db import Connection, Migration, RegistryDatabase

MIGRATIONS: tuple[Migration, ...] = (
    (
        "measurements_001_device_measurements",
        """
CREATE TABLE device_measurements (
    device_id TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    variant TEXT NOT NULL,
    source TEXT NOT NULL,
    profile TEXT NOT NULL,
    artifact_id TEXT,
    probe_id TEXT,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    runs INTEGER NOT NULL,
    p50_ms REAL NOT NULL,
    p95_ms REAL NOT NULL,
    min_ms REAL,
    peak_rss_bytes INTEGER,
    execution_provider TEXT,
    context TEXT NOT NULL,
    PRIMARY KEY (device_id, model, version, variant, source)
);
CREATE INDEX device_measurements_model ON device_measurements(model, version);
CREATE INDEX device_measurements_probe ON device_measurements(probe_id);
CREATE TABLE probe_artifacts (
    probe_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    profile TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (probe_id, device_id, artifact_id)
);
CREATE INDEX probe_artifacts_device ON probe_artifacts(device_id, artifact_id)
""",
    ),
)

_COLUMNS = ("device_id, model, version, variant, source, profile, artifact_id, probe_id, ts, received_at, runs,"
            " p50_ms, p95_ms, min_ms, peak_rss_bytes, execution_provider, context")


@dataclass(frozen=True)
class MeasurementRecord(Record):
    device_id: str
    model: str
    version: int
    variant: str
    source: str
    profile: str
    artifact_id: str | None
    probe_id: str | None
    ts: float
    received_at: float
    runs: int
    p50_ms: float
    p95_ms: float
    min_ms: float | None
    peak_rss_bytes: int | None
    execution_provider: str | None
    context: dict[str, Any] = field(default_factory=dict)


def _record(row: Any) -> MeasurementRecord:
    values = dict(zip(_COLUMNS.replace(" ", "").split(","), tuple(row), strict=True))
    values["context"] = json.loads(values["context"] or "{}")
    return MeasurementRecord(**values)


class MeasurementTables(TableOwner):
    """What devices measured, per build and device."""

    def migrate_measurements(self) -> list[str]:
        return self.db.migrate(MIGRATIONS)

    @staticmethod
    def profiles_of(conn: Connection, device_ids: Iterable[str]) -> dict[str, str]:
        """device id -> profile of those registered (read once for an ingest batch's measurements)."""
        out: dict[str, str] = {}
        for part in iter_chunks(sorted(set(device_ids)), 500):
            out.update({r[0]: r[1] for r in conn.execute(
                f"SELECT device_id, profile FROM devices WHERE device_id IN ({placeholders(part)})",  # noqa: S608
                part)})
        return out

    @staticmethod
    def record_measurement(conn: Connection, m: Measurement, now: float,
                           profiles: Mapping[str, str] | None = None) -> bool:
        """Keep ``m`` as the latest figure of its (device, build, variant, source); False for an unknown device.
        ``profiles``: ``profiles_of`` the batch's devices, read beforehand."""
        if profiles is None:
            profiles = MeasurementTables.profiles_of(conn, [m.device_id])
        profile = profiles.get(m.device_id)
        if profile is None:
            return False
        context = {k: v for k, v in (("governor", m.governor), ("cpu_mhz", m.cpu_mhz),
                                     ("temperature_c", m.temperature_c),
                                     ("load_avg", list(m.load_avg) if m.load_avg else None),
                                     ("seconds", m.seconds)) if v is not None}
        conn.execute(
            f"INSERT INTO device_measurements ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
            " ON CONFLICT (device_id, model, version, variant, source) DO UPDATE SET profile = excluded.profile,"
            " artifact_id = excluded.artifact_id, probe_id = excluded.probe_id, ts = excluded.ts,"
            " received_at = excluded.received_at, runs = excluded.runs, p50_ms = excluded.p50_ms,"
            " p95_ms = excluded.p95_ms, min_ms = excluded.min_ms, peak_rss_bytes = excluded.peak_rss_bytes,"
            " execution_provider = excluded.execution_provider, context = excluded.context",
            (m.device_id, m.model, m.version, m.variant or "", m.source, profile, m.artifact_id, m.probe_id, m.ts,
             now, m.runs, m.p50_ms, m.p95_ms, m.min_ms, m.peak_rss_bytes, m.execution_provider, _json(context)),
        )
        return True

    def record_measurements(self, measurements: Iterable[Measurement], now: float | None = None) -> int:
        """Write several in one transaction (tests, the simulator); returns how many were kept."""
        now = now or _now()
        with self.tx() as conn:
            return sum(self.record_measurement(conn, m, now) for m in measurements)

    def measurements(
        self,
        model: str,
        version: int | None = None,
        *,
        profile: str | None = None,
        sources: Sequence[str] = (),
        probe_id: str | None = None,
    ) -> list[MeasurementRecord]:
        where: list[str] = ["model = ?"]
        args: list[Any] = [model]
        if version is not None:
            where.append("version = ?")
            args.append(version)
        if profile is not None:
            where.append("profile = ?")
            args.append(profile)
        if sources:
            where.append(f"source IN ({placeholders(sources)})")
            args.extend(sources)
        if probe_id is not None:
            where.append("probe_id = ?")
            args.append(probe_id)
        rows = self._read().execute(
            f"SELECT {_COLUMNS} FROM device_measurements WHERE {' AND '.join(where)}"  # noqa: S608 - fixed columns
            " ORDER BY profile, variant, source, device_id", args,
        ).fetchall()
        return [_record(r) for r in rows]

    def all_measurements(self, *, limit: int = 100_000) -> list[MeasurementRecord]:
        """Every kept figure (for /metrics), newest models first, at most ``limit`` rows."""
        rows = self._read().execute(
            f"SELECT {_COLUMNS} FROM device_measurements ORDER BY model, version DESC LIMIT ?",  # noqa: S608
            (limit,),
        ).fetchall()
        return [_record(r) for r in rows]


    @staticmethod
    def record_probe(
        conn: Connection, probe_id: str, *, device_ids: Sequence[str], artifacts: Sequence[tuple[str, str]],
        model: str, version: int, profile: str, now: float, expires_at: float,
    ) -> None:
        """Grant each device the (artifact id, variant) pairs of one probe until ``expires_at``."""
        for device_id in device_ids:
            for artifact_id, variant in artifacts:
                conn.execute(
                    "INSERT INTO probe_artifacts (probe_id, device_id, artifact_id, variant, model, version, profile,"
                    " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (probe_id, device_id, artifact_id, variant, model, version, profile, now, expires_at),
                )

    def probe_names_artifact(self, device_id: str, artifact_id: str, now: float | None = None) -> bool:
        row = self._read().execute(
            "SELECT 1 FROM probe_artifacts WHERE device_id = ? AND artifact_id = ? AND expires_at > ?",
            (device_id, artifact_id, now or _now()),
        ).fetchone()
        return row is not None


class MeasurementRegistry(MeasurementTables):
    """The measurements owner on its own (``model show`` reads it beside the catalog)."""

    def __init__(self, db: RegistryDatabase) -> None:
        self.db = db
        self.migrate_measurements()
