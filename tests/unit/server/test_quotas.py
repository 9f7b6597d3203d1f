"""Per-device ingest budgets (server/quotas.py) and their use in the ingest."""

from __future__ import annotations

from server.config import QuotasSection
from server.quotas import BYTES, EVENTS, IngestBudget, ReportLimiter


def test_events_and_bytes_are_budgeted_per_device_and_minute() -> None:
    budget = IngestBudget(QuotasSection(events_per_minute=3, bytes_per_minute=20_000))
    assert [budget.admit("a", event=True, size=10, now=0.0) for _ in range(4)] == [None, None, None, EVENTS]
    assert budget.admit("a", event=False, size=100, now=1.0) is None  # state/telemetry are not events
    assert budget.admit("b", event=True, size=10, now=1.0) is None  # another device has its own budget
    assert budget.admit("b", event=False, size=19_991, now=2.0) == BYTES
    assert budget.admit("a", event=True, size=10, now=60.0) is None  # the next minute


def test_reports_are_limited_to_one_per_device_quota_and_minute() -> None:
    r = ReportLimiter()
    assert r.due("a", EVENTS, 0.0)
    assert not r.due("a", EVENTS, 30.0)
    assert r.due("a", BYTES, 30.0)
    assert r.due("b", EVENTS, 30.0)
    assert r.due("a", EVENTS, 61.0)
