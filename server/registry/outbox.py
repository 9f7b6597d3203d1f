"""The outbox: signed desired states and commands owed to the broker, and the leases that decide
which process publishes them. Tables ``desired``, ``commands`` and ``leases``.

Everything a process decides is written here first and published to the broker second: a
desired state row carries the signed blob and ``published_seq``; a command row ``published_at``.
A process that dies between the two leaves rows whose publish is still owed, and whichever
process runs next publishes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.protocol.messages import Event
from server.registry.base import TableOwner
from server.registry.base import now as _now
from server.registry.base import to_json as _json
from server.registry.db import Connection, Row


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



class OutboxTables(TableOwner):
    """Desired states, commands and leases."""

    #: allocated by ``devices`` (a mixin beside this one in ``FleetRegistry``)
    next_seq: Callable[[Connection, str], int]
    next_seqs: Callable[[Connection, Sequence[str]], list[int]]

    # -- leases ------------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, ttl_s: float, *, now: float | None = None) -> bool:
        """Take or renew ``name`` for ``ttl_s``; False while another live owner holds it."""
        now = now or _now()
        with self.atomic() as conn:
            row = conn.execute(
                "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at"
                " WHERE leases.owner = excluded.owner OR leases.expires_at < ?"
                " RETURNING owner",
                (name, owner, now + ttl_s, now),
            ).fetchone()
        return row is not None and row[0] == owner

    def release_lease(self, name: str, owner: str) -> None:
        with self.atomic() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def leases_named(self, prefix: str) -> dict[str, tuple[str, float]]:
        """Every lease whose name starts with ``prefix`` (expired ones included): name -> (owner, expires_at)."""
        rows = self._read().execute(
            "SELECT name, owner, expires_at FROM leases WHERE substr(name, 1, ?) = ?", (len(prefix), prefix)
        ).fetchall()
        return {r[0]: (r[1], float(r[2])) for r in rows}

    def lease_holder(self, name: str, *, now: float | None = None) -> str | None:
        row = self._read().execute(
            "SELECT owner FROM leases WHERE name = ? AND expires_at >= ?", (name, now or _now())
        ).fetchone()
        return None if row is None else str(row[0])

    # -- desired states (outbox) -------------------------------------------------------------------

    def store_desired(
        self,
        items: Sequence[tuple[str, str, str | None, int | None, str | None]],
        sign: Callable[[StoredDesired], bytes],
        *,
        ttl_s: float,
        tx: Connection,
        now: float,
    ) -> dict[str, int]:
        """For each (device_id, action, model, version, deployment_id): allocate a seq, sign, store.

        ``sign`` builds the blob from the allocated seq and times (b"" means "clear the retained
        message"). Returns device_id -> seq. The rows are owed to the broker until ``mark_published``.
        """
        out: dict[str, int] = {}
        rows: list[tuple[Any, ...]] = []
        # seqs allocated for the whole list in one go (PostgreSQL: one round trip under the writer lock, not one
        # per device), then signed, then stored together
        for (device_id, action, model, version, deployment_id), seq in zip(
                items, self.next_seqs(tx, [item[0] for item in items]), strict=True):
            blob = sign(StoredDesired(device_id, seq, now, now + ttl_s))
            rows.append((device_id, seq, action, model, version, deployment_id, now, now + ttl_s, blob))
            out[device_id] = seq
        tx.executemany(
            "INSERT INTO desired (device_id, seq, action, model, version, deployment_id, issued_at, expires_at,"
            " blob, published_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
            " ON CONFLICT (device_id) DO UPDATE SET seq = excluded.seq, action = excluded.action,"
            " model = excluded.model, version = excluded.version, deployment_id = excluded.deployment_id,"
            " issued_at = excluded.issued_at, expires_at = excluded.expires_at, blob = excluded.blob",
            rows,
        )
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
        tx: Connection,
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
        with self.atomic() as conn:
            return conn.execute(
                "UPDATE commands SET status = 'expired' WHERE status IN ('pending', 'sent') AND expires_at < ?",
                (now,),
            ).rowcount


    @staticmethod
    def record_command_result(conn: Connection, ev: Event, now: float) -> None:
        """A device answered a command (its ``command.result`` event)."""
        ok = bool(ev.data.get("ok"))
        conn.execute(
            "UPDATE commands SET status = ?, result = ?, answered_at = ? WHERE command_id = ? AND device_id = ?",
            ("ok" if ok else "failed", _json(dict(ev.data) | {"message": ev.message or ev.data.get("message")}),
             now, ev.command_id, ev.device_id),
        )

    # -- reading for other layers ------------------------------------------------------------------

    @staticmethod
    def delete_desired(device_id: str, *, tx: Connection) -> None:
        tx.execute("DELETE FROM desired WHERE device_id = ?", (device_id,))

    def devices_desiring_artifact(self, artifact_id: str) -> list[str]:
        """The active devices whose desired state deploys a build sealed as ``artifact_id`` (the first case of
        ``desired_names_artifact``, for every device at once: the chunk server's bulk authorisation)."""
        return [r[0] for r in self._read().execute(
            "SELECT w.device_id FROM desired w JOIN devices d ON d.device_id = w.device_id"
            " JOIN deployment_builds b ON b.deployment_id = w.deployment_id AND b.profile = d.profile"
            " WHERE w.action = 'deploy' AND b.artifact_id = ? AND d.status = 'active'",
            (artifact_id,),
        )]

    def desired_names_artifact(self, device_id: str, artifact_id: str) -> bool:
        """Whether the device is active and its desired state deploys a build sealed as ``artifact_id``, or a
        delta artifact (``server/delta.py``) of that build."""
        conn = self._read()
        row = conn.execute(
            "SELECT 1 FROM desired w JOIN devices d ON d.device_id = w.device_id"
            " JOIN deployment_builds b ON b.deployment_id = w.deployment_id AND b.profile = d.profile"
            " WHERE w.device_id = ? AND w.action = 'deploy' AND b.artifact_id = ? AND d.status = 'active'",
            (device_id, artifact_id),
        ).fetchone()
        if row is None:
            row = conn.execute(
                "SELECT 1 FROM desired w JOIN devices d ON d.device_id = w.device_id"
                " JOIN deployment_builds b ON b.deployment_id = w.deployment_id AND b.profile = d.profile"
                " JOIN artifacts f ON f.artifact_id = b.artifact_id"
                " JOIN artifacts x ON x.artifact_id = ? AND x.variant = 'delta' AND x.model = f.model"
                " AND x.version = f.version AND x.profile = f.profile"
                " WHERE w.device_id = ? AND w.action = 'deploy' AND d.status = 'active'",
                (artifact_id, device_id),
            ).fetchone()
        return row is not None


def _command(row: Row) -> CommandRecord:
    d = dict(row)
    d["blob"] = bytes(d["blob"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return CommandRecord(**d)

