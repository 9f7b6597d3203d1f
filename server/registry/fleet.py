"""The fleet registry: the owner modules combined into one object, and the schema history.

Theory of operation
    The registry is the only shared state between server processes. Everything a process
    decides is written here first and published to the broker second (an outbox, see
    ``outbox``). Counters go through ``UPDATE ... RETURNING``; leases expire unless renewed.

Each table belongs to one owner module, which holds every SQL statement on it:

=================  =========================================================================
``devices``        devices, device_groups, enroll_requests, unregistered_presence
``rollouts``       artifacts, deployments, deployment_builds, deployment_devices
``outbox``         desired, commands, leases
``observations``   events, telemetry
``access``         api_tokens, audit
``measurements``   device_measurements
=================  =========================================================================

``FleetRegistry`` inherits all of them; what spans owners in one transaction (an ingest batch,
pruning, the /metrics aggregates) is composed here from the owners' methods. Every public
method runs in its own transaction unless it takes a ``tx`` connection, which lets the service
layer compose several steps into one. SQL sticks to what PostgreSQL also accepts (``ON
CONFLICT``, ``RETURNING``), apart from ``AUTOINCREMENT`` in the DDL below; a second backend
replaces the owner modules one table group at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import Any

from agent.protocol.messages import Event, StateReport
from server.config import ServerConfig, private_home
from server.registry.access import AccessRegistry, AuditRecord
from server.registry.base import iter_chunks
from server.registry.base import now as _now
from server.registry.db import (
    CHANGE_NOTIFY_FUNCTION,
    Connection,
    Migration,
    RegistryDatabase,
    change_notify_trigger,
    open_database,
)
from server.registry.devices import (
    DEVICE_ACTIVE,
    DEVICE_AWAITING_KEY,
    DEVICE_REVOKED,
    Device,
    DeviceTables,
    EnrollmentRequest,
)
from server.registry.measurements import MeasurementTables
from server.registry.observations import EventRecord, IngestBatch, ObservationTables
from server.registry.outbox import CommandRecord, DesiredRecord, OutboxTables, StoredCommand, StoredDesired
from server.registry.rollouts import (
    DEP_COMPLETED,
    DEP_HALTED,
    DEP_ROLLED_BACK,
    DEP_ROLLING_BACK,
    DEP_RUNNING,
    FINISHED_STATUSES,
    HOLDING_STATUSES,
    ArtifactRecord,
    Deployment,
    DeploymentBuild,
    DeploymentDevice,
    NewDeployment,
    RolloutTables,
)

__all__ = [
    "DEP_COMPLETED", "DEP_HALTED", "DEP_ROLLED_BACK", "DEP_ROLLING_BACK", "DEP_RUNNING", "DEVICE_ACTIVE",
    "DEVICE_AWAITING_KEY", "DEVICE_REVOKED", "FINISHED_STATUSES", "HOLDING_STATUSES", "MIGRATIONS",
    "ArtifactRecord", "AuditRecord", "CommandRecord", "Deployment", "DeploymentBuild", "DeploymentDevice",
    "DesiredRecord", "Device", "EnrollmentRequest", "EventRecord", "FleetRegistry", "IngestBatch",
    "NewDeployment", "StoredCommand", "StoredDesired", "iter_chunks", "open_registry",
]

# -- schema history: each owner's tables; names are applied-once keys, never renamed ----------------

MIGRATIONS: tuple[Migration, ...] = (
    (
        "fleet_001_devices",
        """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    profile TEXT NOT NULL,
    status TEXT NOT NULL,
    public_key TEXT,
    broker_hash TEXT,
    seq INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    enrolled_at REAL,
    revoked_at REAL,
    online INTEGER NOT NULL DEFAULT 0,
    session INTEGER NOT NULL DEFAULT -1,
    last_seen REAL,
    lifecycle TEXT,
    active_model TEXT,
    active_version INTEGER,
    active_state TEXT,
    active_artifact TEXT,
    active_variant TEXT,
    target_model TEXT,
    target_version INTEGER,
    kept TEXT NOT NULL DEFAULT '[]',
    last_seq INTEGER,
    desired_expires_at REAL,
    agent_version TEXT,
    arch TEXT,
    hostname TEXT,
    cpu_percent REAL,
    memory_percent REAL,
    rss_bytes INTEGER,
    temperature_c REAL,
    p95_ms REAL,
    requests INTEGER,
    errors INTEGER,
    telemetry_at REAL
);
CREATE TABLE device_groups (
    group_name TEXT NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,
    added_at REAL NOT NULL,
    PRIMARY KEY (group_name, device_id)
);
CREATE INDEX device_groups_device ON device_groups(device_id);
CREATE TABLE enroll_requests (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    profile TEXT NOT NULL,
    agent_version TEXT,
    arch TEXT,
    hostname TEXT,
    requested_at REAL NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    params TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT
);
""",
    ),
    (
        "fleet_002_rollouts",
        """
