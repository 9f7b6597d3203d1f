"""The intake: a signed message plus the device's state in, one decision out. No I/O.

Theory of operation
    In the spirit of h11's connection object, the intake decides and the shell acts. The agent's
    runtime and the simulator call ``Intake.desired`` for every desired state and
    ``Intake.command`` for every command, then carry the decision out:

      * ``Duplicate``: the retained desired state (or one already refused), re-delivered: nothing;
      * ``Rejected``: refused, nothing changes; ``seen`` (when set) is fed so its seq is used up;
        the shell reports ``desired.rejected`` (desired states) or answers the command;
      * ``Deferred``: the device is busy (the transition table does not accept the event now):
        the shell holds the blob and offers it again once idle; nothing is acknowledged;
      * ``Accepted``: the lifecycle ``event`` to feed (``Seen`` when there is nothing to do, or
        Deploy / Activate / SwitchBack); a bare ``Seen`` is fed before ``desired.accepted`` is
        reported, a transition after it; ``save`` asks the shell to store the desired state first
        (the download reads it back);
      * ``Answered``: a command answered at once (ping, already serving, busy): feed ``seen``,
        send the result;
      * ``Purge``: the shell removes versions nothing needs (it owns the store);
      * ``Probe``: the shell times the named candidate variants of the parsed ``request`` off the
        serving path and reports ``measurement`` messages (agent/protocol/probe.py); the lifecycle
        is not involved. A probe command whose arguments do not parse is ``Answered`` ("bad probe").

    Whether the device may take an event now is the transition table's answer
    (``UpdateMachine.accepts``), not a state list restated here. Trust (signature, freshness,
    replay floor, downgrade floor, ignored blobs) is ``TrustState``'s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from agent.core.journal import State, Via
from agent.core.lifecycle import Activate, Deploy, Event, Seen, SwitchBack, UpdateMachine
from agent.core.trust import TrustState
from agent.errors import EdgeError, IntegrityError, VersionNotKeptError
from agent.protocol.events import EventKind
from agent.protocol.messages import Command, DesiredState, ModelRef
from agent.protocol.probe import ProbeRequest


class KeptVersions(Protocol):
    """What the intake asks of the device's store (the agent's ModelStore, the simulator's memory)."""

    def committed_refs(self, name: str | None = None) -> Sequence[ModelRef]:
        """Committed versions kept (optionally of one model), most recently committed first."""
        ...

    def committed_artifact(self, ref: ModelRef) -> str | None:
        """The artifact id of the newest committed install of ``ref`` (None when not kept)."""
        ...


@dataclass(frozen=True)
class Duplicate:
    """Re-delivered: nothing to do."""


@dataclass(frozen=True)
class Rejected:
    error: EdgeError
    seen: Seen | None = None
    model: ModelRef | None = None
    #: also raise ``error.<code>`` (an operator asked for something the device cannot do)
    error_event: bool = False


@dataclass(frozen=True)
class Deferred:
    blob: bytes


@dataclass(frozen=True)
class Accepted:
    desired: DesiredState
    event: Seen | Deploy | Activate | SwitchBack
    message: str
    seen: Seen
    save: bool = False


@dataclass(frozen=True)
class Answered:
    command: Command
    seen: Seen
    ok: bool
    message: str
    #: also raise ``error.<code>`` with this error
    error: EdgeError | None = None


@dataclass(frozen=True)
class Switch:
    command: Command
    event: Activate | SwitchBack


@dataclass(frozen=True)
class Purge:
    command: Command
    seen: Seen


@dataclass(frozen=True)
class Probe:
    """Time candidate variants off the serving path (any lifecycle state: nothing is installed or switched)."""

    command: Command
    seen: Seen
    request: ProbeRequest


DesiredDecision: TypeAlias = Duplicate | Rejected | Deferred | Accepted
CommandDecision: TypeAlias = Rejected | Answered | Switch | Purge | Probe


