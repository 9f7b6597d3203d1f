"""Serving statistics and health-check results: plain values and a sample window, no numpy, no clock.

Theory of operation
    Every request the host serves leaves one sample ``(now, latency_ms, outcome)`` in the window of
    the model version that served it: a ring buffer of the latest ``capacity`` samples per version,
    and per-second counts of the samples that left the ring, so memory stays bounded whatever the
    traffic while counts stay exact. Percentiles are computed only when someone asks (telemetry
    every N seconds, the probation rule), never on the request path.

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
    ``nonfinite``: the errors that were non-finite outputs; ``truncated``: the window held more
    requests than its sample ring, so the counts are exact but the percentiles are over the latest
    ``capacity`` requests only.
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


@dataclass(frozen=True)
class Counts:
    """Request counts without latencies (the part of a window that left the sample ring)."""

    requests: int = 0
    errors: int = 0
    rejected: int = 0
    nonfinite: int = 0


def summarize(
    samples: Iterable[tuple[float, float, int]], *, older: Counts | None = None, truncated: bool = False
) -> ServingStats:
    """ServingStats of ``(now, latency_ms, outcome)`` samples, plus ``older`` counts that carry no latency."""
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
    extra = older or Counts()
    requests = len(latencies) + extra.requests
    latencies.sort()
    return ServingStats(
        requests=requests,
        errors=errors + extra.errors,
        p50_ms=percentile(latencies, 50) if latencies else None,
        p95_ms=percentile(latencies, 95) if latencies else None,
        p99_ms=percentile(latencies, 99) if latencies else None,
        rejected=rejected + extra.rejected,
        nonfinite=nonfinite + extra.nonfinite,
        truncated=truncated,
    )


class _Series:
    """One version's history: the latest samples exactly, older ones as per-second counts."""

    __slots__ = ("last_seen", "ring", "spilled")

    def __init__(self, capacity: int, history_s: int) -> None:
        self.ring: deque[tuple[float, float, int]] = deque(maxlen=capacity)
        # [second, requests, errors, rejected, nonfinite] of the samples pushed out of the ring
        self.spilled: deque[list[int]] = deque(maxlen=history_s)
        self.last_seen = -math.inf

    def record(self, now: float, latency_ms: float, outcome: int) -> None:
        ring = self.ring
        if len(ring) == ring.maxlen:
            self._spill(ring[0])
        ring.append((now, latency_ms, outcome))
        self.last_seen = now

    def _spill(self, sample: tuple[float, float, int]) -> None:
        second = math.floor(sample[0])
        spilled = self.spilled
        if not spilled or spilled[-1][0] != second:
            spilled.append([second, 0, 0, 0, 0])
        bucket = spilled[-1]
        outcome = sample[2]
        if outcome == Outcome.REJECTED:
            bucket[3] += 1
            return
        bucket[1] += 1
        if outcome != Outcome.OK:
            bucket[2] += 1
        if outcome == Outcome.NONFINITE:
            bucket[4] += 1


class StatsWindow:
    """Per-version serving history, bounded in memory whatever the traffic.

    For each version: the latest ``capacity`` samples exactly (latency percentiles come from these),
    and the counts of older samples per second for ``history_s`` seconds of traffic (request and error
    counts stay exact over long windows, such as a 60 s telemetry interval at 1,000 requests/s). A
    query whose ``since`` falls inside the per-second history counts the boundary second whole.
    At most ``max_versions`` versions are remembered (the least recently served is forgotten first).
    """

    def __init__(self, *, capacity: int = 4096, max_versions: int = 8, history_s: int = 3600) -> None:
        if capacity < 1 or max_versions < 1 or history_s < 1:
            raise ValueError("capacity, max_versions and history_s must be >= 1")
        self.capacity = capacity
        self.max_versions = max_versions
        self.history_s = history_s
        self._series: dict[ModelRef, _Series] = {}

    def record(self, ref: ModelRef, now: float, latency_ms: float, outcome: Outcome) -> None:
        series = self._series.get(ref)
        if series is None:
            if len(self._series) >= self.max_versions:
                del self._series[min(self._series, key=lambda r: self._series[r].last_seen)]
            series = self._series[ref] = _Series(self.capacity, self.history_s)
        series.record(now, latency_ms, int(outcome))

    def select(
        self, *, since: float | None = None, version: int | None = None, name: str | None = None
    ) -> tuple[list[tuple[float, float, int]], Counts, bool]:
        """Matching samples (a copy), the counts of matching older samples, and whether there were any."""
        picked: list[tuple[float, float, int]] = []
        older = [0, 0, 0, 0]
        for ref, series in self._series.items():
            if (version is not None and ref.version != version) or (name is not None and ref.name != name):
                continue
            picked.extend(series.ring if since is None else (x for x in series.ring if x[0] >= since))
            first = None if since is None else math.floor(since)
            for bucket in series.spilled:
                if first is None or bucket[0] >= first:
                    for i in range(4):
                        older[i] += bucket[i + 1]
        counts = Counts(requests=older[0], errors=older[1], rejected=older[2], nonfinite=older[3])
        return picked, counts, counts != Counts()

    def stats(self, *, since: float | None = None, version: int | None = None, name: str | None = None) -> ServingStats:
        samples, older, truncated = self.select(since=since, version=version, name=name)
        return summarize(samples, older=older, truncated=truncated)

    def versions(self) -> list[ModelRef]:
        return list(self._series)
