"""A hostile device or API caller against the real server, real mosquitto and real agent processes.

One scenario per class of issue 12 (the device- and data-facing half): broker identities, per-device
quotas (events and bytes, retained messages, chunk re-requests), data-set bombs, untrusted strings
in the operator's terminal, files and defaults. Each fails on the code before the fix (the reason is
in its docstring) and checks that honest devices keep serving.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol.envelope import sign_payload
from agent.protocol.messages import ChunkRequest, EnrollRequest, Event, ModelRef, StateReport, Telemetry, encode
from agent.protocol.topics import Channel, artifact_topic, device_topic
from server.broker import SERVER_USER, MosquittoBroker, current_user
from server.errors import InvalidRequestError
from tests.faults.helpers import intact
from tests.support.abuse import local_service, npz_bomb, start_mosquitto
from tests.support.devices.agent_process import ROOT, AgentProcess
from tests.support.devices.fixtures import AgentFactory, agent_factory, assert_serves, deploy_and_commit, fleet, models
from tests.support.faults import FaultLedger, kept_versions, read_journal
from tests.support.models import agent as agent_models
from tests.support.models.agent import AgentModels
from tests.support.mqtt import MqttTestClient
from tests.support.servers.faulty import RealServer
from tests.support.servers.stub import FleetServer, unique_device_id

__all__ = ["agent_factory", "fleet", "models"]

pytestmark = pytest.mark.broker


# -- helpers ------------------------------------------------------------------------------------------------


def _builds(models: AgentModels, *, chunk_size: int = 4096) -> list[dict[str, Any]]:
    return [{"model": "digits", "version": v, "profile": RealServer.PROFILE, "path": str(p),
             "input": models.input_name, "probation_s": 0.3, "chunk_size": chunk_size}
            for v, p in ((1, models.good), (2, models.good_v2))]


def _throttled(server: RealServer, quota: str) -> float:
    got = {}
    for line in _metrics_text(server).splitlines():
        m = re.match(r'^edgefleet_quota_throttled_total\{quota="(\w+)"\} (\S+)$', line)
        if m:
            got[m[1]] = float(m[2])
    return got.get(quota, 0.0)


def _metrics_text(server: RealServer) -> str:
    url = json.loads((server.home / "server.json").read_text())["api_url"]
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def _rogue(server: RealServer, prefix: str, groups: tuple[str, ...] = ()) -> str:
    """A registered device whose owner is hostile (its messages come from a plain paho client)."""
    device_id = unique_device_id(prefix)
    key = X25519PrivateKey.generate().public_key().public_bytes_raw()
    server.service.register_device(device_id, profile=RealServer.PROFILE, groups=groups, broker_password=False,
                                   public_key=base64.b64encode(key).decode())
    return device_id


def _events(server: RealServer, device_id: str, kind: str) -> list[dict[str, Any]]:
    return list(server.service.events(device_id=device_id, kind=kind, limit=1000)["events"])


def _serving(server: RealServer, agent: AgentProcess, models: AgentModels, version: int, *, kept: set[int],
             ledger: FaultLedger) -> None:
    """``helpers.intact`` for the real server: reported active, journal committed, real inference, versions kept."""
    def active() -> int | None:
        row = next((r for r in server.service.list_devices() if r["device_id"] == agent.device_id), {})
        return row.get("active_version") if row.get("online") else None

    try:
        assert agent.running, agent.log_text()[-2000:]
        _until(f"{agent.device_id} reports v{version}", lambda: active() == version, timeout=60)
        journal = read_journal(agent.store_dir)
        assert journal is not None and journal.committed == agent_models.ref(version)
        assert_serves(agent, models, wait_ready=True)
    except (AssertionError, TimeoutError):
        ledger.trial(False, unserving=1)
        raise
    missing = kept - kept_versions(agent.store_dir)
    ledger.trial(not missing, lost=len(missing))
    assert not missing, f"committed versions lost: {sorted(missing)}"


def _deploy(server: RealServer, ref: str, **kw: Any) -> dict[str, Any]:
    dep = server.service.deploy(ref, target="group:g", canary_percent=0, wave_percent=100, max_failures_percent=0,
                                probation_s=0.3, actor="faults", **kw)
    _until(f"{ref} completed", lambda: server.service.deployment_detail(dep["deployment_id"])["status"]
           in ("completed", "failed", "halted"), timeout=90)
    detail = server.service.deployment_detail(dep["deployment_id"])
    assert detail["status"] == "completed", detail
    return detail


# -- 1. broker identities -----------------------------------------------------------------------------------


def test_broker_identity_takeover(tmp_path: Path, models: AgentModels, ledger: FaultLedger) -> None:
    """The config `edgefleet broker config` generates, run by a real mosquitto, with a real agent on TLS + login.

    Before: `edgefleet-server` registered as a device became the broker superuser on the next broker config;
    any login could connect with another device's client id, kick it and fire its Will (online: false)."""
    from server.cli import main as edgefleet
    from server.keys import server_broker_password

    home, out = tmp_path / "home", tmp_path / "broker"
    service = local_service(home)
    config, registry = service.config, service.registry
    for bad in (SERVER_USER, "EDGEFLEET-SERVER", "edgefleet-server-b"):
        with pytest.raises(InvalidRequestError, match="reserved"):
            service.register_device(bad, profile="rpi4", public_key="A" * 43 + "=")
    victim_id, attacker_id = unique_device_id("victim"), unique_device_id("attacker")
    # the victim: a real agent process; its key comes from the test server that signs its commands
    passwords = {d: service.register_device(d, profile="rpi4", broker_password=True)["broker_password"]
                 for d in (victim_id, attacker_id)}

    args: list[str] = []

    def configure(port: int) -> Path:
        args[:] = ["--home", str(home), "broker", "config", "--out", str(out), "--listen", "127.0.0.1",
                   "--port", str(port), "--run-as", current_user()]
        assert edgefleet(args) == 0
        return out / "mosquitto.conf"

    proc, port = start_mosquitto(configure, tmp_path / "mosquitto.log")
    server_password = str(server_broker_password(config.paths, create=False))
    ca = out / "tls" / "ca.crt"
    fleet_srv: FleetServer | None = None
    agent: AgentProcess | None = None
    attacker: MqttTestClient | None = None
    try:
        fleet_srv = FleetServer("127.0.0.1", port, username=SERVER_USER, password=server_password, ca_cert=ca)
        (tmp_path / "pw").write_text(passwords[victim_id] + "\n")
        agent = AgentProcess(tmp_path, victim_id, broker_host="127.0.0.1", broker_port=port, server=fleet_srv,
                             settings={"broker": {"tls": True, "ca_cert": str(ca), "username": victim_id,
                                                  "password_file": str(tmp_path / "pw")}}).start()
        deploy_and_commit(fleet_srv, agent, models, 1, probation_s=0.3)
        mark = fleet_srv.event_count(victim_id)
        # a login with the victim's client id: the broker makes it the attacker's own id instead
        attacker = MqttTestClient("127.0.0.1", port, username=attacker_id, password=passwords[attacker_id],
                                  ca_cert=ca, client_id=victim_id, clean_start=True)
        assert not getattr(attacker.connect_rc, "is_failure", False)
        ping = fleet_srv.command(victim_id, "ping")  # the victim's session still delivers signed commands
        result = fleet_srv.wait_event(victim_id, lambda e: e.kind == "command.result" and e.command_id == ping,
                                      after=mark)
        assert result.data["ok"]
        assert all(s.online for s in fleet_srv.log(victim_id).states), "the victim's Will fired (online: false)"
        intact(fleet_srv, agent, models, 1, ledger=ledger)
        # a device row that collides with the server's login (an old registry): broker config refuses it
        registry.add_device(SERVER_USER, profile="rpi4", public_key=None,
                            broker_hash=registry.broker_users()[attacker_id])
        before = (out / "passwd").read_text()
        assert edgefleet(args) == 1
        assert (out / "passwd").read_text() == before, "the server's broker login was replaced"
        proc.send_signal(signal.SIGHUP)
        check = MqttTestClient("127.0.0.1", port, username=SERVER_USER, password=server_password, ca_cert=ca)
        check.close()
        ledger.trial()
    finally:
        if attacker is not None:
            attacker.close()
        if agent is not None:
            agent.kill()
        if fleet_srv is not None:
            fleet_srv.close()
        proc.terminate()
        proc.wait(timeout=10)
        registry.db.close()


