"""Message types and their versioned JSON codecs (the chunk is binary: see envelope.py).

Every control message is one UTF-8 JSON object with two header fields:

    {"schema": "1.0", "type": "<message type>", ...fields...}

Rules that every decoder here follows, in this order:
  1. cap the payload size *before* parsing (per type, see LIMITS);
  2. parse JSON; anything that is not an object is MalformedMessageError;
  3. ``schema`` major must be SCHEMA_MAJOR (UnsupportedVersionError otherwise); any minor is accepted;
  4. known fields are type-checked; unknown fields are kept in ``extra`` and written back on encode,
     so a newer peer's additions survive a round trip through an older one.

Binary values (keys, tensors) are standard base64 strings. Times are float seconds since
the Unix epoch. Integers are JSON integers (never floats, never booleans).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.errors import MalformedMessageError
from agent.protocol.fields import (
    LIMITS,
    MAX_CONTROL_MESSAGE,
    MAX_GOLDEN_CASES,
    MAX_RANGES,
    MODEL_NAME_PATTERN,
    SCHEMA_MAJOR,
    SCHEMA_VERSION,
    Json,
    _clean,
    _expect_type,
    _extra,
    _get,
    _get_b64,
    _get_choice,
    _get_int,
    _get_obj,
    _get_opt_int,
    _get_str,
    _known,
    b64,
    check_schema,
    dump_json,
    field_dict,
    load_json,
    model_name_problem,
    strict_b64decode,
    wire_dict,
)
from agent.protocol.measurement import MEASUREMENT_SOURCES, Measurement
from agent.protocol.specs import (
    DTYPES,
    MAX_RANK,
    ONNX_DTYPES,
    Dtype,
    GoldenCase,
    HealthSpec,
    RuntimeSpec,
    TensorData,
    TensorSpec,
)

COMPRESSIONS = ("none", "zlib", "lzma")


@dataclass(frozen=True)
class ArtifactInfo:
    """The sealed artifact: what was chunked and how to check it after decryption.

    ``compressed_*`` describe the byte stream that is split into chunks (the model after
    compression); ``size``/``sha256`` describe the model file after decompression.
    """

    artifact_id: str
    size: int
    sha256: str
    compression: str
    compressed_size: int
    compressed_sha256: str
    chunk_size: int
    chunk_count: int
    topic: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Json:
        return _clean({**self.extra, **field_dict(self)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArtifactInfo:
        info = cls(
            artifact_id=_get_hex(d, "artifact_id", 16),
            size=_get_int(d, "size", lo=1, hi=1 << 40),
            sha256=_get_hex(d, "sha256", 32),
            compression=_get_choice(d, "compression", COMPRESSIONS),
            compressed_size=_get_int(d, "compressed_size", lo=1, hi=1 << 40),
            compressed_sha256=_get_hex(d, "compressed_sha256", 32),
            chunk_size=_get_int(d, "chunk_size", lo=1024, hi=1 << 20),
            chunk_count=_get_int(d, "chunk_count", lo=1, hi=1 << 20),
            topic=_get_str(d, "topic", optional=True),
            extra=_extra(d, _known(cls)),
        )
        expected = -(-info.compressed_size // info.chunk_size)
        if info.chunk_count != expected:
            raise MalformedMessageError(
                f"chunk_count {info.chunk_count} does not match compressed_size/chunk_size ({expected})",
                field="chunk_count",
            )
        return info


def _get_hex(d: Mapping[str, Any], key: str, nbytes: int) -> str:
    value = _get_str(d, key, max_len=nbytes * 2)
    if len(value) != nbytes * 2 or any(c not in "0123456789abcdef" for c in value):
        raise MalformedMessageError(f"field {key!r} must be {nbytes * 2} lowercase hex digits", field=key)
    return value


WRAP_ALGORITHM = "X25519-HKDF-SHA256-A256GCM"


@dataclass(frozen=True)
class WrappedKey:
    """The artifact's data key, encrypted to one device's X25519 public key."""

    epk: bytes  # ephemeral X25519 public key, 32 bytes
    ciphertext: bytes  # AES-256-GCM(data key) with tag, 48 bytes
    alg: str = WRAP_ALGORITHM

    def to_dict(self) -> Json:
        return {"alg": self.alg, "epk": b64(self.epk), "ct": b64(self.ciphertext)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WrappedKey:
        return cls(
            alg=_get_choice(d, "alg", (WRAP_ALGORITHM,)),
            epk=_get_b64(d, "epk", size=32),
            ciphertext=_get_b64(d, "ct", size=48),
        )


def validate_model_name(name: str) -> str:
    problem = model_name_problem(name)
    if problem is not None:
        raise MalformedMessageError(problem, field="name")
    return name


@dataclass(frozen=True)
class ModelRef:
    """A model version. The name is checked on construction, so a ModelRef is always safe in a path."""

    name: str
    version: int

    def __post_init__(self) -> None:
        validate_model_name(self.name)

    def to_dict(self) -> Json:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelRef:
        name = validate_model_name(_get_str(d, "name", max_len=64))
        return cls(name, _get_int(d, "version", lo=0, hi=2**31))


# -- signed payloads (server -> device) ----------------------------------------------------------

DESIRED_ACTIONS = ("deploy", "pin")


@dataclass(frozen=True)
class DesiredState:
    """What the server wants a device to run; retained on the device's down/desired topic.

    ``action="deploy"``: fetch ``artifact`` (decrypt with ``key``), check it, swap it in.
    ``action="pin"``: switch to the already-kept ``model`` version, no download. A pin may go
    backwards: it is the retained form of a signed rollback, so an offline device converges.
    """

    device_id: str
    seq: int
    issued_at: float
    expires_at: float
    action: str
    model: ModelRef
    deployment_id: str | None = None
    artifact: ArtifactInfo | None = None
    key: WrappedKey | None = None
    runtime: RuntimeSpec | None = None
    health: HealthSpec | None = None
    variant: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "desired"

    def to_dict(self) -> Json:
        return wire_dict(self, "desired")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DesiredState:
        _expect_type(d, "desired")
        action = _get_choice(d, "action", DESIRED_ACTIONS)
        artifact = _get_obj(d, "artifact", optional=True)
        key = _get_obj(d, "key", optional=True)
        runtime = _get_obj(d, "runtime", optional=True)
        health = _get_obj(d, "health", optional=True)
        if action == "deploy" and (artifact is None or key is None or runtime is None or health is None):
            raise MalformedMessageError("a deploy needs artifact, key, runtime and health", field="action")
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            seq=_get_int(d, "seq", lo=1),
            issued_at=_get(d, "issued_at", float),
            expires_at=_get(d, "expires_at", float),
            action=action,
            model=ModelRef.from_dict(_get_obj(d, "model")),
            deployment_id=_get_str(d, "deployment_id", max_len=64, optional=True),
            artifact=ArtifactInfo.from_dict(artifact) if artifact is not None else None,
            key=WrappedKey.from_dict(key) if key is not None else None,
            runtime=RuntimeSpec.from_dict(runtime) if runtime is not None else None,
            health=HealthSpec.from_dict(health) if health is not None else None,
            variant=_get_str(d, "variant", max_len=64, optional=True),
            extra=_extra(d, _known(cls) | {"schema"}),
        )


COMMAND_ACTIONS = ("rollback", "activate", "purge", "ping", "probe")


@dataclass(frozen=True)
class Command:
    """A one-shot signed instruction. ``rollback`` with no version means "the previous kept one"."""

    device_id: str
    seq: int
    issued_at: float
    expires_at: float
    command_id: str
    action: str
    model: str | None = None
    version: int | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "command"

    def to_dict(self) -> Json:
        return wire_dict(self, "command")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Command:
        _expect_type(d, "command")
        action = _get_choice(d, "action", COMMAND_ACTIONS)
        version = _get_opt_int(d, "version", hi=2**31)
        if action == "activate" and version is None:
            raise MalformedMessageError("activate needs a version", field="version")
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            seq=_get_int(d, "seq", lo=1),
            issued_at=_get(d, "issued_at", float),
            expires_at=_get(d, "expires_at", float),
            command_id=_get_str(d, "command_id", max_len=64),
            action=action,
            model=_get_str(d, "model", max_len=64, optional=True),
            version=version,
            args=_get_obj(d, "args", optional=True) or {},
            extra=_extra(d, _known(cls) | {"schema"}),
        )


# -- device -> server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveModel:
    name: str
    version: int
    state: str  # "committed" | "probation"
    artifact_id: str | None = None
    variant: str | None = None

    def to_dict(self) -> Json:
        return _clean(field_dict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActiveModel:
        return cls(
            name=_get_str(d, "name", max_len=64),
            version=_get_int(d, "version", hi=2**31),
            state=_get_str(d, "state", max_len=32),
            artifact_id=_get_str(d, "artifact_id", max_len=32, optional=True),
            variant=_get_str(d, "variant", max_len=64, optional=True),
        )


@dataclass(frozen=True)
class StateReport:
    """Retained on up/state: the birth message, the Last Will (online=False) and every state change.

    ``session`` grows by one per connection (Sparkplug's bdSeq): a Will from an older session
    that the broker delivers late must not mark a newer, live session offline.
    """

    device_id: str
    online: bool
    session: int
    ts: float
    lifecycle: str | None = None
    active: ActiveModel | None = None
    target: ModelRef | None = None
    kept: tuple[int, ...] = ()
    last_seq: int | None = None
    desired_expires_at: float | None = None
    profile: str | None = None
    arch: str | None = None
    agent_version: str | None = None
    public_key: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "state"

    def to_dict(self) -> Json:
        return wire_dict(self, "state")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StateReport:
        _expect_type(d, "state")
        active = _get_obj(d, "active", optional=True)
        target = _get_obj(d, "target", optional=True)
        kept = d.get("kept") or []
        if (
            not isinstance(kept, list)
            or len(kept) > 64
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in kept)
        ):
            raise MalformedMessageError("kept must be a list of up to 64 integers", field="kept")
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            online=_get(d, "online", bool),
            session=_get_int(d, "session"),
            ts=_get(d, "ts", float),
            lifecycle=_get_str(d, "lifecycle", max_len=32, optional=True),
            active=ActiveModel.from_dict(active) if active is not None else None,
            target=ModelRef.from_dict(target) if target is not None else None,
            kept=tuple(kept),
            last_seq=_get_opt_int(d, "last_seq"),
            desired_expires_at=_get(d, "desired_expires_at", float, optional=True),
            profile=_get_str(d, "profile", max_len=64, optional=True),
            arch=_get_str(d, "arch", max_len=32, optional=True),
            agent_version=_get_str(d, "agent_version", max_len=32, optional=True),
            public_key=_get_str(d, "public_key", max_len=64, optional=True),
            extra=_extra(d, _known(cls) | {"schema"}),
        )


@dataclass(frozen=True)
class Telemetry:
    device_id: str
    ts: float
    window_s: float
    cpu_percent: float
    memory_percent: float
    rss_bytes: int
    disk_free_bytes: int
    requests: int
    errors: int
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # p50, p95, p99
    temperature_c: float | None = None
    model: ActiveModel | None = None
    lifecycle: str | None = None
    arch: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "telemetry"

    def to_dict(self) -> Json:
        return wire_dict(self, "telemetry")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Telemetry:
        _expect_type(d, "telemetry")
        latency = _get_obj(d, "latency_ms")
        if len(latency) > 16 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in latency.values()
        ):
            raise MalformedMessageError("latency_ms must map up to 16 names to numbers", field="latency_ms")
        model = _get_obj(d, "model", optional=True)
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            ts=_get(d, "ts", float),
            window_s=_get(d, "window_s", float),
            cpu_percent=_get(d, "cpu_percent", float),
            memory_percent=_get(d, "memory_percent", float),
            rss_bytes=_get_int(d, "rss_bytes"),
            disk_free_bytes=_get_int(d, "disk_free_bytes"),
            requests=_get_int(d, "requests"),
            errors=_get_int(d, "errors"),
            latency_ms={k: float(v) for k, v in latency.items()},
            temperature_c=_get(d, "temperature_c", float, optional=True),
            model=ActiveModel.from_dict(model) if model is not None else None,
            lifecycle=_get_str(d, "lifecycle", max_len=32, optional=True),
            arch=_get_str(d, "arch", max_len=32, optional=True),
            extra=_extra(d, _known(cls) | {"schema"}),
        )


SEVERITIES = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Event:
    """Something that happened on a device: a lifecycle step, download progress, an error, a command result.

    ``kind`` is a dotted name (``lifecycle.committed``, ``download.progress``, ``rollback.automatic``,
    ``command.result``, ``error.replay``...); ``code`` is the EdgeError code for errors.
    """

    device_id: str
    ts: float
    event_id: str
    kind: str
    severity: str = "info"
    message: str = ""
    code: str | None = None
    deployment_id: str | None = None
    model: ModelRef | None = None
    command_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "event"

    def to_dict(self) -> Json:
        return wire_dict(self, "event")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        _expect_type(d, "event")
        model = _get_obj(d, "model", optional=True)
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            ts=_get(d, "ts", float),
            event_id=_get_str(d, "event_id", max_len=64),
            kind=_get_str(d, "kind", max_len=64),
            severity=_get_choice(d, "severity", SEVERITIES),
            message=_get_str(d, "message", max_len=4096),
            code=_get_str(d, "code", max_len=64, optional=True),
            deployment_id=_get_str(d, "deployment_id", max_len=64, optional=True),
            model=ModelRef.from_dict(model) if model is not None else None,
            command_id=_get_str(d, "command_id", max_len=64, optional=True),
            data=_get_obj(d, "data", optional=True) or {},
            extra=_extra(d, _known(cls) | {"schema"}),
        )


@dataclass(frozen=True)
class ChunkRequest:
    """Ask for the chunks in ``ranges`` (half-open [start, end) index pairs) of an artifact."""

    device_id: str
    artifact_id: str
    ranges: tuple[tuple[int, int], ...]
    ts: float
    reason: str = "missing"
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "chunk_request"

    def to_dict(self) -> Json:
        return {
            **self.extra,
            "schema": SCHEMA_VERSION,
            "type": "chunk_request",
            "device_id": self.device_id,
            "artifact_id": self.artifact_id,
            "ranges": [list(r) for r in self.ranges],
            "ts": self.ts,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChunkRequest:
        _expect_type(d, "chunk_request")
        raw = _get(d, "ranges", list)
        if len(raw) > MAX_RANGES:
            raise MalformedMessageError(f"at most {MAX_RANGES} ranges", field="ranges")
        ranges: list[tuple[int, int]] = []
        for r in raw:
            if (
                not isinstance(r, list)
                or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not 0 <= r[0] < r[1] <= 1 << 20
            ):
                raise MalformedMessageError("each range is [start, end) with 0 <= start < end <= 2^20", field="ranges")
            ranges.append((r[0], r[1]))
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            artifact_id=_get_hex(d, "artifact_id", 16),
            ranges=tuple(ranges),
            ts=_get(d, "ts", float),
            reason=_get_str(d, "reason", max_len=32),
            extra=_extra(d, _known(cls) | {"schema"}),
        )


@dataclass(frozen=True)
class EnrollRequest:
    """A device asking to join: the operator approves it by the public key's fingerprint."""

    device_id: str
    public_key: bytes  # X25519, 32 bytes
    profile: str
    ts: float
    agent_version: str | None = None
    arch: str | None = None
    hostname: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "enroll"

    def to_dict(self) -> Json:
        return wire_dict(self, "enroll")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnrollRequest:
        _expect_type(d, "enroll")
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            public_key=_get_b64(d, "public_key", size=32),
            profile=_get_str(d, "profile", max_len=64),
            ts=_get(d, "ts", float),
            agent_version=_get_str(d, "agent_version", max_len=32, optional=True),
            arch=_get_str(d, "arch", max_len=32, optional=True),
            hostname=_get_str(d, "hostname", max_len=255, optional=True),
            extra=_extra(d, _known(cls) | {"schema"}),
        )


