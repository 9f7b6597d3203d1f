"""A probe round trip: the real server (its own process) seals candidates, real agents fetch them over real
mosquitto, time them off their serving path, report measurements; the server names who did not answer."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.messages import RuntimeSpec
from server.broker import MosquittoBroker
from server.compression.pipeline import Candidate, ProfileResult
from server.compression.recipes import FP16_WEIGHTS, Recipe
from server.probe import probe_status, start_probe, wait_probe
from server.profiles import load_profiles
from tests.support.devices.agent_process import AgentProcess
from tests.support.devices.fixtures import models
from tests.support.models import real_model
from tests.support.models.agent import AgentModels
from tests.support.servers.faulty import RealServer
from tests.support.servers.process import ServerProcess
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


def _serving(tmp_path: Path, broker: MosquittoBroker, models: AgentModels,
             settings: dict[str, Any] | None = None) -> tuple[RealServer, AgentProcess]:
    """A server whose one device serves ``serve:1`` (models.good), committed: the model a probe must not touch."""
    build = {"model": "serve", "version": 1, "profile": RealServer.PROFILE, "path": str(models.good),
             "input": models.input_name, "probation_s": 0.3}
    server = RealServer(tmp_path, broker.host, broker.port, [build])
    agent = AgentProcess(tmp_path, unique_device_id("probe"), broker_host=broker.host, broker_port=broker.port,
                         server=server, settings={"profile": RealServer.PROFILE, **(settings or {})})  # type: ignore[arg-type]
    try:
        server.process.start()
        agent.start()
        _online(server, {agent.device_id})
        server.service.deploy("serve:1", target="group:g", canary_percent=0, wave_percent=100,
                              max_failures_percent=0, probation_s=0.3, actor="test")
        _committed(server, agent)
    except BaseException:  # the caller's finally never runs: stop what was started here
        agent.kill()
        server.process.kill()
        raise
    return server, agent


def _committed(server: RealServer, agent: AgentProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # polls observable registry state
        d = next(d for d in server.registry.list_devices() if d.device_id == agent.device_id)
        if d.online and d.active_model == "serve" and d.active_version == 1 and d.active_state == "committed":
            return
        time.sleep(0.1)
    raise TimeoutError(f"serve:1 not committed:\n{agent.log_text()[-3000:]}")


def _result(profile_id: str, models: AgentModels) -> ProfileResult:
    profile = load_profiles()[profile_id]
    candidates = (Candidate(FP32, "passed", path=models.good), Candidate(FP16_WEIGHTS, "passed", path=models.good_v2))
    return ProfileResult(profile.id, candidates[0], False, candidates, "none", 0,
                         RuntimeSpec("onnx", "onnxruntime"), models.health())


def _infer_ok(agent: AgentProcess, models: AgentModels) -> dict[str, Any]:
    agent.wait_http_ready()
    sample = models.samples[:1]
    body = json.dumps({"inputs": [{"name": models.input_name, "shape": list(sample.shape), "datatype": "FP32",
                                   "data": sample.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{agent.http_port}/v2/models/serve/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_kill_9_mid_probe_leaves_no_probe_file_and_the_serving_model_untouched(
    tmp_path: Path, broker: MosquittoBroker, models: AgentModels
) -> None:
    """A probe is not journaled: the agent dies with a verified probe file on disk (fault point ``probe:stored``);
    the restart deletes it, serves the committed model as before, and the server names the device missing."""
    server, agent = _serving(tmp_path, broker, models)
    try:
        assert agent.stop() == 0, agent.log_text()[-3000:]
        agent.start(fault_at="probe:stored")
        _online(server, {agent.device_id})
        _committed(server, agent)
        plan = start_probe(server.service, _result(RealServer.PROFILE, models), model="digits", version=1,
                           profile=load_profiles()[RealServer.PROFILE], target="group:g", actor="test")
        agent.wait_fault_kill()
        left = list((agent.store_dir / "probe").iterdir())
        assert len(left) == 1 and left[0].stat().st_size == models.good.stat().st_size, left  # died holding it
        journal = agent.journal()
        assert journal is not None and journal.committed is not None and journal.committed.name == "serve"
        agent.start()
        _committed(server, agent)
        assert _infer_ok(agent, models)["model_version"] in ("1", 1)
        assert not (agent.store_dir / "probe").exists(), list((agent.store_dir / "probe").iterdir())
        after = agent.journal()
        assert after is not None and after.committed == journal.committed and after.target == journal.target
        outcome = wait_probe(server.registry, plan, timeout_s=0)
        assert outcome.missing == [agent.device_id] and outcome.measured == {}
    finally:
        agent.kill()
        server.process.kill()


def test_probe_variants_over_the_memory_budget_are_refused_with_a_clear_event(
    tmp_path: Path, broker: MosquittoBroker, models: AgentModels
) -> None:
    """A probe counts against ``models.memory_budget_bytes`` as an update does: a variant whose file alone is over
    it is refused before a chunk of it is asked for; one whose file fits is refused once loading it (the RAM it
    took) busts the budget. Both reasons reach the server as ``probe.failed`` events and in the outcome."""
    sizes = {"fp32": models.good.stat().st_size, "fp16-weights": models.good_v2.stat().st_size}
    small, big = sorted(sizes, key=sizes.__getitem__)
    assert sizes[small] < sizes[big], sizes
    budget = sizes[small] + (sizes[big] - sizes[small]) // 2  # exact: the smaller file fits, the bigger does not
    server = RealServer(tmp_path, broker.host, broker.port, [])
    agent = AgentProcess(tmp_path, unique_device_id("probe"), broker_host=broker.host, broker_port=broker.port,
                         server=server,  # type: ignore[arg-type]
                         settings={"profile": RealServer.PROFILE, "models": {"memory_budget_bytes": budget}})
    try:
        server.process.start()
        agent.start()
        _online(server, {agent.device_id})
        plan = start_probe(server.service, _result(RealServer.PROFILE, models), model="digits", version=1,
                           profile=load_profiles()[RealServer.PROFILE], target="group:g", actor="test")
        outcome = wait_probe(server.registry, plan, timeout_s=120)
        assert outcome.answered == [agent.device_id] and outcome.measured == {}, (outcome, agent.log_text()[-3000:])
        failed = outcome.failed[agent.device_id]
        assert f"{sizes[big]}-byte model file) beside the committed model" in failed[big], failed
        assert f"over the {budget}-byte model memory budget" in failed[big], failed
        assert "once loaded beside the committed model" in failed[small], failed
        events = server.registry.list_events(device_id=agent.device_id, kind_prefix="probe.failed", limit=10)
        assert {str(e.data.get("variant")) for e in events} == {small, big}, events
        assert all("memory budget" in str(e.message) for e in events), events
        assert not (agent.store_dir / "probe").exists()
    finally:
        agent.kill()
        server.process.kill()


def test_cli_probe_build_against_a_real_agent_is_marked_measured_and_shown(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """``edgefleet build MODEL:V --profile P --probe group:G`` (the operator's command line, over the running
    server's HTTP API) with a real agent: the build is re-chosen with what the device measured, marked measured,
    and ``edgefleet model show`` prints the device's figures."""
    digits = real_model("digits")
    profile, group = "x86-64-avx2", "lab"
    server = ServerProcess(tmp_path / "home", broker, [])
    agent: AgentProcess | None = None
    try:
        server.start()
        agent = AgentProcess(tmp_path / "agents", unique_device_id("probe"), broker_host=broker.host,
                             broker_port=broker.port, server=server.enroller(profile, (group,)),  # type: ignore[arg-type]
                             settings={"profile": profile}).start()
        device = agent.device_id
        deadline = time.monotonic() + 60
        while not any(d["device_id"] == device and d["online"] for d in server.call("list_devices")):
            assert time.monotonic() < deadline, agent.log_text()[-3000:]
            time.sleep(0.2)  # polls the server's device list (observable state)
        server.cli("model", "add", str(digits.path), "--name", "digits", "--calibration", str(digits.calibration),
                   "--evaluation", str(digits.evaluation), "--metric", digits.metric)
        built = server.cli("build", "digits:1", "--profile", profile, "--probe", f"group:{group}", "--probe-timeout",
                           "120", "--recipe", "fp16-weights", "--recipe", "int8-dynamic", "--no-pruning",
                           "--no-fallback", "--latency-runs", "3", "--json")
        (row,) = json.loads(built.stdout)
        probe = row["probe"]
        assert probe["answered"] == [device] and probe["missing"] == [] and probe["failed"] == {}, row
        assert set(probe["measured_p50_ms"]) == set(probe["variants"]) and len(probe["variants"]) >= 2, probe
        assert row["variant"] in probe["measured_p50_ms"] and row["blind_variant"], row
        shown = json.loads(server.cli("model", "show", "digits:1", "--json").stdout)
        figures = [f for f in shown["measured"] if f["profile"] == profile]
        assert {f["variant"] for f in figures} >= set(probe["variants"]), shown["measured"]
        assert all(f["devices"] == 1 and f["p50_ms"] > 0 for f in figures), figures
        text = server.cli("model", "show", "digits:1").stdout
        assert f"{row['variant']} (measured)" in text, text  # the build is marked measured
        assert "measured on devices" in text and all(v in text for v in probe["variants"]), text
    finally:
        if agent is not None:
            agent.kill()
        server.stop()
