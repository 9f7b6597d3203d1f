"""The fleet half of the registry: devices, groups, enrollment, artifacts, deployments, desired
states, commands, events, telemetry, leases, API tokens and the audit log.

Theory of operation
    The registry is the only shared state between server processes. Everything a process
    decides is written here first and published to the broker second (an outbox): a desired
    state row carries the signed blob and ``published_seq``; a command row ``published_at``.
    A process that dies between the two leaves rows whose publish is still owed, and whichever
    process runs next publishes them. Counters go through ``UPDATE ... RETURNING``; the
    rollout driver of a deployment holds a lease row that expires unless renewed, so two
    processes never drive the same deployment and a dead driver is replaced within one TTL.

    Per device, ``seq`` is the last sequence number the server allocated for a signed message
    (desired states and commands share it). The device's own ``last_seq`` (from its state
    reports) is kept next to it; the server never allocates below what the device has seen.

Every public method runs in its own transaction unless it takes a ``tx`` connection, which lets
the service layer compose several steps into one. SQL sticks to what PostgreSQL also accepts
(``ON CONFLICT``, ``RETURNING``), apart from ``AUTOINCREMENT`` in DDL.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from agent.errors import EdgeError
from agent.protocol.messages import Event, StateReport, Telemetry, decode_up, encode
from server.errors import ConflictError, NotFoundError, RegistryError
from server.registry.access import AccessRegistry, AuditRecord  # noqa: F401 - AuditRecord re-exported
from server.registry.db import Database, Migration

# -- schema ------------------------------------------------------------------------------------------

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
)

# -- vocabulary ----------------------------------------------------------------------------------------

DEVICE_ACTIVE = "active"
DEVICE_AWAITING_KEY = "awaiting_key"
DEVICE_REVOKED = "revoked"

#: Deployment statuses. ``running`` and ``rolling_back`` hold their devices (a second deployment to
#: them is refused); the others are finished, though a ``completed`` one still converges late joiners
#: until a newer deployment to its target or a rollback clears ``active``. A finished deployment keeps
#: its outcome as status: that a newer rollout took a device over is its device row's ``superseded``
#: phase, and cancelling is ``edgefleet deployments halt [--no-rollback]`` (``halted``/``rolled_back``).
DEP_RUNNING = "running"
DEP_COMPLETED = "completed"
DEP_ROLLING_BACK = "rolling_back"
DEP_ROLLED_BACK = "rolled_back"
DEP_HALTED = "halted"
HOLDING_STATUSES = (DEP_RUNNING, DEP_ROLLING_BACK)
FINISHED_STATUSES = (DEP_COMPLETED, DEP_ROLLED_BACK, DEP_HALTED)


def _now() -> float:
    return time.time()


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    device_id: str
    profile: str
    status: str
    public_key: str | None
    seq: int
    created_at: float
    enrolled_at: float | None
    revoked_at: float | None
    online: bool
    session: int
    last_seen: float | None
    lifecycle: str | None
    active_model: str | None
    active_version: int | None
    active_state: str | None
    active_artifact: str | None
    active_variant: str | None  # which build of the model (the compression recipe), as the device reports
    kept: tuple[int, ...]
    last_seq: int | None
    desired_expires_at: float | None
    agent_version: str | None
    arch: str | None
    hostname: str | None
    cpu_percent: float | None
    memory_percent: float | None
    rss_bytes: int | None
    temperature_c: float | None
    p95_ms: float | None
    telemetry_at: float | None
    broker_hash: str | None = None
    groups: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "broker_hash"}
        d["kept"] = list(self.kept)
        d["groups"] = list(self.groups)
        d["has_broker_password"] = self.broker_hash is not None
        return d


_DEVICE_COLUMNS = (
    "device_id, profile, status, public_key, seq, created_at, enrolled_at, revoked_at, online, session, "
    "last_seen, lifecycle, active_model, active_version, active_state, active_artifact, active_variant, kept, "
    "last_seq, "
    "desired_expires_at, agent_version, arch, hostname, cpu_percent, memory_percent, rss_bytes, "
    "temperature_c, p95_ms, telemetry_at, broker_hash"
)


def _device(row: sqlite3.Row, groups: tuple[str, ...] = ()) -> Device:
    d = dict(row)
    d["online"] = bool(d["online"])
    d["kept"] = tuple(json.loads(d["kept"] or "[]"))
    return Device(**d, groups=groups)


@dataclass(frozen=True)
class EnrollmentRequest:
    device_id: str
    public_key: str
    fingerprint: str
    profile: str
    agent_version: str | None
    arch: str | None
    hostname: str | None
    requested_at: float
    received_at: float
    status: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ArtifactRecord:
    artifact_id: str
    content_key: str
    model: str
    version: int
    profile: str
    variant: str | None
    info: Mapping[str, Any]
    data_key: bytes
    wire_bytes: int
    created_at: float


@dataclass(frozen=True)
class Deployment:
    deployment_id: str
    model: str
    version: int
    target: str
    canary_percent: float
    wave_percent: float
    max_failures_percent: float
    probation_s: float | None
    status: str
    current_wave: int
    wave_count: int
    created_at: float
    created_by: str
    updated_at: float
    finished_at: float | None
    reason: str | None
    active: bool
    lease_owner: str | None
    lease_expires: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DeploymentBuild:
    deployment_id: str
    profile: str
    artifact_id: str
    variant: str | None
    runtime: Mapping[str, Any]
    health: Mapping[str, Any]


@dataclass(frozen=True)
class DeploymentDevice:
    deployment_id: str
    device_id: str
    profile: str
    wave: int
    state: str
    reason: str | None
    code: str | None
    previous_version: int | None
    seq: int | None
    progress: float | None
    dispatched_at: float | None
    updated_at: float
    finished_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class DesiredRecord:
    device_id: str
    seq: int
    action: str
    model: str | None
    version: int | None
    deployment_id: str | None
    issued_at: float
    expires_at: float
    blob: bytes
    published_seq: int


@dataclass(frozen=True)
class CommandRecord:
    command_id: str
    batch_id: str
    device_id: str
    action: str
    model: str | None
    version: int | None
    seq: int
    issued_at: float
    expires_at: float
    blob: bytes
    published_at: float | None
    status: str
    result: Mapping[str, Any] | None
    answered_at: float | None
    deployment_id: str | None
    created_by: str

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("blob")
        return d


@dataclass(frozen=True)
class EventRecord:
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class NewDeployment:
    """Everything ``create_deployment`` writes in one transaction."""

    deployment_id: str
    model: str
    version: int
    target: str
    canary_percent: float
    wave_percent: float
    max_failures_percent: float
    probation_s: float | None
    created_by: str
    builds: Sequence[DeploymentBuild]
    #: (device_id, profile, wave, previous_version)
    devices: Sequence[tuple[str, str, int, int | None]]
    wave_count: int
    #: devices already running this exact version: recorded as committed, nothing is sent
    already_committed: Sequence[str] = ()


@dataclass(frozen=True)
class StoredDesired:
    """What ``store_desired`` hands to the signer: the row's new seq and issue/expiry times."""

    device_id: str
    seq: int
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class StoredCommand:
    """What ``store_commands`` hands to the signer."""

    command_id: str
    device_id: str
    action: str
    model: str | None
    version: int | None
    seq: int
    issued_at: float
    expires_at: float


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

    def __len__(self) -> int:
        return (len(self.states) + len(self.telemetry) + len(self.events) + len(self.server_events)
                + len(self.unregistered_states))


