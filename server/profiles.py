"""Device profiles: what a class of boards can run, loaded from ``firmware_profiles/*.toml``.

One TOML file per profile; the file name (without ``.toml``) is the profile id. Every field is
described in ``firmware_profiles/README.md``. Loading validates every field and raises
``ProfileError`` naming the file and the field, so a typo never silently changes a build.

The directory is found in this order: ``$EDGEFLEET_PROFILES``; ``firmware_profiles/`` of the source
checkout this module lives in; ``sys.prefix/share/edgefleet/firmware_profiles`` (installed wheel).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

PRECISIONS = ("fp32", "fp16", "int8")
FORMATS = ("onnx", "tflite")
RUNTIMES = ("onnxruntime", "litert")
#: Chunk sizes the envelope accepts (agent.protocol.envelope MIN/MAX_CHUNK_SIZE), in KiB.
CHUNK_KB_RANGE = (1, 1024)
MAX_PROFILE_FILE = 64 * 1024
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^\d+(\.\d+){0,3}$")

_REQUIRED = {
    "description": str,
    "arch": str,
    "cpu": str,
    "isa_features": list,
    "os": str,
    "python": str,
    "ram_mb": int,
    "storage_budget_mb": int,
    "max_artifact_mb": int,
    "mqtt_chunk_kb": int,
    "latency_budget_ms": (int, float),
    "allowed_precisions": list,
    "format_preference": list,
    "runtimes": list,
}
_OPTIONAL = {"gpu": str, "accelerator": str, "id": str}
_RUNTIME_FIELDS = {"name": str, "version": str, "max_opset": int, "execution_providers": list, "delegates": list}


@dataclass(frozen=True)
class RuntimeInfo:
    """One inference runtime installed on the device."""

    name: str  # onnxruntime | litert
    version: str
    max_opset: int | None = None  # highest ai.onnx opset the runtime loads (onnxruntime only)
    execution_providers: tuple[str, ...] = ()  # onnxruntime EPs in preference order
    delegates: tuple[str, ...] = ()  # LiteRT delegates (xnnpack, edgetpu, ...)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return version_tuple(self.version)


@dataclass(frozen=True)
class DeviceProfile:
    """A validated device profile. Sizes are bytes; ``chunk_size`` is the MQTT chunk payload size."""

    id: str
    description: str
    arch: str
    cpu: str
    isa_features: tuple[str, ...]
    os: str
    python: str
    ram_bytes: int
    storage_budget_bytes: int
    max_artifact_bytes: int
    chunk_size: int
    latency_budget_ms: float
    allowed_precisions: tuple[str, ...]
    format_preference: tuple[str, ...]
    runtimes: tuple[RuntimeInfo, ...]
    gpu: str | None = None
    accelerator: str | None = None
    source: Path | None = None

    def runtime(self, name: str) -> RuntimeInfo | None:
        return next((r for r in self.runtimes if r.name == name), None)

    def runtime_for_format(self, fmt: str) -> RuntimeInfo | None:
        return self.runtime("onnxruntime" if fmt == "onnx" else "litert") if fmt in self.format_preference else None

    @property
    def has_vnni(self) -> bool:
        return any(f in self.isa_features for f in ("avx512_vnni", "avx_vnni", "amx_int8"))

    @property
    def has_dotprod(self) -> bool:
        return "asimddp" in self.isa_features

    @property
    def fast_int8(self) -> bool:
        """Whether int8 GEMMs have a dedicated instruction here (VNNI / SDOT) or a GPU with int8 units."""
        return self.has_vnni or self.has_dotprod or (self.gpu is not None and "int8" in self.allowed_precisions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "description": self.description,
            "arch": self.arch,
            "cpu": self.cpu,
            "isa_features": list(self.isa_features),
            "gpu": self.gpu,
            "accelerator": self.accelerator,
            "os": self.os,
            "python": self.python,
            "ram_bytes": self.ram_bytes,
            "storage_budget_bytes": self.storage_budget_bytes,
            "max_artifact_bytes": self.max_artifact_bytes,
            "chunk_size": self.chunk_size,
            "latency_budget_ms": self.latency_budget_ms,
            "allowed_precisions": list(self.allowed_precisions),
            "format_preference": list(self.format_preference),
            "runtimes": [
                {
                    "name": r.name,
                    "version": r.version,
                    "max_opset": r.max_opset,
                    "execution_providers": list(r.execution_providers),
                    "delegates": list(r.delegates),
                }
                for r in self.runtimes
            ],
        }


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


# -- loading --------------------------------------------------------------------------------------


def profiles_dir() -> Path:
    env = os.environ.get("EDGEFLEET_PROFILES")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent / "firmware_profiles"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "edgefleet" / "firmware_profiles"


def _fail(path: Path, field: str | None, message: str) -> ProfileError:
    where = f"{path.name}: field {field!r}" if field else path.name
    return ProfileError(f"profile {where}: {message}", profile=path.stem, field=field)


def _typed(path: Path, data: Mapping[str, Any], key: str, kind: Any, prefix: str = "") -> Any:
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _fail(path, prefix + key, f"must be {names}, got {type(value).__name__}")
    return value


def _str_list(path: Path, value: list[Any], field: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v for v in value):
        raise _fail(path, field, "must be a list of non-empty strings")
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            raise _fail(path, field, f"unknown value(s) {', '.join(bad)} (allowed: {', '.join(allowed)})")
    if len(set(value)) != len(value):
        raise _fail(path, field, "has duplicates")
    return tuple(value)


def _positive(path: Path, value: float, field: str) -> None:
    if value <= 0:
        raise _fail(path, field, f"must be positive, got {value}")


def parse_profile(path: Path, data: Mapping[str, Any]) -> DeviceProfile:
    """Validate one profile's TOML table (``path`` names it in errors; its stem is the id)."""
    profile_id = path.stem
    if not _ID.match(profile_id):
        raise _fail(path, None, "file name must be a profile id: lowercase letters, digits, '.', '_' or '-'")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _fail(path, unknown[0], "unknown field (typo?); see firmware_profiles/README.md")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise _fail(path, key, "is required")
        _typed(path, data, key, kind)
    for key, kind in _OPTIONAL.items():
        if key in data:
            _typed(path, data, key, kind)
    if "id" in data and data["id"] != profile_id:
        raise _fail(path, "id", f"{data['id']!r} does not match the file name {profile_id!r}")
    for key in ("ram_mb", "storage_budget_mb", "max_artifact_mb", "mqtt_chunk_kb", "latency_budget_ms"):
        _positive(path, data[key], key)
    lo, hi = CHUNK_KB_RANGE
    if not lo <= data["mqtt_chunk_kb"] <= hi:
        raise _fail(path, "mqtt_chunk_kb", f"must be in [{lo}, {hi}] KiB (the envelope's chunk limits)")
    if data["max_artifact_mb"] > data["storage_budget_mb"]:
        raise _fail(path, "max_artifact_mb", "exceeds storage_budget_mb")
    precisions = _str_list(path, data["allowed_precisions"], "allowed_precisions", PRECISIONS)
    formats = _str_list(path, data["format_preference"], "format_preference", FORMATS)
    if not precisions:
        raise _fail(path, "allowed_precisions", "must not be empty")
    if not formats:
        raise _fail(path, "format_preference", "must not be empty")

    runtimes: list[RuntimeInfo] = []
    for n, raw in enumerate(data["runtimes"]):
        prefix = f"runtimes[{n}]."
        if not isinstance(raw, dict):
            raise _fail(path, f"runtimes[{n}]", "must be a table ([[runtimes]])")
        unknown = sorted(set(raw) - set(_RUNTIME_FIELDS))
        if unknown:
            raise _fail(path, prefix + unknown[0], "unknown field (typo?)")
        for key in ("name", "version"):
            if key not in raw:
                raise _fail(path, prefix + key, "is required")
        for key, kind in _RUNTIME_FIELDS.items():
            if key in raw:
                _typed(path, raw, key, kind, prefix)
        if raw["name"] not in RUNTIMES:
            raise _fail(path, prefix + "name", f"unknown runtime {raw['name']!r} (one of {', '.join(RUNTIMES)})")
        if not _VERSION.match(raw["version"]):
            raise _fail(path, prefix + "version", f"{raw['version']!r} is not a dotted version like 1.20.1")
        max_opset = raw.get("max_opset")
        if raw["name"] == "onnxruntime" and max_opset is None:
            raise _fail(path, prefix + "max_opset", "is required for onnxruntime")
        if max_opset is not None and not 7 <= max_opset <= 40:
            raise _fail(path, prefix + "max_opset", f"{max_opset} is not a plausible ONNX opset")
        providers = _str_list(path, raw.get("execution_providers", []), prefix + "execution_providers")
        if raw["name"] == "onnxruntime" and not providers:
            raise _fail(path, prefix + "execution_providers", "must list at least one provider")
        runtimes.append(
            RuntimeInfo(
                name=raw["name"],
                version=raw["version"],
                max_opset=max_opset,
                execution_providers=providers,
                delegates=_str_list(path, raw.get("delegates", []), prefix + "delegates"),
            )
        )
    names = [r.name for r in runtimes]
    if len(set(names)) != len(names):
        raise _fail(path, "runtimes", "lists a runtime twice")
    for fmt in formats:
        needed = "onnxruntime" if fmt == "onnx" else "litert"
        if needed not in names:
            raise _fail(path, "format_preference", f"prefers {fmt} but no {needed} runtime is listed")
    return DeviceProfile(
        id=profile_id,
        description=data["description"],
        arch=data["arch"],
        cpu=data["cpu"],
        isa_features=_str_list(path, data["isa_features"], "isa_features"),
        os=data["os"],
        python=data["python"],
        ram_bytes=data["ram_mb"] * 1024 * 1024,
        storage_budget_bytes=data["storage_budget_mb"] * 1024 * 1024,
        max_artifact_bytes=data["max_artifact_mb"] * 1024 * 1024,
        chunk_size=data["mqtt_chunk_kb"] * 1024,
        latency_budget_ms=float(data["latency_budget_ms"]),
        allowed_precisions=precisions,
        format_preference=formats,
        runtimes=tuple(runtimes),
        gpu=data.get("gpu"),
        accelerator=data.get("accelerator"),
        source=path,
    )


def load_profile(path: Path) -> DeviceProfile:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(path, None, f"cannot read: {exc.strerror}") from exc
    if len(raw) > MAX_PROFILE_FILE:
        raise _fail(path, None, f"larger than {MAX_PROFILE_FILE} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(path, None, f"not valid TOML: {exc}") from exc
    return parse_profile(path, data)


def load_profiles(directory: Path | None = None) -> dict[str, DeviceProfile]:
    """Every ``*.toml`` in the directory, validated, by id (sorted)."""
    folder = directory or profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"profiles directory {folder} does not exist (set $EDGEFLEET_PROFILES)")
    profiles = [load_profile(p) for p in sorted(folder.glob("*.toml"))]
    if not profiles:
        raise ProfileError(f"no *.toml profiles in {folder}")
    return {p.id: p for p in profiles}


def get_profile(profile_id: str, directory: Path | None = None) -> DeviceProfile:
    profiles = load_profiles(directory)
    try:
        return profiles[profile_id]
    except KeyError:
        raise ProfileError(
            f"unknown profile {profile_id!r} (known: {', '.join(profiles)})", profile=profile_id
        ) from None
