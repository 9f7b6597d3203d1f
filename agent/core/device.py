"""The state every device shell starts from: one constructor for the agent's runtime and the simulator.

``DeviceCore`` holds what both shells decide with: the device's identity and clocks (passed in: the
core never reads the clock), the lifecycle machine, the trust state and the intake over it, and the
bookkeeping of what was reported (error-event windows, the last retained state report, probation
timers). The shells add their own I/O state (store, host, MQTT client, counters) after calling
``DeviceCore.__init__``. No I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.core.intake import Intake, KeptVersions, carry_out
from agent.core.journal import State
from agent.core.lifecycle import Event, Seen, UpdateMachine
from agent.core.reports import EventReporter
from agent.core.trust import TrustState
from agent.errors import EdgeError
from agent.protocol.envelope import TrustAnchor
from agent.protocol.messages import Command, DesiredState
from agent.protocol.probe import ProbeRequest

log = logging.getLogger("agent")


class DeviceCore(EventReporter):
    """Identity, clocks, the lifecycle machine, the trust state and intake, report bookkeeping."""

    def __init__(
        self,
        device_id: str,
        trust: TrustAnchor,
        *,
        skew: float,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.device_id = device_id
        self.clock = clock
        self.monotonic = monotonic
        self.machine = UpdateMachine()
        #: replay floor, expiry, downgrade floor, ignored blobs: the TrustState; decisions: its Intake
        self.trusted = TrustState(trust, device_id=device_id, skew=skew)
        self.intake = Intake(self.trusted)
        self._error_counts: dict[str, tuple[float, int]] = {}
        self._probation_since: float | None = None  # host clock
        self._probation_next: float | None = None  # monotonic
        self._pending_desired: bytes | None = None  # a desired state that arrived while busy
        self._published_lifecycle: State | None = None
        self._last_state: bytes | None = None  # what the last report said (timestamp aside)
        self._birth_sent = False  # the full report went out on the current connection
        self._telemetry_next = 0.0

    def _kept_versions(self) -> KeptVersions:
        """What the device keeps (the store, or the simulator's table): the intake's view of it."""
        raise NotImplementedError

    if TYPE_CHECKING:  # the rest of ``IntakeShell``: each shell's own I/O

        def _feed(self, event: Event) -> None: ...

        def _accepted(self, desired: DesiredState, blob: bytes, message: str) -> None: ...

        def _save_desired(self, desired: DesiredState, blob: bytes) -> EdgeError | None: ...

        def _purge(self, cmd: Command, seen: Seen) -> None: ...

        def _probe(self, cmd: Command, seen: Seen, request: ProbeRequest) -> None: ...

    # -- signed messages in: the trust state checks, the intake decides, ``carry_out`` runs the shell --------

    def _on_desired(self, blob: bytes) -> None:
        carry_out(self.intake.desired(blob, self.machine, self._kept_versions(), self.clock()), blob, self)

    def _on_command(self, blob: bytes) -> None:
        now = self.clock()
        try:
            cmd = self.trusted.open_command(blob, self.machine.record, now)
        except EdgeError as exc:
            self._error_event(exc.code, f"command rejected: {exc.message}")
            return
        log.info("command", extra={"fields": {"action": cmd.action, "command_id": cmd.command_id, "seq": cmd.seq}})
        carry_out(self.intake.command(cmd, self.machine, self._kept_versions(), now), blob, self)

    def _defer(self, blob: bytes) -> None:
        self._pending_desired = blob  # not acknowledged: a crash before it runs re-delivers it
        log.info("desired state deferred until %s ends", self.machine.state.value)

    def _take_deferred(self) -> None:
        """Run the desired state deferred while busy (``_defer``), once the device is idle again."""
        if self.machine.state is State.IDLE and self._pending_desired is not None:
            blob, self._pending_desired = self._pending_desired, None
            self._on_desired(blob)


__all__ = ["DeviceCore"]
