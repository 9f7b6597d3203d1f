"""kill -9 at randomized points of an update; the agent must come back serving a committed model.

Kill points are deterministic per seed: the test watches the agent's journal file, and when the
journal enters the phase under test it waits a seeded random delay and sends SIGKILL. After the
kill it reads the journal (where the process really died), restarts the agent and checks:

  * the first StateReport after the restart (the birth) shows the version the journal called
    committed at the moment of death, serving as committed;
  * the agent settles in idle, serving a committed version (the old one, or the new one when the
    kill fell after the commit, or after a resumed download finished), and its local HTTP API
    classifies real digits;
  * a kill mid-swap never leaves the candidate committed unless its probation had passed.

The phases are stretched with configuration, never with sleeps in product code: the test server
paces its chunk publishes (``chunk_delay_s``) and uses small chunks; probation is a short window.
Three phases x KILLS_PER_PHASE = 21 kill points.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.core.journal import JournalRecord, State
from agent.protocol.messages import StateReport
from tests.support import agent_models
from tests.support.agent_fixtures import AgentFactory, agent_factory, assert_serves, deploy_and_commit, fleet, models
from tests.support.agent_models import AgentModels
from tests.support.agent_process import AgentProcess
from tests.support.fleet_server import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = [pytest.mark.broker, pytest.mark.slow]

KILLS_PER_PHASE = 7
PHASES = {
    # phase: (journal states that start the countdown, delay range in seconds, chunk size, chunk pacing)
    "download": ({State.DOWNLOADING}, (0.0, 0.5), 2048, 0.01),
    "verify": ({State.VERIFYING}, (0.0, 0.02), 16384, 0.0),
    "swap": ({State.WARMING, State.PROBATION}, (0.0, 0.05), 16384, 0.0),
}
#: where a kill is allowed to land for each phase (the delay may carry it one step further)
LANDED_IN = {
    "download": {State.DOWNLOADING, State.VERIFYING},
    "verify": {State.VERIFYING, State.STAGED, State.WARMING},
    "swap": {State.WARMING, State.PROBATION, State.IDLE},
}


def read_journal(store: Path) -> JournalRecord | None:
    best: JournalRecord | None = None
    for slot in ("journal.0", "journal.1"):
        try:
            record = JournalRecord.from_bytes((store / slot).read_bytes())
        except (OSError, ValueError, Exception):
            continue
        if best is None or record.serial > best.serial:
            best = record
    return best


def wait_journal(agent: AgentProcess, states: set[State], *, after_serial: int, timeout: float = 30.0) -> JournalRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_journal(agent.store_dir)
        if record is not None and record.serial > after_serial and record.state in states:
            return record
        time.sleep(0.001)
    raise TimeoutError(f"journal never entered {sorted(s.value for s in states)}:\n{agent.log_text()[-3000:]}")


def restart_and_first_state(fleet: FleetServer, agent: AgentProcess) -> StateReport:
    """Restart the agent; its first online StateReport (published right after it served the committed version)."""
    before = len(fleet.log(agent.device_id).states)
    agent.start()

    def online() -> bool:
        return any(s.online for s in fleet.log(agent.device_id).states[before:])

    fleet.wait_for(online, timeout=30)
    return next(s for s in fleet.log(agent.device_id).states[before:] if s.online)


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_comes_back_serving_a_committed_model(
    phase: str, fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    trigger, (lo, hi), chunk_size, pacing = PHASES[phase]
    rng = random.Random(f"edgefleet-kill-{phase}")  # deterministic kill points per phase
    agent = agent_factory(prefix=f"kill-{phase}")
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    agent.wait_http_ready()
    landed: Counter[State] = Counter()
    resumed_partial = 0
    version = 1
    for _ in range(KILLS_PER_PHASE):
        before = read_journal(agent.store_dir)
        assert before is not None and before.state is State.IDLE
        committed_before = before.committed
        version += 1
        fleet.chunk_delay_s = pacing
        requests_before = len(fleet.log(agent.device_id).chunk_requests)
        desired = fleet.deploy(
            agent.device_id,
            models.bytes_of("good_v2" if version % 2 else "good"),
            agent_models.ref(version),
            runtime=agent_models.ONNX,
            health=models.health(probation_s=0.3),
            chunk_size=chunk_size,
        )
        wait_journal(agent, trigger, after_serial=before.serial)
        time.sleep(rng.uniform(lo, hi))
        agent.kill()
        dead = read_journal(agent.store_dir)
        assert dead is not None
        landed[dead.state] += 1
        fleet.chunk_delay_s = 0.0
        first = restart_and_first_state(fleet, agent)
        assert dead.committed is not None
        assert first.active is not None, f"restarted without serving (journal at death: {dead})"
        assert (first.active.name, first.active.version) == (dead.committed.name, dead.committed.version)
        assert first.active.state == "committed"

        settled = fleet.wait_state(
            agent.device_id, lambda s: s.online and s.lifecycle == "idle" and s.active is not None, timeout=60
        )
        journal = read_journal(agent.store_dir)
        assert journal is not None and journal.state is State.IDLE and journal.committed is not None
        assert settled.active is not None and settled.active.state == "committed"
        assert settled.active.version == journal.committed.version
        assert journal.committed.version in (committed_before.version if committed_before else -1, version)
        if dead.state in (State.WARMING, State.PROBATION):
            assert journal.committed == committed_before, "a kill mid-swap must not commit the candidate"
        resumes = [r for r in fleet.log(agent.device_id).chunk_requests[requests_before:] if r.reason == "resume"]
        assert desired.artifact is not None
        if resumes and sum(b - a for a, b in resumes[0].ranges) < desired.artifact.chunk_count:
            resumed_partial += 1
        agent.wait_http_ready()
        assert_serves(agent, models)

    expected = LANDED_IN[phase]
    assert set(landed) <= expected | {State.IDLE}, f"{phase}: kills landed in {dict(landed)}"
    assert any(s in expected - {State.IDLE} for s in landed), f"{phase}: no kill hit the phase: {dict(landed)}"
    if phase == "download":
        assert resumed_partial >= 1, "no restarted download asked only for the chunks it lacked"
    print(f"{phase}: kill points landed in", {s.value: n for s, n in landed.items()})
