"""The field readers and the JSON envelope every message codec goes through (messages.py documents the rules).

Every decoder reads its fields through ``_get*`` so an error names the field; ``load_json`` caps the
size before parsing and ``check_schema`` checks the schema's major version.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

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
    "measurement": 4 * 1024,
}
#: Largest control message of any type (the signed wrapper of a desired state adds base64 overhead).
MAX_CONTROL_MESSAGE = 512 * 1024
MAX_RANGES = 1024
MAX_GOLDEN_CASES = 8

Json = dict[str, Any]
T = TypeVar("T")


#: A model name, on the server and on every device (it becomes a directory name in the agent's store):
#: 1-64 ASCII letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit, and no ``..``.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def model_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a model name (None when it can): the one rule server and agent share."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        return (f"model name {name!r}: 1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter "
                "or digit, no '..'")
    return None



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


def _wire_value(value: Any) -> Any:
    """One field's JSON form: a nested message by its ``to_dict``, tuples as lists, bytes as base64."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, bytes):
        return b64(value)
    if isinstance(value, tuple):
        return [_wire_value(v) for v in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value


def field_dict(obj: Any) -> Json:
    """A message dataclass's fields in declaration order as JSON values (``extra`` and ``type`` left out)."""
    return {f.name: _wire_value(getattr(obj, f.name)) for f in fields(obj) if f.name not in ("extra", "type")}


def wire_dict(message: Any, kind: str) -> Json:
    """The wire form of a top-level message: its ``extra`` keys, ``schema``, ``type`` = ``kind``, then every
    field (``field_dict``); None fields are absent."""
    return _clean({**message.extra, "schema": SCHEMA_VERSION, "type": kind, **field_dict(message)})


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
    if _SURROGATE_ESCAPE.search(payload):
        _refuse_lone_surrogates(obj, what=what)
    check_schema(obj, what=what)
    return obj


#: JSON may escape a UTF-16 surrogate (``\ud8c8``); Python decodes a lone one into a str that is not
#: Unicode text and cannot be encoded (SQLite, the terminal, any UTF-8 writer raises on it later)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(obj: Any, *, what: str) -> None:
    """Every string (keys too) must be Unicode text; paired surrogate escapes decode to one character."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise MalformedMessageError(
                    f"{what}: a string holds a lone surrogate (\\u{ord(value[exc.start]):04x}): not Unicode text"
                ) from exc
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


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
