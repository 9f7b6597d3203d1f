"""The pure rollout planner: waves, decisions, phase transitions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.rollout.planner import (
    TIMEOUT_CODE,
    DeviceView,
    Phase,
    Policy,
    converge,
    decide,
    observe_event,
    observe_state,
    plan_waves,
    rollback_settled,
    wave_sizes,
    wave_stats,
)

POLICY = Policy(canary_percent=20, wave_percent=50, max_failures_percent=20, device_timeout_s=60)


def view(device_id: str, wave: int, phase: Phase, *, online: bool = True, updated_at: float = 0.0,
         code: str | None = None) -> DeviceView:
    return DeviceView(device_id, wave, phase, online, updated_at, code)


# -- waves -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "canary", "wave", "expected"),
    [
        (0, 10, 25, []),
        (1, 10, 25, [1]),
        (5, 20, 50, [1, 3, 1]),
        (10, 10, 25, [1, 3, 3, 3]),
        (10, 0, 50, [5, 5]),
        (10, 100, 50, [10]),
        (3, 1, 100, [1, 2]),
        (1000, 1, 10, [10] + [100] * 9 + [90]),
    ],
)
def test_wave_sizes(n: int, canary: float, wave: float, expected: list[int]) -> None:
    assert wave_sizes(n, canary, wave) == expected


@given(st.integers(0, 5000), st.floats(0, 100), st.floats(0.01, 100))
def test_wave_sizes_cover_every_device_once(n: int, canary: float, wave: float) -> None:
    sizes = wave_sizes(n, canary, wave)
    assert sum(sizes) == n
    assert all(s > 0 for s in sizes)
    if n and canary > 0:
        assert sizes[0] >= 1


def test_canary_prefers_online_devices_and_is_deterministic() -> None:
    ids = [f"d{i}" for i in range(10)]
    online = {"d7": True, "d3": True}
    waves = plan_waves(ids, canary_percent=20, wave_percent=50, online=online)
    assert waves[0] == ["d3", "d7"]
    assert plan_waves(list(reversed(ids)), canary_percent=20, wave_percent=50, online=online) == waves
    assert sorted(d for w in waves for d in w) == sorted(ids)


def test_policy_rejects_bad_percentages() -> None:
    with pytest.raises(ValueError, match="wave_percent"):
        Policy(10, 0, 10, 60)
    with pytest.raises(ValueError, match="canary_percent"):
        Policy(101, 10, 10, 60)


# -- decide --------------------------------------------------------------------------------------------


def test_first_tick_dispatches_the_canary_only() -> None:
    devices = [view("a", 0, Phase.PENDING), view("b", 1, Phase.PENDING), view("c", 1, Phase.PENDING)]
    d = decide(POLICY, devices, current_wave=0, wave_count=2, now=1.0)
    assert d.dispatch == ("a",)
    assert not d.advanced and not d.complete and d.halt_reason is None


def test_wave_waits_while_devices_work_then_advances() -> None:
    working = [view("a", 0, Phase.DOWNLOADING), view("b", 1, Phase.PENDING)]
    d = decide(POLICY, working, current_wave=0, wave_count=2, now=1.0)
    assert d.dispatch == () and not d.advanced and d.waiting_for
    done = [view("a", 0, Phase.COMMITTED), view("b", 1, Phase.PENDING)]
    d = decide(POLICY, done, current_wave=0, wave_count=2, now=1.0)
    assert d.advanced and d.current_wave == 1 and d.dispatch == ("b",)


def test_completes_after_the_last_wave_settles() -> None:
    devices = [view("a", 0, Phase.COMMITTED), view("b", 1, Phase.COMMITTED)]
    d = decide(POLICY, devices, current_wave=1, wave_count=2, now=1.0)
    assert d.complete and not d.advanced


def test_halts_when_failures_cross_the_threshold() -> None:
    devices = [view("a", 0, Phase.FAILED), view("b", 1, Phase.PENDING)]
    d = decide(POLICY, devices, current_wave=0, wave_count=2, now=1.0)
    assert d.halt_reason is not None and "1 of 1" in d.halt_reason
    assert d.dispatch == ()


def test_failures_at_the_threshold_do_not_halt() -> None:
    # 1 of 5 released = 20%, max 20%: not over
    devices = [view("f", 0, Phase.FAILED)] + [view(f"ok{i}", 0, Phase.COMMITTED) for i in range(4)]
    d = decide(POLICY, devices, current_wave=0, wave_count=1, now=1.0)
    assert d.halt_reason is None and d.complete


def test_zero_percent_tolerance_halts_on_the_first_failure_mid_wave() -> None:
    policy = Policy(10, 50, 0, 60)
    devices = [view("a", 0, Phase.FAILED)] + [view(f"w{i}", 0, Phase.DOWNLOADING) for i in range(9)]
    assert decide(policy, devices, current_wave=0, wave_count=2, now=1.0).halt_reason


def test_online_device_without_progress_times_out_and_counts_as_failed() -> None:
    devices = [view("slow", 0, Phase.DOWNLOADING, updated_at=0.0)] + [
        view(f"ok{i}", 0, Phase.COMMITTED) for i in range(9)
    ]
    d = decide(POLICY, devices, current_wave=0, wave_count=1, now=61.0)
    assert d.timed_out == ("slow",)
    assert d.complete  # 1 of 10 = 10% <= 20%


def test_offline_device_is_deferred_not_timed_out_and_does_not_block() -> None:
    devices = [
        view("off", 0, Phase.DISPATCHED, online=False, updated_at=0.0),
        view("on", 0, Phase.COMMITTED),
        view("next", 1, Phase.PENDING),
    ]
    d = decide(POLICY, devices, current_wave=0, wave_count=2, now=1000.0)
    assert d.timed_out == ()
    assert d.advanced and d.dispatch == ("next",)


def test_a_wave_of_only_offline_devices_proves_nothing() -> None:
    devices = [view("off", 0, Phase.DISPATCHED, online=False), view("next", 1, Phase.PENDING)]
    d = decide(POLICY, devices, current_wave=0, wave_count=2, now=1.0)
    assert not d.advanced and d.waiting_for and "no device has committed" in d.waiting_for


def test_late_joiner_in_a_released_wave_is_dispatched() -> None:
    devices = [view("a", 0, Phase.COMMITTED), view("b", 1, Phase.COMMITTED), view("late", 1, Phase.PENDING)]
    d = decide(POLICY, devices, current_wave=1, wave_count=2, now=1.0)
    assert d.dispatch == ("late",) and not d.complete


def test_converge_and_rollback_settled() -> None:
    assert converge([view("a", 0, Phase.COMMITTED), view("late", 0, Phase.PENDING)]) == ("late",)
    assert not rollback_settled([view("a", 0, Phase.ROLLING_BACK)])
    assert rollback_settled([view("a", 0, Phase.ROLLING_BACK, online=False), view("b", 0, Phase.ROLLED_BACK)])


def test_wave_stats_counts_phases() -> None:
    devices = [
        view("a", 0, Phase.COMMITTED),
        view("b", 1, Phase.FAILED),
        view("c", 1, Phase.DOWNLOADING),
        view("d", 1, Phase.DISPATCHED, online=False),
        view("e", 2, Phase.PENDING),
    ]
    s = wave_stats(devices, 3)
    assert (s[0].committed, s[1].failed, s[1].in_flight, s[1].deferred, s[2].pending) == (1, 1, 1, 1, 1)


# -- phases from events and state ---------------------------------------------------------------------------


def test_events_only_move_forward() -> None:
    obs = observe_event(Phase.DISPATCHED, None, "download.progress", data={"received": 5, "total": 10})
    assert obs is not None and obs.phase is Phase.DOWNLOADING and obs.progress == 0.5
    assert observe_event(Phase.PROBATION, None, "download.progress", data={"received": 1, "total": 2}) is None
    assert observe_event(Phase.INSTALLING, None, "desired.accepted") is None
    committed = observe_event(Phase.PROBATION, None, "lifecycle.committed")
    assert committed is not None and committed.phase is Phase.COMMITTED


def test_pending_and_settled_devices_ignore_events() -> None:
    assert observe_event(Phase.PENDING, None, "lifecycle.committed") is None
    assert observe_event(Phase.COMMITTED, None, "lifecycle.rolled_back") is None


def test_failure_carries_reason_and_code() -> None:
    obs = observe_event(Phase.INSTALLING, None, "lifecycle.rolled_back", message="rolled back",
                        data={"reason": "p95 over budget", "check": "latency"})
    assert obs is not None and obs.phase is Phase.FAILED
    assert obs.reason == "p95 over budget" and obs.code == "health.latency"
    rej = observe_event(Phase.DISPATCHED, None, "desired.rejected", message="too old", code="downgrade")
    assert rej is not None and rej.phase is Phase.FAILED and rej.code == "downgrade"


def test_failure_is_final_except_a_timeout_that_later_commits() -> None:
    assert observe_event(Phase.FAILED, "health.latency", "lifecycle.committed") is None
    late = observe_event(Phase.FAILED, TIMEOUT_CODE, "lifecycle.committed")
    assert late is not None and late.phase is Phase.COMMITTED


def test_rolling_back_listens_for_proof_only() -> None:
    assert observe_event(Phase.ROLLING_BACK, None, "download.progress") is None
    obs = observe_event(Phase.ROLLING_BACK, None, "lifecycle.rolled_back")
    assert obs is not None and obs.phase is Phase.ROLLED_BACK


def test_state_reports_catch_up_on_missed_events() -> None:
    obs = observe_state(Phase.DOWNLOADING, None, version=3, previous_version=2, active_version=3,
                        active_state="committed")
    assert obs is not None and obs.phase is Phase.COMMITTED
    assert observe_state(Phase.DOWNLOADING, None, version=3, previous_version=2, active_version=3,
                         active_state="probation") is None
    back = observe_state(Phase.ROLLING_BACK, None, version=3, previous_version=2, active_version=2,
                         active_state="committed")
    assert back is not None and back.phase is Phase.ROLLED_BACK
    assert observe_state(Phase.FAILED, "health.latency", version=3, previous_version=2, active_version=3,
                         active_state="committed") is None