# -- codec entry points ----------------------------------------------------------------------------

UpMessage = StateReport | Telemetry | Event | ChunkRequest | EnrollRequest | Measurement
_UP_TYPES: Mapping[str, type[UpMessage]] = {
    "state": StateReport,
    "telemetry": Telemetry,
    "event": Event,
    "chunk_request": ChunkRequest,
    "enroll": EnrollRequest,
    "measurement": Measurement,
}
Message = UpMessage | DesiredState | Command


def encode(message: Message) -> bytes:
    """Canonical JSON bytes of any control message."""
    return dump_json(message.to_dict())


def decode_up(payload: bytes, expected: str | None = None) -> UpMessage:
    """Decode a device -> server message; ``expected`` pins the type (from the topic)."""
    obj = load_json(payload, what=expected or "message", limit=LIMITS.get(expected or "", MAX_CONTROL_MESSAGE))
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _UP_TYPES:
        raise MalformedMessageError(f"unknown message type {kind!r}", field="type")
    if expected is not None and kind != expected:
        raise MalformedMessageError(f"expected a {expected!r} message, got {kind!r}", field="type")
    try:
        return _UP_TYPES[kind].from_dict(obj)
    except RecursionError as exc:  # pragma: no cover - json nesting is already bounded by the size cap
        raise MalformedMessageError("message nested too deeply") from exc


