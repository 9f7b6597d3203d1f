"""The whole system as processes: mosquitto, ``edgefleet server run``, six ``edgefleet-agent run``.

One fleet is shared by the scenarios below (they run in file order and each starts from where
the previous one left the fleet; the versions only go up, as in production):

  v1  the real digits CNN, both profiles          canary, then waves, deployed with the CLI over HTTP
  v2  same outputs, other bytes                   one agent is SIGKILLed before; converges on restart
  v3  same outputs, other bytes                   the server is SIGKILLed mid-rollout and resumes
  v4  fine on raspberry-pi-4, NaN on jetson       the jetson device of wave 1 fails its health check:
                                                  the rollout halts and the fleet goes back to v3
  digits-ci:1                                     the production build path: registered with the CLI
                                                  over HTTP, built per profile by the server's
                                                  compression pipeline, rolled out to both profiles

v1-v4 are handed to the server as prepared files (tests.support.servers.main: a NaN variant is
nothing a compression pipeline would ship); every other model version comes from its catalog.

Devices: e2e-a-{0,1,2} on ``raspberry-pi-4`` and e2e-b-{0,1,2} on ``jetson-orin-nano`` (both run
ONNX Runtime on this machine; what differs is the variant each profile gets). Waves are planned
online-first, then by id, so the canary is e2e-a-0.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol.topics import Channel, device_topic
from agent.runtime.keys import public_key_b64
from server.broker import MosquittoBroker
from server.builds import Build
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.registry.fleet import FINISHED_STATUSES
from tests.support.devices.agent_process import AgentProcess
from tests.support.models import agent as agent_models
from tests.support.models import bad as badmodels
from tests.support.models import real_model
from tests.support.models.agent import AgentModels
from tests.support.mqtt import MqttTestClient
from tests.support.servers.process import ServerProcess
from tests.support.waiting import wait_progress

pytestmark = [pytest.mark.broker, pytest.mark.e2e]

GROUP = "e2e"
PROFILE_A = "raspberry-pi-4"
PROFILE_B = "jetson-orin-nano"
DEVICES = {f"e2e-a-{i}": PROFILE_A for i in range(3)} | {f"e2e-b-{i}": PROFILE_B for i in range(3)}
PROBATION_S = 0.5


@dataclass
class Fleet:
    tmp: Path
    broker: MosquittoBroker
    server: ServerProcess
    models: AgentModels
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def call(self, name: str, **kwargs: Any) -> Any:
        return self.server.call(name, **kwargs)

    def deploy(self, version: int, **policy: Any) -> dict[str, Any]:
        body = {"model": f"digits:{version}", "target": f"group:{GROUP}", "probation_s": PROBATION_S, **policy}
        result: dict[str, Any] = self.call("deploy", body=body)
        return result

    def detail(self, deployment_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("get_deployment", path={"deployment_id": deployment_id})
        return result

    def wait_deployment(self, deployment_id: str, statuses: tuple[str, ...], stall_s: float = 120.0) -> dict[str, Any]:
        """Until the deployment's status is one of ``statuses``: as long as its device rows move, and at once
        a failure when it finished otherwise (a rolled-back rollout will not complete)."""
        detail: dict[str, Any] = {}

        def rows() -> list[tuple[str, str, str | None]]:
            return [(d["device_id"], d["state"], d["reason"]) for d in detail.get("devices", [])]

        def done() -> bool:
            nonlocal detail
            detail = self.detail(deployment_id)
            return detail["status"] in statuses

        def failed() -> str | None:
            status = detail.get("status")
            return f"it finished {status}" if status in FINISHED_STATUSES else None

        wait_progress(done, what=f"deployment {deployment_id} {statuses}", failed=failed,
                      progress=lambda: (detail.get("status"), tuple(rows())), stall_s=stall_s, cap_s=600.0,
                      describe=lambda: f"it is {detail.get('status')}: {rows()}\n--- server log (end):\n"
                                       + "\n".join(self.server.log_text().splitlines()[-15:]))
        return detail

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in self.call("list_devices")}

    def wait_online(self, *ids: str, online: bool = True, stall_s: float = 60.0) -> None:
        """Until the registry shows ``ids`` online (or offline). It waits as long as something moves (one more
        device there, a late agent's log grows) and fails at once when an agent it waits for has exited;
        the failure shows the late devices' processes and logs and the server's log."""
        seen: dict[str, bool] = {}

        def late() -> list[str]:
            return [i for i in ids if seen.get(i) is not online]

        def done() -> bool:
            rows = self.devices()
            seen.update({i: rows[i]["online"] for i in ids})
            return not late()

        def failed() -> str | None:
            gone = [i for i in late() if online and i in self.agents and self.agents[i].exited() is not None]
            return f"agent(s) {gone} exited" if gone else None

        def describe() -> str:
            agents = "\n".join(self.agents[i].describe() for i in late() if i in self.agents)
            server = "\n".join(self.server.log_text().splitlines()[-15:])
            return f"not online={online}: {late()} (registry: {seen})\n{agents}\n--- server log (end):\n{server}"

        wait_progress(done, what=f"{len(ids)} device(s) online={online}", describe=describe, failed=failed,
                      progress=lambda: (tuple(late()), tuple(self.agents[i].log_size() for i in late()
                                                                 if i in self.agents)),
                      stall_s=stall_s)

    def committed(self, device_id: str) -> tuple[str, int] | None:
        """What the device itself has committed (its journal on disk)."""
        record = self.agents[device_id].journal()
        if record is None or record.committed is None:
            return None
        return record.committed.name, record.committed.version

    def wait_for(self, condition: Callable[[], bool], what: str, describe: Callable[[], str],
                 stall_s: float = 60.0) -> None:
        """Until ``condition`` holds, as long as the fleet moves (an agent's or the server's log grows); at
        once a failure when an agent exited. No fixed budget: a loaded machine is slow, not stuck."""

        def failed() -> str | None:
            gone = [i for i, a in self.agents.items() if a.exited() is not None]
            return f"agent(s) {gone} exited" if gone else None

        def progress() -> tuple[int, ...]:
            server = self.server.log_path.stat().st_size if self.server.log_path.exists() else 0
            return (server, *(a.log_size() for a in self.agents.values()))

        wait_progress(condition, what=what, progress=progress, failed=failed, stall_s=stall_s,
                      describe=lambda: f"{describe()}\n--- server log (end):\n"
                                       + "\n".join(self.server.log_text().splitlines()[-15:]))

    def wait_rows(self, deployment_id: str, predicate: Callable[[dict[str, dict[str, Any]]], bool],
                  what: str) -> dict[str, Any]:
        """Until ``predicate`` holds for the deployment's device rows (by device id)."""
        detail: dict[str, Any] = {}

        def done() -> bool:
            nonlocal detail
            detail = self.detail(deployment_id)
            return predicate({r["device_id"]: r for r in detail["devices"]})

        self.wait_for(done, f"deployment {deployment_id}: {what}",
                      lambda: f"rows: {[(r['device_id'], r['state']) for r in detail.get('devices', [])]}")
        return detail

    def wait_committed(self, version: int, ids: list[str] | None = None, *, name: str = "digits") -> None:
        ids = ids or list(self.agents)
        self.wait_for(lambda: all(self.committed(i) == (name, version) for i in ids), f"{name}:{version} committed",
                      lambda: f"not all on {name}:{version}: {[(i, self.committed(i)) for i in ids]}")


def retained_desired(broker: MosquittoBroker, device_id: str) -> tuple[str, int] | None:
    """(action, version) of the signed desired state retained for ``device_id`` on the broker (None: none)."""
    client = MqttTestClient(broker.host, broker.port)
    try:
        client.subscribe(device_topic(device_id, Channel.DESIRED))  # the retained message comes with the SUBACK
        client.subscribe("test/e2e-probe")
        client.publish("test/e2e-probe", b"sentinel")  # ... so it arrives before this
        retained = [m for m in client.before(b"sentinel") if m.retain and m.payload]
    finally:
        client.close()
    if not retained:
        return None
    payload = json.loads(base64.b64decode(json.loads(retained[-1].payload)["payload"]))
    return payload["action"], int(payload["model"]["version"])


def serves_real_digits(agent: AgentProcess, models: AgentModels, n: int = 16, *, name: str = "digits") -> float:
    """Accuracy of the agent's local inference API on real evaluation images."""
    status, body = agent.infer(name, models.input_name, models.samples[:n])
    assert status == 200, body
    logits = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(n, -1)
    return float((logits.argmax(axis=1) == models.labels[:n]).mean())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("e2e")
    models = agent_models.build(tmp / "models")
    health = models.health(probation_s=PROBATION_S)
    files = {
        1: {PROFILE_A: models.good, PROFILE_B: models.good},
        2: {PROFILE_A: models.good_v2, PROFILE_B: models.good_v2},
        3: {p: badmodels.identity_variant(models.good, tmp / "models" / f"v3-{p}.onnx", tag="v3")
            for p in (PROFILE_A, PROFILE_B)},
        4: {PROFILE_A: badmodels.identity_variant(models.good, tmp / "models" / "v4-a.onnx", tag="v4"),
            PROFILE_B: models.nan},
    }
    builds = [Build(model="digits", version=v, profile=p, variant="fp32" if path != models.nan else "nan",
                    path=path, runtime=agent_models.ONNX, health=health, chunk_size=16 * 1024, compression="lzma")
              for v, by_profile in files.items() for p, path in by_profile.items()]
    with MosquittoBroker(workdir=tmp / "mosquitto", persistence=True) as broker:
        server = ServerProcess(tmp / "home", broker, builds)
        f = Fleet(tmp, broker, server, models)
        try:
            server.start()
            for device_id, profile in DEVICES.items():
                f.agents[device_id] = AgentProcess(
                    tmp / "agents", device_id, broker_host=broker.host, broker_port=broker.port,
                    server=server.enroller(profile, (GROUP,)),  # type: ignore[arg-type]
                    settings={"profile": profile},
                ).start()
            f.wait_online(*DEVICES)
            yield f
        finally:
            for agent in f.agents.values():
                agent.stop()
            server.stop()


def test_canary_then_waves_across_two_profiles_with_the_cli(fleet: Fleet) -> None:
    out = fleet.server.cli("deploy", "digits:1", "--to", f"group:{GROUP}", "--canary", "10%", "--wave", "50%",
                           "--max-failures", "0", "--probation", str(PROBATION_S), "--json")
    dep = json.loads(out.stdout)
    assert dep["waves"] == [1, 3, 2]
    assert set(dep["artifacts"]) == {PROFILE_A, PROFILE_B}
    assert dep["driver_running"] is True
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",))
    rows = {r["device_id"]: r for r in detail["devices"]}
    assert {r["state"] for r in rows.values()} == {"committed"}
    assert [r["device_id"] for r in rows.values() if r["wave"] == 0] == ["e2e-a-0"]
    canary_done = rows["e2e-a-0"]["finished_at"]
    assert all(r["dispatched_at"] >= canary_done for r in rows.values() if r["wave"] > 0)
    wave1_done = max(r["finished_at"] for r in rows.values() if r["wave"] == 1)
    assert all(r["dispatched_at"] >= wave1_done for r in rows.values() if r["wave"] == 2)
    # the devices agree: each committed v1 and answers real digits correctly on its local API
    fleet.wait_committed(1)
    for agent in fleet.agents.values():
        assert serves_real_digits(agent, fleet.models) >= 0.9
    # the operator's view: the status table comes from the same API
    status = json.loads(fleet.server.cli("status", "--json").stdout)
    shown = {d["device_id"]: d for d in (status["devices"] if isinstance(status, dict) else status)}
    assert set(shown) == set(DEVICES)
    assert {(d["active_model"], d["active_version"]) for d in shown.values()} == {("digits", 1)}
    audit = fleet.call("audit", query={"action": "deploy"})
    assert any(a["actor"] == "e2e" and a["outcome"] == "ok" for a in audit)


def test_offline_device_converges_when_it_comes_back(fleet: Fleet) -> None:
    victim = fleet.agents["e2e-b-2"]
    victim.kill()  # SIGKILL: the broker publishes its Last Will
    fleet.wait_online("e2e-b-2", online=False)
    dep = fleet.deploy(2, canary_percent=20, wave_percent=100, max_failures_percent=0)
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",))
    rows = {r["device_id"]: r for r in detail["devices"]}
    assert rows["e2e-b-2"]["state"] == "dispatched" and not rows["e2e-b-2"]["online"]
    assert all(r["state"] == "committed" for i, r in rows.items() if i != "e2e-b-2")
    assert fleet.committed("e2e-b-2") == ("digits", 1)
    victim.start()  # reconnects, finds its retained desired state, downloads v2, commits
    fleet.wait_committed(2, ["e2e-b-2"])
    fleet.wait_rows(dep["deployment_id"], lambda rows: rows["e2e-b-2"]["state"] == "committed",
                    "the server sees e2e-b-2 commit")
    assert serves_real_digits(victim, fleet.models) >= 0.9


def test_server_killed_mid_rollout_resumes_from_the_registry(fleet: Fleet) -> None:
    # The canary (wave 0: e2e-a-0 and e2e-a-1, planned online-first, then by id) is held at its first
    # probation sample by the agents' fault hook, so the server is killed while the rollout is in
    # probation on any machine, however busy; a timed probation window could end before the kill.
    canary_ids = ["e2e-a-0", "e2e-a-1"]
    barriers = {i: fleet.tmp / f"probation-barrier-{i}" for i in canary_ids}
    for i in canary_ids:
        fleet.agents[i].stop()
        fleet.agents[i].start(fault_at="probation:sample", barrier=barriers[i])
    fleet.wait_online(*canary_ids)
    serving_before = {fleet.committed(i) for i in canary_ids}  # v2 after the tests above, nothing when run alone
    assert len(serving_before) == 1
    dep = fleet.deploy(3, canary_percent=20, wave_percent=50, max_failures_percent=0)
    dep_id = dep["deployment_id"]
    for i in canary_ids:
        reached = Path(f"{barriers[i]}.reached")
        fleet.agents[i].wait_until(reached.exists, "held at its first probation sample")
    fleet.wait_rows(dep_id, lambda rows: all(rows[i]["state"] == "probation" for i in canary_ids),
                    "the canary on probation")
    before = fleet.detail(dep_id)
    assert before["status"] == "running"
    assert sorted(r["device_id"] for r in before["devices"] if r["wave"] == 0) == canary_ids
    # a second rollout to the same devices is refused while this one holds them, naming it
    with pytest.raises(ConflictError, match=f"deployment {dep_id} is still running"):
        fleet.deploy(3, canary_percent=50)
    first_pid = fleet.server.proc.pid if fleet.server.proc else None
    fleet.server.kill()  # kill -9: its rollout lease stays held until it expires
    assert all(fleet.agents[i].running for i in canary_ids)  # still held: nothing committed yet
    assert {fleet.committed(i) for i in canary_ids} == serving_before
    for barrier in barriers.values():
        barrier.touch()
    # devices go on without it: the canary on probation commits; its events wait in the broker (persistent session)
    fleet.wait_committed(3, canary_ids)
    fleet.server.start()
    assert fleet.server.proc is not None and fleet.server.proc.pid != first_pid
    detail = fleet.wait_deployment(dep_id, ("completed",))
    assert {r["state"] for r in detail["devices"]} == {"committed"}
    assert [w["size"] for w in detail["waves"]] == [w["size"] for w in before["waves"]] == [2, 3, 1]
    fleet.wait_committed(3)
    # the plan was not redone: each device was dispatched once, the canary before the rest
    rows = {r["device_id"]: r for r in detail["devices"]}
    canary = [r for r in rows.values() if r["wave"] == 0]
    assert all(r["dispatched_at"] >= max(c["finished_at"] for c in canary) for r in rows.values() if r["wave"] > 0)
    events = fleet.call("events", query={"deployment": dep_id, "kind": "deployment.", "limit": 1000})["events"]
    kinds = [e["kind"] for e in events]
    assert (kinds.count("deployment.created"), kinds.count("deployment.wave"), kinds.count("deployment.completed")) \
        == (1, 2, 1), kinds  # each wave released once, across the crash


def test_bad_version_halts_the_rollout_and_rolls_the_fleet_back(fleet: Fleet) -> None:
    devices = fleet.devices()
    if {(d["active_model"], d["active_version"]) for d in devices.values()} != {("digits", 3)}:
        fleet.wait_deployment(fleet.deploy(3, canary_percent=0)["deployment_id"], ("completed",))
    # canary: e2e-a-0 (its variant is fine); wave 1: a-1, a-2, b-0 (b-0's variant outputs NaN)
    dep = fleet.deploy(4, canary_percent=10, wave_percent=50, max_failures_percent=20)
    assert dep["waves"] == [1, 3, 2]
    detail = fleet.wait_deployment(dep["deployment_id"], ("rolled_back",))
    failures = {f["device_id"]: f for f in detail["failures"]}
    assert set(failures) == {"e2e-b-0"}, failures
    assert "finite" in f"{failures['e2e-b-0']['code']} {failures['e2e-b-0']['reason']}"
    assert any(e["kind"] == "deployment.halted" for e in detail["events"])
    rows = {r["device_id"]: r for r in detail["devices"]}
    assert rows["e2e-a-0"]["state"] == "rolled_back"  # committed v4, then rolled back by a signed command
    assert rows["e2e-b-1"]["state"] == rows["e2e-b-2"]["state"] == "skipped"  # wave 2 was never released
    # every device runs v3 again; none keeps v4
    fleet.wait_committed(3)
    for agent in fleet.agents.values():
        assert serves_real_digits(agent, fleet.models) >= 0.9
    canary_events = fleet.call("events", query={"device": "e2e-a-0", "kind": "command.result"})["events"]
    assert any(e["data"].get("ok") is True for e in canary_events)
    # v4 is not what the group converges to any more: a restarted device is not handed it again
    assert retained_desired(fleet.broker, "e2e-a-1") != ("deploy", 4)  # what a (re)connecting device is handed
    fleet.agents["e2e-a-1"].stop()
    fleet.agents["e2e-a-1"].start()
    fleet.wait_online("e2e-a-1")
    assert fleet.committed("e2e-a-1") == ("digits", 3)


def test_bad_requests_get_clear_messages_and_change_nothing(fleet: Fleet) -> None:
    before = fleet.call("list_deployments")
    with pytest.raises(NotFoundError, match="unknown model version digits:9"):
        fleet.deploy(9)
    with pytest.raises(NotFoundError, match="unknown device 'ghost'"):
        fleet.call("deploy", body={"model": "digits:3", "target": "device:ghost"})
    # a device on a profile that has no built variant (registered, never connected)
    fleet.call("register_device", body={"device_id": "e2e-coral", "profile": "coral-dev-board",
                                        "public_key": _any_key(),
                                        "groups": ["coral"], "broker_password": False})
    with pytest.raises(InvalidRequestError, match=r"no variant of digits:3 is built for profile\(s\) coral-dev-board"):
        fleet.call("deploy", body={"model": "digits:3", "target": "group:coral"})
    # the CLI says the same, with a non-zero exit
    out = fleet.server.cli("deploy", "digits:9", "--to", f"group:{GROUP}", check=False)
    assert out.returncode != 0 and "unknown model version digits:9" in out.stderr
    assert fleet.call("list_deployments") == before
    refused = fleet.call("audit", query={"action": "deploy"})
    assert {a["outcome"] for a in refused} >= {"error:not_found", "error:invalid"}
    assert {fleet.committed(i) for i in DEVICES} == {("digits", 3)}


def _any_key() -> str:
    return public_key_b64(X25519PrivateKey.generate().public_key())


def test_ci_registers_builds_and_rolls_out_a_model_through_the_api(fleet: Fleet) -> None:
    source = real_model("digits")
    added = fleet.server.cli("model", "add", str(source.path), "--name", "digits-ci", "--calibration",
                             str(source.calibration), "--evaluation", str(source.evaluation), "--json")
    assert json.loads(added.stdout)["version"] == 1
    built = fleet.call("build_model", path={"model": "digits-ci", "version": "1"}, timeout=900,
                       body={"profile": f"{PROFILE_A},{PROFILE_B}", "calibration_methods": ["minmax"],
                             "latency_runs": 5, "pruning": False})
    assert built["failures"] == 0, built["results"]
    variants = {r["profile"]: r["variant"] for r in built["results"]}
    assert set(variants) == {PROFILE_A, PROFILE_B}
    dep = fleet.call("deploy", body={"model": "digits-ci:1", "target": f"group:{GROUP}", "canary_percent": 20,
                                     "wave_percent": 100, "max_failures_percent": 0, "probation_s": PROBATION_S})
    detail = fleet.wait_deployment(dep["deployment_id"], ("completed",))
    assert {r["state"] for r in detail["devices"]} == {"committed"}
    fleet.wait_committed(1, list(DEVICES), name="digits-ci")
    devices = fleet.devices()
    for device_id, profile in DEVICES.items():
        assert devices[device_id]["active_variant"] == variants[profile]  # each got its profile's build
        assert serves_real_digits(fleet.agents[device_id], fleet.models, name="digits-ci") >= 0.9
    actions = {(a["action"], a["outcome"]) for a in fleet.call("audit", query={"actor": "e2e"})}
    assert {("register_model", "ok"), ("build_model", "ok"), ("deploy", "ok")} <= actions
