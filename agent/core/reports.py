"""Building the events a device reports: one implementation for the agent's runtime and the simulator.

A shell inherits ``EventReporter`` and provides ``_emit`` (log and publish, or count and publish)
and ``_serving`` (the model now answering requests). Errors are rate-limited here: at most
``ERROR_EVENTS_PER_WINDOW`` ``error.<code>`` events per code every ``ERROR_WINDOW_S`` seconds, so a
flood of bad input stays local. No I/O.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from agent.protocol.events import EventKind, error_kind
from agent.protocol.messages import Event, ModelRef

ERROR_EVENTS_PER_WINDOW = 5
ERROR_WINDOW_S = 10.0

log = logging.getLogger("agent")


class EventReporter:
    """``_event`` / ``_error_event`` / ``_command_result`` over the shell's ``_emit``."""

    device_id: str
    clock: Callable[[], float]
    monotonic: Callable[[], float]
    _error_counts: dict[str, tuple[float, int]]

    def _emit(self, event: Event) -> None:
        raise NotImplementedError

    def _serving(self) -> ModelRef | None:
        raise NotImplementedError

    def _event(
        self,
        kind: str,
        *,
        severity: str = "info",
        message: str = "",
        code: str | None = None,
        model: ModelRef | None = None,
        deployment_id: str | None = None,
        command_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self._emit(
            Event(
                device_id=self.device_id,
                ts=self.clock(),
                event_id=uuid.uuid4().hex,
                kind=kind,
                severity=severity,
                message=message,
                code=code,
                deployment_id=deployment_id,
                model=model,
                command_id=command_id,
                data=dict(data or {}),
            )
        )

    def _error_event(self, code: str, message: str) -> None:
        """``error.<code>``, at most ERROR_EVENTS_PER_WINDOW per code every ERROR_WINDOW_S (a flood stays local)."""
        now = self.monotonic()
        start, count = self._error_counts.get(code, (now, 0))
        if now - start > ERROR_WINDOW_S:
            start, count = now, 0
        self._error_counts[code] = (start, count + 1)
        if count >= ERROR_EVENTS_PER_WINDOW:
            log.debug("error event suppressed", extra={"fields": {"code": code}})
            return
        self._event(error_kind(code), severity="warning", code=code, message=message)

    def _command_result(self, command_id: str, action: str, *, ok: bool, message: str) -> None:
        active = self._serving()
        self._event(
            EventKind.COMMAND_RESULT,
            severity="info" if ok else "warning",
            message=message,
            command_id=command_id,
            model=active,
            data={"ok": ok, "action": action, "active": active.to_dict() if active else None, "message": message},
        )


__all__ = ["ERROR_EVENTS_PER_WINDOW", "ERROR_WINDOW_S", "EventReporter"]
