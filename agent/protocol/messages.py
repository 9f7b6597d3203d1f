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

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar

from agent.errors import MalformedMessageError, MessageTooLargeError, UnsupportedVersionError

SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1

#: Byte caps applied before parsing, by message type.
LIMITS: Mapping[str, int] = {
    "desired": 256 * 1024,
    "command": 16 * 1024,
    "state": 16 * 1024,
    "telemetry": 16 * 1024,
    "event": 32 * 1024,
    "chunk_request": 16 * 1024,
    "enroll": 8 * 1024,
}
#: Largest control message of any type (the signed wrapper of a desired state adds base64 overhead).
MAX_CONTROL_MESSAGE = 512 * 1024
MAX_RANGES = 1024
MAX_GOLDEN_CASES = 8

Json = dict[str, Any]
T = TypeVar("T")


# -- field readers: every decoder goes through these, so errors name the field ---------------------


def _get(d: Mapping[str, Any], key: str, kind: type[T], *, optional: bool = False) -> T:
    if key not in d or d[key] is None:
        if optional:
            return None  # type: ignore[return-value]  # callers pass optional=True only for "T | None" fields
        raise MalformedMessageError(f"missing field {key!r}", field=key)
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool):
        raise MalformedMessageError(f"field {key!r} must be an integer", field=key)
    if not isinstance(value, kind):
        raise MalformedMessageError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}", field=key)
    return value


