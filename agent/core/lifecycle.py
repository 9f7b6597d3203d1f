"""The update lifecycle: a transition table over journal records. Events in, effects out.

Theory of operation
    The agent serves one model. Updating it walks this path, one state per step that can
    fail or take time:

        idle --Deploy--> downloading --DownloadComplete--> verifying --Verified--> staged
             --Warm--> warming --WarmedUp--> probation --Sample(pass)--> idle (new version committed)

    ``Failed`` in any state of that path, and ``Sample(fail)`` in probation, go to
    rolling_back, whose single effect puts the committed version back in service (when it
    ever left) and discards the candidate; ``RolledBack`` returns to idle and reports what
    happened: ``lifecycle.failed`` when the candidate never served (download, verification),
    ``lifecycle.rolled_back`` when it did or was loaded (warm-up, probation), with the phase
    and the check that failed. A kept version is switched to without download by the signed
    ``activate`` command (idle --Activate--> warming: warm-up, probation and automatic
    rollback apply) or by ``rollback`` / a backwards ``pin`` (--SwitchBack--> rolling_back:
    the operator names a version that was committed before; no probation).

    Rules (h11 style; everything that affects transitions lives in this file):
      1. Each transition returns a new JournalRecord and, as its first effect, ``Persist`` of
         that record. The shell executes effects in order, so the journal always names the
         state before a side effect runs (kill -9 at any point resumes from the journal, see
         journal.py's table). One exception, on purpose: the reports that end a rollback are
         published *before* the journal write that ends it (so is a startup fallback's), so a crash
         in between repeats the (idempotent) rollback and its report: at least once, never lost. A commit is the
         other way round: it is announced only once it is durable.
      2. ``committed`` changes only on a commit (probation passed), on a finished operator
         switch, or on a startup fallback. It never names a candidate.
      3. An event that the table does not list for the current state raises LifecycleError
         and changes nothing: no state, no record, no effects.
      4. Time enters only as ``now`` on events; no clock is read here. Probation decisions
         are delegated to the pure policy in health.py.
      5. Effects that finish with a result (verification, warm-up, restore) are answered by
         the shell with the next event (Verified / Failed / WarmedUp / RolledBack).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

from agent.core.health import Outcome, ProbationPolicy, StatsLike, Verdict, decide
from agent.core.journal import (
    DEFAULT_RESTART_LIMIT,
    Failure,
    JournalRecord,
    Resume,
    State,
    Via,
    resume_action,
)
from agent.errors import LifecycleError, VersionNotKeptError
from agent.protocol.events import EventKind
from agent.protocol.messages import ModelRef

# -- events (inputs) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deploy:
    """A verified desired state asks for a new artifact (from idle; supersedes a transfer in progress).

    ``seq`` / ``desired_sha256`` of the signed message that asked are journaled in the same write
    as the new state, so a crash can neither lose the operation nor replay the message.
    """

    target: ModelRef
    artifact_id: str
    now: float
    deployment_id: str | None = None
    seq: int | None = None
    desired_sha256: str | None = None


@dataclass(frozen=True)
class Activate:
    """Switch forward to a kept version, through warm-up and probation (signed command or pin)."""

    target: ModelRef
    now: float
    via: Via = Via.ACTIVATE
    deployment_id: str | None = None
    command_id: str | None = None
    seq: int | None = None
    desired_sha256: str | None = None


@dataclass(frozen=True)
class SwitchBack:
    """Switch to a kept version that was committed before (signed rollback or backwards pin)."""

    target: ModelRef
    now: float
    via: Via = Via.ROLLBACK
    deployment_id: str | None = None
    command_id: str | None = None
    seq: int | None = None
    desired_sha256: str | None = None


@dataclass(frozen=True)
class Seen:
    """A signed message was authenticated: remember its sequence number and (desired) digest."""

    now: float
    seq: int | None = None
    desired_sha256: str | None = None


@dataclass(frozen=True)
class DownloadComplete:
    now: float


@dataclass(frozen=True)
class Verified:
    now: float


@dataclass(frozen=True)
class Warm:
    now: float


@dataclass(frozen=True)
class WarmedUp:
    """The candidate loaded beside the serving model and passed its health check."""

    now: float
    policy: ProbationPolicy
    baseline: StatsLike | None = None


@dataclass(frozen=True)
class Sample:
    """Serving statistics of the candidate since it switched in."""

    now: float
    stats: StatsLike


@dataclass(frozen=True)
class Failed:
    now: float
    failure: Failure

    @classmethod
    def unkept(cls, now: float, target: ModelRef) -> Failed:
        """Warming ``target`` failed before it started: the store does not keep that version."""
        err = VersionNotKeptError(target.name, target.version)
        return cls(now, Failure("warming", err.code, err.message, "load"))


@dataclass(frozen=True)
class RolledBack:
    """The restore effect is done; ``restored`` is what serves now (None: nothing could be loaded)."""

    now: float
    restored: ModelRef | None


@dataclass(frozen=True)
class Fallback:
    """At start the committed version would not serve; ``serving`` is the kept version used instead."""

    now: float
    failed: ModelRef
    serving: ModelRef | None
    reason: str


@dataclass(frozen=True)
class Settled:
    """The resume step after a restart completed: clear the restart-loop counter."""

    now: float


Event: TypeAlias = (
    Deploy
    | Activate
    | SwitchBack
    | Seen
    | DownloadComplete
    | Verified
    | Warm
    | WarmedUp
    | Sample
    | Failed
    | RolledBack
    | Fallback
    | Settled
)

# -- effects (outputs, executed by agent.runtime.agent in order) ------------------------------------


@dataclass(frozen=True)
class Persist:
    """Write the journal record durably (before anything after it in the list)."""

    record: JournalRecord


@dataclass(frozen=True)
class Report:
    """Publish an event (``lifecycle.*``) and a fresh StateReport."""

    kind: str
    model: ModelRef | None
    severity: str = "info"
    message: str = ""
    code: str | None = None
    deployment_id: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommandResult:
    command_id: str
    action: str
    ok: bool
    message: str


@dataclass(frozen=True)
class ServeCommitted:
    """At start: load and serve ``ref`` (or, with ``fallback``, the newest other kept committed version)."""

    ref: ModelRef | None
    fallback: bool = False


@dataclass(frozen=True)
class StartDownload:
    target: ModelRef
    artifact_id: str
    resume: bool = False


@dataclass(frozen=True)
class DiscardDownload:
    artifact_id: str


@dataclass(frozen=True)
class Verify:
    """Check digests, decompress, write the version into the store (answered by Verified / Failed)."""

    target: ModelRef
    artifact_id: str


@dataclass(frozen=True)
class LoadCandidate:
    """Load ``target`` beside the serving model and health-check it (answered by WarmedUp / Failed)."""

    target: ModelRef


@dataclass(frozen=True)
class SwitchTo:
    """The one atomic reference switch to the loaded candidate."""

    target: ModelRef


@dataclass(frozen=True)
class WatchProbation:
    started_at: float
    window_s: float


@dataclass(frozen=True)
class Commit:
    """Mark ``target`` committed in the store, move the active pointer, prune to the last K."""

    target: ModelRef


@dataclass(frozen=True)
class Restore:
    """Make ``target`` the serving model (if it is not already) and discard ``discard``.

    ``target`` None means "whatever is committed keeps serving". ``discard`` is the candidate
    being abandoned: unloaded, and deleted from the store unless it is a kept committed version.
    Answered by RolledBack.
    """

    target: ModelRef | None
    discard: ModelRef | None
    artifact_id: str | None = None


@dataclass(frozen=True)
class Continue:
    """Feed this event back into the machine after the current effects."""

    event: Event


Effect: TypeAlias = (
    Persist
    | Report
    | CommandResult
    | ServeCommitted
    | StartDownload
    | DiscardDownload
    | Verify
    | LoadCandidate
    | SwitchTo
    | WatchProbation
    | Commit
    | Restore
    | Continue
)

# -- the machine ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probation:
    started_at: float
    policy: ProbationPolicy
    baseline: StatsLike | None


Result: TypeAlias = tuple[JournalRecord, list[Effect]]
#: Placeholder a handler puts where its Persist must go when that is not first (see rule 1).
_JOURNAL_HERE = Continue(Settled(-1.0))
_IN_PROGRESS = (State.DOWNLOADING, State.VERIFYING, State.STAGED, State.WARMING, State.PROBATION)


class UpdateMachine:
    """The lifecycle over one JournalRecord; ``handle`` is the only way to change it."""

    def __init__(self, record: JournalRecord | None = None) -> None:
        self._record = record or JournalRecord()
        self._probation: _Probation | None = None
        self.last_verdict: Verdict | None = None

    @property
    def record(self) -> JournalRecord:
        return self._record

    @property
    def state(self) -> State:
        return self._record.state

    @property
    def probation_started_at(self) -> float | None:
        return self._probation.started_at if self._probation else None

    def accepts(self, event: Event) -> bool:
        return (self.state, type(event)) in TRANSITIONS or type(event) in ANY_STATE

    def handle(self, event: Event) -> list[Effect]:
        """Apply one event; returns the effects to execute in order. LifecycleError if illegal here."""
        handler = TRANSITIONS.get((self.state, type(event))) or ANY_STATE.get(type(event))
        if handler is None:
            raise LifecycleError(self.state.value, type(event).__name__)
        record, effects = handler(self, event)
        if record is not self._record:
            record = replace(record, updated_at=_now(event))
            if _JOURNAL_HERE in effects:
                effects = [Persist(record) if e is _JOURNAL_HERE else e for e in effects]
            else:
                effects = [Persist(record), *effects]
        self._record = record
        if record.state is not State.PROBATION:
            self._probation = None
        return effects

    # -- recovery ----------------------------------------------------------------------------------

    @classmethod
    def recover(
        cls, record: JournalRecord, *, now: float, restart_limit: int = DEFAULT_RESTART_LIMIT
    ) -> tuple[UpdateMachine, list[Effect]]:
        """Rebuild the machine from the journal after a start; see journal.py's resume table."""
        action = resume_action(record, restart_limit=restart_limit)
        started = replace(record, attempts=record.attempts + 1, serial=record.serial + 1, updated_at=now)
        machine = cls(started)
        serve = ServeCommitted(started.committed, fallback=action is Resume.SERVE_FALLBACK)
        effects: list[Effect] = [Persist(started), serve]
        target, state = started.target, started.state
        if action in (Resume.SERVE, Resume.SERVE_FALLBACK):
            effects.append(Continue(Settled(now)))
        elif action is Resume.CONTINUE_DOWNLOAD and target is not None and started.artifact_id is not None:
            effects += [StartDownload(target, started.artifact_id, resume=True), Continue(Settled(now))]
        elif action is Resume.REVERIFY and target is not None and started.artifact_id is not None:
            effects.append(Verify(target, started.artifact_id))
        elif action is Resume.CONTINUE_WARMUP and target is not None:
            effects.append(Continue(Warm(now)))
        elif action is Resume.FINISH_ROLLBACK:
            effects.append(Restore(started.restore, started.target, started.artifact_id))
        else:
            # ROLL_BACK (crash in warming/probation), ABANDON (restart loop), or a record missing
            # what it needs to resume: give the operation up and serve the committed version.
            if action is Resume.ABANDON:
                failure = Failure(
                    phase=state.value,
                    code="restart_loop",
                    reason=f"the agent restarted {record.attempts + 1} times during {state.value}; giving up",
                )
            else:
                failure = Failure(phase=state.value, code="restart", reason=f"the agent restarted during {state.value}")
            rolling = started.next(
                attempts=started.attempts,
                state=State.ROLLING_BACK,
                restore=None,
                swapped=started.swapped or state is State.PROBATION,
                failure=failure,
            )
            machine._record = rolling
            effects = [Persist(rolling), serve, Restore(None, started.target, started.artifact_id)]
        return machine, effects

    # -- handlers (one per table entry) ------------------------------------------------------------

    def _seen(self, ev: Seen) -> Result:
        r = self._record
        changes = _seq_changes(r, ev.seq, ev.desired_sha256)
        if changes == {"last_seq": r.last_seq, "last_desired_sha256": r.last_desired_sha256}:
            return r, []
        return r.next(**changes, attempts=r.attempts), []

    def _settled(self, ev: Settled) -> Result:
        r = self._record
        return (r, []) if r.attempts == 0 else (r.next(), [])

    def _deploy(self, ev: Deploy) -> Result:
        r = self._record
        effects: list[Effect] = []
        if r.state is State.DOWNLOADING and r.artifact_id is not None:
            effects += [
                _failed_report(r, Failure("downloading", "superseded", "superseded by a newer desired state")),
                DiscardDownload(r.artifact_id),
            ]
        new = r.next(
            **_seq_changes(r, ev.seq, ev.desired_sha256),
            state=State.DOWNLOADING,
            target=ev.target,
            artifact_id=ev.artifact_id,
            deployment_id=ev.deployment_id,
            via=Via.DEPLOY,
            restore=None,
            swapped=False,
            failure=None,
            command_id=None,
        )
        return new, [*effects, StartDownload(ev.target, ev.artifact_id)]

    def _activate(self, ev: Activate) -> Result:
        r = self._record
        effects: list[Effect] = []
        if r.state is State.DOWNLOADING and r.artifact_id is not None:
            effects += [
                _failed_report(r, Failure("downloading", "superseded", f"superseded by {ev.via.value}")),
                DiscardDownload(r.artifact_id),
            ]
        new = r.next(
            **_seq_changes(r, ev.seq, ev.desired_sha256),
            state=State.WARMING,
            target=ev.target,
            artifact_id=None,
            deployment_id=ev.deployment_id,
            via=ev.via,
            restore=None,
            swapped=False,
            failure=None,
            command_id=ev.command_id,
        )
        return new, [
            *effects,
            Report(EventKind.LIFECYCLE_WARMING, ev.target, deployment_id=ev.deployment_id, data={"via": ev.via.value}),
            LoadCandidate(ev.target),
        ]

    def _switch_back(self, ev: SwitchBack) -> Result:
        r = self._record
        aborted = r.target if r.state in _IN_PROGRESS else None
        failure = None
        if aborted is not None:
            failure = Failure(r.state.value, "cancelled", f"cancelled by {ev.via.value} to version {ev.target.version}")
        new = r.next(
            **_seq_changes(r, ev.seq, ev.desired_sha256),
            state=State.ROLLING_BACK,
            target=aborted,
            artifact_id=r.artifact_id if aborted is not None else None,
            deployment_id=ev.deployment_id or r.deployment_id,
            via=ev.via,
            restore=ev.target,
            swapped=r.state is State.PROBATION,
            failure=failure,
            command_id=ev.command_id,
        )
        return new, [Restore(ev.target, aborted, new.artifact_id)]

    def _download_complete(self, ev: DownloadComplete) -> Result:
        r = self._record
        assert r.target is not None and r.artifact_id is not None
        return r.next(state=State.VERIFYING), [
            Report(EventKind.LIFECYCLE_VERIFYING, r.target, deployment_id=r.deployment_id),
            Verify(r.target, r.artifact_id),
        ]

    def _verified(self, ev: Verified) -> Result:
        r = self._record
        return r.next(state=State.STAGED), [
            Report(EventKind.LIFECYCLE_STAGED, r.target, deployment_id=r.deployment_id),
            Continue(Warm(ev.now)),
        ]

    def _warm(self, ev: Warm) -> Result:
        r = self._record
        assert r.target is not None
        return r.next(state=State.WARMING), [
            Report(EventKind.LIFECYCLE_WARMING, r.target, deployment_id=r.deployment_id),
            LoadCandidate(r.target),
        ]

    def _warmed_up(self, ev: WarmedUp) -> Result:
        r = self._record
        assert r.target is not None
        self._probation = _Probation(ev.now, ev.policy, ev.baseline)
        effects: list[Effect] = [
            SwitchTo(r.target),
            Report(
                EventKind.LIFECYCLE_PROBATION,
                r.target,
                deployment_id=r.deployment_id,
                data={"window_s": ev.policy.window_s, "previous": _ref_dict(r.committed)},
            ),
            WatchProbation(ev.now, ev.policy.window_s),
        ]
        if r.command_id is not None:
            effects.append(CommandResult(r.command_id, "activate", True, f"version {r.target.version} on probation"))
        return r.next(state=State.PROBATION, swapped=True, command_id=None), effects

    def _sample(self, ev: Sample) -> Result:
        r = self._record
        p = self._probation
        assert r.target is not None
        if p is None:  # probation info is not journaled; the shell re-creates it only via WarmedUp
            raise LifecycleError(r.state.value, "Sample without probation window")
        verdict = decide(p.policy, started_at=p.started_at, now=ev.now, candidate=ev.stats, baseline=p.baseline)
        self.last_verdict = verdict
        if not verdict.final:
            return r, []
        if verdict.outcome is Outcome.PASS:
            versions = {**r.committed_versions, r.target.name: r.target.version}
            new = r.next(
                state=State.IDLE,
                committed=r.target,
                committed_versions=versions,
                target=None,
                artifact_id=None,
                via=None,
                restore=None,
                swapped=False,
                failure=None,
                command_id=None,
            )
            return new, [
                Commit(r.target),
                Report(
                    EventKind.LIFECYCLE_COMMITTED,
                    r.target,
                    message=verdict.reason,
                    deployment_id=r.deployment_id,
                    data={"via": (r.via or Via.DEPLOY).value, "previous": _ref_dict(r.committed)},
                ),
            ]
        failure = Failure("probation", "probation", verdict.reason, verdict.check)
        return self._to_rolling_back(failure)

    def _failed(self, ev: Failed) -> Result:
        return self._to_rolling_back(ev.failure)

    def _to_rolling_back(self, failure: Failure) -> Result:
        r = self._record
        new = r.next(
            state=State.ROLLING_BACK,
            restore=None,
            swapped=r.swapped or r.state is State.PROBATION,
            failure=failure,
        )
        return new, [Restore(None, r.target, r.artifact_id)]

    def _rolled_back(self, ev: RolledBack) -> Result:
        r = self._record
        effects: list[Effect] = []
        committed, versions = r.committed, dict(r.committed_versions)
        operator_switch = r.restore is not None
        if operator_switch and ev.restored == r.restore and ev.restored is not None:
            committed = ev.restored
            versions[ev.restored.name] = ev.restored.version
        elif ev.restored is not None and ev.restored != r.committed:
            committed = ev.restored  # the committed version would not load; an older kept one serves
            versions[ev.restored.name] = ev.restored.version

        if r.failure is not None and r.target is not None:
            effects.append(_end_report(r, ev.restored))
        if operator_switch and r.restore is not None:
            ok = ev.restored == r.restore
            if ok:
                effects.append(
                    Report(
                        EventKind.LIFECYCLE_COMMITTED,
                        r.restore,
                        message=f"switched by {(r.via or Via.ROLLBACK).value}",
                        deployment_id=r.deployment_id,
                        data={"via": (r.via or Via.ROLLBACK).value, "previous": _ref_dict(r.committed)},
                    )
                )
            else:
                effects.append(
                    Report(
                        EventKind.LIFECYCLE_FAILED,
                        r.restore,
                        severity="error",
                        code="restore_failed",
                        message=f"could not switch to version {r.restore.version}",
                        deployment_id=r.deployment_id,
                    )
                )
            if r.command_id is not None:
                outcome = "serving" if ok else "could not serve"
                effects.append(
                    CommandResult(
                        r.command_id, (r.via or Via.ROLLBACK).value, ok, f"{outcome} version {r.restore.version}"
                    )
                )
        elif r.command_id is not None and r.failure is not None:
            effects.append(CommandResult(r.command_id, (r.via or Via.ACTIVATE).value, False, r.failure.reason))
        if ev.restored is None and (r.committed is not None or r.restore is not None):
            effects.append(
                Report(EventKind.LIFECYCLE_UNSERVED, None, severity="error", message="no kept version could be served")
            )

        new = r.next(
            state=State.IDLE,
            committed=committed,
            committed_versions=versions,
            target=None,
            artifact_id=None,
            via=None,
            restore=None,
            swapped=False,
            failure=None,
            command_id=None,
        )
        effects.append(_JOURNAL_HERE)
        if committed is not None and committed != r.committed:
            effects.append(Commit(committed))
        return new, effects

    def _fallback(self, ev: Fallback) -> Result:
        r = self._record
        if ev.serving is None:
            # Nothing else is kept: serve nothing this time (the agent stays reachable for a fix) but
            # keep calling the version committed, so a later start tries it again.
            return r, [
                Report(
                    EventKind.LIFECYCLE_UNSERVED,
                    ev.failed,
                    severity="error",
                    code="restart_loop" if r.attempts else "model_load",
                    message=f"{ev.reason}; no other kept version to serve",
                )
            ]
        versions = {**r.committed_versions, ev.serving.name: ev.serving.version}
        new = r.next(committed=ev.serving, committed_versions=versions, attempts=r.attempts)
        # reported before the journal write (rule 1): a crash in between falls back, and reports, again
        return new, [
            Report(
                EventKind.LIFECYCLE_ROLLED_BACK,
                ev.failed,
                severity="error",
                code="restart_loop" if r.attempts else "model_load",
                message=ev.reason,
                data={"reason": ev.reason, "check": "load", "restored": _ref_dict(ev.serving), "phase": "startup"},
            ),
            _JOURNAL_HERE,
            Commit(ev.serving),
        ]


