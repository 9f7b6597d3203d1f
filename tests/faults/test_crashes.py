"""kill -9 at randomized points of an update, power-loss leftovers, and kill -9 of the server mid-rollout.

Agent crashes: each trial picks a phase (download, verification, staging, warm-up, switch,
probation) and a delay with a seeded RNG, deploys the next version, waits for the agent's journal
to enter that phase, sleeps the delay and sends SIGKILL. It then restarts the agent and checks
that the first StateReport serves the version the journal called committed at death, that the
agent settles serving a committed version (the old one, or the new one when the kill fell after
the commit or the resumed update finished), that real digits are classified over the local API,
and that no committed version disappeared from the store. The default suite runs 10 trials;
``EDGEFLEET_FAULT_MODE=soak`` runs 60 (scripts/fault_report.py --soak).

Power loss: the agent is killed the instant an atomic write has its temp file on disk (before
the fsync'd rename), and the newest journal slot is torn as a power cut mid-write would leave it.
A restart must clean every leftover and serve the committed model.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.core.journal import State
from agent.runtime.fsutil import TMP_MARKER
from server.broker import MosquittoBroker
from tests.faults.helpers import intact
from tests.support import agent_models
from tests.support.agent_fixtures import AgentFactory, agent_factory, assert_serves, deploy_and_commit, fleet, models
from tests.support.agent_models import AgentModels
from tests.support.agent_process import AgentProcess
from tests.support.fault_server import RealServer
from tests.support.faults import FaultLedger, fault_mode, kept_versions, read_journal, trials
from tests.support.fleet_server import FleetServer, unique_device_id

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker

PROBATION_S = 0.6
#: phase -> (journal states that start the countdown, delay range s, chunk size, chunk pacing s)
PHASES: dict[str, tuple[set[State], tuple[float, float], int, float]] = {
    "download": ({State.DOWNLOADING}, (0.0, 0.4), 2048, 0.01),
    "verification": ({State.VERIFYING}, (0.0, 0.01), 16384, 0.0),
    "staging": ({State.STAGED}, (0.0, 0.005), 16384, 0.0),
    "warm-up": ({State.WARMING}, (0.0, 0.02), 16384, 0.0),
    "switch": ({State.PROBATION}, (0.0, 0.0), 16384, 0.0),
    "probation": ({State.PROBATION}, (0.05, PROBATION_S), 16384, 0.0),
}


def wait_journal(agent: AgentProcess, states: set[State], *, after_serial: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_journal(agent.store_dir)
        if record is not None and record.serial > after_serial and record.state in states:
            return True
        if record is not None and record.serial > after_serial and record.state is State.IDLE:
            return False  # the phase went by between two polls
        time.sleep(0.0005)
    raise TimeoutError(f"journal never entered {sorted(s.value for s in states)}:\n{agent.log_text()[-3000:]}")


def restart_first_online(fleet: FleetServer, agent: AgentProcess) -> tuple[str, int] | None:
    before = len(fleet.log(agent.device_id).states)
    agent.start()
    fleet.wait_for(lambda: any(s.online for s in fleet.log(agent.device_id).states[before:]), timeout=30)
    first = next(s for s in fleet.log(agent.device_id).states[before:] if s.online)
    if first.active is None:
        return None
    assert first.active.state == "committed", first
    return first.active.name, first.active.version


def test_agent_sigkill_at_random_points(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    n = trials(10, soak=60, quick=4)
    rng = random.Random(f"edgefleet-faults-{fault_mode()}")
    agent = agent_factory(prefix="crash")
    deploy_and_commit(fleet, agent, models, 1, probation_s=PROBATION_S)
    landed: Counter[str] = Counter()
    version = 1
    for trial in range(n):
        phase = list(PHASES)[trial % len(PHASES)] if trial < len(PHASES) else rng.choice(list(PHASES))
        trigger, (lo, hi), chunk_size, pacing = PHASES[phase]
        before = read_journal(agent.store_dir)
        assert before is not None and before.state is State.IDLE and before.committed is not None
        committed_before = before.committed.version
        version += 1
        fleet.chunk_delay_s = pacing
        fleet.deploy(
            agent.device_id,
            models.bytes_of("good_v2" if version % 2 else "good"),
            agent_models.ref(version),
            runtime=agent_models.ONNX,
            health=models.health(probation_s=PROBATION_S),
            chunk_size=chunk_size,
        )
        hit = wait_journal(agent, trigger, after_serial=before.serial)
        time.sleep(rng.uniform(lo, hi))
        agent.kill()
        dead = read_journal(agent.store_dir)
        assert dead is not None and dead.committed is not None
        landed[dead.state.value if hit else "missed"] += 1
        fleet.chunk_delay_s = 0.0
        try:
            first = restart_first_online(fleet, agent)
            assert first == (dead.committed.name, dead.committed.version), f"{phase}: birth {first} vs {dead}"
            settled = fleet.wait_state(
                agent.device_id, lambda s: s.online and s.lifecycle == "idle" and s.active is not None, timeout=60
            )
            assert settled.active is not None
            now = settled.active.version
            assert now in (committed_before, version), f"{phase}: serving v{now}"
            if dead.state in (State.WARMING, State.PROBATION):
                assert now == committed_before, f"{phase}: a kill mid-swap committed the candidate"
        except (AssertionError, TimeoutError):
            ledger.trial(False, unserving=1)
            raise
        # the version committed before the update is still kept (rollback without download stays possible)
        intact(fleet, agent, models, now, kept={now, committed_before}, ledger=ledger)
    ledger.note(f"kills landed in {dict(landed)}")
    print("kill points:", dict(landed))
    assert sum(v for k, v in landed.items() if k != "missed") >= n * 0.7, f"too many kills missed: {dict(landed)}"


def _kill_when_tmp_appears(agent: AgentProcess, timeout: float) -> bool:
    """SIGKILL the agent the moment an atomic write's temp file exists (before its fsync'd rename)."""
    deadline = time.monotonic() + timeout
    store = str(agent.store_dir)
    while time.monotonic() < deadline:
        for _root, _dirs, files in os.walk(store):
            if any(TMP_MARKER in f for f in files):
                agent.kill()
                return True
    return False


def test_power_loss_leftovers_are_cleaned(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    n = trials(4, soak=12, quick=2)
    agent = agent_factory(prefix="power")
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    version = 1
    caught = 0
    for trial in range(n):
        version += 1
        before = read_journal(agent.store_dir)
        assert before is not None and before.committed is not None
        fleet.chunk_delay_s = 0.005
        fleet.deploy(agent.device_id, models.bytes_of("good_v2" if version % 2 else "good"),
                     agent_models.ref(version), runtime=agent_models.ONNX, health=models.health(probation_s=0.3),
                     chunk_size=2048)
        caught += _kill_when_tmp_appears(agent, 20)
        agent.kill()
        fleet.chunk_delay_s = 0.0
        store: Path = agent.store_dir
        dead = read_journal(store)
        assert dead is not None and dead.committed is not None
        # what else a power cut leaves: a stray temp file beside the journal, an orphan partial download,
        # and (every other trial) the newest journal slot torn mid-write
        (store / f"journal.0{TMP_MARKER}999").write_bytes(b"half a journal")
        (store / "partial" / ("f" * 32)).mkdir(parents=True, exist_ok=True)
        (store / "partial" / ("f" * 32) / "data").write_bytes(os.urandom(1000))
        if trial % 2:
            newest = max(("journal.0", "journal.1"), key=lambda s: (store / s).stat().st_mtime)
            data = (store / newest).read_bytes()
            (store / newest).write_bytes(data[: len(data) // 2])
        survivor = read_journal(store)  # what the agent will recover from (the other slot when one is torn)
        assert survivor is not None and survivor.committed is not None
        first = restart_first_online(fleet, agent)
        assert first == (survivor.committed.name, survivor.committed.version), f"birth {first} vs {survivor}"
        # the retained desired state on the broker is the newest deploy: a device whose torn journal forgot
        # it was seen takes it again, so it converges on that version, or stays on its committed one
        allowed = {survivor.committed.version, version} | ({survivor.target.version} if survivor.target else set())
        try:
            settled = fleet.wait_state(agent.device_id, lambda s, v=version: s.online and s.lifecycle == "idle"
                                       and s.active is not None and s.active.version == v, timeout=20)
        except TimeoutError:
            settled = fleet.wait_state(agent.device_id, lambda s, ok=allowed: s.online and s.lifecycle == "idle"
                                       and s.active is not None and s.active.version in ok, timeout=30)
        assert settled.active is not None
        assert settled.active.version in allowed, f"serving v{settled.active.version}; recovered from {survivor}"
        assert agent.proc is not None
        live = f"{TMP_MARKER}{agent.proc.pid}"  # the running agent's own in-flight writes are not leftovers
        leftovers = [p for p in store.rglob(f"*{TMP_MARKER}*") if not p.name.endswith(live)]
        assert not leftovers, f"temp files survived the restart: {leftovers}"
        assert not (store / "partial" / ("f" * 32)).exists(), "an orphan partial download survived"
        intact(fleet, agent, models, settled.active.version,
               kept={settled.active.version}, ledger=ledger)
    ledger.note(f"killed with a temp file on disk in {caught}/{n} trials")
    assert caught >= 1, "never caught an atomic write between write and rename"


def test_server_sigkill_mid_rollout(tmp_path: Path, broker: MosquittoBroker, models: AgentModels,
                                    ledger: FaultLedger) -> None:
    """The real server process is killed -9 while a rollout is in flight; restarted, it finishes from its registry."""
    builds = [
        {"model": "digits", "version": v, "profile": RealServer.PROFILE, "path": str(p), "input": models.input_name,
         "probation_s": 1.5, "chunk_size": 2048}
        for v, p in ((1, models.good), (2, models.good_v2))
    ]
    server = RealServer(tmp_path, broker.host, broker.port, builds)
    agents = [
        AgentProcess(tmp_path, unique_device_id("srvkill"), broker_host=broker.host, broker_port=broker.port,
                     server=server, settings={"profile": RealServer.PROFILE})  # type: ignore[arg-type]
        for _ in range(3)
    ]
    try:
        server.process.start()
        for a in agents:
            a.start()
        first = server.service.deploy("digits:1", target="group:g", canary_percent=34, wave_percent=100,
                                      max_failures_percent=0, probation_s=0.5, actor="faults")
        _wait_deployment(server, first["deployment_id"], ("completed",))
        dep = server.service.deploy("digits:2", target="group:g", canary_percent=34, wave_percent=100,
                                    max_failures_percent=0, probation_s=1.5, actor="faults")
        _wait_rows(server, dep["deployment_id"], lambda rows: any(r["state"] not in ("pending", "queued")
                                                                     for r in rows))
        time.sleep(random.Random("srvkill").uniform(0.0, 1.0))
        before = server.counts()
        at_kill = server.service.deployment_detail(dep["deployment_id"])
        server.process.kill()
        assert at_kill["status"] == "running", "the kill came after the rollout had finished"
        ledger.note(f"killed with device rows in {sorted(d['state'] for d in at_kill['devices'])}")
        time.sleep(1.0)  # devices carry on (download, probation) while no server runs; their reports queue
        server.process.start()
        detail = _wait_deployment(server, dep["deployment_id"], ("completed",), timeout=90)
        after = server.counts()
        lost = sum(max(0, n - after.get(t, 0)) for t, n in before.items() if t not in _VOLATILE)
        assert not lost, f"registry rows lost: { {t: (n, after.get(t)) for t, n in before.items()} }"
        assert all(d["state"] == "committed" for d in detail["devices"]), detail["devices"]
        for a in agents:
            journal = read_journal(a.store_dir)
            assert journal is not None and journal.committed == agent_models.ref(2) and journal.state is State.IDLE
            a.wait_http_ready()
            assert_serves(a, models)
            assert {1, 2} <= kept_versions(a.store_dir)
            ledger.trial()
        rows = {d["device_id"]: d for d in server.service.list_devices()}
        assert all(rows[a.device_id]["active_version"] == 2 for a in agents), rows
    except (AssertionError, TimeoutError):
        ledger.trial(False, unserving=sum(not a.running for a in agents))
        raise
    finally:
        for a in agents:
            a.kill()
        server.process.kill()


#: tables whose rows are expected to be pruned or replaced (leases, caches), not records
_VOLATILE = {"leases", "sqlite_sequence", "telemetry", "telemetry_buckets"}


def _wait_deployment(server: RealServer, deployment_id: str, statuses: tuple[str, ...],
                     timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    detail: dict[str, Any] = {}
    while time.monotonic() < deadline:
        detail = server.service.deployment_detail(deployment_id)
        if detail["status"] in statuses:
            return detail
        time.sleep(0.2)
    raise TimeoutError(f"deployment {detail.get('status')}: "
                       f"{[(d['device_id'], d['state'], d.get('reason')) for d in detail.get('devices', [])]}")


def _wait_rows(server: RealServer, deployment_id: str, predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(server.service.deployment_detail(deployment_id)["devices"]):
            return
        time.sleep(0.05)
    raise TimeoutError("rollout never started")
