"""Serving statistics and health-check results: plain values and a sample window, no numpy, no clock.

Theory of operation
    Every request the host serves leaves one sample ``(now, latency_ms, outcome)`` in the window of
    the model version that served it. A window is a ring buffer of at most ``capacity`` samples per
    version, so memory stays bounded whatever the traffic; percentiles are computed only when someone
    asks (telemetry every N seconds, the probation rule), never on the request path.

    Outcomes:
      * ``OK``         the runtime answered;
      * ``NONFINITE``  the runtime answered, but a float output held NaN or Inf (counts as an error
                       for probation: the model misbehaves, the client still gets what it produced);
      * ``ERROR``      the runtime raised (InferenceError);
      * ``REJECTED``   the request never reached the runtime (malformed input): the client's fault,
                       so it is counted apart and never counts against the model.

    ``requests`` counts the requests that reached the model (OK + NONFINITE + ERROR); ``errors``
    counts NONFINITE + ERROR. Latency percentiles are over the requests that reached the model.

    The window is not thread-safe: the runtime (``agent.runtime.host``) serialises access with a
    lock held only for an append.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from agent.protocol.messages import ModelRef


class Outcome(IntEnum):
    OK = 0
    NONFINITE = 1
    ERROR = 2
    REJECTED = 3


@dataclass(frozen=True)
class ServingStats:
    """What one model version did over a window (contract: CONTRACTS.md section 6).

    ``requests``: requests that reached the model; ``errors``: of those, the ones that raised or
    returned non-finite outputs; ``p50/p95/p99_ms``: latency percentiles over ``requests`` (None when
    there were none); ``rejected``: requests refused before the model ran (bad input);
    ``nonfinite``: the errors that were non-finite outputs; ``truncated``: the window had already
    dropped samples newer than ``since``, so the counts cover less time than asked for.
    """

    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    rejected: int = 0
    nonfinite: int = 0
    truncated: bool = False

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def latency_ms(self) -> dict[str, float]:
        """The percentiles that are known, keyed as telemetry carries them (``p50``, ``p95``, ``p99``)."""
        pairs = (("p50", self.p50_ms), ("p95", self.p95_ms), ("p99", self.p99_ms))
        return {k: v for k, v in pairs if v is not None}


EMPTY_STATS = ServingStats(requests=0, errors=0, p50_ms=None, p95_ms=None, p99_ms=None)


@dataclass(frozen=True)
class HealthReport:
    """A passed health check: what ran and what it measured (a failure raises HealthCheckError)."""

    ref: ModelRef
    checks: tuple[str, ...]  # the checks that ran and passed, in order
    runs: int  # inference runs made (priming + timed warm-up + golden cases)
    first_run_ms: float  # the priming run: lazy allocation, engine builds
    p50_ms: float  # over the timed warm-up runs
    p95_ms: float
    max_ms: float
    golden_cases: int = 0
    golden_max_abs_err: float | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summarize(samples: Iterable[tuple[float, float, int]], *, truncated: bool = False) -> ServingStats:
    """ServingStats of ``(now, latency_ms, outcome)`` samples."""
    latencies: list[float] = []
    errors = rejected = nonfinite = 0
    for _, latency_ms, outcome in samples:
        if outcome == Outcome.REJECTED:
            rejected += 1
            continue
        latencies.append(latency_ms)
        if outcome == Outcome.ERROR:
            errors += 1
        elif outcome == Outcome.NONFINITE:
            errors += 1
            nonfinite += 1
    if not latencies:
        return ServingStats(0, 0, None, None, None, rejected=rejected, truncated=truncated)
    latencies.sort()
    return ServingStats(
        requests=len(latencies),
        errors=errors,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        rejected=rejected,
        nonfinite=nonfinite,
        truncated=truncated,
    )


class StatsWindow:
    """Per-version ring buffers of samples; bounded in samples per version and in versions kept.

    ``capacity`` samples per version (oldest dropped first); at most ``max_versions`` versions are
    remembered (the least recently served is forgotten first), so a device that swaps forever keeps
    constant memory.
    """

    def __init__(self, *, capacity: int = 4096, max_versions: int = 8) -> None:
        if capacity < 1 or max_versions < 1:
            raise ValueError("capacity and max_versions must be >= 1")
        self.capacity = capacity
        self.max_versions = max_versions
        self._samples: dict[ModelRef, deque[tuple[float, float, int]]] = {}
        self._dropped_until: dict[ModelRef, float] = {}  # time of the newest sample pushed out

    def record(self, ref: ModelRef, now: float, latency_ms: float, outcome: Outcome) -> None:
        ring = self._samples.get(ref)
        if ring is None:
            ring = self._new_ring(ref)
        elif len(ring) == self.capacity:
            self._dropped_until[ref] = ring[0][0]
        ring.append((now, latency_ms, int(outcome)))

    def _new_ring(self, ref: ModelRef) -> deque[tuple[float, float, int]]:
        if len(self._samples) >= self.max_versions:
            stalest = min(self._samples, key=lambda r: self._samples[r][-1][0] if self._samples[r] else -math.inf)
            del self._samples[stalest]
            self._dropped_until.pop(stalest, None)
        ring: deque[tuple[float, float, int]] = deque(maxlen=self.capacity)
        self._samples[ref] = ring
        return ring

    def select(
        self, *, since: float | None = None, version: int | None = None, name: str | None = None
    ) -> tuple[list[tuple[float, float, int]], bool]:
        """The samples matching the filters (a copy) and whether the window had dropped any of them."""
        picked: list[tuple[float, float, int]] = []
        truncated = False
        for ref, ring in self._samples.items():
            if (version is not None and ref.version != version) or (name is not None and ref.name != name):
                continue
            dropped = self._dropped_until.get(ref)
            if dropped is not None and (since is None or dropped >= since):
                truncated = True
            if since is None:
                picked.extend(ring)
            else:
                picked.extend(s for s in ring if s[0] >= since)
        return picked, truncated

    def stats(self, *, since: float | None = None, version: int | None = None, name: str | None = None) -> ServingStats:
        samples, truncated = self.select(since=since, version=version, name=name)
        return summarize(samples, truncated=truncated)

    def versions(self) -> list[ModelRef]:
        return list(self._samples)
