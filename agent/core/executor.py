"""Feeding the lifecycle and dispatching its effects: the loop both device shells run. No I/O.

Theory of operation
    ``feed`` hands an event to the ``UpdateMachine`` and runs the effects it returns, in order,
    through the shell's executors (one method per effect type, ``ExecutorShell``); an executor
    that finishes with a result (verification, warm-up, restore) returns the next event, which is
    fed after the current effects have all run. An event the transition table refuses changes
    nothing and is reported (``_lifecycle_refused``). After each fed event the shell hears
    ``_transitioned`` (it publishes a StateReport when the lifecycle state moved). The agent's
    runtime executes effects against disk and an inference runtime, the simulator against memory
    and a stand-in; this loop is the same for both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from agent.core.journal import JournalRecord
from agent.core.lifecycle import (
    CommandResult,
    Commit,
    Continue,
    DiscardDownload,
    Effect,
    Event,
    LoadCandidate,
    Persist,
    Report,
    Restore,
    ServeCommitted,
    StartDownload,
    SwitchTo,
    UpdateMachine,
    Verify,
    WatchProbation,
)
from agent.errors import LifecycleError
from agent.protocol.messages import ModelRef


class ExecutorShell(Protocol):
    """The executors a device shell provides (lifecycle.py documents each effect)."""

    machine: UpdateMachine

    def _persist(self, record: JournalRecord) -> None: ...

    def _event(
        self, kind: str, *, severity: str = "info", message: str = "", code: str | None = None,
        model: ModelRef | None = None, deployment_id: str | None = None, command_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None: ...

    def _command_result(self, command_id: str, action: str, *, ok: bool, message: str) -> None: ...

    def _serve_committed(self, ref: ModelRef | None, *, fallback: bool) -> Event | None: ...

    def _start_download(self, target: ModelRef, artifact_id: str, *, resume: bool) -> Event | None: ...

    def _discard_download(self, artifact_id: str) -> None: ...

    def _verify(self, target: ModelRef, artifact_id: str) -> Event: ...

    def _load_candidate(self, target: ModelRef) -> Event: ...

    def _switch_to(self, target: ModelRef) -> Event | None: ...

    def _watch_probation(self) -> None: ...

    def _commit(self, target: ModelRef) -> None: ...

    def _restore(self, target: ModelRef | None, discard: ModelRef | None, artifact_id: str | None) -> Event: ...

    def _lifecycle_refused(self, event: Event, exc: LifecycleError) -> None: ...

    def _transitioned(self) -> None: ...


def feed(event: Event, shell: ExecutorShell) -> None:
    """Apply ``event`` and everything its effects answer with, breadth first."""
    pending: deque[Event] = deque([event])
    while pending:
        ev = pending.popleft()
        try:
            effects = shell.machine.handle(ev)
        except LifecycleError as exc:
            shell._lifecycle_refused(ev, exc)
            continue
        pending.extend(execute_all(effects, shell))
        shell._transitioned()  # one retained StateReport per transition, after its side effects


def execute_all(effects: Iterable[Effect], shell: ExecutorShell) -> list[Event]:
    """Run effects in order; collect the events they answer with (fed after all of them ran)."""
    answers: list[Event] = []
    for effect in effects:
        answer = execute(effect, shell)
        if answer is not None:
            answers.append(answer)
    return answers


def execute(effect: Effect, shell: ExecutorShell) -> Event | None:
    """The executor table: one branch per effect type."""
    if isinstance(effect, Persist):
        shell._persist(effect.record)
    elif isinstance(effect, Report):
        shell._event(effect.kind, severity=effect.severity, message=effect.message, code=effect.code,
                     model=effect.model, deployment_id=effect.deployment_id, data=effect.data)
    elif isinstance(effect, CommandResult):
        shell._command_result(effect.command_id, effect.action, ok=effect.ok, message=effect.message)
    elif isinstance(effect, ServeCommitted):
        return shell._serve_committed(effect.ref, fallback=effect.fallback)
    elif isinstance(effect, StartDownload):
        return shell._start_download(effect.target, effect.artifact_id, resume=effect.resume)
    elif isinstance(effect, DiscardDownload):
        shell._discard_download(effect.artifact_id)
    elif isinstance(effect, Verify):
        return shell._verify(effect.target, effect.artifact_id)
    elif isinstance(effect, LoadCandidate):
        return shell._load_candidate(effect.target)
    elif isinstance(effect, SwitchTo):
        return shell._switch_to(effect.target)
    elif isinstance(effect, WatchProbation):
        shell._watch_probation()
    elif isinstance(effect, Commit):
        shell._commit(effect.target)
    elif isinstance(effect, Restore):
        return shell._restore(effect.target, effect.discard, effect.artifact_id)
    elif isinstance(effect, Continue):
        return effect.event
    return None


__all__ = ["ExecutorShell", "execute", "execute_all", "feed"]
