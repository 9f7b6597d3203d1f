"""The update state machine: table-driven transitions, illegal events, and crash-anywhere recovery.

The in-memory ``Shell`` below stands in for agent.runtime.agent: it executes effects against a
pretend store and host, answering each effect the way the real driver does. It exists only
for these pure tests; the runtime is tested against real processes in tests/integration.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.health import ProbationPolicy, WindowStats
from agent.core.journal import Failure, JournalRecord, State, Via
from agent.core.lifecycle import (
    ANY_STATE,
    TRANSITIONS,
    Activate,
    CommandResult,
    Commit,
    Continue,
    Deploy,
    DiscardDownload,
    DownloadComplete,
    Effect,
    Event,
    Failed,
    Fallback,
    LoadCandidate,
    Persist,
    Report,
    Restore,
    RolledBack,
    Sample,
    Seen,
    ServeCommitted,
    Settled,
    StartDownload,
    SwitchBack,
    SwitchTo,
    UpdateMachine,
    Verified,
    Verify,
    Warm,
    WarmedUp,
    WatchProbation,
)
from agent.errors import LifecycleError
from agent.protocol.messages import ModelRef

V1 = ModelRef("digits", 1)
V2 = ModelRef("digits", 2)
V3 = ModelRef("digits", 3)
ART = "ab" * 16
ART3 = "cd" * 16
POLICY = ProbationPolicy(window_s=10.0, min_requests=5, max_error_rate=0.1)
GOOD = WindowStats(requests=50, errors=0, p50_ms=1.0, p95_ms=1.0, p99_ms=1.0)
BAD = WindowStats(requests=50, errors=20, p50_ms=1.0, p95_ms=1.0, p99_ms=1.0)


def committed_at(ref: ModelRef | None = V1) -> UpdateMachine:
    versions = {ref.name: ref.version} if ref else {}
    return UpdateMachine(JournalRecord(committed=ref, committed_versions=versions))


def kinds(effects: list[Effect]) -> list[str]:
    return [e.kind for e in effects if isinstance(e, Report)]


def drive(m: UpdateMachine, *events: Event) -> list[Effect]:
    out: list[Effect] = []
    for ev in events:
        out += m.handle(ev)
    return out


# -- the happy path, one step at a time ----------------------------------------------------------------


def test_deploy_path_journals_before_every_side_effect() -> None:
    m = committed_at(V1)
    steps: list[tuple[Event, State, type]] = [
        (Deploy(V2, ART, now=1.0, deployment_id="dep-1"), State.DOWNLOADING, StartDownload),
        (DownloadComplete(now=2.0), State.VERIFYING, Verify),
        (Verified(now=3.0), State.STAGED, Continue),
        (Warm(now=3.0), State.WARMING, LoadCandidate),
        (WarmedUp(now=4.0, policy=POLICY, baseline=GOOD), State.PROBATION, SwitchTo),
    ]
    for event, state, side_effect in steps:
        effects = m.handle(event)
        assert m.state is state
        assert isinstance(effects[0], Persist), "the journal must be written before anything else"
        assert effects[0].record == m.record
        assert any(isinstance(e, side_effect) for e in effects)
        assert m.record.committed == V1, "nothing is committed before probation passes"
    assert m.handle(Sample(now=8.0, stats=GOOD)) == []  # window not over: wait, nothing written
    effects = m.handle(Sample(now=14.0, stats=GOOD))
    assert m.state is State.IDLE
    assert m.record.committed == V2
    assert m.record.committed_versions == {"digits": 2}
    assert isinstance(effects[0], Persist)
    assert effects[1] == Commit(V2)
    assert kinds(effects) == ["lifecycle.committed"]
    assert m.record.target is None


def test_reports_follow_the_contract_order() -> None:
    m = committed_at(V1)
    effects = drive(
        m,
        Deploy(V2, ART, now=1.0),
        DownloadComplete(now=2.0),
        Verified(now=3.0),
        Warm(now=3.0),
        WarmedUp(now=4.0, policy=POLICY),
        Sample(now=20.0, stats=GOOD),
    )
    assert kinds(effects) == [
        "lifecycle.verifying",
        "lifecycle.staged",
        "lifecycle.warming",
        "lifecycle.probation",
        "lifecycle.committed",
    ]
    assert sum(isinstance(e, Persist) for e in effects) == 6


# -- failures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "phase", "kind", "swapped"),
    [
        ([], "downloading", "lifecycle.failed", False),
        ([DownloadComplete(now=2)], "verifying", "lifecycle.failed", False),
        ([DownloadComplete(now=2), Verified(now=3), Warm(now=3)], "warming", "lifecycle.rolled_back", False),
        (
            [DownloadComplete(now=2), Verified(now=3), Warm(now=3), WarmedUp(now=4, policy=POLICY)],
            "probation",
            "lifecycle.rolled_back",
            True,
        ),
    ],
)
def test_failure_in_each_phase_rolls_back_to_committed(
    prefix: list[Event], phase: str, kind: str, swapped: bool
) -> None:
    m = committed_at(V1)
    drive(m, Deploy(V2, ART, now=1.0, deployment_id="dep-9"), *prefix)
    assert m.state.value == phase
    effects = m.handle(Failed(now=5.0, failure=Failure(phase, "health_check", "outputs are NaN", "finite")))
    assert m.state is State.ROLLING_BACK
    assert m.record.swapped is swapped
    restore = [e for e in effects if isinstance(e, Restore)]
    assert restore == [Restore(None, V2, ART)]
    effects = m.handle(RolledBack(now=6.0, restored=V1))
    assert m.state is State.IDLE
    assert m.record.committed == V1
    reports = [e for e in effects if isinstance(e, Report)]
    assert [r.kind for r in reports] == [kind]
    assert reports[0].model == V2
    assert reports[0].deployment_id == "dep-9"
    if kind == "lifecycle.rolled_back":
        assert reports[0].data == {
            "reason": "outputs are NaN",
            "check": "finite",
            "restored": {"name": "digits", "version": 1},
            "phase": phase,
        }
    else:
        assert reports[0].code == "health_check"


def test_probation_failure_names_the_check() -> None:
    m = committed_at(V1)
    drive(m, Deploy(V2, ART, now=0), DownloadComplete(now=0), Verified(now=0), Warm(now=0))
    m.handle(WarmedUp(now=0, policy=POLICY, baseline=GOOD))
    effects = m.handle(Sample(now=1.0, stats=BAD))  # error rate fails before the window ends
    assert m.state is State.ROLLING_BACK
    assert m.record.failure is not None
    assert m.record.failure.check == "error_rate"
    assert any(isinstance(e, Restore) for e in effects)
    effects = m.handle(RolledBack(now=2.0, restored=V1))
    (report,) = [e for e in effects if isinstance(e, Report)]
    assert report.kind == "lifecycle.rolled_back"
    assert report.data["phase"] == "probation"


def test_newer_deploy_supersedes_a_transfer() -> None:
    m = committed_at(V1)
    m.handle(Deploy(V2, ART, now=0, deployment_id="old"))
    effects = m.handle(Deploy(V3, ART3, now=1, deployment_id="new"))
    assert m.state is State.DOWNLOADING
    assert (m.record.target, m.record.artifact_id, m.record.deployment_id) == (V3, ART3, "new")
    assert DiscardDownload(ART) in effects
    (report,) = [e for e in effects if isinstance(e, Report)]
    assert (report.kind, report.code, report.model) == ("lifecycle.failed", "superseded", V2)
    assert report.deployment_id == "old"
    assert effects.index(DiscardDownload(ART)) > 0  # after Persist


# -- operator switches ----------------------------------------------------------------------------------------


def test_rollback_command_switches_and_answers() -> None:
    m = UpdateMachine(JournalRecord(committed=V2, committed_versions={"digits": 2}))
    effects = m.handle(SwitchBack(V1, now=1, command_id="c-1"))
    assert m.state is State.ROLLING_BACK
    assert effects[1:] == [Restore(V1, None, None)]
    effects = m.handle(RolledBack(now=2, restored=V1))
    assert m.record.committed == V1
    assert m.record.committed_versions == {"digits": 1}, "the downgrade floor follows the signed rollback"
    assert Commit(V1) in effects
    assert kinds(effects) == ["lifecycle.committed"]
    assert CommandResult("c-1", "rollback", True, "serving version 1") in effects


def test_rollback_command_that_cannot_load_keeps_serving_and_says_so() -> None:
    m = UpdateMachine(JournalRecord(committed=V2, committed_versions={"digits": 2}))
    m.handle(SwitchBack(V1, now=1, command_id="c-2"))
    effects = m.handle(RolledBack(now=2, restored=V2))
    assert m.record.committed == V2
    assert not any(isinstance(e, Commit) for e in effects)
    results = [e for e in effects if isinstance(e, CommandResult)]
    assert results == [CommandResult("c-2", "rollback", False, "could not serve version 1")]


def test_rollback_during_probation_reports_the_candidate() -> None:
    m = committed_at(V2)
    drive(m, Deploy(V3, ART, now=0), DownloadComplete(now=0), Verified(now=0), Warm(now=0))
    m.handle(WarmedUp(now=0, policy=POLICY))
    effects = m.handle(SwitchBack(V1, now=1, command_id="c-3"))
    assert effects[1:] == [Restore(V1, V3, ART)]
    effects = m.handle(RolledBack(now=2, restored=V1))
    assert kinds(effects) == ["lifecycle.rolled_back", "lifecycle.committed"]
    assert m.record.committed == V1


def test_activate_goes_through_warmup_and_probation() -> None:
    m = committed_at(V1)
    effects = m.handle(Activate(V2, now=0, command_id="c-4"))
    assert m.state is State.WARMING
    assert LoadCandidate(V2) in effects
    effects = m.handle(WarmedUp(now=1, policy=POLICY))
    assert CommandResult("c-4", "activate", True, "version 2 on probation") in effects
    m.handle(Sample(now=20, stats=GOOD))
    assert (m.state, m.record.committed) == (State.IDLE, V2)


def test_activate_that_fails_warmup_answers_the_command() -> None:
    m = committed_at(V1)
    m.handle(Activate(V2, now=0, command_id="c-5"))
    m.handle(Failed(now=1, failure=Failure("warming", "health_check", "wrong output shape", "shape")))
    effects = m.handle(RolledBack(now=2, restored=V1))
    assert CommandResult("c-5", "activate", False, "wrong output shape") in effects


# -- bookkeeping ------------------------------------------------------------------------------------------------


def test_seen_records_sequence_without_changing_state() -> None:
    m = committed_at(V1)
    effects = m.handle(Seen(now=1, seq=7, desired_sha256="aa"))
    assert m.state is State.IDLE
    assert (m.record.last_seq, m.record.last_desired_sha256) == (7, "aa")
    assert effects == [Persist(m.record)]
    assert m.handle(Seen(now=2, seq=5)) == [], "the sequence never goes back; nothing to write"
    assert m.record.last_seq == 7


# -- illegal transitions -------------------------------------------------------------------------------------------

ALL_EVENTS: list[Event] = [
    Deploy(V2, ART, now=0),
    Activate(V2, now=0),
    SwitchBack(V1, now=0),
    DownloadComplete(now=0),
    Verified(now=0),
    Warm(now=0),
    WarmedUp(now=0, policy=POLICY),
    Sample(now=0, stats=GOOD),
    Failed(now=0, failure=Failure("x", "y", "z")),
    RolledBack(now=0, restored=V1),
]


def machine_in(state: State) -> UpdateMachine:
    return UpdateMachine(
        JournalRecord(state=state, committed=V1, target=V2, artifact_id=ART, committed_versions={"digits": 1})
    )


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_events_outside_the_table_raise_and_change_nothing(state: State, event: Event) -> None:
    if (state, type(event)) in TRANSITIONS:
        return
    m = machine_in(state)
    before = m.record
    with pytest.raises(LifecycleError) as info:
        m.handle(event)
    assert info.value.state == state.value
    assert m.record is before
    assert m.state is state


def test_table_covers_the_documented_transitions() -> None:
    assert (State.PROBATION, Deploy) not in TRANSITIONS, "deploys wait for probation to end"
    assert set(ANY_STATE) == {Seen, Settled, Fallback}
    reachable = {s for s, _ in TRANSITIONS}
    assert reachable == set(State)


# -- recovery after kill -9 anywhere: the property ---------------------------------------------------------------------


@dataclass
class Shell:
    """A pretend driver: store of kept versions, the serving model, the journal on 'disk'."""

    outcomes: dict[str, bool]
    kept: set[ModelRef] = field(default_factory=lambda: {V1})
    serving: ModelRef | None = None
    loaded: ModelRef | None = None
    journal: JournalRecord = field(default_factory=JournalRecord)
    reports: list[Report] = field(default_factory=list)
    now: float = 0.0
    side_effects: int = 0
    journaled_deploy: bool = False

    def execute(self, m: UpdateMachine, effect: Effect) -> Event | None:
        self.now += 1
        if not isinstance(effect, Persist | Report | CommandResult | Continue):
            # the journal on disk must already say what the machine says (bar the bookkeeping counters)
            assert _essence(self.journal) == _essence(m.record), f"{type(effect).__name__} ran before its journal write"
            self.side_effects += 1
        match effect:
            case Persist(record):
                self.journal = record
                self.journaled_deploy |= record.state is State.DOWNLOADING
            case Report():
                self.reports.append(effect)
            case ServeCommitted(ref, fallback):
                if ref is not None and not fallback and ref in self.kept:
                    self.serving = ref
                    return None
                others = sorted((k for k in self.kept if k != ref), key=lambda r: -r.version)
                self.serving = others[0] if others else None
                if ref is not None:
                    return Fallback(self.now, ref, self.serving, "would not load")
            case StartDownload():
                return DownloadComplete(self.now) if self.outcomes["download"] else self.fail("downloading")
            case Verify():
                return Verified(self.now) if self.outcomes["verify"] else self.fail("verifying")
            case LoadCandidate(target):
                if not self.outcomes["warm"]:
                    return self.fail("warming")
                self.loaded = target
                return WarmedUp(self.now, POLICY, GOOD)
            case SwitchTo(target):
                assert self.loaded == target
                self.serving = target
            case WatchProbation(started, window):
                return Sample(started + window + 1, GOOD if self.outcomes["probation"] else BAD)
            case Commit(target):
                self.kept.add(target)
            case Restore(target, discard, _art):
                if discard is not None and discard not in self.kept:
                    self.loaded = None
                want = target or m.record.committed
                self.serving = want if want in self.kept else m.record.committed
                return RolledBack(self.now, self.serving)
            case Continue(event):
                return event
        return None

    def fail(self, phase: str) -> Failed:
        return Failed(self.now, Failure(phase, "test", f"{phase} failed"))


def _essence(r: JournalRecord) -> JournalRecord:
    return replace(r, attempts=0, serial=0, updated_at=0.0)


def run(m: UpdateMachine, shell: Shell, first: list[Effect], crash_at: set[int], budget: int = 500) -> UpdateMachine:
    """Execute effects, feeding answers back; at each step in ``crash_at`` kill -9 and recover."""
    pending: deque[Effect] = deque(first)
    step = 0
    while pending:
        step += 1
        assert step < budget, "the machine did not settle"
        if step in crash_at:
            shell.serving = shell.loaded = None  # the process is gone, and so is every loaded session
            m, effects = UpdateMachine.recover(shell.journal, now=shell.now, restart_limit=3)
            pending = deque(effects)
            continue
        answer = shell.execute(m, pending.popleft())
        if answer is not None:
            pending.extend(m.handle(answer))
    return m


outcomes = st.fixed_dictionaries(
    {k: st.booleans() for k in ("download", "verify", "warm", "probation")},
)


@settings(max_examples=400, deadline=None)
@given(outcomes, st.sets(st.integers(1, 40), max_size=4))
def test_every_crash_point_ends_committed_or_rolled_back(outcome: dict[str, bool], crash_at: set[int]) -> None:
    m = committed_at(V1)
    shell = Shell(outcomes=outcome, serving=V1, journal=m.record)
    m = run(m, shell, m.handle(Deploy(V2, ART, now=0, seq=5, desired_sha256="ee")), crash_at)

    assert m.state is State.IDLE
    assert m.record == shell.journal
    assert m.record.committed in (V1, V2)
    assert shell.serving == m.record.committed, "what serves is what the journal calls committed"
    assert m.record.target is None
    if m.record.committed == V2:
        assert all(outcome.values()), "only a deploy that passed every step may be committed"
    kinds_seen = {r.kind for r in shell.reports}
    if m.record.committed == V1 and shell.journaled_deploy:
        assert kinds_seen & {"lifecycle.failed", "lifecycle.rolled_back"}, "a failed deploy is always reported"
    if not shell.journaled_deploy:
        assert m.record.last_seq == 0, "a deploy lost before its journal write must not consume its sequence"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(State)), st.booleans(), st.integers(0, 6), st.sets(st.integers(1, 30), max_size=3))
def test_every_resumable_journal_state_settles(state: State, good: bool, attempts: int, crash_at: set[int]) -> None:
    """Start from any journal a crash can leave behind; recovery always reaches idle on a committed version."""
    record = JournalRecord(
        state=state,
        committed=V1,
        committed_versions={"digits": 1},
        target=V2 if state is not State.IDLE else None,
        artifact_id=ART if state is not State.IDLE else None,
        via=Via.DEPLOY if state is not State.IDLE else None,
        swapped=state is State.PROBATION,
        restore=V1 if state is State.ROLLING_BACK else None,
        attempts=attempts,
    )
    shell = Shell(outcomes=dict.fromkeys(("download", "verify", "warm", "probation"), good), journal=record)
    m, effects = UpdateMachine.recover(record, now=0.0, restart_limit=3)
    m = run(m, shell, effects, crash_at)
    assert m.state is State.IDLE
    assert m.record.committed in (V1, V2)
    assert m.record.attempts == 0
    if "lifecycle.unserved" in {r.kind for r in shell.reports}:
        # the committed version "kept killing the agent" (restart loop) and nothing older is kept:
        # it serves nothing this time, says so, and still calls V1 committed for the next start
        assert attempts + len(crash_at) >= 3
        assert shell.serving is None
        return
    assert shell.serving == m.record.committed
    if state in (State.WARMING, State.PROBATION):
        assert m.record.committed == V1, "a crash mid-swap never commits the candidate"
    if attempts >= 3 and state is not State.IDLE:
        assert m.record.committed == V1, "a restart loop abandons the operation"


def test_restart_loop_in_idle_falls_back_to_an_older_kept_version() -> None:
    record = JournalRecord(committed=V2, committed_versions={"digits": 2}, attempts=3)
    shell = Shell(outcomes={}, kept={V1, V2}, journal=record)
    m, effects = UpdateMachine.recover(record, now=0.0, restart_limit=3)
    assert ServeCommitted(V2, fallback=True) in effects
    m = run(m, shell, effects, set())
    assert m.record.committed == V1
    assert shell.serving == V1
    assert [r.kind for r in shell.reports] == ["lifecycle.rolled_back"]
    assert shell.reports[0].data["phase"] == "startup"


def test_attempts_are_persisted_before_the_resume_step() -> None:
    record = JournalRecord(state=State.VERIFYING, committed=V1, target=V2, artifact_id=ART, attempts=1)
    m, effects = UpdateMachine.recover(record, now=0.0)
    assert effects[0] == Persist(m.record)
    assert m.record.attempts == 2
    assert effects[1:] == [ServeCommitted(V1), Verify(V2, ART)]