class Intake:
    """Decides what a signed message does to one device (see the module docstring)."""

    def __init__(self, trust: TrustState) -> None:
        self.trust = trust

    # -- desired states ----------------------------------------------------------------------------

    def desired(self, blob: bytes, machine: UpdateMachine, kept: KeptVersions, now: float) -> DesiredDecision:
        digest = hashlib.sha256(blob).hexdigest()
        record = machine.record
        if self.trust.known(digest, record):
            return Duplicate()  # the retained desired state, re-delivered on reconnect
        try:
            desired = self.trust.open_desired(blob, digest, record, now)
        except EdgeError as exc:
            return Rejected(exc)
        seen = Seen(now, desired.seq, digest)
        downgrade = self.trust.downgrade(desired, record)
        if downgrade is not None:
            return Rejected(downgrade, seen, desired.model)
        if desired.action == "deploy":
            return self._deploy(desired, blob, seen, machine, kept)
        return self._pin(desired, blob, seen, machine, kept)

    @staticmethod
    def _deploy(
        desired: DesiredState, blob: bytes, seen: Seen, machine: UpdateMachine, kept: KeptVersions
    ) -> DesiredDecision:
        now, digest = seen.now, seen.desired_sha256
        info = desired.artifact
        if info is None:
            raise IntegrityError("the desired state lacks a field a deploy needs")
        record = machine.record
        if record.committed == desired.model and kept.committed_artifact(record.committed) == info.artifact_id:
            return Accepted(desired, seen, "already serving this version", seen)
        if machine.state is State.DOWNLOADING and record.artifact_id == info.artifact_id:
            return Accepted(desired, seen, "already downloading this artifact", seen)  # re-signed: keep on
        event = Deploy(desired.model, info.artifact_id, now, desired.deployment_id, seq=desired.seq,
                       desired_sha256=digest)
        if not machine.accepts(event):
            return Deferred(blob)  # not acknowledged: a crash before it runs re-delivers it
        return Accepted(desired, event, "deploying", seen, save=True)

    @staticmethod
    def _pin(
        desired: DesiredState, blob: bytes, seen: Seen, machine: UpdateMachine, kept: KeptVersions
    ) -> DesiredDecision:
        now, digest = seen.now, seen.desired_sha256
        target, record = desired.model, machine.record
        if record.committed == target and machine.state is State.IDLE:
            return Accepted(desired, seen, "already serving this version", seen)
        if target not in kept.committed_refs(target.name):
            return Rejected(VersionNotKeptError(target.name, target.version), seen, target, error_event=True)
        kind = SwitchBack if _backwards(target, record.committed) else Activate
        event = kind(target, now, via=Via.PIN, deployment_id=desired.deployment_id, seq=desired.seq,
                     desired_sha256=digest)
        if not machine.accepts(event):
            return Deferred(blob)
        return Accepted(desired, event, "switching to a kept version", seen)

    # -- commands ------------------------------------------------------------------------------------

    def command(self, cmd: Command, machine: UpdateMachine, kept: KeptVersions, now: float) -> CommandDecision | None:
        """What an authentic command does (``TrustState.open_command`` first); None for an action it does not know."""
        seen = Seen(now, cmd.seq)
        if cmd.action == "ping":
            return Answered(cmd, seen, ok=True, message="pong")
        if cmd.action == "purge":
            return Purge(cmd, seen)
        if cmd.action == "probe":
            return self._probe(cmd, seen)
        if cmd.action in ("rollback", "activate"):
            return self._switch(cmd, seen, machine, kept, now)
        return None

    @staticmethod
    def _probe(cmd: Command, seen: Seen) -> CommandDecision:
        try:
            request = ProbeRequest.from_args(cmd.args)
        except EdgeError as exc:
            return Answered(cmd, seen, ok=False, message=f"bad probe: {exc.message}")
        return Probe(cmd, seen, request)

    @staticmethod
    def _switch(cmd: Command, seen: Seen, machine: UpdateMachine, kept: KeptVersions, now: float) -> CommandDecision:
        record, state = machine.record, machine.state
        name = cmd.model or (record.committed.name if record.committed else None)
        target: ModelRef | None = None
        if name is not None and cmd.version is not None:
            target = ModelRef(name, cmd.version)
        elif name is not None and cmd.action == "rollback":
            if state in (State.PROBATION, State.DOWNLOADING) and record.committed is not None:
                target = record.committed  # roll back the update in progress
            else:
                older = [ref for ref in kept.committed_refs(name) if ref != record.committed]
                target = older[0] if older else None
        if target is None or target not in kept.committed_refs(target.name):
            err = VersionNotKeptError(name or "model", None if target is None else target.version)
            return Answered(cmd, seen, ok=False, message=err.message, error=err)
        if target == record.committed and state is State.IDLE:
            return Answered(cmd, seen, ok=True, message=f"already serving version {target.version}")
        event: Activate | SwitchBack
        if cmd.action == "rollback":
            event = SwitchBack(target, now, via=Via.ROLLBACK, command_id=cmd.command_id, seq=cmd.seq)
        else:
            event = Activate(target, now, via=Via.ACTIVATE, command_id=cmd.command_id, seq=cmd.seq)
        if not machine.accepts(event):
            return Answered(cmd, seen, ok=False, message=f"busy ({state.value}); send it again when idle")
        return Switch(cmd, event)