# -- 2. per-device quotas -----------------------------------------------------------------------------------


def test_device_over_its_quotas_is_throttled_and_reported(tmp_path: Path, broker: MosquittoBroker,
                                                          models: AgentModels, ledger: FaultLedger) -> None:
    """A registered device floods events (~10 MB) and leaves retained messages on its up-leaves.

    Before: every event was stored (46 MB in 4 s in the review) and retained junk stayed in the broker."""
    server = RealServer(tmp_path, broker.host, broker.port, _builds(models), overrides={
        "quotas": {"events_per_minute": 40, "bytes_per_minute": 256 * 1024, "retained_sweep_s": 5.0}})
    agent = AgentProcess(tmp_path, unique_device_id("quota-ok"), broker_host=broker.host, broker_port=broker.port,
                         server=server, settings={"profile": RealServer.PROFILE})  # type: ignore[arg-type]
    rogue_id = _rogue(server, "quota-rogue")
    rogue = None
    try:
        server.process.start()
        agent.start()
        _deploy(server, "digits:1")
        rogue = MqttTestClient(broker.host, broker.port)
        sent = 400
        pad = {"pad": "x" * 20_000}
        for i in range(sent):  # 100 large events (~24 KB) bust the bytes budget, then 300 small ones the count
            big = i < 100
            ev = Event(rogue_id, time.time(), f"flood-{i}", "flood.event", "info", "m" * (4000 if big else 100),
                       data=pad if big else {})
            rogue.client.publish(device_topic(rogue_id, Channel.EVENT), encode(ev), qos=1)

        def stored() -> int:
            return len(_events(server, rogue_id, "flood.event"))

        _until("every flood event stored or throttled",
               lambda: stored() + _throttled(server, "events") + _throttled(server, "bytes") >= sent, timeout=120)
        assert stored() <= 40, f"{stored()} of {sent} flood events stored; the budget is 40 a minute"
        assert _throttled(server, "events") > 0 and _throttled(server, "bytes") > 0
        reports = _events(server, rogue_id, "quota.exceeded")
        assert sorted(r["code"] for r in reports) == ["quota_bytes", "quota_events"], reports  # once a minute each
        ledger.note(f"{sent} flood events: {stored()} stored, throttled {_throttled(server, 'events'):g} (events) "
                    f"+ {_throttled(server, 'bytes'):g} (bytes)")
        # junk kept by the broker where only up/state may hold a retained message: cleared by the server
        junk = {device_topic(rogue_id, Channel.EVENT): encode(Event(rogue_id, time.time(), "r", "x.y", "info", "r")),
                device_topic(rogue_id, Channel.TELEMETRY): encode(Telemetry(
                    rogue_id, time.time(), 1.0, 1.0, 1.0, 1, 1, 1, 0, {"p50": 1.0, "p95": 1.0, "p99": 1.0}))}
        for topic, payload in junk.items():
            rogue.publish(topic, payload, retain=True)
        _until("retained junk cleared", lambda: not _retained(broker, list(junk)), timeout=60)
        assert _throttled(server, "retained") >= 2
        # the honest device is unaffected: it still updates and serves
        _deploy(server, "digits:2")
        _serving(server, agent, models, 2, kept={1, 2}, ledger=ledger)
    finally:
        if rogue is not None:
            rogue.close()
        agent.kill()
        server.process.kill()


