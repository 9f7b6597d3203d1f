"""Delta updates end to end: a real agent, real mosquitto, the real digits model. The agent downloads the
patch instead of the full artifact, applies it over the version it keeps, verifies, installs and serves;
a corrupted or foreign base falls back to the full artifact (reported), never a failed update."""

from __future__ import annotations

from typing import Any

import pytest

from agent.runtime.store import ModelStore
from tests.support.delta import DeltaDeploy, deploy_delta, fine_tuned, requested
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import agent_factory, agent_v1, assert_serves, fleet, models
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "agent_v1", "fleet", "models"]

pytestmark = pytest.mark.broker

DONE = ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed")


def _commit_v2(fleet: FleetServer, device_id: str, mark: int) -> None:
    event = fleet.wait_event(device_id, lambda e: e.kind in DONE, after=mark, timeout=90)
    assert event.kind == "lifecycle.committed", (event.kind, event.message, event.data)
    assert event.model == agent_models.ref(2)


def _deploy_v2(
    fleet: FleetServer, agent: AgentProcess, models: AgentModels, **kw: Any
) -> tuple[DeltaDeploy, int, set[str]]:
    """Deploy digits:2 (a fine-tuned head) with a delta offer over v1; wait for the commit. Returns the deploy,
    the event mark before it and the artifact ids asked for before it."""
    mark = fleet.event_count(agent.device_id)
    before = requested(fleet, agent.device_id)
    dd = deploy_delta(fleet, agent.device_id, models, base=models.bytes_of("good"), base_version=1,
                      target=fine_tuned(models.good), version=2, **kw)  # fmt: skip
    _commit_v2(fleet, agent.device_id, mark)
    return dd, mark, requested(fleet, agent.device_id) - before


def test_delta_is_downloaded_applied_and_served(
    agent_v1: AgentProcess, fleet: FleetServer, models: AgentModels
) -> None:
    agent = agent_v1
    dd, mark, asked = _deploy_v2(fleet, agent, models)
    assert asked == {dd.delta.info.artifact_id}, "only the patch travels"
    kinds = fleet.kinds(agent.device_id, after=mark)
    assert "delta.applied" in kinds and "delta.fallback" not in kinds, kinds
    assert dd.delta.info.compressed_size < 0.6 * dd.full.info.compressed_size
    kept = {v.ref.version: v for v in ModelStore(agent.store_dir).kept(agent_models.NAME)}
    assert kept[2].path.read_bytes() == dd.target
    assert_serves(agent, models)


def test_corrupted_base_falls_back_to_the_full_artifact(
    agent_v1: AgentProcess, fleet: FleetServer, models: AgentModels
) -> None:
    agent = agent_v1
    (v1,) = [v for v in ModelStore(agent.store_dir).kept(agent_models.NAME) if v.ref.version == 1]
    raw = bytearray(v1.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # bit rot in the kept base (the served copy is already in memory)
    v1.path.write_bytes(bytes(raw))
    dd, mark, asked = _deploy_v2(fleet, agent, models)
    assert asked == {dd.delta.info.artifact_id, dd.full.info.artifact_id}
    events = [e for e in fleet.log(agent.device_id).events[mark:] if e.kind == "delta.fallback"]
    assert len(events) == 1 and "base does not match" in events[0].data["reason"], events
    assert_serves(agent, models)


def test_foreign_base_goes_straight_to_full(
    agent_v1: AgentProcess, fleet: FleetServer, models: AgentModels
) -> None:
    agent = agent_v1
    dd, mark, asked = _deploy_v2(fleet, agent, models, base_sha256="0" * 64)
    assert asked == {dd.full.info.artifact_id}, "the patch is never fetched"
    events = [e for e in fleet.log(agent.device_id).events[mark:] if e.kind == "delta.fallback"]
    assert len(events) == 1 and "digest differs" in events[0].data["reason"], events
