"""Probation policy: should a model that is now serving be committed, rolled back, or watched longer?

Theory of operation
    After the switch, the new version serves real traffic for a probation window. Every few
    seconds the shell reads the serving statistics of the new version since the switch (and
    keeps the statistics the previous version had just before it) and asks ``decide``. The
    answer is PASS (commit), FAIL (roll back, naming the check) or WAIT. Pure: numbers in,
    verdict out; time enters as ``now``.

    Rules, in this order:
      1. evidence: the statistical checks below only judge once the window holds at least
         ``min_requests`` requests (and at least one). Fewer requests is not evidence of
         anything, so a quiet device commits at the end of its window on the strength of the
         warm-up health check alone;
      2. error rate: errors / requests > ``max_error_rate`` fails at once (it does not wait for
         the window to end: a model that fails requests should stop serving now);
      3. latency, at the end of the window only (early samples are dominated by cache warm-up):
         p95 over the profile's ``latency_budget_ms`` fails; so does p95 of the new version over
         ``max_latency_regression`` x p95 of the previous version *and* more than
         LATENCY_SLACK_MS above it (on a busy two-core board a swap alone moves a sub-millisecond
         p95 by a fraction of a millisecond: that is scheduling noise, not a slower model);
      4. otherwise WAIT until ``started_at + window_s``, then PASS.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from agent.protocol.messages import HealthSpec

#: A p95 below this is measurement noise: regression ratios between two sub-millisecond numbers mean nothing.
LATENCY_FLOOR_MS = 0.5
#: A regression must also be at least this much slower in absolute terms (see rule 3).
LATENCY_SLACK_MS = 1.0


class StatsLike(Protocol):
    """What the policy reads from the serving statistics (agent.runtime.host.ServingStats fits)."""

    @property
    def requests(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def p95_ms(self) -> float | None: ...


@dataclass(frozen=True)
class WindowStats:
    """Plain statistics over a window (for tests and for baselines captured by the shell)."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


@dataclass(frozen=True)
class ProbationPolicy:
    """Limits of one probation window (from the manifest's HealthSpec).

    Args:
        window_s: how long the new version serves before it can be committed (>= 0).
        min_requests: requests needed before error rate and latency are judged.
        max_error_rate: largest tolerated errors / requests, in [0, 1].
        max_latency_regression: largest tolerated p95(new) / p95(previous), >= 1.
        latency_budget_ms: the profile's p95 budget, used when there is no previous version.
    """

    window_s: float = 60.0
    min_requests: int = 0
    max_error_rate: float = 0.01
    max_latency_regression: float = 1.5
    latency_budget_ms: float | None = None

    @classmethod
    def from_health_spec(cls, spec: HealthSpec) -> ProbationPolicy:
        return cls(
            window_s=max(0.0, spec.probation_s),
            min_requests=max(0, spec.probation_min_requests),
            max_error_rate=min(1.0, max(0.0, spec.max_error_rate)),
            max_latency_regression=max(1.0, spec.max_latency_regression),
            latency_budget_ms=spec.latency_budget_ms if spec.latency_budget_ms > 0 else None,
        )


class Outcome(str, Enum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "fail"
    WAIT = "wait"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str
    check: str | None = None  # "error_rate" | "latency" on FAIL

    @property
    def final(self) -> bool:
        return self.outcome is not Outcome.WAIT


def decide(
    policy: ProbationPolicy,
    *,
    started_at: float,
    now: float,
    candidate: StatsLike,
    baseline: StatsLike | None,
) -> Verdict:
    """Judge the new version's window so far; see the module docstring for the rules."""
    window_over = now >= started_at + policy.window_s
    enough = candidate.requests >= max(1, policy.min_requests)

    if enough:
        rate = candidate.errors / candidate.requests
        if rate > policy.max_error_rate:
            return Verdict(
                Outcome.FAIL,
                f"error rate {rate:.1%} ({candidate.errors}/{candidate.requests}) "
                f"over the {policy.max_error_rate:.1%} limit",
                "error_rate",
            )

    if not window_over:
        return Verdict(Outcome.WAIT, f"probation running, {candidate.requests} requests so far")

    if enough and candidate.p95_ms is not None:
        failed = _latency_failure(policy, candidate.p95_ms, baseline)
        if failed is not None:
            return Verdict(Outcome.FAIL, failed, "latency")

    if not enough:
        return Verdict(
            Outcome.PASS,
            f"window over with {candidate.requests} requests (fewer than {max(1, policy.min_requests)} needed "
            "to judge); committed on the warm-up health check",
        )
    return Verdict(Outcome.PASS, f"{candidate.requests} requests, {candidate.errors} errors, within limits")


def _latency_failure(policy: ProbationPolicy, p95: float, baseline: StatsLike | None) -> str | None:
    if policy.latency_budget_ms is not None and p95 > policy.latency_budget_ms:
        return f"p95 latency {p95:.2f} ms over the {policy.latency_budget_ms:.2f} ms budget"
    previous = baseline.p95_ms if baseline is not None and baseline.requests > 0 else None
    if previous is None:
        return None
    reference = max(previous, LATENCY_FLOOR_MS)
    if p95 > reference * policy.max_latency_regression and p95 - previous > LATENCY_SLACK_MS:
        return (
            f"p95 latency {p95:.2f} ms is {p95 / reference:.1f}x the previous version's {previous:.2f} ms "
            f"(limit {policy.max_latency_regression:.2f}x)"
        )
    return None
