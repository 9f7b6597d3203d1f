"""The access half of the registry: API tokens with roles, and the hash-chained audit log.

``FleetRegistry`` inherits these methods. Roles and the chain's canonical encoding are defined in
``server.access``; this module only stores and reads them. Audit rows are appended inside one
``BEGIN IMMEDIATE`` transaction that reads the previous row's hash, so several server processes
writing to one registry still build a single unbroken chain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from server.access import ChainReport, check_role, row_hash, verify_chain
from server.errors import ConflictError, NotFoundError
from server.registry.base import Record
from server.registry.db import Migration, RegistryDatabase, change_notify_trigger, matching

MIGRATIONS: tuple[Migration, ...] = (
    (
        "access_001_token_roles_audit_chain",
        """
ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT
""",
    ),
    ("access_002_change_notify", {"postgresql": change_notify_trigger("audit")}),  # after fleet_005's function
)
#: applying this migration chains the rows written before it (in id order, from "")
CHAIN_MIGRATION = MIGRATIONS[0][0]

_AUDIT_COLUMNS = "id, ts, actor, action, target, params, outcome, detail, prev_hash, hash"


@dataclass(frozen=True)
class AuditRecord(Record):
    id: int
    ts: float
    actor: str
    action: str
    target: str | None
    params: Mapping[str, Any]
    outcome: str
    detail: str | None
    hash: str | None = None


def _params_text(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


class AccessRegistry:
    db: RegistryDatabase

    def migrate_access(self) -> list[str]:
        applied = self.db.migrate(MIGRATIONS)
        if CHAIN_MIGRATION in applied:
            self._chain_legacy_rows()
        return applied

    def _chain_legacy_rows(self) -> None:
        with self.db.transaction() as conn:
            prev = ""
            rows = conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY id").fetchall()
            for r in rows:
                digest = row_hash(r, prev)
                conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?", (prev, digest, r["id"]))
                prev = digest

    # -- API tokens --------------------------------------------------------------------------------

    def add_token(self, name: str, digest: str, *, role: str, replace: bool = False) -> None:
        check_role(role)
        with self.db.transaction() as conn:
            exists = conn.execute("SELECT revoked_at FROM api_tokens WHERE name = ?", (name,)).fetchone()
            if exists is not None and exists[0] is None and not replace:
                raise ConflictError(f"an API token named {name!r} exists; revoke it first")
            conn.execute(
                "INSERT INTO api_tokens (name, token_sha256, created_at, role) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256,"
                " created_at = excluded.created_at, revoked_at = NULL, role = excluded.role",
                (name, digest, time.time(), role),
            )

    def token_identity(self, digest: str) -> tuple[str, str] | None:
        """(name, role) of the live token with this SHA-256, or None."""
        row = self.db.connection().execute(
            "SELECT name, role FROM api_tokens WHERE token_sha256 = ? AND revoked_at IS NULL", (digest,)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def token_owner(self, digest: str) -> str | None:
        ident = self.token_identity(digest)
        return None if ident is None else ident[0]

    def revoke_token(self, name: str) -> None:
        with self.db.transaction() as conn:
            if conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                            (time.time(), name)).rowcount == 0:
                raise NotFoundError(f"no active API token named {name!r}")

    def list_tokens(self) -> list[dict[str, Any]]:
        rows = self.db.connection().execute(
            "SELECT name, role, created_at, revoked_at FROM api_tokens ORDER BY name")
        return [dict(r) for r in rows]

    # -- audit -------------------------------------------------------------------------------------

    def record_audit(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        params: Mapping[str, Any],
        outcome: str,
        detail: str | None = None,
        now: float | None = None,
    ) -> int:
        """Append one row, chained to the last one (same transaction)."""
        ts = now or time.time()
        text = _params_text(params)
        with self.db.transaction() as conn:
            last = conn.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            prev = str(last[0] or "") if last is not None else ""
            rid = int(conn.execute(
                "INSERT INTO audit (ts, actor, action, target, params, outcome, detail, prev_hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (ts, actor, action, target, text, outcome, detail, prev),
            ).fetchone()[0])
            row = {"id": rid, "ts": ts, "actor": actor, "action": action, "target": target, "params": text,
                   "outcome": outcome, "detail": detail}
            conn.execute("UPDATE audit SET hash = ? WHERE id = ?", (row_hash(row, prev), rid))
        return rid

    def list_audit(self, *, limit: int = 100, actor: str | None = None, action: str | None = None) -> list[AuditRecord]:
        clauses, args = matching(("actor = ?", actor), ("action = ?", action))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.connection().execute(
            f"SELECT * FROM (SELECT {_AUDIT_COLUMNS} FROM audit{where} ORDER BY id DESC LIMIT ?) AS newest ORDER BY id",
            (*args, limit),
        ).fetchall()
        out = []
        for r in rows:
            try:
                params = json.loads(r["params"])
            except ValueError:
                params = {"<unparseable>": r["params"]}
            out.append(AuditRecord(id=r["id"], ts=r["ts"], actor=r["actor"], action=r["action"], target=r["target"],
                                   params=params, outcome=r["outcome"], detail=r["detail"], hash=r["hash"]))
        return out

    def _audit_rows(self, batch: int = 1000) -> Iterator[Mapping[str, Any]]:
        conn = self.db.connection()
        after = -1
        while True:
            rows = conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                                (after, batch)).fetchall()
            if not rows:
                return
            yield from rows
            after = int(rows[-1]["id"])

    def verify_audit(self, *, anchor: tuple[int, str] | None = None) -> ChainReport:
        """Recompute the chain over every row; the report names the first broken link."""
        return verify_chain(self._audit_rows(), anchor=anchor)