def _retained(broker: MosquittoBroker, topics: list[str]) -> list[str]:
    probe = MqttTestClient(broker.host, broker.port)
    try:
        for t in topics:
            probe.subscribe(t)
        # retained copies are sent on subscribing, before anything this client publishes afterwards
        probe.subscribe("edgefleet-test/sentinel")
        probe.publish("edgefleet-test/sentinel", b"sentinel")
        return [m.topic for m in probe.before(b"sentinel") if m.retain and m.payload]
    finally:
        probe.close()


def test_chunk_rerequests_are_budgeted_and_never_rebroadcast(tmp_path: Path, broker: MosquittoBroker,
                                                             models: AgentModels, ledger: FaultLedger) -> None:
    """In broadcast mode a recipient asks for the whole artifact again and again.

    Before: each request streamed every chunk again on the shared topic, to every device downloading it."""
    server = RealServer(tmp_path, broker.host, broker.port, _builds(models, chunk_size=2048), overrides={
        "publisher": {"broadcast": True, "chunk_window_s": 0.2},
        "quotas": {"chunk_resend_factor": 1.0, "chunk_resend_floor": 0}})
    agent = AgentProcess(tmp_path, unique_device_id("resend-ok"), broker_host=broker.host, broker_port=broker.port,
                         server=server, settings={"profile": RealServer.PROFILE})  # type: ignore[arg-type]
    rogue_id = _rogue(server, "resend-rogue", groups=("g",))
    rogue = watcher = None
    try:
        server.process.start()
        agent.start()
        rogue = MqttTestClient(broker.host, broker.port)
        rogue.publish(device_topic(rogue_id, Channel.STATE), encode(StateReport(rogue_id, True, 1, time.time(),
                                                                                lifecycle="idle")), retain=True)
        _until("the rogue is online", lambda: any(r["device_id"] == rogue_id and r["online"]
                                                  for r in server.service.list_devices()), timeout=30)
        dep = server.service.deploy("digits:1", target="group:g", canary_percent=0, wave_percent=100,
                                    max_failures_percent=100, probation_s=0.3, actor="faults")
        art = server.service.deployment_detail(dep["deployment_id"])["builds"][RealServer.PROFILE]["artifact_id"]
        _until("the honest device committed", lambda: any(
            d["device_id"] == agent.device_id and d["state"] == "committed"
            for d in server.service.deployment_detail(dep["deployment_id"])["devices"]), timeout=90)
        count = server.service.artifacts.info(art).chunk_count
        watcher = MqttTestClient(broker.host, broker.port)
        watcher.subscribe(artifact_topic(art))
        watcher.subscribe(device_topic(rogue_id, Channel.CHUNK, art))
        got: dict[str, int] = {"shared": 0, "own": 0}

        def seen(want: str, n: int) -> Callable[[], bool]:
            def check() -> bool:
                for m in watcher.pending():
                    got["shared" if m.topic == artifact_topic(art) else "own"] += 1
                return got[want] >= n
            return check

        def ask() -> None:
            req = ChunkRequest(rogue_id, art, ((0, count),), time.time(), "retry")
            rogue.publish(device_topic(rogue_id, Channel.CHUNK_REQUEST), encode(req))

        ask()  # its first ask: one shared round, as for any recipient
        _until("the first round", seen("shared", count), timeout=60)
        ask()  # asking again: only on its own topic
        _until("the resend on the device's own topic", seen("own", count), timeout=60)
        for _ in range(3):
            ask()  # over the budget (1 x the chunk count): refused
        _until("three refused re-requests", lambda: _throttled(server, "chunk_resends") >= 3, timeout=60)
        seen("own", 0)()
        assert got == {"shared": count, "own": count}, (got, count)
        reports = _events(server, rogue_id, "quota.exceeded")
        assert [r["code"] for r in reports] == ["quota_chunk_resends"], reports
        ledger.note(f"{count} chunks; 5 full requests: {got['shared']} shared, {got['own']} own, 3 refused")
        _serving(server, agent, models, 1, kept={1}, ledger=ledger)
    finally:
        for c in (rogue, watcher):
            if c is not None:
                c.close()
        agent.kill()
        server.process.kill()