# -- the registry --------------------------------------------------------------------------------------


class FleetRegistry(AccessRegistry):
    """Devices, rollouts, events; API tokens and the audit log come from ``AccessRegistry``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def migrate(self) -> list[str]:
        return self.db.migrate(MIGRATIONS) + self.migrate_access()

    def tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return self.db.transaction()

    def _read(self) -> sqlite3.Connection:
        return self.db.connection()

    # -- devices -----------------------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        *,
        profile: str,
        public_key: str | None,
        broker_hash: str | None,
        groups: Iterable[str] = (),
        now: float | None = None,
        tx: sqlite3.Connection | None = None,
    ) -> Device:
        now = now or _now()
        with self._maybe_tx(tx) as conn:
            if conn.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone():
                raise ConflictError(f"device {device_id!r} is already registered")
            conn.execute(
                "INSERT INTO devices (device_id, profile, status, public_key, broker_hash, created_at, enrolled_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    device_id,
                    profile,
                    DEVICE_ACTIVE if public_key else DEVICE_AWAITING_KEY,
                    public_key,
                    broker_hash,
                    now,
                    now if public_key else None,
                ),
            )
            for g in groups:
                self._add_member(conn, g, device_id, now)
            return self._get_device(conn, device_id)

    def get_device(self, device_id: str) -> Device:
        return self._get_device(self._read(), device_id)

    def find_device(self, device_id: str) -> Device | None:
        try:
            return self.get_device(device_id)
        except NotFoundError:
            return None

    def _get_device(self, conn: sqlite3.Connection, device_id: str) -> Device:
        row = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown device {device_id!r}")
        groups = tuple(
            r[0]
            for r in conn.execute(
                "SELECT group_name FROM device_groups WHERE device_id = ? ORDER BY group_name", (device_id,)
            )
        )
        return _device(row, groups)

    def list_devices(self, *, include_revoked: bool = True) -> list[Device]:
        conn = self._read()
        groups: dict[str, list[str]] = {}
        for g, d in conn.execute("SELECT group_name, device_id FROM device_groups ORDER BY group_name"):
            groups.setdefault(d, []).append(g)
        where = "" if include_revoked else f" WHERE status != '{DEVICE_REVOKED}'"
        rows = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices{where} ORDER BY device_id").fetchall()
        return [_device(r, tuple(groups.get(r["device_id"], ()))) for r in rows]

    def set_device_key(self, device_id: str, public_key: str, *, tx: sqlite3.Connection, now: float) -> None:
        cur = tx.execute(
            "UPDATE devices SET public_key = ?, status = ?, enrolled_at = ? WHERE device_id = ? AND status != ?",
            (public_key, DEVICE_ACTIVE, now, device_id, DEVICE_REVOKED),
        )
        if cur.rowcount == 0:
            raise ConflictError(f"device {device_id!r} is revoked; register it again under a new id")

    def set_broker_hash(self, device_id: str, broker_hash: str) -> None:
        with self.tx() as conn:
            if conn.execute("UPDATE devices SET broker_hash = ? WHERE device_id = ?",
                            (broker_hash, device_id)).rowcount == 0:
                raise NotFoundError(f"unknown device {device_id!r}")

    def revoke_device(self, device_id: str, *, tx: sqlite3.Connection, now: float) -> None:
        cur = tx.execute(
            "UPDATE devices SET status = ?, revoked_at = ?, broker_hash = NULL, online = 0 WHERE device_id = ?",
            (DEVICE_REVOKED, now, device_id),
        )
        if cur.rowcount == 0:
            raise NotFoundError(f"unknown device {device_id!r}")
        tx.execute("DELETE FROM device_groups WHERE device_id = ?", (device_id,))

    def broker_users(self) -> dict[str, str]:
        """device id -> mosquitto password hash, for every device that may connect."""
        rows = self._read().execute(
            "SELECT device_id, broker_hash FROM devices WHERE status != ? AND broker_hash IS NOT NULL",
            (DEVICE_REVOKED,),
        )
        return {r[0]: r[1] for r in rows}

    def next_seq(self, conn: sqlite3.Connection, device_id: str) -> int:
        """Allocate the device's next sequence number (never at or below what the device reported)."""
        row = conn.execute(
            "UPDATE devices SET seq = MAX(seq, COALESCE(last_seq, 0)) + 1 WHERE device_id = ? RETURNING seq",
            (device_id,),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"unknown device {device_id!r}")
        return int(row[0])

    # -- groups ------------------------------------------------------------------------------------

    @staticmethod
    def _add_member(conn: sqlite3.Connection, group: str, device_id: str, now: float) -> None:
        conn.execute(
            "INSERT INTO device_groups (group_name, device_id, added_at) VALUES (?, ?, ?)"
            " ON CONFLICT (group_name, device_id) DO NOTHING",
            (group, device_id, now),
        )

    def add_to_group(self, group: str, device_ids: Sequence[str], *, tx: sqlite3.Connection, now: float) -> None:
        for d in device_ids:
            self._get_device(tx, d)
            self._add_member(tx, group, d, now)

    def remove_from_group(self, group: str, device_ids: Sequence[str], *, tx: sqlite3.Connection) -> int:
        removed = 0
        for d in device_ids:
            removed += tx.execute(
                "DELETE FROM device_groups WHERE group_name = ? AND device_id = ?", (group, d)
            ).rowcount
        return removed

    def list_groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for g, d in self._read().execute("SELECT group_name, device_id FROM device_groups ORDER BY 1, 2"):
            out.setdefault(g, []).append(d)
        return out

    def target_devices(self, kind: str, value: str | None, *, conn: sqlite3.Connection | None = None) -> list[Device]:
        """Devices a target names (``all``, ``group``, ``device``), revoked ones excluded."""
        c = conn or self._read()
        if kind == "device":
            assert value is not None
            dev = self._get_device(c, value)
            if dev.status == DEVICE_REVOKED:
                raise ConflictError(f"device {value!r} is revoked")
            return [dev]
        if kind == "group":
            rows = c.execute(
                f"SELECT {', '.join('d.' + x.strip() for x in _DEVICE_COLUMNS.split(','))} FROM devices d"
                " JOIN device_groups g ON g.device_id = d.device_id"
                " WHERE g.group_name = ? AND d.status != ? ORDER BY d.device_id",
                (value, DEVICE_REVOKED),
            ).fetchall()
            if not rows and not c.execute("SELECT 1 FROM device_groups WHERE group_name = ?", (value,)).fetchone():
                raise NotFoundError(f"unknown group {value!r} (it has no devices)")
            return [_device(r) for r in rows]
        if kind == "all":
            rows = c.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE status != ? ORDER BY device_id", (DEVICE_REVOKED,)
            ).fetchall()
            return [_device(r) for r in rows]
        raise RegistryError(f"unknown target kind {kind!r}")

    # -- enrollment --------------------------------------------------------------------------------

    def record_enroll_request(self, req: EnrollmentRequest, *, tx: sqlite3.Connection) -> bool:
        """Store (or refresh) a pending request; False when an identical key was already handled."""
        row = tx.execute(
            "SELECT public_key, status FROM enroll_requests WHERE device_id = ?", (req.device_id,)
        ).fetchone()
        if row is not None and row["public_key"] == req.public_key and row["status"] != "pending":
            return False
        tx.execute(
            "INSERT INTO enroll_requests (device_id, public_key, fingerprint, profile, agent_version, arch, hostname,"
            " requested_at, received_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')"
            " ON CONFLICT (device_id) DO UPDATE SET public_key = excluded.public_key,"
            " fingerprint = excluded.fingerprint, profile = excluded.profile,"
            " agent_version = excluded.agent_version, arch = excluded.arch, hostname = excluded.hostname,"
            " requested_at = excluded.requested_at, received_at = excluded.received_at, status = 'pending'",
            (
                req.device_id,
                req.public_key,
                req.fingerprint,
                req.profile,
                req.agent_version,
                req.arch,
                req.hostname,
                req.requested_at,
                req.received_at,
            ),
        )
        return True

    def enroll_requests(self, status: str | None = "pending") -> list[EnrollmentRequest]:
        if status is None:
            rows = self._read().execute("SELECT * FROM enroll_requests ORDER BY received_at").fetchall()
        else:
            rows = self._read().execute(
                "SELECT * FROM enroll_requests WHERE status = ? ORDER BY received_at", (status,)
            ).fetchall()
        return [EnrollmentRequest(**dict(r)) for r in rows]

    def get_enroll_request(self, device_id: str, *, conn: sqlite3.Connection | None = None) -> EnrollmentRequest:
        row = (conn or self._read()).execute(
            "SELECT * FROM enroll_requests WHERE device_id = ?", (device_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no enrollment request from device {device_id!r}")
        return EnrollmentRequest(**dict(row))

    def set_enroll_status(self, device_id: str, status: str, *, tx: sqlite3.Connection) -> None:
        tx.execute("UPDATE enroll_requests SET status = ? WHERE device_id = ?", (status, device_id))

    # -- leases ------------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl_s: float, *, now: float | None = None) -> bool:
        """Take or renew ``name`` for ``ttl_s``; False while another live owner holds it."""
        now = now or _now()
        with self.tx() as conn:
            row = conn.execute(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
                " WHERE leases.owner = excluded.owner OR leases.expires_at < ?"
                " RETURNING owner",
                (name, owner, now + ttl_s, now),
            ).fetchone()
        return row is not None and row[0] == owner

    def release_lease(self, name: str, owner: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def lease_holder(self, name: str, *, now: float | None = None) -> str | None:
        row = self._read().execute(
            "SELECT owner FROM leases WHERE name = ? AND expires_at >= ?", (name, now or _now())
        ).fetchone()
        return None if row is None else str(row[0])

    # -- artifacts ---------------------------------------------------------------------------------

    def find_artifact(self, content_key: str) -> ArtifactRecord | None:
        row = self._read().execute("SELECT * FROM artifacts WHERE content_key = ?", (content_key,)).fetchone()
        return None if row is None else _artifact(row)

    def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        row = self._read().execute("SELECT * FROM artifacts WHERE artifact_id = ?", (artifact_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown artifact {artifact_id}")
        return _artifact(row)

    def put_artifact(self, rec: ArtifactRecord) -> ArtifactRecord:
        """Insert; if another process sealed the same content first, return that one instead."""
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO artifacts (artifact_id, content_key, model, version, profile, variant, info, data_key,"
                " wire_bytes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (content_key) DO NOTHING",
                (
                    rec.artifact_id,
                    rec.content_key,
                    rec.model,
                    rec.version,
                    rec.profile,
                    rec.variant,
                    _json(dict(rec.info)),
                    rec.data_key,
                    rec.wire_bytes,
                    rec.created_at,
                ),
            )
            row = conn.execute("SELECT * FROM artifacts WHERE content_key = ?", (rec.content_key,)).fetchone()
        return _artifact(row)

    # -- deployments -------------------------------------------------------------------------------

    def holding_deployments(self, device_ids: Sequence[str], *, conn: sqlite3.Connection) -> dict[str, list[str]]:
        """deployment id -> the given devices it holds (running or rolling back)."""
        out: dict[str, list[str]] = {}
        wanted = set(device_ids)
        rows = conn.execute(
            "SELECT dd.deployment_id, dd.device_id FROM deployment_devices dd"
            " JOIN deployments d ON d.deployment_id = dd.deployment_id"
            f" WHERE d.status IN ({', '.join('?' * len(HOLDING_STATUSES))})"
            " AND dd.state NOT IN ('skipped', 'superseded')",
            HOLDING_STATUSES,
        )
        for dep, dev in rows:
            if dev in wanted:
                out.setdefault(dep, []).append(dev)
        return out

    def create_deployment(self, new: NewDeployment, *, now: float | None = None) -> Deployment:
        """Insert a deployment with its builds and device plan, refusing devices another rollout holds."""
        now = now or _now()
        with self.tx() as conn:
            held = self.holding_deployments([d for d, *_ in new.devices], conn=conn)
            if held:
                parts = [f"{dep} ({len(devs)} device(s), e.g. {devs[0]})" for dep, devs in sorted(held.items())]
                raise ConflictError(
                    "another deployment is still running on these devices: "
                    + "; ".join(parts)
                    + ". Wait for it to finish, or halt it (`edgefleet deployments halt ID`)."
                )
            conn.execute(
                "INSERT INTO deployments (deployment_id, model, version, target, canary_percent, wave_percent,"
                " max_failures_percent, probation_s, status, current_wave, wave_count, created_at, created_by,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?)",
                (
                    new.deployment_id,
                    new.model,
                    new.version,
                    new.target,
                    new.canary_percent,
                    new.wave_percent,
                    new.max_failures_percent,
                    new.probation_s,
                    DEP_RUNNING,
                    new.wave_count,
                    now,
                    new.created_by,
                    now,
                ),
            )
            # an older finished deployment to the same target no longer converges late joiners
            conn.execute(
                "UPDATE deployments SET active = 0 WHERE target = ? AND deployment_id != ?",
                (new.target, new.deployment_id),
            )
            for b in new.builds:
                conn.execute(
                    "INSERT INTO deployment_builds (deployment_id, profile, artifact_id, variant, runtime, health)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (new.deployment_id, b.profile, b.artifact_id, b.variant, _json(dict(b.runtime)),
                     _json(dict(b.health))),
                )
            self._insert_deployment_devices(conn, new.deployment_id, new.devices, now)
            conn.executemany(
                "UPDATE deployment_devices SET state = 'committed', reason = 'already running this version',"
                " progress = 1.0, finished_at = ? WHERE deployment_id = ? AND device_id = ?",
                [(now, new.deployment_id, d) for d in new.already_committed],
            )
            return self._get_deployment(conn, new.deployment_id)

    def _insert_deployment_devices(
        self,
        conn: sqlite3.Connection,
        deployment_id: str,
        devices: Iterable[tuple[str, str, int, int | None]],
        now: float,
    ) -> None:
        rows = list(devices)
        conn.executemany(
            "INSERT INTO deployment_devices (deployment_id, device_id, profile, wave, state, previous_version,"
            " updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING",
            [(deployment_id, d, p, w, prev, now) for d, p, w, prev in rows],
        )
        # a device joining a new rollout leaves the finished ones it was part of
        conn.executemany(
            "UPDATE deployment_devices SET state = 'superseded', updated_at = ? WHERE device_id = ?"
            " AND deployment_id != ? AND state NOT IN ('superseded')"
            " AND deployment_id IN (SELECT deployment_id FROM deployments WHERE status NOT IN ('running',"
            " 'rolling_back'))",
            [(now, d, deployment_id) for d, *_ in rows],
        )

    def add_late_joiners(
        self, deployment_id: str, devices: Sequence[tuple[str, str, int, int | None]], *, now: float | None = None
    ) -> int:
        now = now or _now()
        with self.tx() as conn:
            before = conn.total_changes
            self._insert_deployment_devices(conn, deployment_id, devices, now)
            return conn.total_changes - before

    def get_deployment(self, deployment_id: str) -> Deployment:
        return self._get_deployment(self._read(), deployment_id)

    def _get_deployment(self, conn: sqlite3.Connection, deployment_id: str) -> Deployment:
        row = conn.execute("SELECT * FROM deployments WHERE deployment_id = ?", (deployment_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown deployment {deployment_id!r}")
        return Deployment(**{**dict(row), "active": bool(row["active"])})

    def list_deployments(self, *, statuses: Sequence[str] | None = None, limit: int = 50) -> list[Deployment]:
        if statuses:
            rows = self._read().execute(
                f"SELECT * FROM deployments WHERE status IN ({', '.join('?' * len(statuses))})"
                " ORDER BY created_at DESC LIMIT ?",
                (*statuses, limit),
            ).fetchall()
        else:
            rows = self._read().execute(
                "SELECT * FROM deployments ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Deployment(**{**dict(r), "active": bool(r["active"])}) for r in rows]

    def converging_deployments(self) -> list[Deployment]:
        """Deployments the driver looks after: running, rolling back, or completed but still active."""
        rows = self._read().execute(
            "SELECT * FROM deployments WHERE status IN ('running', 'rolling_back')"
            " OR (status = 'completed' AND active = 1) ORDER BY created_at"
        ).fetchall()
        return [Deployment(**{**dict(r), "active": bool(r["active"])}) for r in rows]

    def claim_deployment(self, deployment_id: str, owner: str, ttl_s: float, *, now: float | None = None) -> bool:
        now = now or _now()
        with self.tx() as conn:
            row = conn.execute(
                "UPDATE deployments SET lease_owner = ?, lease_expires = ? WHERE deployment_id = ?"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_expires < ?) RETURNING lease_owner",
                (owner, now + ttl_s, deployment_id, owner, now),
            ).fetchone()
        return row is not None

    def release_deployment(self, deployment_id: str, owner: str) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE deployments SET lease_owner = NULL, lease_expires = NULL"
                " WHERE deployment_id = ? AND lease_owner = ?",
                (deployment_id, owner),
            )

    def set_deployment_status(
        self,
        deployment_id: str,
        status: str,
        *,
        reason: str | None = None,
        current_wave: int | None = None,
        expect: Sequence[str] | None = None,
        tx: sqlite3.Connection | None = None,
        now: float | None = None,
    ) -> bool:
        """Change status (only from one of ``expect`` when given); False when the row was not in ``expect``."""
        now = now or _now()
        finished = status not in HOLDING_STATUSES
        with self._maybe_tx(tx) as conn:
            sql = (
                "UPDATE deployments SET status = ?, updated_at = ?, reason = COALESCE(?, reason),"
                " current_wave = COALESCE(?, current_wave),"
                " finished_at = CASE WHEN ? THEN COALESCE(finished_at, ?) ELSE NULL END"
                " WHERE deployment_id = ?"
            )
            args: list[Any] = [status, now, reason, current_wave, int(finished), now, deployment_id]
            if expect:
                sql += f" AND status IN ({', '.join('?' * len(expect))})"
                args += list(expect)
            return conn.execute(sql, args).rowcount > 0

    def set_current_wave(self, deployment_id: str, wave: int, *, now: float | None = None) -> None:
        with self.tx() as conn:
            conn.execute(
                "UPDATE deployments SET current_wave = ?, updated_at = ? WHERE deployment_id = ?",
                (wave, now or _now(), deployment_id),
            )

    def deactivate_deployment(self, deployment_id: str, *, tx: sqlite3.Connection) -> None:
        tx.execute("UPDATE deployments SET active = 0 WHERE deployment_id = ?", (deployment_id,))

    def deployment_builds(self, deployment_id: str) -> dict[str, DeploymentBuild]:
        rows = self._read().execute(
            "SELECT * FROM deployment_builds WHERE deployment_id = ?", (deployment_id,)
        ).fetchall()
        return {
            r["profile"]: DeploymentBuild(
                deployment_id=r["deployment_id"],
                profile=r["profile"],
                artifact_id=r["artifact_id"],
                variant=r["variant"],
                runtime=json.loads(r["runtime"]),
                health=json.loads(r["health"]),
            )
            for r in rows
        }

    def deployment_devices(
        self, deployment_id: str, *, conn: sqlite3.Connection | None = None
    ) -> list[DeploymentDevice]:
        rows = (conn or self._read()).execute(
            "SELECT * FROM deployment_devices WHERE deployment_id = ? ORDER BY wave, device_id", (deployment_id,)
        ).fetchall()
        return [DeploymentDevice(**dict(r)) for r in rows]

    def update_deployment_devices(
        self,
        deployment_id: str,
        updates: Sequence[tuple[str, str, str | None, str | None]],
        *,
        tx: sqlite3.Connection | None = None,
        now: float | None = None,
        terminal: Sequence[str] = ("committed", "failed", "rolled_back", "skipped", "superseded"),
    ) -> None:
        """(device_id, state, reason, code) for each device; ``finished_at`` is set on terminal states."""
        now = now or _now()
        with self._maybe_tx(tx) as conn:
            conn.executemany(
                "UPDATE deployment_devices SET state = ?, reason = COALESCE(?, reason), code = COALESCE(?, code),"
                " updated_at = ?, finished_at = CASE WHEN ? THEN ? ELSE finished_at END"
                " WHERE deployment_id = ? AND device_id = ?",
                [(s, r, c, now, int(s in terminal), now, deployment_id, d) for d, s, r, c in updates],
            )

    def mark_dispatched(self, deployment_id: str, dispatched: Mapping[str, int], *, tx: sqlite3.Connection,
                        now: float) -> None:
        tx.executemany(
            "UPDATE deployment_devices SET state = 'dispatched', seq = ?, dispatched_at = ?, updated_at = ?"
            " WHERE deployment_id = ? AND device_id = ? AND state = 'pending'",
            [(seq, now, now, deployment_id, d) for d, seq in dispatched.items()],
        )

    def device_rows(self, device_id: str, *, conn: sqlite3.Connection | None = None) -> list[DeploymentDevice]:
        """This device's rows in deployments that still hold it or converge it, newest first."""
        rows = (conn or self._read()).execute(
            "SELECT dd.* FROM deployment_devices dd JOIN deployments d ON d.deployment_id = dd.deployment_id"
            " WHERE dd.device_id = ? AND (d.status IN ('running', 'rolling_back') OR d.active = 1)"
            " ORDER BY d.created_at DESC",
            (device_id,),
        ).fetchall()
        return [DeploymentDevice(**dict(r)) for r in rows]

    # -- desired states (outbox) -------------------------------------------------------------------

    def store_desired(
        self,
        items: Sequence[tuple[str, str, str | None, int | None, str | None]],
        sign: Callable[[StoredDesired], bytes],
        *,
        ttl_s: float,
        tx: sqlite3.Connection,
        now: float,
    ) -> dict[str, int]:
        """For each (device_id, action, model, version, deployment_id): allocate a seq, sign, store.

        ``sign`` builds the blob from the allocated seq and times (b"" means "clear the retained
        message"). Returns device_id -> seq. The rows are owed to the broker until ``mark_published``.
        """
        out: dict[str, int] = {}
        for device_id, action, model, version, deployment_id in items:
            seq = self.next_seq(tx, device_id)
            stored = StoredDesired(device_id, seq, now, now + ttl_s)
            blob = sign(stored)
            tx.execute(
                "INSERT INTO desired (device_id, seq, action, model, version, deployment_id, issued_at, expires_at,"
                " blob, published_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
                " ON CONFLICT (device_id) DO UPDATE SET seq = excluded.seq, action = excluded.action,"
                " model = excluded.model, version = excluded.version, deployment_id = excluded.deployment_id,"
                " issued_at = excluded.issued_at, expires_at = excluded.expires_at, blob = excluded.blob",
                (device_id, seq, action, model, version, deployment_id, now, now + ttl_s, blob),
            )
            out[device_id] = seq
        return out

    def get_desired(self, device_id: str) -> DesiredRecord | None:
        row = self._read().execute("SELECT * FROM desired WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else DesiredRecord(**{**dict(row), "blob": bytes(row["blob"])})

    def unpublished_desired(self, limit: int = 1000) -> list[DesiredRecord]:
        rows = self._read().execute(
            "SELECT * FROM desired WHERE published_seq < seq ORDER BY issued_at LIMIT ?", (limit,)
        ).fetchall()
        return [DesiredRecord(**{**dict(r), "blob": bytes(r["blob"])}) for r in rows]

    def mark_desired_published(self, published: Sequence[tuple[str, int]]) -> None:
        with self.tx() as conn:
            conn.executemany(
                "UPDATE desired SET published_seq = ? WHERE device_id = ? AND published_seq < ?",
                [(seq, d, seq) for d, seq in published],
            )

    def expiring_desired(self, before: float, limit: int = 500) -> list[DesiredRecord]:
        rows = self._read().execute(
            "SELECT * FROM desired WHERE expires_at < ? AND action != 'clear' ORDER BY expires_at LIMIT ?",
            (before, limit),
        ).fetchall()
        return [DesiredRecord(**{**dict(r), "blob": bytes(r["blob"])}) for r in rows]

    def all_desired(self) -> dict[str, DesiredRecord]:
        rows = self._read().execute("SELECT * FROM desired").fetchall()
        return {r["device_id"]: DesiredRecord(**{**dict(r), "blob": bytes(r["blob"])}) for r in rows}

    # -- commands (outbox) -------------------------------------------------------------------------

    def store_commands(
        self,
        items: Sequence[tuple[str, str, str, str | None, int | None]],
        sign: Callable[[StoredCommand], bytes],
        *,
        batch_id: str,
        ttl_s: float,
        created_by: str,
        deployment_id: str | None,
        tx: sqlite3.Connection,
        now: float,
    ) -> list[str]:
        """(command_id, device_id, action, model, version) each -> seq, signed blob, row; returns the ids."""
        ids = []
        for command_id, device_id, action, model, version in items:
            seq = self.next_seq(tx, device_id)
            blob = sign(StoredCommand(command_id, device_id, action, model, version, seq, now, now + ttl_s))
            tx.execute(
                "INSERT INTO commands (command_id, batch_id, device_id, action, model, version, seq, issued_at,"
                " expires_at, blob, status, deployment_id, created_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (command_id, batch_id, device_id, action, model, version, seq, now, now + ttl_s, blob,
                 deployment_id, created_by),
            )
            ids.append(command_id)
        return ids

    def unpublished_commands(self, now: float, limit: int = 1000) -> list[CommandRecord]:
        rows = self._read().execute(
            "SELECT * FROM commands WHERE published_at IS NULL AND expires_at > ? ORDER BY seq LIMIT ?",
            (now, limit),
        ).fetchall()
        return [_command(r) for r in rows]

    def mark_commands_published(self, command_ids: Sequence[str], now: float) -> None:
        with self.tx() as conn:
            conn.executemany(
                "UPDATE commands SET published_at = ?, status = CASE WHEN status = 'pending' THEN 'sent'"
                " ELSE status END WHERE command_id = ?",
                [(now, c) for c in command_ids],
            )

    def commands_in_batch(self, batch_id: str) -> list[CommandRecord]:
        rows = self._read().execute(
            "SELECT * FROM commands WHERE batch_id = ? ORDER BY device_id", (batch_id,)
        ).fetchall()
        return [_command(r) for r in rows]

    def expire_commands(self, now: float) -> int:
        with self.tx() as conn:
            return conn.execute(
                "UPDATE commands SET status = 'expired' WHERE status IN ('pending', 'sent') AND expires_at < ?",
                (now,),
            ).rowcount

    # -- ingest ------------------------------------------------------------------------------------

    def write_ingest(
        self,
        batch: IngestBatch,
        *,
        bucket_s: float,
        now: float | None = None,
        on_event: Callable[[sqlite3.Connection, Event, int], None] | None = None,
        on_state: Callable[[sqlite3.Connection, StateReport], None] | None = None,
    ) -> list[int]:
        """Write one batch of device messages in one transaction; returns the new event row ids.

        ``on_event``/``on_state`` let the rollout layer update deployment progress in the same
        transaction (so an event is never recorded without its effect, nor the other way round).
        """
        now = now or _now()
        new_ids: list[int] = []
        with self.tx() as conn:
            for report in batch.states:
                if self._apply_state(conn, report, now) and on_state is not None:
                    on_state(conn, report)
            for report in batch.unregistered_states:
                conn.execute(
                    "INSERT INTO unregistered_presence (device_id, session, report, received_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (device_id) DO UPDATE SET session = excluded.session, report = excluded.report,"
                    " received_at = excluded.received_at WHERE excluded.session >= unregistered_presence.session",
                    (report.device_id, report.session, encode(report), now),
                )
            for t in batch.telemetry:
                self._apply_telemetry(conn, t, bucket_s)
                self._presence_from_telemetry(conn, t, now)
            for ev in batch.events:
                row = conn.execute(
                    "INSERT INTO events (device_id, event_id, ts, received_at, kind, severity, message, code,"
                    " deployment_id, model, version, command_id, data, source)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'device')"
                    " ON CONFLICT (device_id, event_id) DO NOTHING RETURNING id",
                    (
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
                    ),
                ).fetchone()
                if row is None:  # a QoS 1 duplicate: already recorded and applied
                    continue
                new_ids.append(int(row[0]))
                conn.execute("UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE device_id = ?",
                             (now, ev.device_id))
                if ev.kind == "command.result" and ev.command_id:
                    self._apply_command_result(conn, ev, now)
                if on_event is not None:
                    on_event(conn, ev, int(row[0]))
            for device_id, kind, severity, message, code, data in batch.server_events:
                new_ids.append(self._server_event(conn, device_id, kind, severity, message, code, data, now=now))
        return new_ids

    def _apply_state(self, conn: sqlite3.Connection, r: StateReport, now: float) -> bool:
        """Apply a state report unless it is older than what we have (a late Will of an older session)."""
        row = conn.execute("SELECT session, online FROM devices WHERE device_id = ?", (r.device_id,)).fetchone()
        if row is None:
            return False
        if r.session < row["session"]:
            return False
        if bool(row["online"]) != r.online:
            self._server_event(
                conn, r.device_id, "device.online" if r.online else "device.offline", "info",
                f"device {r.device_id} is {'online' if r.online else 'offline'} (session {r.session})", None,
                {"session": r.session}, now=now,
            )
        if not r.online:
            # the Will (or a clean goodbye): keep the last known model state, just mark offline
            conn.execute(
                "UPDATE devices SET online = 0, session = ?, last_seen = ? WHERE device_id = ?",
                (r.session, now, r.device_id),
            )
            return True
        a = r.active
        conn.execute(
            "UPDATE devices SET online = 1, session = ?, last_seen = ?, lifecycle = ?, active_model = ?,"
            " active_version = ?, active_state = ?, active_artifact = ?, active_variant = ?, target_model = ?,"
            " target_version = ?, kept = ?, last_seq = COALESCE(?, last_seq),"
            " desired_expires_at = ?, agent_version = COALESCE(?, agent_version), arch = COALESCE(?, arch)"
            " WHERE device_id = ?",
            (
                r.session,
                now,
                r.lifecycle,
                a.name if a else None,
                a.version if a else None,
                a.state if a else None,
                a.artifact_id if a else None,
                a.variant if a else None,
                r.target.name if r.target else None,
                r.target.version if r.target else None,
                _json(list(r.kept)),
                r.last_seq,
                r.desired_expires_at,
                r.agent_version,
                r.arch,
                r.device_id,
            ),
        )
        return True

    def adopt_presence(self, device_id: str, *, tx: sqlite3.Connection) -> bool:
        """Apply the last state report a device sent before it was registered (approval, registration).

        The device may have been connected for a while: without this it would show offline until
        its next report. False when there was none (or it no longer decodes).
        """
        row = tx.execute(
            "DELETE FROM unregistered_presence WHERE device_id = ? RETURNING report, received_at", (device_id,)
        ).fetchone()
        if row is None:
            return False
        try:
            report = decode_up(bytes(row["report"]), "state")
        except EdgeError:
            return False
        if not isinstance(report, StateReport) or report.device_id != device_id:
            return False
        return self._apply_state(tx, report, float(row["received_at"]))

    def _presence_from_telemetry(self, conn: sqlite3.Connection, t: Telemetry, now: float) -> None:
        """Telemetry proves a live connection: a device never seen in a state report (session -1) is online.

        Once a state report or Last Will has been applied, those (with their session numbers) decide.
        """
        row = conn.execute(
            "UPDATE devices SET online = 1, last_seen = MAX(COALESCE(last_seen, 0), ?)"
            " WHERE device_id = ? AND session < 0 AND online = 0 RETURNING device_id",
            (now, t.device_id),
        ).fetchone()
        if row is not None:
            self._server_event(conn, t.device_id, "device.online", "info",
                               f"device {t.device_id} is online (telemetry; no state report yet)", None,
                               {"source": "telemetry"}, now=now)

    @staticmethod
    def _apply_telemetry(conn: sqlite3.Connection, t: Telemetry, bucket_s: float) -> None:
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
        conn.execute(
            "UPDATE devices SET cpu_percent = ?, memory_percent = ?, rss_bytes = ?, temperature_c = ?, p95_ms = ?,"
            " requests = ?, errors = ?, telemetry_at = ?, last_seen = MAX(COALESCE(last_seen, 0), ?)"
            " WHERE device_id = ? AND COALESCE(telemetry_at, 0) <= ?",
            (
                t.cpu_percent,
                t.memory_percent,
                t.rss_bytes,
                t.temperature_c,
                p95,
                t.requests,
                t.errors,
                t.ts,
                t.ts,
                t.device_id,
                t.ts,
            ),
        )

    @staticmethod
    def _apply_command_result(conn: sqlite3.Connection, ev: Event, now: float) -> None:
        ok = bool(ev.data.get("ok"))
        conn.execute(
            "UPDATE commands SET status = ?, result = ?, answered_at = ? WHERE command_id = ? AND device_id = ?",
            ("ok" if ok else "failed", _json(dict(ev.data) | {"message": ev.message or ev.data.get("message")}),
             now, ev.command_id, ev.device_id),
        )

    def _server_event(  # noqa: PLR0917 - mirrors the tuple layout of IngestBatch.server_events
        self,
        conn: sqlite3.Connection,
        device_id: str | None,
        kind: str,
        severity: str,
        message: str,
        code: str | None,
        data: Mapping[str, Any],
        *,
        deployment_id: str | None = None,
        now: float,
    ) -> int:
        row = conn.execute(
            "INSERT INTO events (device_id, event_id, ts, received_at, kind, severity, message, code, deployment_id,"
            " data, source) VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, 'server') RETURNING id",
            (device_id, now, now, kind, severity, message, code, deployment_id, _json(dict(data))),
        ).fetchone()
        return int(row[0])

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
        tx: sqlite3.Connection | None = None,
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
        clauses: list[str] = ["id > ?"]
        args: list[Any] = [after]
        if device_id:
            clauses.append("device_id = ?")
            args.append(device_id)
        if deployment_id:
            clauses.append("deployment_id = ?")
            args.append(deployment_id)
        if kind_prefix:
            clauses.append("kind LIKE ?")
            args.append(kind_prefix.replace("%", "") + "%")
        where = " AND ".join(clauses)
        if newest:
            sql = f"SELECT * FROM (SELECT * FROM events WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id"
        else:
            sql = f"SELECT * FROM events WHERE {where} ORDER BY id LIMIT ?"
        rows = self._read().execute(sql, (*args, limit)).fetchall()
        return [EventRecord(**{**dict(r), "data": json.loads(r["data"])}) for r in rows]

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

    def prune(self, *, telemetry_before: float, events_before: float) -> tuple[int, int]:
        with self.tx() as conn:
            t = conn.execute("DELETE FROM telemetry WHERE bucket < ?", (telemetry_before,)).rowcount
            e = conn.execute("DELETE FROM events WHERE received_at < ?", (events_before,)).rowcount
            conn.execute("DELETE FROM unregistered_presence WHERE received_at < ?", (events_before,))
        return t, e

    def fleet_counts(self) -> dict[str, Any]:
        """Aggregates for /metrics (one query per family)."""
        conn = self._read()
        out: dict[str, Any] = {}
        out["devices"] = [dict(r) for r in conn.execute(
            "SELECT status, profile, online, COALESCE(lifecycle, 'unknown') AS lifecycle, COUNT(*) AS n"
            " FROM devices GROUP BY status, profile, online, lifecycle"
        )]
        out["versions"] = [dict(r) for r in conn.execute(
            "SELECT active_model AS model, active_version AS version, COUNT(*) AS n FROM devices"
            " WHERE active_model IS NOT NULL AND status = 'active' GROUP BY active_model, active_version"
        )]
        out["rollouts"] = [dict(r) for r in conn.execute(
            "SELECT d.deployment_id, d.status, dd.state, COUNT(*) AS n FROM deployments d"
            " JOIN deployment_devices dd ON dd.deployment_id = d.deployment_id"
            " WHERE d.status IN ('running', 'rolling_back') OR d.active = 1 GROUP BY d.deployment_id, dd.state"
        )]
        out["deployment_status"] = [dict(r) for r in conn.execute(
            "SELECT status, COUNT(*) AS n FROM deployments GROUP BY status"
        )]
        row = conn.execute(
            "SELECT AVG(cpu_percent) AS cpu, AVG(memory_percent) AS mem, AVG(p95_ms) AS p95, MAX(p95_ms) AS p95max,"
            " MAX(temperature_c) AS tmax, SUM(requests) AS req, SUM(errors) AS err FROM devices"
            " WHERE status = 'active' AND online = 1"
        ).fetchone()
        out["telemetry"] = dict(row)
        out["pending_enrollments"] = conn.execute(
            "SELECT COUNT(*) FROM enroll_requests WHERE status = 'pending'"
        ).fetchone()[0]
        return out

    # -- helpers -----------------------------------------------------------------------------------

    def _maybe_tx(self, tx: sqlite3.Connection | None) -> AbstractContextManager[sqlite3.Connection]:
        if tx is not None:
            return _Borrowed(tx)
        return self.db.transaction()


class _Borrowed(AbstractContextManager[sqlite3.Connection]):
    """Context manager that hands back a caller's open transaction without committing it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        return None


def _artifact(row: sqlite3.Row) -> ArtifactRecord:
    return ArtifactRecord(**{**dict(row), "info": json.loads(row["info"]), "data_key": bytes(row["data_key"])})


def _command(row: sqlite3.Row) -> CommandRecord:
    d = dict(row)
    d["blob"] = bytes(d["blob"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return CommandRecord(**d)


def iter_chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
