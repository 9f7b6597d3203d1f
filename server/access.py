"""Who may do what, and the tamper-evident audit chain (pure: no I/O).

Roles
    Every API route declares the role it needs; every API token carries one role. Roles are
    ordered, each including the ones below it::

        read    < deploy    < admin
        status, events,     deploy, rollback,    devices, enrollment, groups, broker
        audit, listings     halt, model add/     passwords (and, locally, keys, tokens,
                            build                broker config)

    ``public`` routes (``/healthz``, ``/openapi.json``, ``/metrics`` unless configured
    otherwise) need no token. Tokens created before roles existed were migrated to ``admin``.

Audit chain
    Each audit row stores ``prev_hash`` (the previous row's ``hash``; ``""`` for the first row)
    and ``hash = SHA-256(canonical(row))`` as lowercase hex, where ``canonical(row)`` is the
    UTF-8 encoding of the JSON array::

        [id, ts_us, actor, action, target, params, outcome, detail, prev_hash]

    written with ``json.dumps(..., ensure_ascii=True, separators=(",", ":"))``: ``ts_us`` is
    ``round(ts * 1e6)`` (an integer), ``params`` is the stored JSON text of the parameters (a
    string, exactly as stored), ``target`` and ``detail`` may be ``null``. Editing any field of a
    row breaks its own hash; deleting or reordering rows breaks the next row's ``prev_hash`` (and
    leaves a gap in the ids). Rewriting the whole tail consistently is only caught against a head
    (``id:hash``) saved elsewhere: ``edgefleet audit verify --anchor ID:HASH``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PUBLIC = "public"
READ = "read"
DEPLOY = "deploy"
ADMIN = "admin"

#: token roles, least to most privileged
ROLES: tuple[str, ...] = (READ, DEPLOY, ADMIN)
_RANK: Mapping[str, int] = {PUBLIC: 0, READ: 1, DEPLOY: 2, ADMIN: 3}


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    return role


def allows(granted: str, needed: str) -> bool:
    """Whether a token of role ``granted`` may call a route that needs ``needed``."""
    return _RANK.get(granted, -1) >= _RANK[needed] and granted in _RANK


def local_actor() -> str:
    """The audit actor of a command run on the server machine: the OS account of this process's
    real uid (not $USER or $LOGNAME, which anyone can set)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    return f"local:{name}"


# -- the audit chain --------------------------------------------------------------------------------------


def canonical(row: Mapping[str, Any], prev_hash: str) -> bytes:
    """The bytes an audit row's hash covers (see the module docstring)."""
    fields = [int(row["id"]), round(float(row["ts"]) * 1e6), row["actor"], row["action"], row["target"],
              row["params"], row["outcome"], row["detail"], prev_hash]
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()


def row_hash(row: Mapping[str, Any], prev_hash: str) -> str:
    return hashlib.sha256(canonical(row, prev_hash)).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    rows: int
    ok: bool
    head_id: int | None
    head_hash: str | None
    #: the first broken row and why (None when intact)
    broken_id: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _link_error(row: Mapping[str, Any], prev_id: int | None, prev_hash: str,
                anchor: tuple[int, str] | None) -> str | None:
    rid = int(row["id"])
    if prev_id is not None and rid != prev_id + 1:
        return f"rows {prev_id + 1}..{rid - 1} are missing (deleted)"
    if (row["prev_hash"] or "") != prev_hash:
        return "its prev_hash does not match the previous row (a row before it was changed, deleted or inserted)"
    if row["hash"] != row_hash(row, prev_hash):
        return "its contents do not match its hash (the row was edited)"
    if anchor is not None and rid == anchor[0] and row["hash"] != anchor[1]:
        return f"its hash is not the anchor's {anchor[1][:16]}... (the chain was rewritten)"
    return None


def verify_chain(rows: Iterable[Mapping[str, Any]], *, anchor: tuple[int, str] | None = None) -> ChainReport:
    """Walk rows in id order (each with ``id, ts, actor, action, target, params, outcome, detail,
    prev_hash, hash``); stop at the first broken link."""
    prev_hash, prev_id, n = "", None, 0
    anchor_seen = anchor is None
    for row in rows:
        n += 1
        rid = int(row["id"])
        why = _link_error(row, prev_id, prev_hash, anchor)
        if why is not None:
            return ChainReport(n, False, prev_id, prev_hash or None, rid, why)
        anchor_seen = anchor_seen or (anchor is not None and rid == anchor[0])
        prev_hash, prev_id = str(row["hash"]), rid
    if not anchor_seen and anchor is not None:
        return ChainReport(n, False, prev_id, prev_hash or None, anchor[0],
                           "the anchored row is gone (the log was truncated)")
    return ChainReport(n, True, prev_id, prev_hash or None)


def parse_anchor(text: str) -> tuple[int, str]:
    rid, sep, digest = text.partition(":")
    if not sep or not rid.isdigit() or len(digest) != 64:
        raise ValueError(f"anchor {text!r} must be ID:SHA256HEX (as `edgefleet audit verify` prints the head)")
    return int(rid), digest.lower()
