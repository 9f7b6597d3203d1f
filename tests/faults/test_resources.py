"""Resource exhaustion with a real agent: a disk that fills up mid-download (a real small tmpfs, root only),
a model too large for the RAM budget, and the local inference API flooded during a hot swap.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.faults.helpers import intact
from tests.support.devices.fixtures import AgentFactory, agent_factory, deploy_and_commit, deploy_digits, fleet, models
from tests.support.faults import FaultLedger, not_run, small_fs
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.servers.stub import FleetServer

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


def test_disk_full_during_download(
    tmp_path: Path, fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """The store lives on a 3 MiB tmpfs; mid-download the disk is filled: ENOSPC fails the update, not the device."""
    with small_fs(tmp_path / "smallfs", 3 << 20) as mount:
        if mount is None:
            not_run("needs root to mount a small tmpfs (disk-full during download)")
        assert mount is not None
        agent = agent_factory(prefix="diskfull", settings={
            "store_dir": str(mount / "store"), "models": {"min_free_bytes": 0},
        })
        agent.store_dir = mount / "store"
        deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
        held = fleet.chunk_limit = fleet.chunks_sent + 20  # the transfer holds after 20 chunks (of ~140)
        mark = fleet.event_count(agent.device_id)
        deploy_digits(fleet, agent, models, 2, "good_v2", health=models.health(probation_s=0.3), chunk_size=1024)
        fleet.wait_for(lambda: fleet.chunks_sent >= held and not fleet.streaming, timeout=60)
        fleet.wait_event(agent.device_id, "download.started", after=mark)
        filler = mount / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:  # take every free block: the next chunk write hits ENOSPC for real
                f.write(b"\0" * 65536)
                f.flush()
        fleet.chunk_limit = None  # the rest of the stream: the next chunk write hits ENOSPC
        failed = fleet.wait_event(agent.device_id, "lifecycle.failed", after=mark, timeout=60)
        assert failed.code == "disk_full", f"{failed.code}: {failed.message}"
        assert "space" in failed.message.lower() or "full" in failed.message.lower(), failed.message
        assert agent.running
        filler.unlink()
        intact(fleet, agent, models, 1, ledger=ledger)
        partial = mount / "store" / "partial"
        assert not (list(partial.iterdir()) if partial.exists() else []), "the partial download was kept"
        # with space back, the same version deploys
        deploy_and_commit(fleet, agent, models, 2, "good_v2", probation_s=0.3)
        intact(fleet, agent, models, 2, kept={1, 2}, ledger=ledger)
        agent.kill()


def _digits_shaped(path: Path, name: str, nodes: list[Any], initializers: list[Any]) -> Path:
    """Save a real ONNX model with the digits model's interface: ``logits = f(head)``, ``head`` the first ten
    pixels (``nodes`` compute ``logits`` from ``head`` and their ``initializers``)."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]),
         helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["head"]),
         *nodes],
        name,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        [*initializers,
         numpy_helper.from_array(np.array([0], np.int64), "starts"),
         numpy_helper.from_array(np.array([10], np.int64), "ends"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _big_model(path: Path, megabytes: int) -> Path:
    """A real ONNX digits-shaped model carrying a large (unused by the output) initializer."""
    weight = np.zeros((megabytes * 1024 * 256,), dtype=np.float32)
    return _digits_shaped(
        path, "big",
        [helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1), helper.make_node("Add", ["head", "s"], ["logits"])],
        [numpy_helper.from_array(weight, "big")],
    )


def test_model_over_the_ram_budget_is_refused(
    tmp_path: Path, fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    budget = 48 << 20
    agent = agent_factory(prefix="ram", settings={"models": {"memory_budget_bytes": budget}})
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)  # the real model fits
    big = _big_model(tmp_path / "big.onnx", 64)
    mark = fleet.event_count(agent.device_id)
    desired = fleet.deploy(agent.device_id, big.read_bytes(), agent_models.ref(2), runtime=agent_models.ONNX,
                 health=models.health(probation_s=0.3), compression="zlib", chunk_size=1 << 20)
    failed = fleet.wait_event(agent.device_id, lambda e: e.kind in ("lifecycle.failed", "lifecycle.committed"),
                              after=mark, timeout=60)
    assert failed.kind == "lifecycle.failed" and failed.code == "memory_budget", (failed.kind, failed.message)
    assert str(budget) in failed.message
    kinds = fleet.kinds(agent.device_id, mark)
    assert "download.completed" not in kinds, "refused before a byte was downloaded"
    assert desired.artifact is not None
    big_id = desired.artifact.artifact_id
    assert not [r for r in fleet.log(agent.device_id).chunk_requests if r.artifact_id == big_id], "it asked for chunks"
    intact(fleet, agent, models, 1, ledger=ledger)
    deploy_and_commit(fleet, agent, models, 3, "good_v2", probation_s=0.3)  # a model that fits still deploys
    intact(fleet, agent, models, 3, kept={1, 3}, ledger=ledger)


def _hungry_model(path: Path, megabytes: int) -> Path:
    """A tiny real ONNX file (< 1 KB) that builds a ``megabytes`` tensor when it runs (ConstantOfShape)."""
    n = megabytes * 1024 * 256
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.5])
    return _digits_shaped(
        path, "hungry",
        [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill),
         helper.make_node("Gather", ["big", "idx"], ["picked"], axis=0),
         helper.make_node("Mul", ["head", "picked"], ["logits"])],
        [numpy_helper.from_array(np.array([n], np.int64), "shape"),
         numpy_helper.from_array(np.arange(10, dtype=np.int64) * 997, "idx")],
    )