# -- 3. data sets -------------------------------------------------------------------------------------------


def test_dataset_bomb_is_refused_before_inflating(tmp_path: Path, models: AgentModels,
                                                  ledger: FaultLedger) -> None:
    """A ~1 MB calibration .npz that inflates to 600 MiB, uploaded as the API does (model_ops.add_model).

    Before: numpy inflated it all (the review saw 1.3 GiB) before any check looked at it."""
    bomb = npz_bomb(tmp_path / "bomb.npz", models.input_name, (600 * 1024 * 4, 1, 8, 8))
    assert bomb.stat().st_size < 2 << 20
    body = {"name": "bomb", "filename": "model.onnx",
            "model": base64.b64encode(Path(models.good).read_bytes()).decode(),
            "calibration": base64.b64encode(bomb.read_bytes()).decode()}
    (tmp_path / "body.json").write_text(json.dumps(body))
    code = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from server.errors import ServerError\n"
        "from server.model_ops import add_model\n"
        "import numpy, onnx, onnxruntime\n"
        "body = json.loads(Path(sys.argv[1]).read_text())\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "try:\n"
        "    add_model(Path(sys.argv[2]), body); out = {'error': None}\n"
        "except ServerError as exc:\n"
        "    out = {'error': exc.message}\n"
        "out['peak_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "out['growth_mib'] = out['peak_mib'] - before\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "body.json"), str(tmp_path / "home")],
                          cwd=ROOT, capture_output=True, timeout=300, check=True, env={**os.environ,
                                                                                       "PYTHONPATH": str(ROOT)})
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    ledger.note(f"{bomb.stat().st_size}-byte .npz declaring 600 MiB refused before inflating; peak RSS "
                f"{out['peak_mib']:.0f} MiB, {out['growth_mib']:.0f} MiB above the process before the upload")
    assert out["error"] and "before inflating" in out["error"], out
    # Measured against the process's own peak after its imports, not an absolute figure: the interpreter with
    # ONNX Runtime loaded differs by tens of MiB between machines and runs (CI saw 401 MiB absolute).
    # Inflating the bomb adds at least its 600 MiB; registering the model itself (an ONNX Runtime session whose
    # arenas and threads scale with the host's cores) must stay well under that.
    assert out["growth_mib"] < 300, f"the upload grew the server process by {out['growth_mib']:.0f} MiB"
    assert not list((tmp_path / "home" / "models").glob("bomb*")), "a model was registered"
    ledger.trial()


