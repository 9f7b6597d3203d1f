"""Device-measured latency, aggregated per profile: pure functions over ``registry.measurements`` rows.

Per profile, variant and kind (``bench``: the off-path benchmark after warm-up or of a probe artifact;
``service``: what real traffic measured during probation) the figures are: how many devices reported, the
median of their p50s, the median of their p95s, and the spread of their p50s ((max - min) / median, so 0.1
means the devices of one profile differ by 10 %). A profile whose median p95 exceeds its
``latency_budget_ms`` is flagged. ``measured_latency`` is what selection uses: per variant, the median p50
over the profile's devices, from benchmarks only (one method on every device, comparable across variants).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

BENCH_SOURCES = ("warmup", "probe")


class MeasuredRow(Protocol):
    @property
    def device_id(self) -> str: ...

    @property
    def profile(self) -> str: ...

    @property
    def variant(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def p50_ms(self) -> float: ...

    @property
    def p95_ms(self) -> float: ...


@dataclass(frozen=True)
class ProfileFigure:
    profile: str
    variant: str
    kind: str  # bench | service
    devices: int
    p50_ms: float  # median of the devices' p50
    p95_ms: float  # median of the devices' p95
    p50_min_ms: float
    p50_max_ms: float
    spread: float  # (max p50 - min p50) / median p50
    budget_ms: float | None = None
    over_budget: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kind(source: str) -> str:
    return "bench" if source in BENCH_SOURCES else "service"


def aggregate(rows: Iterable[MeasuredRow], budgets: Mapping[str, float] | None = None) -> list[ProfileFigure]:
    """One figure per (profile, variant, kind); a device counts once per group (its probe figure wins)."""
    groups: dict[tuple[str, str, str], dict[str, MeasuredRow]] = defaultdict(dict)
    for r in rows:
        group = groups[(r.profile, r.variant, _kind(r.source))]
        if r.device_id not in group or r.source == "probe":
            group[r.device_id] = r
    figures = []
    for (profile, variant, kind), by_device in sorted(groups.items()):
        p50s = sorted(r.p50_ms for r in by_device.values())
        p95 = statistics.median(r.p95_ms for r in by_device.values())
        median = statistics.median(p50s)
        budget = (budgets or {}).get(profile)
        budget = budget if budget is not None and budget > 0 else None
        figures.append(ProfileFigure(
            profile=profile, variant=variant, kind=kind, devices=len(p50s), p50_ms=round(median, 4),
            p95_ms=round(p95, 4), p50_min_ms=p50s[0], p50_max_ms=p50s[-1],
            spread=round((p50s[-1] - p50s[0]) / median, 4) if median > 0 else 0.0,
            budget_ms=budget, over_budget=budget is not None and p95 > budget,
        ))
    return figures


def profile_budgets() -> dict[str, float]:
    """Each profile's ``latency_budget_ms`` (firmware_profiles/); empty when the profiles cannot be read."""
    from server.errors import ProfileError  # noqa: PLC0415 - keeps this module free of server imports at load
    from server.profiles import load_profiles  # noqa: PLC0415

    try:
        return {pid: p.latency_budget_ms for pid, p in load_profiles().items()}
    except ProfileError:
        return {}


class BuildRow(MeasuredRow, Protocol):
    @property
    def model(self) -> str: ...

    @property
    def version(self) -> int: ...


def by_build(rows: Iterable[BuildRow], budgets: Mapping[str, float]) -> list[tuple[str, int, ProfileFigure]]:
    """``aggregate`` per model version: (model, version, figure), sorted."""
    groups: dict[tuple[str, int], list[BuildRow]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.version)].append(r)
    return [(m, v, f) for (m, v), group in sorted(groups.items()) for f in aggregate(group, budgets)]


def measured_latency(rows: Iterable[MeasuredRow], profile: str) -> dict[str, float]:
    """Per variant, the median benchmark p50 on ``profile``'s devices (what selection compares)."""
    return {f.variant: f.p50_ms for f in aggregate(r for r in rows if r.profile == profile)
            if f.kind == "bench" and f.variant}
