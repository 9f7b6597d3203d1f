"""tests.support.waiting: a wait ends on success, a stall, a failure or its cap (a fake clock: no real time)."""

from __future__ import annotations

import pytest

from tests.support.waiting import WaitError, wait_progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_moving_slowly_is_not_a_stall() -> None:
    clock, polls = Clock(), []

    def done() -> bool:
        polls.append(clock.now)
        return len(polls) > 200  # 200 polls of 1 s: far past the stall window, but each one moved

    waited = wait_progress(done, what="slow", progress=lambda: len(polls), describe=lambda: "", stall_s=5,
                           cap_s=1000, interval_s=1.0, clock=clock, sleep=clock.sleep)
    assert waited == 200


def test_a_stall_fails_with_what_describe_shows() -> None:
    clock = Clock()
    with pytest.raises(WaitError, match=r"stuck: no progress for 5s(.|\n)*the late one's log"):
        wait_progress(lambda: False, what="stuck", progress=lambda: 0, describe=lambda: "the late one's log",
                      stall_s=5, interval_s=1.0, clock=clock, sleep=clock.sleep)
    assert clock.now == 5


def test_a_failure_ends_the_wait_at_once() -> None:
    clock = Clock()
    with pytest.raises(WaitError, match="gone: the agent exited"):
        wait_progress(lambda: False, what="gone", progress=lambda: 0, describe=lambda: "",
                      failed=lambda: "the agent exited" if clock.now >= 2 else None, stall_s=60, interval_s=1.0,
                      clock=clock, sleep=clock.sleep)
    assert clock.now == 2


def test_the_cap_bounds_a_wait_that_keeps_moving() -> None:
    clock = Clock()
    with pytest.raises(WaitError, match="still not done after 30s"):
        wait_progress(lambda: False, what="busy", progress=clock, describe=lambda: "", stall_s=5, cap_s=30,
                      interval_s=1.0, clock=clock, sleep=clock.sleep)