class IntakeShell(Protocol):
    """What a device shell offers ``carry_out``: the agent's runtime and the simulator implement it."""

    def _feed(self, event: Event) -> None: ...

    def _accepted(self, desired: DesiredState, blob: bytes, message: str) -> None: ...

    def _event(
        self, kind: str, *, severity: str = "info", message: str = "", code: str | None = None,
        model: ModelRef | None = None, deployment_id: str | None = None, command_id: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None: ...

    def _defer(self, blob: bytes) -> None: ...

    def _save_desired(self, desired: DesiredState, blob: bytes) -> EdgeError | None: ...

    def _purge(self, cmd: Command, seen: Seen) -> None: ...

    def _probe(self, cmd: Command, seen: Seen, request: ProbeRequest) -> None: ...

    def _command_result(self, command_id: str, action: str, *, ok: bool, message: str) -> None: ...

    def _error_event(self, code: str, message: str) -> None: ...


def carry_out(decision: DesiredDecision | CommandDecision | None, blob: bytes, shell: IntakeShell) -> None:
    """Execute a decision through ``shell``, in the one order both shells keep.

    A bare ``Seen`` is fed before ``desired.accepted`` is reported (a crash in between leaves the
    re-delivered message a duplicate, not a replay); a transition is fed after it. A desired state
    that cannot be saved for its download is refused (its seq used up).
    """
    if isinstance(decision, Rejected):
        _rejected(decision, shell)
    elif isinstance(decision, Deferred):
        shell._defer(decision.blob)
    elif isinstance(decision, Accepted):
        desired = decision.desired
        if decision.save:
            failed = shell._save_desired(desired, blob)
            if failed is not None:
                _rejected(Rejected(failed, decision.seen, desired.model), shell, severity="error")
                return
        if decision.event is decision.seen:
            shell._feed(decision.seen)
            shell._accepted(desired, blob, decision.message)
        else:
            shell._accepted(desired, blob, decision.message)
            shell._feed(decision.event)
    elif isinstance(decision, Answered):
        shell._feed(decision.seen)
        shell._command_result(decision.command.command_id, decision.command.action, ok=decision.ok,
                              message=decision.message)
        if decision.error is not None:
            shell._error_event(decision.error.code, decision.error.message)
    elif isinstance(decision, Purge):
        shell._purge(decision.command, decision.seen)
    elif isinstance(decision, Probe):
        shell._probe(decision.command, decision.seen, decision.request)
    elif isinstance(decision, Switch):
        shell._feed(decision.event)


def _rejected(decision: Rejected, shell: IntakeShell, *, severity: str = "warning") -> None:
    if decision.seen is not None:
        shell._feed(decision.seen)
    err = decision.error
    shell._event(
        EventKind.DESIRED_REJECTED, severity=severity, code=err.code, message=err.message, model=decision.model
    )
    if decision.error_event:
        shell._error_event(err.code, err.message)


def _backwards(target: ModelRef, committed: ModelRef | None) -> bool:
    """A pin to another model, or to a version not newer than the committed one, is a switch back."""
    return committed is not None and (target.name != committed.name or target.version <= committed.version)


__all__ = [
    "Accepted",
    "Answered",
    "CommandDecision",
    "Deferred",
    "DesiredDecision",
    "Duplicate",
    "Intake",
    "IntakeShell",
    "KeptVersions",
    "Probe",
    "Purge",
    "Rejected",
    "Switch",
    "carry_out",
]
