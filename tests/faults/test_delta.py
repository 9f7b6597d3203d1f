"""Delta updates under faults: kill -9 while the patch is applied, a corrupted base on the device, and the base
evicted between the deploy's arrival and the apply. Each must end with the new version committed and serving
(a resumed apply, or an automatic fallback to the full artifact, reported as ``delta.fallback``), nothing lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.core.journal import State
from agent.runtime.store import ModelStore
from tests.faults.helpers import intact
from tests.support.delta import DeltaDeploy, deploy_delta, fine_tuned, requested
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import AgentFactory, agent_factory, deploy_and_commit, fleet, models
from tests.support.faults import FaultLedger, read_journal
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker

DONE = ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed")


def _v1_then_stopped_with_delta(fleet: FleetServer, agent: AgentProcess, models: AgentModels) -> DeltaDeploy:
    """v1 committed; the agent stopped; a delta deploy of v2 retained for it."""
    deploy_and_commit(fleet, agent, models, 1)
    assert agent.stop() == 0, agent.log_text()[-3000:]
    return deploy_delta(fleet, agent.device_id, models, base=models.bytes_of("good"), base_version=1,
                        target=fine_tuned(models.good), version=2)  # fmt: skip


def _committed_v2(fleet: FleetServer, agent: AgentProcess, mark: int) -> list[str]:
    event = fleet.wait_event(agent.device_id, lambda e: e.kind in DONE, after=mark, timeout=90)
    assert event.kind == "lifecycle.committed" and event.model == agent_models.ref(2), (event, agent.log_text()[-3000:])
    return fleet.kinds(agent.device_id, after=mark)


def test_sigkill_while_patching_resumes_the_apply(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    agent = agent_factory(prefix="dkill")
    dd = _v1_then_stopped_with_delta(fleet, agent, models)
    agent.start(fault_at="delta:apply")
    agent.wait_fault_kill()
    dead = read_journal(agent.store_dir)
    assert dead is not None and dead.state is State.DOWNLOADING and dead.target == agent_models.ref(2), dead
    mark = fleet.event_count(agent.device_id)
    asked = len(fleet.log(agent.device_id).chunk_requests)
    agent.start()
    kinds = _committed_v2(fleet, agent, mark)
    assert "delta.applied" in kinds and "delta.fallback" not in kinds, kinds
    again = {r.artifact_id for r in fleet.log(agent.device_id).chunk_requests[asked:]}
    assert dd.full.info.artifact_id not in again, "the resumed apply needs no full download"
    intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)


def test_corrupted_base_falls_back_to_full(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    agent = agent_factory(prefix="dcorrupt")
    dd = _v1_then_stopped_with_delta(fleet, agent, models)
    (v1,) = [v for v in ModelStore(agent.store_dir).kept(agent_models.NAME) if v.ref.version == 1]
    raw = bytearray(v1.path.read_bytes())
    raw[100] ^= 0x01
    v1.path.write_bytes(bytes(raw))
    mark = fleet.event_count(agent.device_id)
    agent.start()
    kinds = _committed_v2(fleet, agent, mark)
    assert "delta.fallback" in kinds, kinds
    assert {dd.delta.info.artifact_id, dd.full.info.artifact_id} <= requested(fleet, agent.device_id)
    intact(fleet, agent, models, 2, kept={2}, ledger=ledger)


def test_base_evicted_between_dispatch_and_apply_falls_back(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger, tmp_path: Path
) -> None:
    agent = agent_factory(prefix="devict")
    dd = _v1_then_stopped_with_delta(fleet, agent, models)
    assert dd.delta.info.chunk_count >= 2
    barrier = tmp_path / "evicted"
    mark = fleet.event_count(agent.device_id)
    agent.start(fault_at="download:chunk:1", barrier=barrier)  # the patch transfer has begun (base was checked)
    fleet.wait_for(lambda: Path(f"{barrier}.reached").exists(), timeout=60)
    (v1,) = [v for v in ModelStore(agent.store_dir).kept(agent_models.NAME) if v.ref.version == 1]
    shutil.rmtree(v1.directory)  # evicted (space pressure, an operator) while the patch downloads
    barrier.touch()
    kinds = _committed_v2(fleet, agent, mark)
    assert "delta.fallback" in kinds and "delta.applied" not in kinds, kinds
    assert dd.full.info.artifact_id in requested(fleet, agent.device_id)
    intact(fleet, agent, models, 2, kept={2}, ledger=ledger)