def _now(event: Event) -> float:
    return event.now


def _seq_changes(r: JournalRecord, seq: int | None, desired_sha256: str | None) -> dict[str, Any]:
    """The sequence only moves forward; the digest is the last processed desired blob's."""
    return {
        "last_seq": max(r.last_seq, seq) if seq is not None else r.last_seq,
        "last_desired_sha256": desired_sha256 if desired_sha256 is not None else r.last_desired_sha256,
    }


def _ref_dict(ref: ModelRef | None) -> dict[str, Any] | None:
    return ref.to_dict() if ref else None


def _failed_report(r: JournalRecord, failure: Failure) -> Report:
    return Report(
        EventKind.LIFECYCLE_FAILED,
        r.target,
        severity="warning" if failure.code in ("superseded", "cancelled") else "error",
        message=failure.reason,
        code=failure.code,
        deployment_id=r.deployment_id,
        data=failure.to_dict(),
    )


def _end_report(r: JournalRecord, restored: ModelRef | None) -> Report:
    """How an abandoned candidate is reported: failed if it never served or loaded, else rolled back."""
    failure = r.failure
    assert failure is not None
    loaded = r.swapped or failure.phase in ("warming", "probation", "staged")
    if not loaded:
        return _failed_report(r, failure)
    return Report(
        EventKind.LIFECYCLE_ROLLED_BACK,
        r.target,
        severity="warning" if failure.code in ("cancelled",) else "error",
        message=failure.reason,
        code=failure.code,
        deployment_id=r.deployment_id,
        data={
            "reason": failure.reason,
            "check": failure.check,
            "restored": _ref_dict(restored),
            "phase": failure.phase,
        },
    )


