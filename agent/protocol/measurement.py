"""The device's own latency measurement of one installed (or probed) variant: the ``measurement`` message.

Sent on ``up/measure`` (docs/protocol.md §4.6): after warm-up (``source: "warmup"``), for a probe
artifact timed in a side slot (``"probe"``, with the ``probe_id`` of the command that asked), and at
commit with what probation's real traffic measured (``"service"``). Every number is bounded so a
device cannot poison the server's aggregates with NaN, negative or absurd figures; the whole message
is capped at 4 KiB before parsing (``fields.LIMITS``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import MalformedMessageError
from agent.protocol.fields import (
    Json,
    _expect_type,
    _extra,
    _get,
    _get_choice,
    _get_int,
    _get_opt_int,
    _get_str,
    _known,
    model_name_problem,
    wire_dict,
)

MEASUREMENT_SOURCES = ("warmup", "probe", "service")
#: the largest latency a device may report: an hour per run is a hung model, not a figure
MAX_LATENCY_MS = 3_600_000.0
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def _get_ms(d: Mapping[str, Any], key: str, *, optional: bool = False, hi: float = MAX_LATENCY_MS) -> float:
    value = _get(d, key, float, optional=optional)
    if value is not None and not (math.isfinite(value) and 0.0 <= value <= hi):
        raise MalformedMessageError(f"field {key!r}={value} outside [0, {hi:g}]", field=key)
    return value


@dataclass(frozen=True)
class Measurement:
    """p50/p95 of ``runs`` timed runs of one variant on this device, and the context that moves latency."""

    device_id: str
    ts: float
    model: str
    version: int
    source: str  # warmup | probe | service
    runs: int
    p50_ms: float
    p95_ms: float
    artifact_id: str | None = None
    variant: str | None = None
    probe_id: str | None = None
    min_ms: float | None = None
    peak_rss_bytes: int | None = None
    execution_provider: str | None = None
    governor: str | None = None
    cpu_mhz: float | None = None
    temperature_c: float | None = None
    load_avg: tuple[float, float, float] | None = None
    seconds: float | None = None  # wall time the benchmark took
    extra: Mapping[str, Any] = field(default_factory=dict)
    type: str = "measurement"

    def to_dict(self) -> Json:
        return wire_dict(self, "measurement")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        _expect_type(d, "measurement")
        model = _get_str(d, "model", max_len=64)
        problem = model_name_problem(model)
        if problem is not None:
            raise MalformedMessageError(problem, field="model")
        artifact_id = _get_str(d, "artifact_id", max_len=32, optional=True)
        if artifact_id is not None and not _HEX32.match(artifact_id):
            raise MalformedMessageError("field 'artifact_id' must be 32 lowercase hex digits", field="artifact_id")
        p50, p95 = _get_ms(d, "p50_ms"), _get_ms(d, "p95_ms")
        if p95 < p50:
            raise MalformedMessageError(f"p95_ms {p95} below p50_ms {p50}", field="p95_ms")
        load = d.get("load_avg")
        load_avg: tuple[float, float, float] | None = None
        if load is not None:
            if (
                not isinstance(load, list)
                or len(load) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in load)
                or not all(math.isfinite(v) and 0.0 <= v <= 1e6 for v in load)
            ):
                raise MalformedMessageError("load_avg must be three numbers in [0, 1e6]", field="load_avg")
            load_avg = (float(load[0]), float(load[1]), float(load[2]))
        temperature = _get(d, "temperature_c", float, optional=True)
        if temperature is not None and not (math.isfinite(temperature) and -100.0 <= temperature <= 300.0):
            raise MalformedMessageError(f"temperature_c={temperature} outside [-100, 300]", field="temperature_c")
        return cls(
            device_id=_get_str(d, "device_id", max_len=64),
            ts=_get(d, "ts", float),
            model=model,
            version=_get_int(d, "version", lo=0, hi=2**31),
            source=_get_choice(d, "source", MEASUREMENT_SOURCES),
            runs=_get_int(d, "runs", lo=1, hi=1_000_000),
            p50_ms=p50,
            p95_ms=p95,
            artifact_id=artifact_id,
            variant=_get_str(d, "variant", max_len=64, optional=True),
            probe_id=_get_str(d, "probe_id", max_len=64, optional=True),
            min_ms=_get_ms(d, "min_ms", optional=True),
            peak_rss_bytes=_get_opt_int(d, "peak_rss_bytes", hi=1 << 44),
            execution_provider=_get_str(d, "execution_provider", max_len=64, optional=True),
            governor=_get_str(d, "governor", max_len=32, optional=True),
            cpu_mhz=_get_ms(d, "cpu_mhz", optional=True, hi=100_000.0),
            temperature_c=temperature,
            load_avg=load_avg,
            seconds=_get_ms(d, "seconds", optional=True, hi=86_400.0),
            extra=_extra(d, _known(cls) | {"schema"}),
        )


__all__ = ["MAX_LATENCY_MS", "MEASUREMENT_SOURCES", "Measurement"]