CREATE TABLE artifacts (
    artifact_id TEXT PRIMARY KEY,
    content_key TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    profile TEXT NOT NULL,
    variant TEXT,
    info TEXT NOT NULL,
    data_key BLOB NOT NULL,
    wire_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE deployments (
    deployment_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    target TEXT NOT NULL,
    canary_percent REAL NOT NULL,
    wave_percent REAL NOT NULL,
    max_failures_percent REAL NOT NULL,
    probation_s REAL,
    status TEXT NOT NULL,
    current_wave INTEGER NOT NULL DEFAULT 0,
    wave_count INTEGER NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    reason TEXT,
    active INTEGER NOT NULL DEFAULT 1,
    lease_owner TEXT,
    lease_expires REAL
);
CREATE INDEX deployments_status ON deployments(status);
CREATE TABLE deployment_builds (
    deployment_id TEXT NOT NULL REFERENCES deployments(deployment_id) ON DELETE CASCADE,
    profile TEXT NOT NULL,
    artifact_id TEXT NOT NULL REFERENCES artifacts(artifact_id),
    variant TEXT,
    runtime TEXT NOT NULL,
    health TEXT NOT NULL,
    PRIMARY KEY (deployment_id, profile)
);
CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments(deployment_id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    profile TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    code TEXT,
    previous_version INTEGER,
    seq INTEGER,
    progress REAL,
    dispatched_at REAL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_device ON deployment_devices(device_id);
CREATE TABLE desired (
    device_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    action TEXT NOT NULL,
    model TEXT,
    version INTEGER,
    deployment_id TEXT,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    blob BLOB NOT NULL,
    published_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX desired_expiry ON desired(expires_at);
CREATE TABLE commands (
    command_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT,
    version INTEGER,
    seq INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    blob BLOB NOT NULL,
    published_at REAL,
    status TEXT NOT NULL,
    result TEXT,
    answered_at REAL,
    deployment_id TEXT,
    created_by TEXT NOT NULL
);
CREATE INDEX commands_batch ON commands(batch_id);
CREATE INDEX commands_unpublished ON commands(published_at);
""",
    ),
    (
        "fleet_003_observations",
        """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT,
    event_id TEXT,
    ts REAL NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    code TEXT,
    deployment_id TEXT,
    model TEXT,
    version INTEGER,
    command_id TEXT,
    data TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE UNIQUE INDEX events_dedup ON events(device_id, event_id);
CREATE INDEX events_deployment ON events(deployment_id, id);
CREATE INDEX events_received ON events(received_at);
CREATE TABLE telemetry (
    device_id TEXT NOT NULL,
    bucket REAL NOT NULL,
    samples INTEGER NOT NULL,
    cpu_sum REAL NOT NULL,
    memory_sum REAL NOT NULL,
    rss_max INTEGER NOT NULL,
    p95_sum REAL NOT NULL,
    p95_samples INTEGER NOT NULL,
    p95_max REAL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    temperature_max REAL,
    PRIMARY KEY (device_id, bucket)
);
CREATE INDEX telemetry_bucket ON telemetry(bucket);
""",
    ),
    (
        "fleet_004_unregistered_presence",
        """
CREATE TABLE unregistered_presence (
    device_id TEXT PRIMARY KEY,
    session INTEGER NOT NULL,
    report BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX unregistered_presence_received ON unregistered_presence(received_at);
""",
    ),
    (
        # PostgreSQL only: a NOTIFY per changing statement on what `events --follow` and the console show
        # (PostgreSQL folds identical notifications of one transaction into one). SQLite readers poll.
        "fleet_005_change_notify",
        {"postgresql": CHANGE_NOTIFY_FUNCTION + "".join(
            change_notify_trigger(t) for t in ("events", "devices", "deployments", "deployment_devices",
                                               "enroll_requests"))},
    ),
)


def open_registry(config: ServerConfig) -> FleetRegistry:
    """The fleet registry of a server home, migrated, its files private (0600)."""
    private_home(config.home)
    db = config.paths.registry_db
    registry = FleetRegistry(open_database(config.registry_url, db))
    registry.migrate()
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(OSError):
            path.chmod(0o600)
    return registry


# -- the registry --------------------------------------------------------------------------------------


class FleetRegistry(DeviceTables, RolloutTables, OutboxTables, ObservationTables, AccessRegistry, MeasurementTables):
    """Devices, rollouts, the outbox, observations, API tokens, the audit log and device measurements."""

    def __init__(self, db: RegistryDatabase) -> None:
        self.db = db

    def migrate(self) -> list[str]:
        return self.db.migrate(MIGRATIONS) + self.migrate_access() + self.migrate_measurements()

    # -- what spans owners -------------------------------------------------------------------------

    def write_ingest(
        self,
        batch: IngestBatch,
        *,
        bucket_s: float,
        now: float | None = None,
        on_event: Callable[[Connection, Event, int], None] | None = None,
        on_state: Callable[[Connection, StateReport], None] | None = None,
        prefetch: Callable[[Connection, Collection[str]], AbstractContextManager[object]] | None = None,
    ) -> list[int]:
        """Write one batch of device messages in one transaction; returns the new event row ids.

        ``on_event``/``on_state`` let the rollout layer update deployment progress in the same
        transaction (so an event is never recorded without its effect, nor the other way round);
        ``prefetch(conn, device_ids)`` lets it read what they need for the batch's devices at once.

        On PostgreSQL the transaction is pipelined and what it reads is read per batch, not per message
        (``presence_of``, ``insert_device_events``, ``prefetch``): the writer lock is held for a handful of
        round trips instead of several per message.
        """
        now = now or _now()
        new_ids: list[int] = []
        devices = {r.device_id for r in batch.states} | {ev.device_id for ev in batch.events}
        with self.db.transaction(pipelined=True) as conn, (
                prefetch(conn, devices) if prefetch is not None and devices else contextlib.nullcontext()):
            known = self.presence_of(conn, [r.device_id for r in batch.states])
            for report in batch.states:
                if self._apply_state(conn, report, now, known) and on_state is not None:
                    on_state(conn, report)
            for report in batch.unregistered_states:
                self.record_unregistered_state(conn, report, now)
            for t in batch.telemetry:
                self.insert_telemetry(conn, t, bucket_s)
                self.apply_telemetry_snapshot(conn, t)
                self._presence_from_telemetry(conn, t, now)
            for ev, row_id in zip(batch.events, self.insert_device_events(conn, batch.events, now), strict=True):
                if row_id is None:  # a QoS 1 duplicate: already recorded and applied
                    continue
                new_ids.append(row_id)
                self.touch_last_seen(conn, ev.device_id, now)
                if ev.kind == "command.result" and ev.command_id:
                    self.record_command_result(conn, ev, now)
                if on_event is not None:
                    on_event(conn, ev, row_id)
            profiles = self.profiles_of(conn, [m.device_id for m in batch.measurements]) if batch.measurements else {}
            for m in batch.measurements:
                self.record_measurement(conn, m, now, profiles)
            for device_id, kind, severity, message, code, data in batch.server_events:
                new_ids.append(self._server_event(conn, device_id, kind, severity, message, code, data, now=now))
        return new_ids

    def prune(self, *, telemetry_before: float, events_before: float) -> tuple[int, int]:
        with self.tx() as conn:
            counts = self.prune_observations(conn, telemetry_before=telemetry_before, events_before=events_before)
            self.prune_presence(conn, events_before)
        return counts

    def fleet_counts(self) -> dict[str, Any]:
        """Aggregates for /metrics (one query per family)."""
        conn = self._read()
        return self.device_counts(conn) | self.rollout_counts(conn)