def decode_payload(payload: bytes, kind: Literal["desired", "command"]) -> DesiredState | Command:
    """Decode the JSON *inside* a verified signed envelope (see envelope.open_signed)."""
    obj = load_json(payload, what=kind, limit=LIMITS[kind])
    return DesiredState.from_dict(obj) if kind == "desired" else Command.from_dict(obj)


__all__ = [
    "COMMAND_ACTIONS",
    "COMPRESSIONS",
    "DESIRED_ACTIONS",
    "DTYPES",
    "LIMITS",
    "MAX_CONTROL_MESSAGE",
    "MAX_GOLDEN_CASES",
    "MAX_RANGES",
    "MAX_RANK",
    "MEASUREMENT_SOURCES",
    "MODEL_NAME_PATTERN",
    "ONNX_DTYPES",
    "SCHEMA_MAJOR",
    "SCHEMA_VERSION",
    "SEVERITIES",
    "WRAP_ALGORITHM",
    "ActiveModel",
    "ArtifactInfo",
    "ChunkRequest",
    "Command",
    "DesiredState",
    "Dtype",
    "EnrollRequest",
    "Event",
    "GoldenCase",
    "HealthSpec",
    "Json",
    "Measurement",
    "Message",
    "ModelRef",
    "RuntimeSpec",
    "StateReport",
    "Telemetry",
    "TensorData",
    "TensorSpec",
    "UpMessage",
    "WrappedKey",
    "b64",
    "check_schema",
    "decode_payload",
    "decode_up",
    "dump_json",
    "encode",
    "load_json",
    "model_name_problem",
    "strict_b64decode",
    "validate_model_name",
]
