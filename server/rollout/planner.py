"""The rollout planner: pure functions over plain data (no registry, broker or clock).

Theory of operation (hawkBit's cascade of groups plus Azure Device Update's fleet rollback)
    ``plan_waves`` splits a deployment's devices into waves: wave 0 is the canary
    (``canary_percent`` of the fleet, at least one device when the percentage is above zero,
    online devices first so the canary proves something), then waves of ``wave_percent`` each.

    Each device moves through server-side phases, driven by the events and state reports it
    sends (``observe_event``/``observe_state``)::

        pending -> dispatched -> accepted -> downloading -> installing -> probation -> committed
                        \\___________\\_____________\\_____________\\___________\\-> failed
        (fleet rollback)  any released phase -> rolling_back -> rolled_back
        (halt)            pending -> skipped; no version to go back to -> cancelled

    ``decide`` runs on every tick of a running deployment, in this order:
      1. an online device that made no progress for ``device_timeout_s`` has failed ("timeout");
         an offline device is *deferred*, never timed out: its retained desired state lets it
         converge whenever it reconnects;
      2. halt when failed / released > ``max_failures_percent`` (released = devices whose desired
         state was published); evaluated continuously, not only at wave boundaries;
      3. pending devices of released waves are dispatched (late joiners, resume after a crash);
      4. the current wave is settled when every device in it and in earlier waves is settled
         (committed, failed, ...) or deferred, and at least one device has committed so far
         (a wave of only offline devices proves nothing); then the next wave is released, or
         the deployment completes after the last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from agent.protocol.events import EventKind


class Phase(str, Enum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    PROBATION = "probation"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


#: Released and not finished: the device is working on it (or will, once it is back online).
IN_FLIGHT = frozenset({Phase.DISPATCHED, Phase.ACCEPTED, Phase.DOWNLOADING, Phase.INSTALLING, Phase.PROBATION})
SETTLED = frozenset(
    {Phase.COMMITTED, Phase.FAILED, Phase.ROLLED_BACK, Phase.SKIPPED, Phase.CANCELLED, Phase.SUPERSEDED}
)
TERMINAL = SETTLED
_RANK = {p: i for i, p in enumerate(
    (Phase.PENDING, Phase.DISPATCHED, Phase.ACCEPTED, Phase.DOWNLOADING, Phase.INSTALLING, Phase.PROBATION)
)}
TIMEOUT_CODE = "timeout"


@dataclass(frozen=True)
class Policy:
    canary_percent: float
    wave_percent: float
    max_failures_percent: float
    device_timeout_s: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_percent <= 100.0:
            raise ValueError("canary_percent must be within 0..100")
        if not 0.0 < self.wave_percent <= 100.0:
            raise ValueError("wave_percent must be within (0, 100]")
        if not 0.0 <= self.max_failures_percent <= 100.0:
            raise ValueError("max_failures_percent must be within 0..100")
        if self.device_timeout_s <= 0:
            raise ValueError("device_timeout_s must be positive")


def wave_sizes(n: int, canary_percent: float, wave_percent: float) -> list[int]:
    """Sizes of the waves for ``n`` devices; they sum to ``n`` (empty for n == 0)."""
    if n <= 0:
        return []
    sizes: list[int] = []
    canary = min(n, math.ceil(n * canary_percent / 100.0 - 1e-9)) if canary_percent > 0 else 0
    if canary:
        sizes.append(canary)
    step = max(1, math.ceil(n * wave_percent / 100.0 - 1e-9))
    rest = n - canary
    while rest > 0:
        take = min(step, rest)
        sizes.append(take)
        rest -= take
    return sizes


def plan_waves(
    device_ids: Sequence[str], *, canary_percent: float, wave_percent: float, online: Mapping[str, bool] | None = None
) -> list[list[str]]:
    """Deterministic waves: online devices first (so the canary can answer), then by id."""
    online = online or {}
    ordered = sorted(set(device_ids), key=lambda d: (not online.get(d, False), d))
    out: list[list[str]] = []
    i = 0
    for size in wave_sizes(len(ordered), canary_percent, wave_percent):
        out.append(ordered[i : i + size])
        i += size
    return out


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    wave: int
    phase: Phase
    online: bool
    updated_at: float
    code: str | None = None


@dataclass(frozen=True)
class WaveStats:
    wave: int
    size: int
    committed: int
    failed: int
    in_flight: int
    deferred: int
    pending: int
    other: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Decision:
    current_wave: int
    dispatch: tuple[str, ...] = ()
    timed_out: tuple[str, ...] = ()
    halt_reason: str | None = None
    complete: bool = False
    advanced: bool = False
    waiting_for: str | None = None


def failure_level(devices: Sequence[DeviceView], timed_out: frozenset[str] = frozenset()) -> tuple[int, int]:
    """(failed, released) counting devices about to time out as failed."""
    released = failed = 0
    for d in devices:
        if d.phase in (Phase.PENDING, Phase.SKIPPED, Phase.SUPERSEDED):
            continue
        released += 1
        if d.phase is Phase.FAILED or d.device_id in timed_out:
            failed += 1
    return failed, released


def decide(
    policy: Policy, devices: Sequence[DeviceView], *, current_wave: int, wave_count: int, now: float
) -> Decision:
    """What a running deployment does next (see the module docstring for the rules)."""
    timed_out = frozenset(
        d.device_id
        for d in devices
        if d.phase in IN_FLIGHT and d.online and now - d.updated_at > policy.device_timeout_s
    )
    failed, released = failure_level(devices, timed_out)
    if released and failed * 100.0 > policy.max_failures_percent * released:
        pct = 100.0 * failed / released
        return Decision(
            current_wave=current_wave,
            timed_out=tuple(sorted(timed_out)),
            halt_reason=(
                f"{failed} of {released} released device(s) failed ({pct:.0f}% > max {policy.max_failures_percent:g}%)"
            ),
        )

    wave = current_wave
    released_waves = [d for d in devices if d.wave <= wave]
    dispatch = tuple(sorted(d.device_id for d in released_waves if d.phase is Phase.PENDING))

    def unsettled(d: DeviceView) -> bool:
        if d.phase in SETTLED or d.device_id in timed_out:
            return False
        if d.phase is Phase.PENDING:
            return True  # being dispatched this tick
        return not (d.phase in IN_FLIGHT and not d.online)  # offline = deferred: converges on reconnect

    waiting = [d for d in released_waves if unsettled(d)]
    any_committed = any(d.phase is Phase.COMMITTED for d in devices)
    if waiting:
        return Decision(
            current_wave=wave,
            dispatch=dispatch,
            timed_out=tuple(sorted(timed_out)),
            waiting_for=f"{len(waiting)} device(s) of wave {wave} still working",
        )
    if not any_committed and released_waves:
        return Decision(
            current_wave=wave,
            dispatch=dispatch,
            timed_out=tuple(sorted(timed_out)),
            waiting_for="no device has committed yet (released devices are offline)",
        )
    if wave + 1 >= wave_count:
        return Decision(current_wave=wave, dispatch=dispatch, timed_out=tuple(sorted(timed_out)), complete=True)
    nxt = wave + 1
    dispatch = tuple(sorted({*dispatch, *(d.device_id for d in devices if d.wave == nxt and d.phase is Phase.PENDING)}))
    return Decision(current_wave=nxt, dispatch=dispatch, timed_out=tuple(sorted(timed_out)), advanced=True)


def converge(devices: Sequence[DeviceView]) -> tuple[str, ...]:
    """A finished-but-active deployment only dispatches its late joiners."""
    return tuple(sorted(d.device_id for d in devices if d.phase is Phase.PENDING))


def rollback_settled(devices: Sequence[DeviceView]) -> bool:
    """A fleet rollback is done when no online device is still rolling back."""
    return not any(d.phase is Phase.ROLLING_BACK and d.online for d in devices)


def wave_stats(devices: Sequence[DeviceView], wave_count: int) -> list[WaveStats]:
    out = []
    for w in range(wave_count):
        ds = [d for d in devices if d.wave == w]
        committed = sum(d.phase is Phase.COMMITTED for d in ds)
        failed = sum(d.phase is Phase.FAILED for d in ds)
        in_flight = sum(d.phase in IN_FLIGHT and d.online for d in ds)
        deferred = sum(d.phase in IN_FLIGHT and not d.online for d in ds)
        pending = sum(d.phase is Phase.PENDING for d in ds)
        other = len(ds) - committed - failed - in_flight - deferred - pending
        out.append(WaveStats(w, len(ds), committed, failed, in_flight, deferred, pending, other))
    return out


# -- phases from what devices report --------------------------------------------------------------------

_EVENT_PHASE: Mapping[str, Phase] = {
    EventKind.DESIRED_ACCEPTED: Phase.ACCEPTED,
    EventKind.DESIRED_REJECTED: Phase.FAILED,
    EventKind.DOWNLOAD_STARTED: Phase.DOWNLOADING,
    EventKind.DOWNLOAD_PROGRESS: Phase.DOWNLOADING,
    EventKind.DOWNLOAD_COMPLETED: Phase.INSTALLING,
    EventKind.LIFECYCLE_VERIFYING: Phase.INSTALLING,
    EventKind.LIFECYCLE_STAGED: Phase.INSTALLING,
    EventKind.LIFECYCLE_WARMING: Phase.INSTALLING,
    EventKind.LIFECYCLE_PROBATION: Phase.PROBATION,
    EventKind.LIFECYCLE_COMMITTED: Phase.COMMITTED,
    EventKind.LIFECYCLE_ROLLED_BACK: Phase.FAILED,
    EventKind.LIFECYCLE_FAILED: Phase.FAILED,
}


@dataclass(frozen=True)
class Observation:
    phase: Phase
    reason: str | None = None
    code: str | None = None
    progress: float | None = None


def observe_event(
    current: Phase,
    current_code: str | None,
    kind: str,
    *,
    message: str = "",
    code: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> Observation | None:
    """The phase an event moves a deployment's device to, or None when it changes nothing.

    Phases only move forward; a failure is final except a timeout (the device was only slow),
    which a later commit overrides. Rolling-back devices listen only for proof they are back.
    """
    data = data or {}
    if current is Phase.ROLLING_BACK:
        if kind == EventKind.LIFECYCLE_ROLLED_BACK:
            return Observation(Phase.ROLLED_BACK, reason=_reason(message, data))
        return None
    target = _EVENT_PHASE.get(kind)
    if target is None:
        return None
    if current is Phase.FAILED:
        if current_code == TIMEOUT_CODE and target is Phase.COMMITTED:
            return Observation(Phase.COMMITTED, reason="committed after the timeout")
        return None
    if current not in IN_FLIGHT:
        return None  # pending (not sent yet: an event about an older desired state), or settled
    if target is Phase.FAILED:
        if kind == EventKind.LIFECYCLE_ROLLED_BACK:
            check = data.get("check")
            return Observation(Phase.FAILED, reason=_reason(message, data),
                               code=f"health.{check}" if isinstance(check, str) and check else code or "rolled_back")
        return Observation(Phase.FAILED, reason=_reason(message, data), code=code or kind.split(".", 1)[1])
    if target is Phase.COMMITTED:
        return Observation(Phase.COMMITTED)
    progress = _progress(data) if target is Phase.DOWNLOADING else None
    if _RANK[target] < _RANK[current]:
        return None
    if target is current and progress is None:
        return None
    return Observation(target, progress=progress)


def observe_state(
    current: Phase,
    current_code: str | None,
    *,
    version: int,
    previous_version: int | None,
    active_version: int | None,
    active_state: str | None,
) -> Observation | None:
    """Catch up from a state report (events may have been missed while no server was running)."""
    if current is Phase.ROLLING_BACK:
        if previous_version is not None and active_version == previous_version:
            return Observation(Phase.ROLLED_BACK, reason=f"running version {previous_version} again")
        return None
    if active_version != version or active_state != "committed":
        return None
    if current in IN_FLIGHT:
        return Observation(Phase.COMMITTED, reason="state report")
    if current is Phase.FAILED and current_code == TIMEOUT_CODE:
        return Observation(Phase.COMMITTED, reason="committed after the timeout")
    return None


def _reason(message: str, data: Mapping[str, Any]) -> str:
    reason = data.get("reason")
    text = reason if isinstance(reason, str) and reason else message
    return text[:500] if text else "no reason given"


def _progress(data: Mapping[str, Any]) -> float | None:
    received, total = data.get("received"), data.get("total")
    if isinstance(received, int) and isinstance(total, int) and total > 0:
        return max(0.0, min(1.0, received / total))
    return None
