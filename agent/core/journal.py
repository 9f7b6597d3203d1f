"""The update journal: one record that says where the agent is, and what to do after a crash.

Theory of operation
    The lifecycle machine (lifecycle.py) is the only writer: each transition produces a new
    ``JournalRecord`` and a ``Persist`` effect that the shell executes (atomic write, fsync,
    rename, fsync of the directory) *before* the transition's side effects. So after kill -9
    or a power cut the journal names either the state before a side effect or the state after
    it, and never a state whose preparation was skipped.

    On start the shell reads the record and asks ``resume_action``. The table below is the
    whole recovery policy (Mender's LoadStateFromDb, with rollback as the default):

        state at crash   what happens on restart
        ---------------  ----------------------------------------------------------------
        idle             serve the committed version
        downloading      serve the committed version; resume the transfer from its snapshot
        verifying        serve the committed version; verify the downloaded bytes again
        staged           serve the committed version; warm the staged version up again
        warming          serve the committed version; roll the candidate back (reported)
        probation        serve the committed version; roll the candidate back (reported)
        rolling_back     serve the committed version; finish the rollback (reported)

    ``committed`` never names a version that was not committed, so "serve the committed
    version" is always safe. Each start increments ``attempts`` (persisted before the resume
    step runs); any transition, or the resume step completing, resets it. A record that comes
    back with ``attempts >= limit`` means the resume step itself keeps killing the agent (a
    model that segfaults the runtime, an OOM in verification): the operation is abandoned
    instead of resumed, and an idle agent skips the committed version that fails to load and
    falls back to an older kept one.

    Records are JSON inside a checked frame (magic, CRC-32, length): a record that fails the
    check raises StorageError and the shell falls back to its other copy (see store.py).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from agent.errors import MalformedMessageError, StorageError
from agent.protocol.messages import ModelRef

JOURNAL_FORMAT = 1
_MAGIC = b"EFJ1"
_FRAME = struct.Struct(">4sII")  # magic, crc32(body), len(body)
MAX_JOURNAL_BYTES = 64 * 1024
DEFAULT_RESTART_LIMIT = 3


class State(str, Enum):
    """Lifecycle states (the transition table is in lifecycle.py)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    WARMING = "warming"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"


class Via(str, Enum):
    """How the current operation started."""

    DEPLOY = "deploy"  # signed desired state, action=deploy (download)
    ACTIVATE = "activate"  # signed command: switch to a kept version, with warm-up and probation
    PIN = "pin"  # signed desired state, action=pin: switch to a kept version
    ROLLBACK = "rollback"  # signed command: back to a kept committed version
    AUTOMATIC = "automatic"  # the agent rolled back by itself


@dataclass(frozen=True)
class Failure:
    """Why an operation is being rolled back (reported once the rollback is done)."""

    phase: str  # the state it failed in: downloading, verifying, warming, probation, restart...
    code: str  # EdgeError code: integrity, health_check, probation, restart_loop, superseded...
    reason: str
    check: str | None = None  # finite, shape, dtype, latency, golden, load, error_rate

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "code": self.code, "reason": self.reason, "check": self.check}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Failure:
        return cls(
            phase=_str(d, "phase"),
            code=_str(d, "code"),
            reason=_str(d, "reason", max_len=2048),
            check=_opt_str(d, "check"),
        )


@dataclass(frozen=True)
class JournalRecord:
    """Everything the agent must remember across a crash, and nothing it could recompute."""

    state: State = State.IDLE
    #: the committed version the device serves when nothing is in progress (None: never deployed)
    committed: ModelRef | None = None
    #: committed version per model name: the floor for downgrade checks
    committed_versions: Mapping[str, int] = field(default_factory=dict)
    #: the version being installed (downloading .. probation), or left behind (rolling_back)
    target: ModelRef | None = None
    artifact_id: str | None = None
    deployment_id: str | None = None
    via: Via | None = None
    #: rolling_back: the version to serve once done (None: stay on ``committed``)
    restore: ModelRef | None = None
    #: rolling_back: whether ``target`` was ever switched in (decides rolled_back vs failed)
    swapped: bool = False
    failure: Failure | None = None
    command_id: str | None = None
    last_seq: int = 0
    last_desired_sha256: str | None = None
    attempts: int = 0
    serial: int = 0
    updated_at: float = 0.0

    # -- codec ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": JOURNAL_FORMAT,
            "state": self.state.value,
            "committed": self.committed.to_dict() if self.committed else None,
            "committed_versions": dict(sorted(self.committed_versions.items())),
            "target": self.target.to_dict() if self.target else None,
            "artifact_id": self.artifact_id,
            "deployment_id": self.deployment_id,
            "via": self.via.value if self.via else None,
            "restore": self.restore.to_dict() if self.restore else None,
            "swapped": self.swapped,
            "failure": self.failure.to_dict() if self.failure else None,
            "command_id": self.command_id,
            "last_seq": self.last_seq,
            "last_desired_sha256": self.last_desired_sha256,
            "attempts": self.attempts,
            "serial": self.serial,
            "updated_at": self.updated_at,
        }

    def to_bytes(self) -> bytes:
        body = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return _FRAME.pack(_MAGIC, zlib.crc32(body), len(body)) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> JournalRecord:
        """Decode a record; StorageError if the frame, checksum or any field is wrong."""
        if len(data) > MAX_JOURNAL_BYTES:
            raise StorageError(f"journal record of {len(data)} bytes is over the {MAX_JOURNAL_BYTES}-byte cap")
        if len(data) < _FRAME.size:
            raise StorageError("journal record truncated")
        magic, crc, length = _FRAME.unpack_from(data)
        body = data[_FRAME.size :]
        if magic != _MAGIC:
            raise StorageError("journal record has a bad magic number")
        if length != len(body) or zlib.crc32(body) != crc:
            raise StorageError("journal record fails its checksum (torn or corrupt)")
        try:
            obj = json.loads(body)
            if not isinstance(obj, dict):
                raise StorageError("journal record is not a JSON object")
            return cls.from_dict(obj)
        except (ValueError, TypeError, KeyError, MalformedMessageError) as exc:
            raise StorageError(f"journal record is unreadable: {exc}") from exc

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JournalRecord:
        if d.get("format") != JOURNAL_FORMAT:
            raise StorageError(f"journal format {d.get('format')!r} is not {JOURNAL_FORMAT}")
        versions = d.get("committed_versions") or {}
        if not isinstance(versions, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in versions.items()
        ):
            raise StorageError("journal committed_versions must map names to integers")
        failure = d.get("failure")
        via = d.get("via")
        return cls(
            state=State(_str(d, "state")),
            committed=_ref(d, "committed"),
            committed_versions=dict(versions),
            target=_ref(d, "target"),
            artifact_id=_opt_str(d, "artifact_id"),
            deployment_id=_opt_str(d, "deployment_id"),
            via=Via(via) if via is not None else None,
            restore=_ref(d, "restore"),
            swapped=bool(d.get("swapped", False)),
            failure=Failure.from_dict(failure) if isinstance(failure, dict) else None,
            command_id=_opt_str(d, "command_id"),
            last_seq=_int(d, "last_seq"),
            last_desired_sha256=_opt_str(d, "last_desired_sha256"),
            attempts=_int(d, "attempts"),
            serial=_int(d, "serial"),
            updated_at=float(d.get("updated_at", 0.0)),
        )

    # -- helpers ----------------------------------------------------------------------------------

    def committed_version(self, model: str) -> int | None:
        return self.committed_versions.get(model)

    def next(self, **changes: Any) -> JournalRecord:
        """The record after a transition: serial + 1, restart counter cleared."""
        changes.setdefault("attempts", 0)
        return replace(self, serial=self.serial + 1, **changes)


