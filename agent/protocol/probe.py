"""A probe: the ``args`` of a signed ``probe`` command (docs/protocol.md §3.3, §4.6).

The server asks a few devices to time every candidate variant of a build that passed the gate, off the
serving path: each variant is an encrypted artifact like a deployment's (``ArtifactInfo`` + the data key
wrapped to this device), fetched by ChunkRequest, held in memory (at most ``MAX_PROBE_BYTES`` each),
loaded in a side slot, benchmarked, reported as a ``measurement`` with ``source: "probe"`` and the
``probe_id``, then unloaded and forgotten. Probe artifacts are never installed or served.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import MalformedMessageError
from agent.protocol.fields import Json, _get, _get_obj, _get_str
from agent.protocol.messages import ArtifactInfo, HealthSpec, ModelRef, RuntimeSpec, WrappedKey

MAX_PROBE_VARIANTS = 12
#: the largest probe artifact a device holds in memory (models meant for boards are far smaller)
MAX_PROBE_BYTES = 256 << 20


@dataclass(frozen=True)
class ProbeVariant:
    variant: str
    artifact: ArtifactInfo
    key: WrappedKey
    runtime: RuntimeSpec

    def to_dict(self) -> Json:
        return {"variant": self.variant, "artifact": self.artifact.to_dict(), "key": self.key.to_dict(),
                "runtime": self.runtime.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeVariant:
        artifact = ArtifactInfo.from_dict(_get_obj(d, "artifact"))
        if artifact.size > MAX_PROBE_BYTES or artifact.compressed_size > MAX_PROBE_BYTES:
            raise MalformedMessageError(f"a probe artifact holds at most {MAX_PROBE_BYTES} bytes", field="artifact")
        return cls(
            variant=_get_str(d, "variant", max_len=64),
            artifact=artifact,
            key=WrappedKey.from_dict(_get_obj(d, "key")),
            runtime=RuntimeSpec.from_dict(_get_obj(d, "runtime")),
        )


@dataclass(frozen=True)
class ProbeRequest:
    probe_id: str
    model: ModelRef
    health: HealthSpec
    variants: tuple[ProbeVariant, ...]

    def to_args(self) -> Json:
        return {"probe": {"probe_id": self.probe_id, "model": self.model.to_dict(), "health": self.health.to_dict(),
                          "variants": [v.to_dict() for v in self.variants]}}

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ProbeRequest:
        d = _get_obj(args, "probe")
        raw = _get(d, "variants", list)
        if not 1 <= len(raw) <= MAX_PROBE_VARIANTS:
            raise MalformedMessageError(f"1 to {MAX_PROBE_VARIANTS} variants", field="variants")
        variants = tuple(ProbeVariant.from_dict(v) if isinstance(v, dict) else _not_object() for v in raw)
        if len({v.artifact.artifact_id for v in variants}) != len(variants):
            raise MalformedMessageError("a probe names each artifact once", field="variants")
        return cls(
            probe_id=_get_str(d, "probe_id", max_len=64),
            model=ModelRef.from_dict(_get_obj(d, "model")),
            health=HealthSpec.from_dict(_get_obj(d, "health")),
            variants=variants,
        )


def _not_object() -> ProbeVariant:
    raise MalformedMessageError("each variant is an object", field="variants")


__all__ = ["MAX_PROBE_BYTES", "MAX_PROBE_VARIANTS", "ProbeRequest", "ProbeVariant"]
