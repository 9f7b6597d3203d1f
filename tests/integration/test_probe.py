"""A probe round trip: the real server (its own process) seals candidates, real agents fetch them over real
mosquitto, time them off their serving path, report measurements; the server names who did not answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.protocol.messages import RuntimeSpec
from server.broker import MosquittoBroker
from server.compression.pipeline import Candidate, ProfileResult
from server.compression.recipes import FP16_WEIGHTS, Recipe
from server.probe import probe_status, start_probe, wait_probe
from server.profiles import load_profiles
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import models
from tests.support.models.agent import AgentModels
from tests.support.servers.faulty import RealServer
from tests.support.servers.stub import unique_device_id

__all__ = ["models"]

pytestmark = pytest.mark.broker

FP32 = Recipe("fp32", "fp32", "fp32")


def _online(server: RealServer, device_ids: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # polls observable registry state
        if device_ids <= {d.device_id for d in server.registry.list_devices() if d.online}:
            return
        time.sleep(0.1)
    raise TimeoutError(f"not online: {device_ids}")


def test_probe_times_every_passing_candidate_off_path_and_names_who_did_not_answer(
    tmp_path: Path, broker: MosquittoBroker, models: AgentModels
) -> None:
    server = RealServer(tmp_path, broker.host, broker.port, [])
    agents = [AgentProcess(tmp_path, unique_device_id("probe"), broker_host=broker.host, broker_port=broker.port,
                           server=server, settings={"profile": RealServer.PROFILE})  # type: ignore[arg-type]
              for _ in range(3)]  # fmt: skip
    live, silent = agents[:2], agents[2]  # the third is registered but never runs
    profile = load_profiles()[RealServer.PROFILE]
    candidates = (
        Candidate(FP32, "passed", path=models.good),
        Candidate(FP16_WEIGHTS, "passed", path=models.good_v2),
        Candidate(Recipe("int8-dynamic", "int8", "dynamic"), "failed", reason="cosine 0.9 < 0.99"),
        Candidate(Recipe("fp32-copy", "fp32", "fp32"), "passed", path=models.good),  # byte-identical to fp32's
    )
    result = ProfileResult(profile.id, candidates[0], False, candidates, "none", 0,
                           RuntimeSpec("onnx", "onnxruntime"), models.health())
    try:
        server.process.start()
        for a in live:
            a.start()
        _online(server, {a.device_id for a in live})
        plan = start_probe(server.service, result, model="digits", version=1, profile=profile, target="group:g",
                           actor="test")
        assert set(plan.devices) == {a.device_id for a in agents} and plan.variants == ("fp32", "fp16-weights")
        assert plan.aliases == {"fp32-copy": "fp32"}  # one artifact is sent once
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the live devices' answers, as ingest writes them
            done, _, _ = probe_status(server.registry, plan)
            if done >= {a.device_id for a in live}:
                break
            time.sleep(0.2)
        outcome = wait_probe(server.registry, plan, timeout_s=0)  # nothing more to wait for: who is missing
        assert outcome.answered == sorted(a.device_id for a in live)
        assert outcome.missing == [silent.device_id]
        assert outcome.measured["fp32-copy"] == outcome.measured["fp32"]
        assert set(outcome.measured) == {"fp32", "fp16-weights", "fp32-copy"} and outcome.failed == {}, (
            outcome, server.registry.list_events(kind_prefix="probe.", limit=20), live[0].log_text()[-3000:])
        rows = server.registry.measurements("digits", 1, sources=("probe",), probe_id=plan.probe_id)
        assert len(rows) == 4 and {r.profile for r in rows} == {profile.id}
        assert all(r.execution_provider == "CPUExecutionProvider" and r.p50_ms > 0 for r in rows)
        assert all(r.runs > 10 for r in rows), [r.runs for r in rows]  # both mirrored passes (10 runs each) counted
        evidence = outcome.evidence()
        assert evidence["missing"] == [silent.device_id] and evidence["measured_p50_ms"] == outcome.measured
        for a in live:  # never installed, never served, deleted
            assert not (a.store_dir / "probe").exists()
            assert not (a.store_dir / "models").exists() or not any((a.store_dir / "models").iterdir())
            row = next(d for d in server.service.list_devices() if d["device_id"] == a.device_id)
            assert row["active_model"] is None and row["active_version"] is None, row
            assert "probe.completed" in a.log_text()
    finally:
        for a in live:
            a.kill()
        server.process.kill()