def _str(d: Mapping[str, Any], key: str, *, max_len: int = 256) -> str:
    value = d.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise StorageError(f"journal field {key!r} must be a string")
    return value


def _opt_str(d: Mapping[str, Any], key: str) -> str | None:
    return None if d.get(key) is None else _str(d, key)


def _int(d: Mapping[str, Any], key: str) -> int:
    value = d.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StorageError(f"journal field {key!r} must be a non-negative integer")
    return value


def _ref(d: Mapping[str, Any], key: str) -> ModelRef | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StorageError(f"journal field {key!r} must be a model reference")
    return ModelRef.from_dict(value)


# -- what to do after a restart ------------------------------------------------------------------------


class Resume(str, Enum):
    SERVE = "serve"  # nothing in progress
    SERVE_FALLBACK = "serve_fallback"  # the committed version keeps killing the agent: try an older kept one
    CONTINUE_DOWNLOAD = "continue_download"
    REVERIFY = "reverify"
    CONTINUE_WARMUP = "continue_warmup"
    ROLL_BACK = "roll_back"
    FINISH_ROLLBACK = "finish_rollback"
    ABANDON = "abandon"  # restart loop inside an operation: give it up, report it


RESUME_TABLE: Mapping[State, Resume] = {
    State.IDLE: Resume.SERVE,
    State.DOWNLOADING: Resume.CONTINUE_DOWNLOAD,
    State.VERIFYING: Resume.REVERIFY,
    State.STAGED: Resume.CONTINUE_WARMUP,
    State.WARMING: Resume.ROLL_BACK,
    State.PROBATION: Resume.ROLL_BACK,
    State.ROLLING_BACK: Resume.FINISH_ROLLBACK,
}

#: On a restart loop, what replaces each action (rolling back is already the safe choice).
LOOP_TABLE: Mapping[Resume, Resume] = {
    Resume.SERVE: Resume.SERVE_FALLBACK,
    Resume.CONTINUE_DOWNLOAD: Resume.ABANDON,
    Resume.REVERIFY: Resume.ABANDON,
    Resume.CONTINUE_WARMUP: Resume.ABANDON,
    Resume.ROLL_BACK: Resume.ROLL_BACK,
    Resume.FINISH_ROLLBACK: Resume.ABANDON,
}


def resume_action(record: JournalRecord, *, restart_limit: int = DEFAULT_RESTART_LIMIT) -> Resume:
    """What to do with a record read at start (before ``attempts`` is incremented for this start)."""
    action = RESUME_TABLE[record.state]
    if record.attempts >= restart_limit:
        return LOOP_TABLE[action]
    return action


# -- the replay floor after a lost journal ------------------------------------------------------------------


def recover_replay_floor(record: JournalRecord, *others: int | None) -> JournalRecord:
    """The record with ``last_seq`` raised to the highest seq any independent record vouches for.

    The journal's two slots can both be lost (power cut, disk corruption); a record rebuilt from
    the store then says ``last_seq=0`` and every old, validly signed command (a replayed
    ``rollback``) would be obeyed again. The shell keeps other records of the floor (the
    ``seq.floor`` file, the seq of the last accepted desired state); the floor only ever moves up,
    so the highest of them is safe: at worst a message the agent never saw is refused as a replay,
    and the server's next re-signed message (a fresh seq) is accepted.
    """
    floor = max([record.last_seq, *(s for s in others if s is not None)])
    return record if floor == record.last_seq else replace(record, last_seq=floor)