Handler: TypeAlias = Callable[[UpdateMachine, Any], Result]

#: The transition table: (state, event type) -> handler. Anything absent is illegal.
TRANSITIONS: Mapping[tuple[State, type], Handler] = {
    (State.IDLE, Deploy): UpdateMachine._deploy,
    (State.IDLE, Activate): UpdateMachine._activate,
    (State.IDLE, SwitchBack): UpdateMachine._switch_back,
    (State.DOWNLOADING, Deploy): UpdateMachine._deploy,
    (State.DOWNLOADING, Activate): UpdateMachine._activate,
    (State.DOWNLOADING, SwitchBack): UpdateMachine._switch_back,
    (State.DOWNLOADING, DownloadComplete): UpdateMachine._download_complete,
    (State.DOWNLOADING, Failed): UpdateMachine._failed,
    (State.VERIFYING, Verified): UpdateMachine._verified,
    (State.VERIFYING, Failed): UpdateMachine._failed,
    (State.STAGED, Warm): UpdateMachine._warm,
    (State.STAGED, Failed): UpdateMachine._failed,
    (State.WARMING, WarmedUp): UpdateMachine._warmed_up,
    (State.WARMING, Failed): UpdateMachine._failed,
    (State.PROBATION, Sample): UpdateMachine._sample,
    (State.PROBATION, SwitchBack): UpdateMachine._switch_back,
    (State.PROBATION, Failed): UpdateMachine._failed,
    (State.ROLLING_BACK, RolledBack): UpdateMachine._rolled_back,
}

#: Events every state accepts (bookkeeping that never changes the state).
ANY_STATE: Mapping[type, Handler] = {
    Seen: UpdateMachine._seen,
    Settled: UpdateMachine._settled,
    Fallback: UpdateMachine._fallback,
}
