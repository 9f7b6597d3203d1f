"""Pure serving statistics: percentiles, outcome accounting, bounded per-version windows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.serving import EMPTY_STATS, Counts, Outcome, ServingStats, StatsWindow, percentile, summarize
from agent.protocol.messages import ModelRef

V1 = ModelRef("digits", 1)
V2 = ModelRef("digits", 2)


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_counts_outcomes_apart() -> None:
    samples = [
        (0.0, 1.0, Outcome.OK),
        (0.1, 2.0, Outcome.OK),
        (0.2, 3.0, Outcome.ERROR),
        (0.3, 4.0, Outcome.NONFINITE),
        (0.4, 99.0, Outcome.REJECTED),  # the client's fault: not a request the model served
    ]
    stats = summarize(samples)
    assert stats.requests == 4
    assert stats.errors == 2
    assert stats.nonfinite == 1
    assert stats.rejected == 1
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.p99_ms is not None and stats.p99_ms <= 4.0  # the rejected 99 ms is not in the latency
    assert stats.error_rate == pytest.approx(0.5)
    assert stats.latency_ms().keys() == {"p50", "p95", "p99"}


def test_empty_window_has_no_percentiles() -> None:
    assert summarize([]) == EMPTY_STATS
    assert summarize([], older=Counts(requests=3, errors=1)) == ServingStats(3, 1, None, None, None)
    assert EMPTY_STATS.error_rate == 0.0
    assert EMPTY_STATS.latency_ms() == {}


def test_window_filters_by_version_name_and_time() -> None:
    w = StatsWindow()
    for t in range(10):
        w.record(V1, float(t), 1.0, Outcome.OK)
    for t in range(10, 15):
        w.record(V2, float(t), 5.0, Outcome.ERROR if t == 14 else Outcome.OK)
    w.record(ModelRef("other", 2), 20.0, 7.0, Outcome.OK)
    assert w.stats().requests == 16
    assert w.stats(version=1).requests == 10
    assert w.stats(version=2).requests == 6  # same version number, two model names
    v2 = w.stats(version=2, name="digits")
    assert (v2.requests, v2.errors, v2.p50_ms) == (5, 1, 5.0)
    assert w.stats(since=12.0, name="digits").requests == 3
    assert not w.stats(since=0.0).truncated


def test_window_keeps_counts_exact_beyond_its_sample_ring() -> None:
    w = StatsWindow(capacity=4)
    for t in range(10):
        w.record(V1, float(t), float(t), Outcome.ERROR if t in (1, 8) else Outcome.OK)
    w.record(V1, 10.0, 50.0, Outcome.REJECTED)
    everything = w.stats(version=1)
    assert (everything.requests, everything.errors, everything.rejected) == (10, 2, 1)
    assert everything.truncated  # percentiles from the latest samples only
    assert everything.p50_ms == pytest.approx(8.0)  # the ring holds 7, 8, 9 and the rejected 10
    recent = w.stats(version=1, since=7.0)
    assert (recent.requests, recent.errors) == (3, 1) and not recent.truncated
    middle = w.stats(version=1, since=3.0)  # samples 3..6 only as counts, 7..9 exact
    assert (middle.requests, middle.errors) == (7, 1) and middle.truncated


def test_window_memory_is_bounded_under_heavy_traffic() -> None:
    w = StatsWindow(capacity=16, history_s=5)
    for i in range(20_000):
        w.record(V1, i / 1000.0, 1.0, Outcome.OK)  # 1,000 requests/s for 20 s
    series = w._series[V1]
    assert len(series.ring) == 16 and len(series.spilled) == 5
    assert w.stats(version=1, since=16.0).requests == 4000  # the last 4 s: exact


def test_window_forgets_the_stalest_version_first() -> None:
    w = StatsWindow(max_versions=2)
    w.record(ModelRef("m", 1), 1.0, 1.0, Outcome.OK)
    w.record(ModelRef("m", 2), 2.0, 1.0, Outcome.OK)
    w.record(ModelRef("m", 1), 3.0, 1.0, Outcome.OK)  # v1 served more recently than v2
    w.record(ModelRef("m", 3), 4.0, 1.0, Outcome.OK)
    assert set(w.versions()) == {ModelRef("m", 1), ModelRef("m", 3)}


def test_window_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        StatsWindow(capacity=0)