def _get_int(d: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = _get(d, key, int)
    if not lo <= value <= hi:
        raise MalformedMessageError(f"field {key!r}={value} outside [{lo}, {hi}]", field=key)
    return value


def _get_opt_int(d: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int | None:
    if d.get(key) is None:
        return None
    return _get_int(d, key, lo=lo, hi=hi)


def _get_str(d: Mapping[str, Any], key: str, *, max_len: int = 256, optional: bool = False) -> str:
    value = _get(d, key, str, optional=optional)
    if value is not None and len(value) > max_len:
        raise MalformedMessageError(f"field {key!r} longer than {max_len} characters", field=key)
    return value


def _get_choice(d: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _get_str(d, key)
    if value not in choices:
        raise MalformedMessageError(f"field {key!r}={value!r} is not one of {', '.join(choices)}", field=key)
    return value


def _get_b64(d: Mapping[str, Any], key: str, *, size: int | None = None, max_size: int = 1 << 20) -> bytes:
    text = _get_str(d, key, max_len=(max_size * 4) // 3 + 8)
    raw = strict_b64decode(text)
    if raw is None:
        raise MalformedMessageError(f"field {key!r} is not canonical base64", field=key)
    if size is not None and len(raw) != size:
        raise MalformedMessageError(f"field {key!r} must decode to {size} bytes, got {len(raw)}", field=key)
    return raw


def _get_obj(d: Mapping[str, Any], key: str, *, optional: bool = False) -> Json:
    return _get(d, key, dict, optional=optional)


def strict_b64decode(text: str) -> bytes | None:
    """Standard base64 with padding, rejecting non-canonical encodings (set padding bits, whitespace).

    Without the re-encode check, flipping an unused padding bit would give a *different* string that
    decodes to the same bytes; we want every bit of a signed message to matter.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _extra(d: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


def _known(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


def _clean(d: Json) -> Json:
    """Drop None values so optional fields are simply absent on the wire."""
    return {k: v for k, v in d.items() if v is not None}


# -- envelope of every message -------------------------------------------------------------------


def load_json(payload: bytes, *, what: str, limit: int = MAX_CONTROL_MESSAGE) -> Json:
    """Size-capped JSON object parse with the schema-major check."""
    if len(payload) > limit:
        raise MessageTooLargeError(what, len(payload), limit)
    try:
        obj = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise MalformedMessageError(f"{what}: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise MalformedMessageError(f"{what}: expected a JSON object")
    check_schema(obj, what=what)
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def check_schema(obj: Mapping[str, Any], *, what: str) -> None:
    schema = obj.get("schema")
    if not isinstance(schema, str):
        raise MalformedMessageError(f"{what}: missing field 'schema'", field="schema")
    major, _, minor = schema.partition(".")
    if not major.isdigit() or (minor and not minor.isdigit()):
        raise MalformedMessageError(f"{what}: schema {schema!r} is not MAJOR.MINOR", field="schema")
    if int(major) != SCHEMA_MAJOR:
        raise UnsupportedVersionError(what, schema, SCHEMA_VERSION)


def dump_json(obj: Json) -> bytes:
    """Canonical encoding: sorted keys, no whitespace (what signatures are computed over)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _expect_type(obj: Mapping[str, Any], expected: str) -> None:
    got = obj.get("type")
    if got != expected:
        raise MalformedMessageError(f"expected a {expected!r} message, got type {got!r}", field="type")


# -- building blocks ------------------------------------------------------------------------------

Dtype = Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
DTYPES: tuple[str, ...] = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
#: ONNX Runtime's tensor type names -> the dtype names above (plus the unsigned ones a model may declare
#: locally); the agent's ONNX Runtime backend and the server's build pipeline both read this one table.
ONNX_DTYPES: Mapping[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
MAX_RANK = 8


def _get_shape(d: Mapping[str, Any], key: str) -> tuple[int, ...]:
    raw = _get(d, key, list)
    if len(raw) > MAX_RANK:
        raise MalformedMessageError(f"field {key!r} has rank over {MAX_RANK}", field=key)
    shape: list[int] = []
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < -1 or dim > 2**31:
            raise MalformedMessageError(f"field {key!r}: dimensions are integers >= -1 (-1 = dynamic)", field=key)
        shape.append(dim)
    return tuple(shape)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one model input or output; -1 marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> Json:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(_get_str(d, "name"), _get_choice(d, "dtype", DTYPES), _get_shape(d, "shape"))


@dataclass(frozen=True)
class TensorData:
    """A concrete tensor: little-endian, C-order raw bytes of ``dtype`` with ``shape``."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_dict(self) -> Json:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": b64(self.data)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorData:
        return cls(_get_choice(d, "dtype", DTYPES), _get_shape(d, "shape"), _get_b64(d, "data", max_size=64 * 1024))


def _tensor_map(d: Mapping[str, Any], key: str) -> dict[str, TensorData]:
    raw = _get_obj(d, key)
    if len(raw) > 64:
        raise MalformedMessageError(f"field {key!r} has too many tensors", field=key)
    out: dict[str, TensorData] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise MalformedMessageError(f"field {key!r}.{name} must be a tensor object", field=key)
        out[name] = TensorData.from_dict(value)
    return out


@dataclass(frozen=True)
class GoldenCase:
    """An input with the outputs the server measured for it; the device must reproduce them."""

    inputs: Mapping[str, TensorData]
    outputs: Mapping[str, TensorData]
    atol: float = 1e-3
    rtol: float = 1e-2

    def to_dict(self) -> Json:
        return {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "atol": self.atol,
            "rtol": self.rtol,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GoldenCase:
        return cls(_tensor_map(d, "inputs"), _tensor_map(d, "outputs"), _get(d, "atol", float), _get(d, "rtol", float))


@dataclass(frozen=True)
class HealthSpec:
    """What the agent checks before switching (warm-up) and after (probation)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latency_budget_ms: float
    probation_s: float = 60.0
    probation_min_requests: int = 0
    max_error_rate: float = 0.01
    max_latency_regression: float = 1.5
    warmup_runs: int = 3
    golden: tuple[GoldenCase, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Json:
        return {
            **self.extra,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "latency_budget_ms": self.latency_budget_ms,
            "probation_s": self.probation_s,
            "probation_min_requests": self.probation_min_requests,
            "max_error_rate": self.max_error_rate,
            "max_latency_regression": self.max_latency_regression,
            "warmup_runs": self.warmup_runs,
            "golden": [g.to_dict() for g in self.golden],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HealthSpec:
        golden = _get(d, "golden", list)
        if len(golden) > MAX_GOLDEN_CASES:
            raise MalformedMessageError(f"at most {MAX_GOLDEN_CASES} golden cases", field="golden")
        ins, outs = _get(d, "inputs", list), _get(d, "outputs", list)
        if len(ins) > 64 or len(outs) > 64:
            raise MalformedMessageError("at most 64 inputs and 64 outputs", field="inputs")
        return cls(
            inputs=tuple(TensorSpec.from_dict(_as_obj(t, "inputs")) for t in ins),
            outputs=tuple(TensorSpec.from_dict(_as_obj(t, "outputs")) for t in outs),
            latency_budget_ms=_get(d, "latency_budget_ms", float),
            probation_s=_get(d, "probation_s", float),
            probation_min_requests=_get_int(d, "probation_min_requests"),
            max_error_rate=_get(d, "max_error_rate", float),
            max_latency_regression=_get(d, "max_latency_regression", float),
            warmup_runs=_get_int(d, "warmup_runs", hi=1000),
            golden=tuple(GoldenCase.from_dict(_as_obj(g, "golden")) for g in golden),
            extra=_extra(d, _known(cls)),
        )


def _as_obj(value: Any, key: str) -> Json:
    if not isinstance(value, dict):
        raise MalformedMessageError(f"items of {key!r} must be objects", field=key)
    return value


@dataclass(frozen=True)
class RuntimeSpec:
    """What the device needs to run the artifact."""

    format: str  # "onnx" | "tflite"
    runtime: str  # "onnxruntime" | "litert"
    min_version: str = "0"
    execution_providers: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Json:
        return {
            **self.extra,
            "format": self.format,
            "runtime": self.runtime,
            "min_version": self.min_version,
            "execution_providers": list(self.execution_providers),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeSpec:
        providers = _get(d, "execution_providers", list)
        if len(providers) > 16 or not all(isinstance(p, str) and len(p) <= 64 for p in providers):
            raise MalformedMessageError(
                "execution_providers must be up to 16 short strings", field="execution_providers"
            )
        return cls(
            format=_get_choice(d, "format", ("onnx", "tflite")),
            runtime=_get_choice(d, "runtime", ("onnxruntime", "litert")),
            min_version=_get_str(d, "min_version", max_len=32),
            execution_providers=tuple(providers),
            extra=_extra(d, _known(cls)),
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
        return _clean(
            {
                **self.extra,
                "artifact_id": self.artifact_id,
                "size": self.size,
                "sha256": self.sha256,
                "compression": self.compression,
                "compressed_size": self.compressed_size,
                "compressed_sha256": self.compressed_sha256,
                "chunk_size": self.chunk_size,
                "chunk_count": self.chunk_count,
                "topic": self.topic,
            }
        )

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


#: A model name, on the server and on every device (it becomes a directory name in the agent's store):
#: 1-64 ASCII letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit, and no ``..``.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def model_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a model name (None when it can): the one rule server and agent share."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        return (f"model name {name!r}: 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter "
                "or digit, no '..'")
    return None


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
        return _clean(
            {
                **self.extra,
                "schema": SCHEMA_VERSION,
                "type": "desired",
                "device_id": self.device_id,
                "seq": self.seq,
                "issued_at": self.issued_at,
                "expires_at": self.expires_at,
                "action": self.action,
                "model": self.model.to_dict(),
                "deployment_id": self.deployment_id,
                "artifact": self.artifact.to_dict() if self.artifact else None,
                "key": self.key.to_dict() if self.key else None,
                "runtime": self.runtime.to_dict() if self.runtime else None,
                "health": self.health.to_dict() if self.health else None,
                "variant": self.variant,
            }
        )

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


COMMAND_ACTIONS = ("rollback", "activate", "purge", "ping")


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
        return _clean(
            {
                **self.extra,
                "schema": SCHEMA_VERSION,
                "type": "command",
                "device_id": self.device_id,
                "seq": self.seq,
                "issued_at": self.issued_at,
                "expires_at": self.expires_at,
                "command_id": self.command_id,
                "action": self.action,
                "model": self.model,
                "version": self.version,
                "args": dict(self.args),
            }
        )

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
        return _clean(
            {
                "name": self.name,
                "version": self.version,
                "state": self.state,
                "artifact_id": self.artifact_id,
                "variant": self.variant,
            }
        )

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
        return _clean(
            {
                **self.extra,
                "schema": SCHEMA_VERSION,
                "type": "state",
                "device_id": self.device_id,
                "online": self.online,
                "session": self.session,
                "ts": self.ts,
                "lifecycle": self.lifecycle,
                "active": self.active.to_dict() if self.active else None,
                "target": self.target.to_dict() if self.target else None,
                "kept": list(self.kept),
                "last_seq": self.last_seq,
                "desired_expires_at": self.desired_expires_at,
                "profile": self.profile,
                "arch": self.arch,
                "agent_version": self.agent_version,
                "public_key": self.public_key,
            }
        )

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
        return _clean(
            {
                **self.extra,
                "schema": SCHEMA_VERSION,
                "type": "telemetry",
                "device_id": self.device_id,
                "ts": self.ts,
                "window_s": self.window_s,
                "cpu_percent": self.cpu_percent,
                "memory_percent": self.memory_percent,
                "rss_bytes": self.rss_bytes,
                "disk_free_bytes": self.disk_free_bytes,
                "requests": self.requests,
                "errors": self.errors,
                "latency_ms": dict(self.latency_ms),
                "temperature_c": self.temperature_c,
                "model": self.model.to_dict() if self.model else None,
                "lifecycle": self.lifecycle,
                "arch": self.arch,
            }
        )

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
        return _clean(
            {
                **self.extra,
                "schema": SCHEMA_VERSION,
                "type": "event",
                "device_id": self.device_id,
                "ts": self.ts,
                "event_id": self.event_id,
                "kind": self.kind,
                "severity": self.severity,
                "message": self.message,
                "code": self.code,
                "deployment_id": self.deployment_id,
                "model": self.model.to_dict() if self.model else None,
                "command_id": self.command_id,
                "data": dict(self.data),
            }
        )

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
        return _clean(
            {
                **self.extra,
                "schema": SCHEMA_VERSION,
                "type": "enroll",
                "device_id": self.device_id,
                "public_key": b64(self.public_key),
                "profile": self.profile,
                "ts": self.ts,
                "agent_version": self.agent_version,
                "arch": self.arch,
                "hostname": self.hostname,
            }
        )

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

UpMessage = StateReport | Telemetry | Event | ChunkRequest | EnrollRequest
_UP_TYPES: Mapping[str, type[UpMessage]] = {
    "state": StateReport,
    "telemetry": Telemetry,
    "event": Event,
    "chunk_request": ChunkRequest,
    "enroll": EnrollRequest,
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
