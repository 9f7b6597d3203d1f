"""Test/fault hook: stop the agent at a named point of its lifecycle, deterministically.

Crash tests need "kill -9 while the agent is in phase X" to mean exactly that, on any machine,
however busy. A timed kill cannot promise it; this hook can. It is read once, when
``edgefleet-agent run`` starts, from the environment (never from a config file or the network):

    EDGEFLEET_FAULT_AT=<point>[#N]   the point, and which occurrence of it (default: the first)
    EDGEFLEET_FAULT_WAIT=<path>      optional: instead of dying there, create ``<path>.reached``
                                     and block until ``<path>`` exists (a barrier) or the agent is
                                     asked to stop (SIGTERM, SIGINT), then go on

Without ``EDGEFLEET_FAULT_WAIT`` the agent SIGKILLs itself at the point (nothing flushed, as a
power cut or the OOM killer would). Points (docs/faults.md lists them with what is on disk):

    journal:<state>        a journal record in <state> is durably written; its side effects (download,
                           verify, load, switch, restore) have not run yet. A start writes one record
                           too (in the state it found), so ``journal:idle`` counts those
    download:chunk:<K>     the download holds K chunks (pwritten, not yet in a resume snapshot)
    download:snapshot      a resume snapshot (and the chunk data it names) is durably written
    delta:apply            a received delta is being applied: part of the target file is written
    switched               the candidate serves; probation has not taken a sample yet
    probation:sample       a probation sample is about to be judged
    commit                 the journal names the candidate committed; the store's pointer has not moved
    write:tmp              an atomic write's temp file is on disk (fsynced, but status.json), not yet renamed
    probe:stored           a probe variant is fetched, verified and written under <store>/probe/, not timed yet

Unset, the hook costs one ``is None`` test at each point. It can only stop the agent at points that
ordinary operation reaches, so a network peer cannot trigger anything a restart would not.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

ENV_AT = "EDGEFLEET_FAULT_AT"
ENV_WAIT = "EDGEFLEET_FAULT_WAIT"

_POINT = re.compile(
    r"(journal:(idle|downloading|verifying|staged|warming|probation|rolling_back)"
    r"|download:chunk:[1-9][0-9]{0,8}|download:snapshot|delta:apply|switched|probation:sample|commit|write:tmp|probe:stored)(#([1-9][0-9]{0,5}))?"
)

log = logging.getLogger("agent.faults")


@dataclass(frozen=True)
class FaultPoint:
    point: str
    occurrence: int = 1
    barrier: Path | None = None


def parse(spec: str, barrier: str | None = None) -> FaultPoint:
    match = _POINT.fullmatch(spec.strip())
    if match is None:
        raise ConfigError(f"{ENV_AT}={spec!r}: not a fault point (see docs/faults.md)", field=ENV_AT)
    return FaultPoint(match.group(1), int(match.group(4) or 1), Path(barrier) if barrier else None)


class FaultHook:
    """The armed point (``armed`` is None, the hook off, unless ``edgefleet-agent run`` found the variable)."""

    def __init__(self) -> None:
        self.armed: FaultPoint | None = None
        self._seen = 0
        self._lock = threading.Lock()
        self._released = threading.Event()

    def arm(self, point: FaultPoint | None) -> None:
        self.armed, self._seen = point, 0
        if point is not None:
            log.warning("fault hook armed: %s #%d (%s)", point.point, point.occurrence,
                        f"wait on {point.barrier}" if point.barrier else "SIGKILL")

    def reach(self, point: str) -> None:
        """Call sites guard with ``if HOOK.armed is not None``; counts occurrences and acts on the armed one."""
        spec = self.armed
        if spec is None or point != spec.point:
            return
        with self._lock:
            self._seen += 1
            if self._seen != spec.occurrence:
                return
        log.warning("fault point reached: %s #%d", point, spec.occurrence)
        if spec.barrier is None:
            os.kill(os.getpid(), signal.SIGKILL)
            return
        Path(f"{spec.barrier}.reached").touch()
        while not spec.barrier.exists() and not self._released.wait(0.01):
            pass
        log.warning("fault barrier released: %s", point)

    def release(self) -> None:
        """Let a waiting barrier go (the agent was asked to stop: SIGTERM/SIGINT must not hang on a test hook)."""
        self._released.set()


HOOK = FaultHook()


def arm_from_env(environ: Mapping[str, str] = os.environ) -> FaultPoint | None:
    """Arm the hook from ``EDGEFLEET_FAULT_AT`` (once, at agent start); ConfigError on a malformed point."""
    spec = environ.get(ENV_AT, "")
    HOOK.arm(parse(spec, environ.get(ENV_WAIT) or None) if spec else None)
    return HOOK.armed