def test_model_over_the_ram_budget_once_running_is_refused(
    tmp_path: Path, fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """A small file can still need a lot of RAM: the resident growth over load and warm-up is checked too."""
    budget = 48 << 20
    agent = agent_factory(prefix="ramrun", settings={"models": {"memory_budget_bytes": budget}})
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    hungry = _hungry_model(tmp_path / "hungry.onnx", 96)
    assert hungry.stat().st_size < 4096
    mark = fleet.event_count(agent.device_id)
    fleet.deploy(agent.device_id, hungry.read_bytes(), agent_models.ref(2), runtime=agent_models.ONNX,
                 health=models.health(probation_s=0.3, latency_budget_ms=2000.0))
    event = fleet.wait_event(agent.device_id, lambda e: e.kind in ("lifecycle.failed", "lifecycle.rolled_back",
                                                                   "lifecycle.committed"), after=mark, timeout=60)
    assert event.kind != "lifecycle.committed" and event.code == "memory_budget", (event.kind, event.code,
                                                                                     event.message)
    assert "warmed up" in event.message or "loaded" in event.message, event.message
    intact(fleet, agent, models, 1, ledger=ledger)


def test_api_flood_during_swap(
    fleet: FleetServer, models: AgentModels, agent_factory: AgentFactory, ledger: FaultLedger
) -> None:
    """8 clients hammer the local API while v2 downloads, warms, switches in and sits in probation."""
    agent = agent_factory(prefix="flood", settings={"http": {"max_connections": 4}})
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    agent.wait_http_ready()
    statuses: Counter[int | str] = Counter()
    bad: list[str] = []
    versions: Counter[str] = Counter()
    stop = threading.Event()
    x = models.samples[:4]

    def client() -> None:
        while not stop.is_set():
            try:
                status, body = agent.infer(agent_models.NAME, models.input_name, x)
            except OSError as exc:
                statuses[type(exc).__name__] += 1
                continue
            statuses[status] += 1
            if status == 200:
                versions[str(body.get("model_version"))] += 1
                (out,) = [o for o in body["outputs"] if o["name"] == "logits"]
                got = np.asarray(out["data"], np.float32).reshape(out["shape"]).argmax(1)
                if (got != models.labels[:4]).mean() > 0.5:
                    bad.append(f"wrong answers {got}")
            elif status not in (503,):
                bad.append(f"{status}: {body}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    def answered(n: int) -> None:
        deadline = time.monotonic() + 60
        while sum(statuses.values()) < n:
            assert time.monotonic() < deadline, f"the flood got only {dict(statuses)}"
            time.sleep(0.01)

    try:
        answered(50)  # the flood is on before the update starts
        mark = fleet.event_count(agent.device_id)
        deploy_digits(fleet, agent, models, 2, "good_v2",
                      health=models.health(probation_s=1.0, latency_budget_ms=500.0), chunk_size=8192)
        done = fleet.wait_event(agent.device_id, lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back",
                                                                      "lifecycle.failed"), after=mark, timeout=120)
        answered(sum(statuses.values()) + 50)  # ... and still on after it ended
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    ledger.note(f"flood answers {dict(statuses)}; versions {dict(versions)}; swap ended {done.kind}")
    assert not bad, bad[:5]
    assert statuses[200] > 50, dict(statuses)
    errors = sum(n for k, n in statuses.items() if isinstance(k, str))
    assert not errors, f"a refused client must read its 503, not a reset: {dict(statuses)}"
    # a swap under flood may commit or (latency regression from the flood itself) roll back: never neither
    version = 2 if done.kind == "lifecycle.committed" else 1
    intact(fleet, agent, models, version, ledger=ledger)
