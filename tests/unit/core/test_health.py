"""The probation policy, table-driven: each row is one situation and the verdict it must give."""

from __future__ import annotations

import pytest

from agent.core.health import Outcome, ProbationPolicy, WindowStats, decide
from agent.protocol.messages import HealthSpec, TensorSpec

POLICY = ProbationPolicy(
    window_s=60.0, min_requests=20, max_error_rate=0.05, max_latency_regression=1.5, latency_budget_ms=10.0
)
FAST = WindowStats(requests=500, errors=0, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0)

CASES = [
    # (name, now, candidate, baseline, outcome, check)
    ("quiet and early", 10, WindowStats(), FAST, Outcome.WAIT, None),
    ("quiet at window end", 60, WindowStats(), FAST, Outcome.PASS, None),
    ("few errors below evidence threshold", 30, WindowStats(5, 5, 1, 2, 2), FAST, Outcome.WAIT, None),
    ("few requests at end are no evidence", 61, WindowStats(5, 5, 1, 50, 60), FAST, Outcome.PASS, None),
    ("error rate fails early", 5, WindowStats(40, 10, 1, 2, 2), FAST, Outcome.FAIL, "error_rate"),
    ("error rate at the limit passes", 60, WindowStats(100, 5, 1, 2, 2), FAST, Outcome.PASS, None),
    ("latency regression waits for window end", 30, WindowStats(100, 0, 5, 9, 9), FAST, Outcome.WAIT, None),
    ("latency regression fails at end", 60, WindowStats(100, 0, 5, 9, 9), FAST, Outcome.FAIL, "latency"),
    ("latency within ratio passes", 60, WindowStats(100, 0, 2, 2.9, 3), FAST, Outcome.PASS, None),
    (
        "over the budget fails even with a slow baseline",
        60,
        WindowStats(100, 0, 5, 11, 12),
        WindowStats(100, 0, 9, 10, 10),
        Outcome.FAIL,
        "latency",
    ),
    ("no baseline: budget applies", 60, WindowStats(100, 0, 5, 11, 12), None, Outcome.FAIL, "latency"),
    ("no baseline: within budget", 60, WindowStats(100, 0, 5, 9, 12), None, Outcome.PASS, None),
    ("baseline without requests: budget", 60, WindowStats(100, 0, 5, 9, 9), WindowStats(), Outcome.PASS, None),
    # 1.7x but only 0.65 ms slower: a swap under load on a busy board, not a slower model
    (
        "sub-millisecond noise under load",
        60,
        WindowStats(900, 0, 0.6, 1.56, 2),
        WindowStats(900, 0, 0.5, 0.91, 1.2),
        Outcome.PASS,
        None,
    ),
    (
        "sub-millisecond noise is not a regression",
        60,
        WindowStats(100, 0, 0.1, 0.4, 0.5),
        WindowStats(100, 0, 0.05, 0.1, 0.1),
        Outcome.PASS,
        None,
    ),
]


@pytest.mark.parametrize(("name", "now", "candidate", "baseline", "outcome", "check"), CASES, ids=[c[0] for c in CASES])
def test_decide(
    name: str,
    now: float,
    candidate: WindowStats,
    baseline: WindowStats | None,
    outcome: Outcome,
    check: str | None,
) -> None:
    verdict = decide(POLICY, started_at=0.0, now=now, candidate=candidate, baseline=baseline)
    assert verdict.outcome is outcome, verdict.reason
    assert verdict.check == check
    assert verdict.reason


def test_min_requests_zero_still_needs_one_request_to_judge() -> None:
    policy = ProbationPolicy(window_s=1.0, min_requests=0, max_error_rate=0.0)
    assert decide(policy, started_at=0, now=0.5, candidate=WindowStats(), baseline=None).outcome is Outcome.WAIT
    failed = decide(policy, started_at=0, now=0.5, candidate=WindowStats(1, 1), baseline=None)
    assert failed.outcome is Outcome.FAIL
    assert failed.check == "error_rate"


def test_policy_from_health_spec_clamps_nonsense() -> None:
    spec = HealthSpec(
        inputs=(TensorSpec("x", "float32", (1, 4)),),
        outputs=(TensorSpec("y", "float32", (1, 2)),),
        latency_budget_ms=0.0,
        probation_s=-5,
        probation_min_requests=-1,
        max_error_rate=7.0,
        max_latency_regression=0.2,
    )
    policy = ProbationPolicy.from_health_spec(spec)
    assert policy == ProbationPolicy(
        window_s=0.0, min_requests=0, max_error_rate=1.0, max_latency_regression=1.0, latency_budget_ms=None
    )
