"""Devices, groups, enrollment requests and presence: the tables ``devices``, ``device_groups``,
``enroll_requests`` and ``unregistered_presence``.

Per device, ``seq`` is the last sequence number the server allocated for a signed message
(desired states and commands share it). The device's own ``last_seq`` (from its state
reports) is kept next to it; the server never allocates below what the device has seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import EdgeError
from agent.protocol.messages import StateReport, Telemetry, decode_up, encode
from server.errors import ConflictError, NotFoundError, RegistryError
from server.registry.base import Record, TableOwner, iter_chunks, placeholders
from server.registry.base import now as _now
from server.registry.base import to_json as _json
from server.registry.db import Connection, Row, execute_each

DEVICE_ACTIVE = "active"
DEVICE_AWAITING_KEY = "awaiting_key"
DEVICE_REVOKED = "revoked"


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


def _device(row: Row, groups: tuple[str, ...] = ()) -> Device:
    d = dict(row)
    d["online"] = bool(d["online"])
    d["kept"] = tuple(json.loads(d["kept"] or "[]"))
    return Device(**d, groups=groups)


@dataclass(frozen=True)
class EnrollmentRequest(Record):
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


class DeviceTables(TableOwner):
    """Devices, groups, enrollment and presence."""

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
        tx: Connection | None = None,
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

    def _get_device(self, conn: Connection, device_id: str) -> Device:
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

    def online_device_ids(self) -> set[str]:
        """Devices whose connection is up (the rollout driver's per-tick question; no full rows built)."""
        return {r[0] for r in self._read().execute("SELECT device_id FROM devices WHERE online = 1")}

    def set_device_key(self, device_id: str, public_key: str, *, tx: Connection, now: float) -> None:
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

    def revoke_device(self, device_id: str, *, tx: Connection, now: float) -> None:
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

    def next_seq(self, conn: Connection, device_id: str) -> int:
        """Allocate the device's next sequence number (never at or below what the device reported)."""
        return self.next_seqs(conn, [device_id])[0]

    @staticmethod
    def next_seqs(conn: Connection, device_ids: Sequence[str]) -> list[int]:
        """``next_seq`` of each device, in order (PostgreSQL: in one round trip)."""
        rows = execute_each(conn, "UPDATE devices SET seq = MAX(seq, COALESCE(last_seq, 0)) + 1 WHERE device_id = ?"
                            " RETURNING seq", [(d,) for d in device_ids])
        for device_id, row in zip(device_ids, rows, strict=True):
            if row is None:
                raise NotFoundError(f"unknown device {device_id!r}")
        return [int(row[0]) for row in rows]

    # -- groups ------------------------------------------------------------------------------------

    @staticmethod
    def _add_member(conn: Connection, group: str, device_id: str, now: float) -> None:
        conn.execute(
            "INSERT INTO device_groups (group_name, device_id, added_at) VALUES (?, ?, ?)"
            " ON CONFLICT (group_name, device_id) DO NOTHING",
            (group, device_id, now),
        )

    def add_to_group(self, group: str, device_ids: Sequence[str], *, tx: Connection, now: float) -> None:
        for d in device_ids:
            self._get_device(tx, d)
            self._add_member(tx, group, d, now)

    def remove_from_group(self, group: str, device_ids: Sequence[str], *, tx: Connection) -> int:
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

    def target_devices(self, kind: str, value: str | None, *, conn: Connection | None = None) -> list[Device]:
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

    def record_enroll_request(self, req: EnrollmentRequest, *, tx: Connection) -> bool:
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

    def get_enroll_request(self, device_id: str, *, conn: Connection | None = None) -> EnrollmentRequest:
        row = (conn or self._read()).execute(
            "SELECT * FROM enroll_requests WHERE device_id = ?", (device_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no enrollment request from device {device_id!r}")
        return EnrollmentRequest(**dict(row))

    def set_enroll_status(self, device_id: str, status: str, *, tx: Connection) -> None:
        tx.execute("UPDATE enroll_requests SET status = ? WHERE device_id = ?", (status, device_id))

    # -- presence ----------------------------------------------------------------------------------

    #: recorded by ``observations`` (a mixin beside this one in ``FleetRegistry``)
    _server_event: Callable[..., int]

    @staticmethod
    def presence_of(conn: Connection, device_ids: Iterable[str]) -> dict[str, tuple[int, bool]]:
        """device id -> (session, online) of those of ``device_ids`` that are registered: what ``_apply_state``
        compares a report with, read for a whole ingest batch at once."""
        out: dict[str, tuple[int, bool]] = {}
        for part in iter_chunks(sorted(set(device_ids)), 500):
            rows = conn.execute(
                f"SELECT device_id, session, online FROM devices WHERE device_id IN ({placeholders(part)})", part)
            out.update({r[0]: (r[1], bool(r[2])) for r in rows})
        return out

    def _apply_state(self, conn: Connection, r: StateReport, now: float,
                     known: dict[str, tuple[int, bool]] | None = None) -> bool:
        """Apply a state report unless it is older than what we have (a late Will of an older session).
        ``known``: ``presence_of`` the batch's devices, read beforehand and kept up to date here."""
        if known is None:
            known = self.presence_of(conn, [r.device_id])
        current = known.get(r.device_id)
        if current is None:
            return False
        session, online = current
        if r.session < session:
            return False
        known[r.device_id] = (r.session, r.online)
        if online != r.online:
            self._server_event(
                conn, r.device_id, "device.online" if r.online else "device.offline", "info",
                f"device {r.device_id} is {'online' if r.online else 'offline'} (session {r.session})", None,
                {"session": r.session}, now=now, returning=False,
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

    def adopt_presence(self, device_id: str, *, tx: Connection) -> bool:
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

    def _presence_from_telemetry(self, conn: Connection, t: Telemetry, now: float) -> None:
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


    def record_unregistered_state(self, conn: Connection, report: StateReport, now: float) -> None:
        """Keep the newest state report of a device not registered (yet), for ``adopt_presence``."""
        conn.execute(
            "INSERT INTO unregistered_presence (device_id, session, report, received_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (device_id) DO UPDATE SET session = excluded.session, report = excluded.report,"
            " received_at = excluded.received_at WHERE excluded.session >= unregistered_presence.session",
            (report.device_id, report.session, encode(report), now),
        )

    @staticmethod
    def touch_last_seen(conn: Connection, device_id: str, now: float) -> None:
        conn.execute("UPDATE devices SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE device_id = ?",
                     (now, device_id))

    @staticmethod
    def apply_telemetry_snapshot(conn: Connection, t: Telemetry) -> None:
        """The device row keeps its latest telemetry sample (an older one arriving late is ignored)."""
        p95 = t.latency_ms.get("p95")
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
    def prune_presence(conn: Connection, before: float) -> None:
        conn.execute("DELETE FROM unregistered_presence WHERE received_at < ?", (before,))

    # -- reading for other layers ------------------------------------------------------------------

    def device_statuses(self, device_ids: Iterable[str]) -> dict[str, str]:
        """device id -> status for those of ``device_ids`` that are registered."""
        conn = self._read()
        out: dict[str, str] = {}
        for part in iter_chunks(list(device_ids), 500):
            rows = conn.execute(
                f"SELECT device_id, status FROM devices WHERE device_id IN ({placeholders(part)})",
                part,
            )
            out.update({r[0]: r[1] for r in rows})
        return out

    @staticmethod
    def device_public_key(conn: Connection, device_id: str) -> str | None:
        row = conn.execute("SELECT public_key FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else row[0]

    def device_counts(self, conn: Connection) -> dict[str, Any]:
        """The device families of ``fleet_counts`` (for /metrics)."""
        out: dict[str, Any] = {}
        out["devices"] = [dict(r) for r in conn.execute(
            "SELECT status, profile, online, COALESCE(lifecycle, 'unknown') AS lifecycle, COUNT(*) AS n"
            " FROM devices GROUP BY status, profile, online, lifecycle"
        )]
        out["versions"] = [dict(r) for r in conn.execute(
            "SELECT active_model AS model, active_version AS version, COUNT(*) AS n FROM devices"
            " WHERE active_model IS NOT NULL AND status = 'active' GROUP BY active_model, active_version"
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
