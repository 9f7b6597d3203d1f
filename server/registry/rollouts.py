"""Artifacts and deployments: the tables ``artifacts``, ``deployments``, ``deployment_builds`` and
``deployment_devices``.

A deployment's driver holds a lease on its row (``lease_owner``/``lease_expires``) that expires
unless renewed, so two processes never drive the same deployment and a dead driver is replaced
within one TTL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import ConflictError, NotFoundError
from server.registry.base import Record, TableOwner, iter_chunks, placeholders
from server.registry.base import now as _now
from server.registry.base import to_json as _json
from server.registry.db import Connection, Row

#: deployment row states the ingest no longer applies device reports to (``progress_rows``)
NOT_WATCHED = ("pending", "skipped", "superseded", "cancelled")
NOT_WATCHED_SQL = "(" + ", ".join(f"'{state}'" for state in NOT_WATCHED) + ")"

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
class Deployment(Record):
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


@dataclass(frozen=True)
class DeploymentBuild:
    deployment_id: str
    profile: str
    artifact_id: str
    variant: str | None
    runtime: Mapping[str, Any]
    health: Mapping[str, Any]


@dataclass(frozen=True)
class DeploymentDevice(Record):
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


class RolloutTables(TableOwner):
    """Artifacts, deployments, their builds and device plans."""

    # -- artifacts ---------------------------------------------------------------------------------

    def find_artifact(self, content_key: str) -> ArtifactRecord | None:
        row = self._read().execute("SELECT * FROM artifacts WHERE content_key = ?", (content_key,)).fetchone()
        return None if row is None else _artifact(row)

    def artifact_of(self, model: str, version: int, profile: str) -> ArtifactRecord | None:
        """The newest full (non-delta) artifact sealed for ``model:version`` on ``profile`` (a delta's base)."""
        row = self._read().execute(
            "SELECT * FROM artifacts WHERE model = ? AND version = ? AND profile = ? AND content_key NOT LIKE 'delta:%'"
            " ORDER BY created_at DESC LIMIT 1", (model, version, profile)).fetchone()
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

    def holding_deployments(
        self, device_ids: Sequence[str], *, conn: Connection | None = None
    ) -> dict[str, list[str]]:
        """deployment id -> the given devices it holds (running or rolling back)."""
        out: dict[str, list[str]] = {}
        wanted = set(device_ids)
        rows = (conn or self._read()).execute(
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
        conn: Connection,
        deployment_id: str,
        devices: Iterable[tuple[str, str, int, int | None]],
        now: float,
    ) -> int:
        """Insert the rows (existing ones are kept); returns how many rows changed (inserted or superseded)."""
        rows = list(devices)
        changed = conn.executemany(
            "INSERT INTO deployment_devices (deployment_id, device_id, profile, wave, state, previous_version,"
            " updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?) ON CONFLICT DO NOTHING",
            [(deployment_id, d, p, w, prev, now) for d, p, w, prev in rows],
        ).rowcount
        # a device joining a new rollout leaves the finished ones it was part of
        return changed + conn.executemany(
            "UPDATE deployment_devices SET state = 'superseded', updated_at = ? WHERE device_id = ?"
            " AND deployment_id != ? AND state NOT IN ('superseded')"
            " AND deployment_id IN (SELECT deployment_id FROM deployments WHERE status NOT IN ('running',"
            " 'rolling_back'))",
            [(now, d, deployment_id) for d, *_ in rows],
        ).rowcount

    def add_late_joiners(
        self, deployment_id: str, devices: Sequence[tuple[str, str, int, int | None]], *, now: float | None = None
    ) -> int:
        now = now or _now()
        with self.tx() as conn:
            return self._insert_deployment_devices(conn, deployment_id, devices, now)

    def get_deployment(self, deployment_id: str) -> Deployment:
        return self._get_deployment(self._read(), deployment_id)

    def _get_deployment(self, conn: Connection, deployment_id: str) -> Deployment:
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
        with self.atomic() as conn:
            row = conn.execute(
                "UPDATE deployments SET lease_owner = ?, lease_expires = ? WHERE deployment_id = ?"
                " AND (lease_owner IS NULL OR lease_owner = ? OR lease_expires < ?) RETURNING lease_owner",
                (owner, now + ttl_s, deployment_id, owner, now),
            ).fetchone()
        return row is not None

    def release_deployment(self, deployment_id: str, owner: str) -> None:
        with self.atomic() as conn:
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
        tx: Connection | None = None,
        now: float | None = None,
    ) -> bool:
        """Change status (only from one of ``expect`` when given); False when the row was not in ``expect``."""
        now = now or _now()
        finished = status not in HOLDING_STATUSES
        with self._maybe_tx(tx) as conn:
            sql = (
                "UPDATE deployments SET status = ?, updated_at = ?, reason = COALESCE(?, reason),"
                " current_wave = COALESCE(?, current_wave),"
                " finished_at = CASE WHEN ? = 1 THEN COALESCE(finished_at, ?) ELSE NULL END"
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

    def deactivate_deployment(self, deployment_id: str, *, tx: Connection) -> None:
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
        self, deployment_id: str, *, conn: Connection | None = None
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
        tx: Connection | None = None,
        now: float | None = None,
        terminal: Sequence[str] = ("committed", "failed", "rolled_back", "skipped", "superseded"),
    ) -> None:
        """(device_id, state, reason, code) for each device; ``finished_at`` is set on terminal states."""
        now = now or _now()
        with self._maybe_tx(tx) as conn:
            conn.executemany(
                "UPDATE deployment_devices SET state = ?, reason = COALESCE(?, reason), code = COALESCE(?, code),"
                " updated_at = ?, finished_at = CASE WHEN ? = 1 THEN ? ELSE finished_at END"
                " WHERE deployment_id = ? AND device_id = ?",
                [(s, r, c, now, int(s in terminal), now, deployment_id, d) for d, s, r, c in updates],
            )

    def mark_dispatched(self, deployment_id: str, dispatched: Mapping[str, int], *, tx: Connection,
                        now: float) -> None:
        tx.executemany(
            "UPDATE deployment_devices SET state = 'dispatched', seq = ?, dispatched_at = ?, updated_at = ?"
            " WHERE deployment_id = ? AND device_id = ? AND state = 'pending'",
            [(seq, now, now, deployment_id, d) for d, seq in dispatched.items()],
        )

    def device_rows(self, device_id: str, *, conn: Connection | None = None) -> list[DeploymentDevice]:
        """This device's rows in deployments that still hold it or converge it, newest first."""
        rows = (conn or self._read()).execute(
            "SELECT dd.* FROM deployment_devices dd JOIN deployments d ON d.deployment_id = dd.deployment_id"
            " WHERE dd.device_id = ? AND (d.status IN ('running', 'rolling_back') OR d.active = 1)"
            " ORDER BY d.created_at DESC",
            (device_id,),
        ).fetchall()
        return [DeploymentDevice(**dict(r)) for r in rows]


    # -- named writes for the service and the rollout layer ------------------------------------------

    @staticmethod
    def cancel_device_rows(
        device_ids: Sequence[str], reason: str, *, tx: Connection, now: float, live_only: bool = False
    ) -> None:
        """Cancel the devices' unfinished rows (``live_only``: only in running/rolling back/completed ones)."""
        sql = (
            "UPDATE deployment_devices SET state = 'cancelled', reason = ?, updated_at = ?"
            " WHERE device_id = ? AND state NOT IN ('committed', 'failed', 'rolled_back', 'skipped',"
            " 'superseded', 'cancelled')"
        )
        if live_only:
            sql += (" AND deployment_id IN (SELECT deployment_id FROM deployments WHERE"
                    " status IN ('running', 'rolling_back', 'completed'))")
        tx.executemany(sql, [(reason, now, d) for d in device_ids])

    @staticmethod
    def deactivate_target(target: str, statuses: Sequence[str], *, tx: Connection) -> None:
        """Deployments to ``target`` in one of ``statuses`` stop converging late joiners."""
        tx.execute(f"UPDATE deployments SET active = 0 WHERE target = ? AND status IN ({placeholders(statuses)})",
                   (target, *statuses))

    def add_deployment_build(self, build: DeploymentBuild) -> None:
        """A build for a profile that joined the deployment late (first writer wins)."""
        with self.tx() as tx:
            tx.execute(
                "INSERT INTO deployment_builds (deployment_id, profile, artifact_id, variant, runtime, health)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (build.deployment_id, build.profile, build.artifact_id, build.variant,
                 _json(dict(build.runtime)), _json(dict(build.health))),
            )

    @staticmethod
    def progress_rows(conn: Connection, device_id: str) -> list[Row]:
        """The device's dispatched rows of deployments still watching it, with the deployment's model."""
        return RolloutTables.progress_rows_of(conn, [device_id]).get(device_id, [])

    @staticmethod
    def progress_rows_of(conn: Connection, device_ids: Iterable[str]) -> dict[str, list[Row]]:
        """``progress_rows`` of several devices at once (by device id; a device with none is left out)."""
        out: dict[str, list[Row]] = {}
        for part in iter_chunks(sorted(set(device_ids)), 500):
            rows = conn.execute(
                "SELECT dd.device_id, dd.deployment_id, dd.state, dd.code, dd.previous_version, d.model, d.version"
                " FROM deployment_devices dd JOIN deployments d ON d.deployment_id = dd.deployment_id"
                f" WHERE dd.device_id IN ({placeholders(part)}) AND dd.state NOT IN {NOT_WATCHED_SQL}"
                " AND (d.status IN ('running', 'rolling_back', 'rolled_back') OR d.active = 1)",
                part,
            ).fetchall()
            for r in rows:
                out.setdefault(r["device_id"], []).append(r)
        return out

    @staticmethod
    def set_device_progress(
        conn: Connection, deployment_id: str, device_id: str, *, state: str, reason: str | None,
        code: str | None, progress: float | None, finished: bool, now: float,
    ) -> None:
        conn.execute(
            "UPDATE deployment_devices SET state = ?, reason = COALESCE(?, reason), code = ?,"
            " progress = COALESCE(?, progress), updated_at = ?,"
            " finished_at = CASE WHEN ? = 1 THEN ? ELSE finished_at END WHERE deployment_id = ? AND device_id = ?",
            (state, reason, code, progress, now, int(finished), now, deployment_id, device_id),
        )

    @staticmethod
    def touch_device_row(conn: Connection, deployment_id: str, device_id: str, now: float) -> None:
        """The device is making progress: restart its timeout."""
        conn.execute(
            "UPDATE deployment_devices SET updated_at = ? WHERE deployment_id = ? AND device_id = ?",
            (now, deployment_id, device_id),
        )

    @staticmethod
    def rollout_counts(conn: Connection) -> dict[str, Any]:
        """The rollout families of ``fleet_counts`` (for /metrics)."""
        out: dict[str, Any] = {}
        out["rollouts"] = [dict(r) for r in conn.execute(
            "SELECT d.deployment_id, d.status, dd.state, COUNT(*) AS n FROM deployments d"
            " JOIN deployment_devices dd ON dd.deployment_id = d.deployment_id"
            " WHERE d.status IN ('running', 'rolling_back') OR d.active = 1 GROUP BY d.deployment_id, dd.state"
        )]
        out["deployment_status"] = [dict(r) for r in conn.execute(
            "SELECT status, COUNT(*) AS n FROM deployments GROUP BY status"
        )]
        return out


def _artifact(row: Row) -> ArtifactRecord:
    return ArtifactRecord(**{**dict(row), "info": json.loads(row["info"]), "data_key": bytes(row["data_key"])})

