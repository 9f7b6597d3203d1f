"""Waiting on real processes by what they show, not by a fixed budget.

A machine under load (issue 11: the test command under ``stress-ng``) makes every step slower but
not wrong. ``wait_progress`` waits as long as the thing waited on keeps moving (the ``progress``
marker changes: one more device online, an agent's log grows) and gives up only when it has been
still for ``stall_s``, when ``failed`` names a problem (a process died: no point waiting), or
after ``cap_s`` in all. The error says which, with what ``describe`` shows (the logs of what is
late), so a failure under load can be told from a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class WaitError(TimeoutError):
    """A wait that cannot end well: stalled, past its cap, or a process it waited on is gone."""


def wait_progress(
    done: Callable[[], bool],
    *,
    what: str,
    progress: Callable[[], Hashable],
    describe: Callable[[], str],
    failed: Callable[[], str | None] = lambda: None,
    stall_s: float = 60.0,
    cap_s: float = 300.0,
    interval_s: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Poll ``done`` until it holds; returns the seconds waited. Raises ``WaitError`` (see the module)."""
    start = clock()
    marker = progress()
    moved = start
    while True:
        if done():
            return clock() - start
        now = clock()
        problem = failed()
        if problem is not None:
            raise WaitError(f"{what}: {problem} (after {now - start:.0f}s)\n{describe()}")
        current = progress()
        if current != marker:
            marker, moved = current, now
        if now - moved >= stall_s:
            raise WaitError(f"{what}: no progress for {stall_s:.0f}s (waited {now - start:.0f}s)\n{describe()}")
        if now - start >= cap_s:
            raise WaitError(f"{what}: still not done after {cap_s:.0f}s, though moving\n{describe()}")
        sleep(interval_s)
