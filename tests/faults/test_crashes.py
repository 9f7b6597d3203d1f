"""kill -9 at named points of an update, power-loss leftovers, and kill -9 of the server mid-rollout.

Agent crashes: each trial picks a named kill point (seeded order; the first pass covers every point
in ``KILL_POINTS``) and arms the agent's fault hook with it (``EDGEFLEET_FAULT_AT``,
agent/runtime/faults.py): the agent SIGKILLs itself exactly there, whatever the machine's speed.
The test asserts the kill landed in the intended phase (exit by SIGKILL, the journal's state at
death), restarts the agent without the hook and checks that the first StateReport serves the version
the journal called committed at death, that the agent settles on the version the resume table
promises (a download, verification or staging resumes and commits; a warm-up, probation or rollback
ends on the old version; a kill after the journal's commit serves the new one), that real digits are
classified over the local API, that no committed version disappeared from the store, and that a
resumed download asks only for the chunks it lacks. The default suite runs one trial per point;
``EDGEFLEET_FAULT_MODE=soak`` runs 60 (scripts/fault_report.py --soak).

Power loss: the agent is killed at the Nth atomic write (``write:tmp#N``: its temp file fsynced, not
yet renamed), and the newest journal slot is torn as a power cut mid-write would leave it. A restart
must clean every leftover and serve the committed model.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.core.journal import State
from agent.protocol.messages import ChunkRequest
from agent.runtime.fsutil import TMP_MARKER
from server.broker import MosquittoBroker
from tests.faults.helpers import intact
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import AgentFactory, agent_factory, assert_serves, deploy_and_commit, fleet, models
from tests.support.faults import FaultLedger, fault_mode, kept_versions, read_journal, trials
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.faulty import RealServer
from tests.support.servers.stub import FleetServer, unique_device_id
from tests.support.waiting import wait_progress

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker

PROBATION_S = 0.6
SMALL_CHUNK = 2048


@dataclass(frozen=True)
class KillPoint:
    """Where the hook kills the agent, and what the journal and the restart must show for it."""

    died_in: State  # the journal's state at death
    commits: bool  # after the restart, the update ends committed (else the old version serves)
    model: str = "good"  # what the update deploys ("good" alternates with good_v2)
    chunk_size: int = 16384
    pacing_s: float = 0.0  # the test server's pause between chunk publishes
    probation_s: float = PROBATION_S


KILL_POINTS: dict[str, KillPoint] = {
    "journal:downloading": KillPoint(State.DOWNLOADING, True, chunk_size=SMALL_CHUNK),
    "download:chunk": KillPoint(State.DOWNLOADING, True, chunk_size=SMALL_CHUNK),  # chunk K drawn per trial
    # paced so a download lasts well over the agent's 0.2 s snapshot interval: the first snapshot is partial
    "download:snapshot": KillPoint(State.DOWNLOADING, True, chunk_size=SMALL_CHUNK, pacing_s=0.01),
    "journal:verifying": KillPoint(State.VERIFYING, True),
    "journal:staged": KillPoint(State.STAGED, True),
    "journal:warming": KillPoint(State.WARMING, False),
    "journal:probation": KillPoint(State.PROBATION, False),  # the journal says probation; the switch is not made
    "switched": KillPoint(State.PROBATION, False),  # the candidate serves; no probation sample yet
    "probation:sample": KillPoint(State.PROBATION, False, probation_s=10.0),  # sample N drawn per trial
    "commit": KillPoint(State.IDLE, True),  # the journal commits; the store's pointer has not moved
    "journal:rolling_back": KillPoint(State.ROLLING_BACK, False, model="nan"),  # NaN outputs fail the warm-up
}


def fault_spec(name: str, rng: random.Random, chunk_count: int) -> str:
    """The ``EDGEFLEET_FAULT_AT`` value for a kill point (a seeded chunk count or probation sample)."""
    if name == "download:chunk":
        return f"download:chunk:{rng.randint(1, chunk_count - 1)}"
    if name == "probation:sample":
        return f"probation:sample#{rng.randint(1, 3)}"
    return name


def restart_first_online(fleet: FleetServer, agent: AgentProcess) -> tuple[str, int] | None:
    before = len(fleet.log(agent.device_id).states)
    agent.start()
    agent.wait_until(lambda: any(s.online for s in fleet.log(agent.device_id).states[before:]), "online again")
    first = next(s for s in fleet.log(agent.device_id).states[before:] if s.online)
    if first.active is None:
        return None
    assert first.active.state == "committed", first
    return first.active.name, first.active.version


def wait_settled(fleet: FleetServer, agent: AgentProcess, version: int, *, after: int, timeout: float = 60.0) -> None:
    """A StateReport sent after index ``after`` says idle, serving committed ``version``."""
    def settled() -> bool:
        return any(s.online and s.lifecycle == "idle" and s.active is not None and s.active.version == version
                   for s in fleet.log(agent.device_id).states[after:])
    try:
        fleet.wait_for(settled, timeout=timeout)
    except TimeoutError:
        raise TimeoutError(f"never settled on v{version}:\n{agent.log_text()[-3000:]}") from None


def chunks_asked(request: ChunkRequest) -> int:
    return sum(b - a for a, b in request.ranges)


def test_agent_sigkill_at_named_points(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    n = trials(len(KILL_POINTS), soak=60, quick=4)
    rng = random.Random(f"edgefleet-faults-{fault_mode()}")
    order = rng.sample(list(KILL_POINTS), len(KILL_POINTS))  # every point once, in a seeded order
    agent = agent_factory(prefix="crash")
    deploy_and_commit(fleet, agent, models, 1, probation_s=PROBATION_S)
    landed: Counter[str] = Counter()
    version = 1
    for trial in range(n):
        name = order[trial] if trial < len(order) else rng.choice(order)
        point = KILL_POINTS[name]
        before = read_journal(agent.store_dir)
        assert before is not None and before.state is State.IDLE and before.committed is not None
        committed_before = before.committed.version
        assert agent.stop() == 0, agent.log_text()[-3000:]
        version += 1
        fleet.chunk_delay_s = point.pacing_s
        # deployed while the agent is down (the desired state is retained): its chunk count picks the kill point
        model = point.model if point.model != "good" else ("good_v2" if version % 2 else "good")
        desired = fleet.deploy(agent.device_id, models.bytes_of(model), agent_models.ref(version),
                               runtime=agent_models.ONNX, health=models.health(probation_s=point.probation_s),
                               chunk_size=point.chunk_size)
        assert desired.artifact is not None
        total = desired.artifact.chunk_count
        spec = fault_spec(name, rng, total)
        agent.start(fault_at=spec)
        try:
            agent.wait_fault_kill()
            dead = read_journal(agent.store_dir)
            assert dead is not None and dead.committed is not None
            assert dead.state is point.died_in, f"{spec}: killed in {dead.state.value}, not {point.died_in.value}"
            assert dead.target == agent_models.ref(version) or point.died_in is State.IDLE, dead
            if point.died_in is State.IDLE:
                assert dead.committed == agent_models.ref(version), f"{spec}: the journal had not committed: {dead}"
            else:
                assert dead.committed.version == committed_before, dead
            landed[spec.split("#")[0] if not spec.startswith("download:chunk") else "download:chunk"] += 1
            fleet.chunk_delay_s = 0.0
            requests_at_restart = len(fleet.log(agent.device_id).chunk_requests)
            states_at_restart = len(fleet.log(agent.device_id).states)
            first = restart_first_online(fleet, agent)
            assert first == (dead.committed.name, dead.committed.version), f"{spec}: birth {first} vs {dead}"
            now = version if point.commits else committed_before
            wait_settled(fleet, agent, now, after=states_at_restart)
            journal = read_journal(agent.store_dir)
            assert journal is not None and journal.state is State.IDLE, journal
            assert journal.committed == agent_models.ref(now), f"{spec}: the journal commits {journal.committed}"
            _check_resumed_download(fleet, agent, spec, total, requests_at_restart)
        except (AssertionError, TimeoutError):
            ledger.trial(False, unserving=int(not agent.running))
            raise
        # the version committed before the update is still kept (rollback without download stays possible)
        intact(fleet, agent, models, now, kept={now, committed_before}, ledger=ledger)
    ledger.note(f"kills landed in {dict(landed)}")
    print("kill points:", dict(landed))


def _check_resumed_download(fleet: FleetServer, agent: AgentProcess, spec: str, total: int, mark: int) -> None:
    """After a kill mid-download, the restarted agent asks for what its resume snapshot lacks, no more."""
    if not spec.startswith("download:") and spec != "journal:downloading":
        return
    asked = [r for r in fleet.log(agent.device_id).chunk_requests[mark:] if r.reason in ("initial", "resume")]
    assert asked, f"{spec}: the restarted agent asked for no chunks"
    first = asked[0]
    if spec == "journal:downloading":
        assert (first.reason, chunks_asked(first)) == ("initial", total), first
    elif spec == "download:snapshot":  # the first snapshot is taken mid-transfer (paced: > 0.2 s long)
        assert first.reason == "resume" and 0 < chunks_asked(first) < total, (total, first)
    else:  # download:chunk:K: at most K chunks can be known
        held = int(spec.rsplit(":", 1)[1])
        assert chunks_asked(first) >= total - held, (held, total, first)


def test_power_loss_leftovers_are_cleaned(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    n = trials(4, soak=12, quick=2)
    rng = random.Random(f"edgefleet-power-{fault_mode()}")
    agent = agent_factory(prefix="power")
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    version = 1
    for trial in range(n):
        version += 1
        before = read_journal(agent.store_dir)
        assert before is not None and before.committed is not None
        assert agent.stop() == 0, agent.log_text()[-3000:]
        fleet.deploy(agent.device_id, models.bytes_of("good_v2" if version % 2 else "good"),
                     agent_models.ref(version), runtime=agent_models.ONNX, health=models.health(probation_s=0.3),
                     chunk_size=SMALL_CHUNK)
        nth = rng.randint(1, 8)  # a start and an update make more atomic writes than that
        agent.start(fault_at=f"write:tmp#{nth}")
        agent.wait_fault_kill()
        store: Path = agent.store_dir
        at_death = list(store.rglob(f"*{TMP_MARKER}*"))
        assert at_death, f"write:tmp#{nth}: no temp file on disk at death"
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
    ledger.note(f"killed at an atomic write with its temp file on disk in {n}/{n} trials")


#: where the server is killed mid-rollout (rollout 3 devices: 1 canary, then a wave of 2), by its device rows;
#: every agent is held at its first probation sample (a fault barrier) until the server is dead, so the
#: rollout is still running at each point on any machine, however busy (no probation window to catch)
SERVER_KILL_POINTS: dict[str, Any] = {
    "canary-dispatched": lambda rows: any(r["state"] not in ("pending", "queued") for r in rows),
    "canary-probation": lambda rows: any(r["state"] == "probation" for r in rows),
    "wave-dispatched": lambda rows: (any(r["state"] == "committed" for r in rows)
                                     and any(r["state"] not in ("pending", "queued", "committed") for r in rows)),
}


@pytest.mark.parametrize("point", list(SERVER_KILL_POINTS))
def test_server_sigkill_mid_rollout(point: str, tmp_path: Path, broker: MosquittoBroker, models: AgentModels,
                                    ledger: FaultLedger) -> None:
    """The real server process is killed -9 while a rollout is in flight; restarted, it finishes from its registry.

    The kill point is a rollout state read from the registry (never a delay): the canary dispatched, the
    canary in probation, the wave dispatched after the canary committed. The agents are restarted before
    the v2 rollout with their fault hook at ``probation:sample`` on a barrier each: a device cannot
    commit v2 until the test lets it, so at each point the rollout is still running.
    """
    builds = [
        {"model": "digits", "version": v, "profile": RealServer.PROFILE, "path": str(p), "input": models.input_name,
         "probation_s": 0.5, "chunk_size": 2048}
        for v, p in ((1, models.good), (2, models.good_v2))
    ]
    server = RealServer(tmp_path, broker.host, broker.port, builds)
    agents = [
        AgentProcess(tmp_path, unique_device_id("srvkill"), broker_host=broker.host, broker_port=broker.port,
                     server=server, settings={"profile": RealServer.PROFILE})  # type: ignore[arg-type]
        for _ in range(3)
    ]
    barriers = {a.device_id: tmp_path / f"barrier-{a.device_id}" for a in agents}
    try:
        server.process.start()
        for a in agents:
            a.start()
        first = server.service.deploy("digits:1", target="group:g", canary_percent=34, wave_percent=100,
                                      max_failures_percent=0, probation_s=0.5, actor="faults")
        _wait_deployment(server, first["deployment_id"], ("completed",))
        for a in agents:  # armed from here: the v2 rollout's first probation sample is the hook's first
            a.stop()
            a.start(fault_at="probation:sample", barrier=barriers[a.device_id])
            a.wait_http_ready()
        dep = server.service.deploy("digits:2", target="group:g", canary_percent=34, wave_percent=100,
                                    max_failures_percent=0, probation_s=0.5, actor="faults")
        canary_id = next(r["device_id"] for r in server.service.deployment_detail(dep["deployment_id"])["devices"]
                         if r["wave"] == 0)
        if point == "wave-dispatched":  # the canary commits; the wave's devices are held
            canary_agent = next(a for a in agents if a.device_id == canary_id)
            canary_agent.wait_until(Path(f"{barriers[canary_id]}.reached").exists, "held at probation")
            barriers[canary_id].touch()
        _wait_rows(server, dep["deployment_id"], SERVER_KILL_POINTS[point])
        before = server.counts()
        at_kill = server.service.deployment_detail(dep["deployment_id"])
        server.process.kill()
        assert at_kill["status"] == "running", f"{point}: the kill came after the rollout had finished"
        assert SERVER_KILL_POINTS[point](at_kill["devices"]), at_kill["devices"]
        ledger.note(f"killed at {point}: device rows in {sorted(d['state'] for d in at_kill['devices'])}")
        for barrier in barriers.values():
            barrier.touch()
        if point == "canary-probation":  # the canary carries on without a server: it commits, its report queues
            canary = next(a for a in agents if a.device_id == canary_id)
            _wait_journal_committed(canary, 2)
        server.process.start()
        detail = _wait_deployment(server, dep["deployment_id"], ("completed",))
        after = server.counts()
        lost = sum(max(0, n - after.get(t, 0)) for t, n in before.items() if t not in _VOLATILE)
        assert not lost, f"registry rows lost: { {t: (n, after.get(t)) for t, n in before.items()} }"
        assert all(d["state"] == "committed" for d in detail["devices"]), detail["devices"]
        for a in agents:
            journal = read_journal(a.store_dir)
            assert journal is not None and journal.committed == agent_models.ref(2) and journal.state is State.IDLE
            assert_serves(a, models, wait_ready=True)
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


def _wait_deployment(server: RealServer, deployment_id: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    """Until the deployment's status is one of ``statuses``, as long as its rows or the server's log move."""
    detail: dict[str, Any] = {}

    def done() -> bool:
        nonlocal detail
        detail = server.service.deployment_detail(deployment_id)
        return detail["status"] in statuses

    def rows() -> list[tuple[str, str, str | None]]:
        return [(d["device_id"], d["state"], d.get("reason")) for d in detail.get("devices", [])]

    wait_progress(done, what=f"deployment {deployment_id} {statuses}", progress=lambda: (tuple(rows()),
                  _size(server.process.log_path)), describe=lambda: f"{detail.get('status')}: {rows()}")
    return detail


def _wait_rows(server: RealServer, deployment_id: str, predicate: Any) -> None:
    rows: list[dict[str, Any]] = []

    def done() -> bool:
        nonlocal rows
        rows = server.service.deployment_detail(deployment_id)["devices"]
        return bool(predicate(rows))

    wait_progress(done, what="the rollout reaching the kill point", interval_s=0.02,
                  progress=lambda: (tuple(r["state"] for r in rows), _size(server.process.log_path)),
                  describe=lambda: f"rows: {[r['state'] for r in rows]}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _wait_journal_committed(agent: AgentProcess, version: int) -> None:
    def done() -> bool:
        record = read_journal(agent.store_dir)
        return record is not None and record.state is State.IDLE and record.committed == agent_models.ref(version)

    agent.wait_until(done, f"committed v{version}")