# -- 4. untrusted text, reserved ids at enrolment -----------------------------------------------------------


def test_hostile_enrollment_requests(tmp_path: Path, broker: MosquittoBroker, models: AgentModels,
                                     ledger: FaultLedger) -> None:
    """Enrollment requests with markup and escape sequences in their strings, and one for the server's login.

    Before: a hostname `[/]` crashed `edgefleet devices pending`; `edgefleet-server` could enrol and be approved."""
    server = RealServer(tmp_path, broker.host, broker.port, _builds(models))
    hostile = "[/][bold red]FAKE[/]\x1b[2J\x1b]0;owned\x07\u202e"
    stranger, client = unique_device_id("hostile"), None
    try:
        subprocess.run([sys.executable, "-m", "server", "--home", str(server.home), "keys", "init"], cwd=ROOT,
                       capture_output=True, timeout=60, check=True)  # the CLI's API token
        server.process.start()
        client = MqttTestClient(broker.host, broker.port)
        key = X25519PrivateKey.generate().public_key().public_bytes_raw()
        for device_id in (stranger, SERVER_USER):
            req = EnrollRequest(device_id, key, RealServer.PROFILE, time.time(), agent_version="[/]1.0",
                                arch="[link=x]a[/link]", hostname=hostile)
            client.publish(device_topic(device_id, Channel.ENROLL), encode(req))
        _until("both requests handled", lambda: bool(
            [r for r in server.service.pending_enrollments() if r["device_id"] == stranger]
            and _events(server, SERVER_USER, "enroll.refused")), timeout=30)
        assert SERVER_USER not in {r["device_id"] for r in server.service.pending_enrollments()}
        assert _events(server, SERVER_USER, "enroll.refused")[0]["code"] == "reserved_id"
        with pytest.raises(InvalidRequestError):
            server.service.approve_device(SERVER_USER)
        done = subprocess.run([sys.executable, "-m", "server", "--home", str(server.home), "devices", "pending"],
                              cwd=ROOT, capture_output=True, timeout=60, check=False,
                              env={**os.environ, "COLUMNS": "200"})
        text = done.stdout.decode(errors="replace")
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
        assert stranger in text and "[/]" in text and "FAKE" in text, text
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, repr(text)
        ledger.trial()
    finally:
        if client is not None:
            client.close()
        server.process.kill()


