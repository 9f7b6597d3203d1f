"""The warm standby (``[models] warm_standby``): after a commit the previous version stays loaded, so a
rollback command to it switches without loading from disk; a memory budget releases it when a new
candidate needs the room, and rollback then loads from disk as before.

Real agent processes, real mosquitto, the real digits model; what happened is read from the agent's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import (
    AgentFactory,
    agent_factory,
    assert_serves,
    deploy_and_commit,
    fleet,
    models,
    serving_v1,
)
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]  # fixtures used by name below

pytestmark = pytest.mark.broker

KEPT_WARM = "keeping the previous version loaded as a warm standby"
FROM_STANDBY = "switched to the standby without loading"
MADE_ROOM = "releasing the warm standby to make room"


def _logs_after(agent: AgentProcess, mark: int) -> list[dict[str, Any]]:
    return agent.log_records()[mark:]


def _loaded(records: list[dict[str, Any]], version: int) -> bool:
    return any(str(r.get("msg", "")).startswith(f"loaded {agent_models.NAME} v{version} ") for r in records)


def _rollback(fleet: FleetServer, agent: AgentProcess, version: int) -> None:
    command_id = fleet.command(agent.device_id, "rollback", version=version)
    result = fleet.wait_event(agent.device_id, lambda e: e.kind == "command.result" and e.command_id == command_id)
    assert result.data["ok"] is True, result.data
    assert result.data["active"] == {"name": agent_models.NAME, "version": version}
    fleet.wait_state(
        agent.device_id, lambda s: s.lifecycle == "idle" and s.active is not None and s.active.version == version
    )


def _padded(src: Path, dst: Path, megabytes: int) -> Path:
    """The digits model carrying ``megabytes`` of extra (unused) weights: a large file, the same outputs."""
    model = onnx.load(str(src))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(megabytes << 18, np.float32), "padding"))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("warm", [True, False], ids=["warm_standby", "no_standby"])
def test_rollback_after_commit_from_the_warm_standby(
    warm: bool, fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    agent = serving_v1(agent_factory, fleet, models, settings={"models": {"warm_standby": warm}})
    mark = len(agent.log_records())
    deploy_and_commit(fleet, agent, models, 2, "good_v2")
    assert any(r["msg"] == KEPT_WARM for r in _logs_after(agent, mark)) is warm

    fleet.serve_chunks = False
    mark = len(agent.log_records())
    _rollback(fleet, agent, 1)
    after = _logs_after(agent, mark)
    switched = [r for r in after if r["msg"] == FROM_STANDBY]
    if warm:
        assert switched and switched[0]["model"] == "digits v1", after
        assert not _loaded(after, 1), "v1 was loaded from disk although it was on standby"
    else:
        assert not switched and _loaded(after, 1), after
    assert_serves(agent, models, wait_ready=True)
    journal = agent.journal()
    assert journal is not None and journal.committed == agent_models.ref(1)


def test_budget_releases_the_standby_and_rollback_loads_from_disk(
    tmp_path: Path, fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    big = _padded(models.good, tmp_path / "big.onnx", 56)
    s1, s2, s3 = (p.stat().st_size for p in (models.good, models.good_v2, big))
    # v2 beside v1 fits, v3 beside v2 fits, v3 beside v2 and the standby v1 does not
    budget = s3 + s2 + s1 // 2
    agent = agent_factory(prefix="budget", settings={"models": {"memory_budget_bytes": budget}})
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    mark = len(agent.log_records())
    deploy_and_commit(fleet, agent, models, 2, "good_v2", probation_s=0.3)
    assert any(r["msg"] == KEPT_WARM for r in _logs_after(agent, mark)), "two small models fit the budget"

    mark, events = len(agent.log_records()), fleet.event_count(agent.device_id)
    fleet.deploy(
        agent.device_id,
        big.read_bytes(),
        agent_models.ref(3),
        runtime=agent_models.ONNX,
        health=models.health(probation_s=0.3),
        compression="zlib",
        chunk_size=1 << 20,
    )
    # v3 either commits or is refused once loaded (its resident size is measured); the standby must go first
    fleet.wait_event(
        agent.device_id,
        lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed"),
        after=events,
        timeout=90,
    )
    made_room = [r for r in _logs_after(agent, mark) if r["msg"] == MADE_ROOM]
    assert made_room and made_room[0]["standby"] == "digits v1", _logs_after(agent, mark)
    fleet.wait_state(agent.device_id, lambda s: s.lifecycle == "idle" and s.active is not None)

    fleet.serve_chunks = False
    mark = len(agent.log_records())
    _rollback(fleet, agent, 1)
    after = _logs_after(agent, mark)
    assert _loaded(after, 1) and not any(r["msg"] == FROM_STANDBY for r in after), after
    assert_serves(agent, models, wait_ready=True)


def test_purge_and_eviction_release_the_standby(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory
) -> None:
    agent = agent_factory()
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    deploy_and_commit(fleet, agent, models, 2, "good_v2", probation_s=0.3)
    assert any(r["msg"] == KEPT_WARM for r in agent.log_records())
    mark = len(agent.log_records())
    purge = fleet.command(agent.device_id, "purge")
    result = fleet.wait_event(agent.device_id, lambda e: e.command_id == purge)
    assert result.data["ok"] is True and "v1" in result.data["message"], result.data
    released = [r for r in _logs_after(agent, mark) if "warm standby" in r["msg"]]
    assert released and released[0]["msg"].startswith("releasing") and released[0]["standby"] == "digits v1"

    # keep_versions = 1: committing v2 evicts v1 from the store, so it is not kept loaded either
    evicting = agent_factory(prefix="evict", settings={"models": {"keep_versions": 1}})
    deploy_and_commit(fleet, evicting, models, 1, probation_s=0.3)
    mark = len(evicting.log_records())
    deploy_and_commit(fleet, evicting, models, 2, "good_v2", probation_s=0.3)
    assert not any(r["msg"] == KEPT_WARM for r in _logs_after(evicting, mark))
    assert_serves(evicting, models)