# -- 5. files and defaults ----------------------------------------------------------------------------------


def test_files_and_defaults(tmp_path: Path, broker: MosquittoBroker, fleet: FleetServer, models: AgentModels,
                            agent_factory: AgentFactory, ledger: FaultLedger) -> None:
    """A signed desired state naming model `..`; the server's home; the agent's TLS default.

    Before: the agent accepted `..` (and non-ASCII) model names and joined them into store paths; the server
    home was 0755 (models and data sets world-readable); `edgefleet-agent init` wrote `tls = false`."""
    agent = agent_factory(prefix="names")
    deploy_and_commit(fleet, agent, models, 1, probation_s=0.3)
    mark = fleet.event_count(agent.device_id)
    good = fleet.desired_deploy(agent.device_id, fleet.seal(models.bytes_of("good_v2")), agent_models.ref(2),
                                runtime=agent_models.ONNX, health=models.health(probation_s=0.3))
    for bad in ("..", "é"):
        payload = good.to_dict()
        payload["model"]["name"] = bad
        payload["seq"] = fleet.next_seq(agent.device_id)
        blob = sign_payload("desired", json.dumps(payload).encode(), fleet.signing_key)
        fleet.publish_raw(device_topic(agent.device_id, Channel.DESIRED), blob, retain=True)
        rejected = fleet.wait_event(agent.device_id, "desired.rejected", after=mark)
        mark = fleet.event_count(agent.device_id)
        assert rejected.code == "malformed", (rejected.code, rejected.message)
    assert not [p for p in agent.store_dir.rglob("*") if p.name in ("..", "é") or "é" in str(p)]
    assert sorted(p.name for p in (agent.store_dir / "models").iterdir()) == [agent_models.NAME]
    fleet.clear_desired(agent.device_id)
    intact(fleet, agent, models, 1, ledger=ledger)
    with pytest.raises(ValueError):
        ModelRef("..", 1)

    server = RealServer(tmp_path / "srv", broker.host, broker.port, _builds(models))
    try:
        server.process.start()
        mode = stat.S_IMODE(server.home.stat().st_mode)
        assert mode == 0o700, oct(mode)
        loose = [p for p in server.home.rglob("*") if p.is_file() and stat.S_IMODE(p.stat().st_mode) & 0o077]
        assert not loose, [(str(p), oct(p.stat().st_mode)) for p in loose]
    finally:
        server.process.kill()

    pub = tmp_path / "server.pub"
    fleet.write_public_key(pub)
    cfg = tmp_path / "init" / "agent.toml"
    subprocess.run([sys.executable, "-m", "agent", "init", "--device-id", "tls-default", "--profile", "p",
                    "--server-key", str(pub), "--broker", "mqtt.example.com", "--config", str(cfg)],
                   cwd=ROOT, capture_output=True, timeout=60, check=True)
    text = cfg.read_text()
    assert "tls = true" in text and "port = 8883" in text, text
    ledger.trial()
