"""``edgefleet simulate``: simulated devices through a real mosquitto and the real server rollout path.

The devices run the agent's protocol (signed desired states, key unwrap, chunk decryption),
reassembly and lifecycle code; only inference and storage are stand-ins (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from agent.protocol.envelope import TrustAnchor, raw_public
from agent.protocol.messages import ModelRef
from server.app import FleetServer
from server.broker import SERVER_USER, MosquittoBroker, current_user, generate_tls
from server.builds import StaticBuilds
from server.cli import build_parser, main
from server.config import load_config
from server.measured import aggregate
from server.simulator import BrokerTarget, SimFleet, SimSettings, device_ids, device_key
from tests.conftest import SecureBrokerFactory
from tests.support.abuse import start_mosquitto
from tests.support.mqtt import wait_login
from tests.support.servers.fleet import onnx_builds, public_key, server_config

pytestmark = pytest.mark.broker

N = 12


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> StaticBuilds:
    return onnx_builds(tmp_path_factory.mktemp("sim-builds"), "m", [1, 2], ["rpi4"], hidden=2048)


@pytest.fixture
def server(tmp_path: Path, fresh_broker: MosquittoBroker, builds: StaticBuilds) -> Iterator[FleetServer]:
    config = server_config(tmp_path / "home", fresh_broker, {"publisher": {"chunk_window_s": 0.3}})
    srv = FleetServer(config, builds=builds).start()
    yield srv
    srv.stop()


def register(server: FleetServer, ids: list[str], seed: str) -> None:
    for device_id in ids:
        key = base64.b64encode(raw_public(device_key(seed, device_id).public_key())).decode()
        server.service.register_device(device_id, profile="rpi4", public_key=key, groups=["sim"],
                                       broker_password=False)


def wait_status(server: FleetServer, deployment_id: str, statuses: tuple[str, ...], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    detail: Any = {}
    while time.monotonic() < deadline:
        detail = server.service.deployment_detail(deployment_id)
        if detail["status"] in statuses:
            return detail
        time.sleep(0.1)
    rows = [(d["device_id"], d["state"]) for d in detail["devices"]]
    raise TimeoutError(f"deployment is {detail.get('status')}: {rows}")


def test_simulated_fleet_commits_a_rollout_then_rolls_back_a_failing_version(
    server: FleetServer, fresh_broker: MosquittoBroker
) -> None:
    ids = device_ids(N, "simt")
    register(server, ids, "t1")
    settings = SimSettings(fail_versions=frozenset({2}), telemetry_s=0.5)
    trust = TrustAnchor.of(public_key(server.config))
    with SimFleet(ids, broker=BrokerTarget(fresh_broker.host, fresh_broker.port), trust=trust, settings=settings,
                  seed="t1", loops=2) as fleet:
        assert fleet.wait(lambda s: s.online == N, 20)
        dep = server.service.deploy("m:1", target="group:sim", canary_percent=0, wave_percent=100,
                                    max_failures_percent=0, probation_s=0.3, actor="test")
        detail = wait_status(server, dep["deployment_id"], ("completed", "rolled_back", "halted"))
        assert detail["status"] == "completed"
        assert [d["state"] for d in detail["devices"]] == ["committed"] * N
        assert fleet.wait(lambda s: s.committed_on(ModelRef("m", 1)) == N, 10)
        snap = fleet.snapshot()
        count = server.artifacts.info(dep["artifacts"]["rpi4"]).chunk_count
        assert snap.chunks == N * count, "every device decrypted and stored every chunk once"
        assert server.publish_stats.chunks["broadcast"] >= count  # the shared stream carried them
        # what the server's registry learned from the devices' reports
        devices = {d.device_id: d for d in server.registry.list_devices()}
        assert all(devices[i].online and devices[i].active_version == 1 for i in ids)

        # v2 fails its warm-up health check on every device: the canary fails, the rollout halts and
        # every device keeps (or gets back to) v1
        dep2 = server.service.deploy("m:2", target="group:sim", canary_percent=25, wave_percent=100,
                                     max_failures_percent=0, probation_s=0.3, actor="test")
        detail = wait_status(server, dep2["deployment_id"], ("rolled_back", "halted"))
        failures = detail["failures"]
        assert failures and all(f["code"] == "health.latency" or "latency" in (f["reason"] or "") for f in failures)
        assert fleet.wait(lambda s: s.committed_on(ModelRef("m", 1)) == N and s.lifecycle == {"idle": N}, 20)
        rolled = [d for d in fleet.devices if d.counters.events.get("lifecycle.rolled_back")]
        assert rolled, "the released devices reported lifecycle.rolled_back"
        assert all(d.active == ModelRef("m", 1) for d in fleet.devices)
        # telemetry arrived from the simulated devices (every 0.5 s each)
        deadline = time.monotonic() + 60
        while server.ingest.stats.received["telemetry"] < N:
            assert time.monotonic() < deadline, f"telemetry: {server.ingest.stats.received}"
            time.sleep(0.05)
    # a clean stop leaves every device offline (retained report), as an agent's shutdown does
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(d.online for d in server.registry.list_devices()):
        time.sleep(0.1)
    assert not any(d.online for d in server.registry.list_devices())


def test_simulate_command_runs_until_every_device_commits(
    server: FleetServer, fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    ids = device_ids(5, "simc")
    register(server, ids, "cli")
    pem = tmp_path / "server.pem"
    pem.write_bytes(public_key(server.config).public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    out = tmp_path / "sim.json"
    argv = ["--home", str(tmp_path / "cli-home"), "simulate", "--devices", "5", "--prefix", "simc", "--seed", "cli",
            "--no-register", "--broker", fresh_broker.url, "--server-key", str(pem), "--until", "m:1",
            "--timeout", "60", "--quiet", "--json", str(out)]
    assert _simulate_while_deploying(server, argv, online=5) == 0
    summary = json.loads(out.read_text())
    assert summary["committed"] == {"m v1": 5} and summary["until_reached_s"] > 0
    assert summary["timeline"]["lifecycle.committed"]["n"] == 5
    assert summary["measurements_sent"] >= 5  # a stand-in warm-up figure per device
    deadline = time.monotonic() + 60
    while len(rows := server.registry.measurements("m", 1, sources=("warmup",))) < 5:  # as ingest writes them
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    (figure,) = aggregate(rows)
    assert figure.devices == 5 and figure.p50_min_ms < figure.p50_max_ms  # per-device spread of the stand-in model
    assert {r.execution_provider for r in rows} == {"simulated"}


def _simulate_while_deploying(server: FleetServer, argv: list[str], *, online: int) -> int:
    """Run ``edgefleet simulate argv`` in a thread; once ``online`` devices are (or after 20 s), deploy m:1 to
    group:sim, all at once; the command's exit code."""
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(main(argv)))
    runner.start()
    deadline = time.monotonic() + 60
    while sum(d.online for d in server.registry.list_devices()) < online and time.monotonic() < deadline:
        time.sleep(0.1)
    server.service.deploy("m:1", target="group:sim", canary_percent=0, wave_percent=100, max_failures_percent=0,
                          probation_s=0.2, actor="test")
    runner.join(timeout=90)
    assert not runner.is_alive(), "edgefleet simulate did not end"
    return codes[0]


def test_help_says_what_is_simulated() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["simulate"].format_help().split())
    assert "inference is a stand-in" in text and "1,000 devices" in text


def _pem(server_config_: Any, path: Path) -> Path:
    path.write_bytes(public_key(server_config_).public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _creds(path: Path, passwords: dict[str, str]) -> Path:
    path.write_text("# device:password\n\n" + "".join(f"{d}:{pw}\n" for d, pw in passwords.items()))
    return path


def test_simulate_rolls_out_through_a_tls_broker_with_a_login_per_device_and_the_acl(
    secure_broker: SecureBrokerFactory, builds: StaticBuilds, tmp_path: Path
) -> None:
    ids = device_ids(5, "simtls")
    broker, passwords = secure_broker(ids)  # TLS, one password per device, the generated ACL
    ca = secure_broker.tls.ca_cert
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    (home / "keys" / "broker.password").write_text(passwords[SERVER_USER] + "\n")
    config = server_config(home, broker, {"broker": {"url": broker.url, "username": SERVER_USER,
                                                     "password_file": "keys/broker.password", "ca_cert": str(ca)},
                                          "publisher": {"chunk_window_s": 0.3}})
    server = FleetServer(config, builds=builds).start()
    try:
        register(server, ids, "tls")
        creds = _creds(tmp_path / "sim.creds", {d: passwords[d] for d in ids})
        out = tmp_path / "sim.json"
        argv = ["--home", str(tmp_path / "cli-home"), "simulate", "--devices", "5", "--prefix", "simtls",
                "--seed", "tls", "--no-register", "--broker", f"mqtt://{broker.host}:{broker.port}", "--tls",
                "--ca", str(ca), "--credentials", str(creds), "--server-key", str(_pem(config, tmp_path / "s.pem")),
                "--until", "m:1", "--timeout", "60", "--quiet", "--json", str(out)]
        assert _simulate_while_deploying(server, argv, online=5) == 0
        summary = json.loads(out.read_text())
        assert summary["committed"] == {"m v1": 5}
        assert summary["timeline"]["lifecycle.committed"]["n"] == 5
        devices = {d.device_id: d for d in server.registry.list_devices()}
        assert all(devices[i].active_version == 1 for i in ids)
    finally:
        server.stop()


def test_simulate_stops_with_a_clear_error_on_wrong_missing_credentials_or_an_untrusted_broker(
    secure_broker: SecureBrokerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = device_ids(3, "simbad")
    broker, passwords = secure_broker(ids)
    config = server_config(tmp_path / "home", broker)
    pem = _pem(config, tmp_path / "s.pem")
    base = ["--home", str(tmp_path / "cli-home"), "simulate", "--devices", "3", "--prefix", "simbad",
            "--no-register", "--broker", broker.url, "--server-key", str(pem), "--timeout", "300", "--quiet"]

    def run(*extra: str) -> tuple[int, float, str]:
        capsys.readouterr()
        started = time.monotonic()
        code = main([*base, *extra])
        return code, time.monotonic() - started, " ".join(capsys.readouterr().err.split())

    ca = str(secure_broker.tls.ca_cert)
    wrong = _creds(tmp_path / "wrong.creds", {d: passwords[d] for d in ids} | {ids[1]: "not-" + passwords[ids[1]]})
    code, took, err = run("--ca", ca, "--credentials", str(wrong))
    # a refused login ends the run at once; retrying would last the whole --timeout (300 s): half is the line
    assert code == 1 and took < 150, "a refused login stops the run instead of retrying until the timeout"
    assert f"{ids[1]}: broker refused the login" in err and "--credentials" in err

    missing = _creds(tmp_path / "missing.creds", {ids[0]: passwords[ids[0]]})
    code, _, err = run("--ca", ca, "--credentials", str(missing))
    assert code == 1 and f"has no password for {ids[1]}, {ids[2]}" in err

    code, took, err = run("--ca", ca)  # no credentials at all: the broker allows no anonymous login
    assert code == 1 and took < 150 and "broker refused the login" in err

    other_ca = generate_tls(tmp_path / "other-tls").ca_cert  # a CA that did not sign the broker's certificate
    right = _creds(tmp_path / "right.creds", {d: passwords[d] for d in ids})
    code, took, err = run("--ca", str(other_ca), "--credentials", str(right))
    assert code == 1 and took < 150 and "TLS:" in err and "certificate" in err


def test_simulate_issues_credentials_then_runs_on_the_broker_config_generates(
    builds: StaticBuilds, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's path: register with server-issued passwords, `broker config`, reload, simulate."""
    home, out, creds = tmp_path / "home", tmp_path / "broker", tmp_path / "sim.creds"
    assert main(["--home", str(home), "keys", "init"]) == 0  # the signing key and the CLI's admin token

    def configure(port: int) -> Path:
        broker_config = ["--home", str(home), "broker", "config", "--out", str(out), "--listen", "127.0.0.1",
                         "--port", str(port), "--run-as", current_user()]
        assert main(broker_config) == 0  # writes server.toml's [broker] (mqtts, server login, CA)
        return out / "mosquitto.conf"

    proc, port = start_mosquitto(configure, tmp_path / "mosquitto.log")
    with (home / "server.toml").open("a") as f:
        f.write('\n[api]\nhost = "127.0.0.1"\nport = 0\n[publisher]\nchunk_window_s = 0.3\n'
                "[rollout]\ntick_s = 0.1\nlease_ttl_s = 2.0\ndevice_timeout_s = 30.0\n")
    server: FleetServer | None = None
    try:
        server = FleetServer(load_config(home), builds=builds).start()
        capsys.readouterr()
        # registration goes through the API
        assert main(["--home", str(home), "tokens", "create", "sim", "--role", "admin"]) == 0
        monkeypatch.setenv("EDGEFLEET_TOKEN", capsys.readouterr().out.split()[-1])
        sim = ["--home", str(home), "simulate", "--devices", "4", "--prefix", "simiss", "--seed", "iss",
               "--profile", "rpi4", "--quiet"]
        assert main([*sim, "--issue-credentials", str(creds)]) == 0
        assert creds.stat().st_mode & 0o077 == 0
        lines = [ln for ln in creds.read_text().splitlines() if ln and not ln.startswith("#")]
        assert [ln.split(":")[0] for ln in lines] == device_ids(4, "simiss")
        assert all(pw not in (out / "passwd").read_text() for pw in (ln.split(":", 1)[1] for ln in lines))
        # not in the broker's password file yet: the logins are refused, and the run says so
        assert main([*sim, "--no-register", "--credentials", str(creds), "--timeout", "20"]) == 1
        configure(port)  # the same `broker config` again, now with the issued logins
        proc.send_signal(signal.SIGHUP)  # mosquitto re-reads the password file and ACL ...
        first_id, first_password = lines[0].split(":", 1)
        wait_login("127.0.0.1", port, first_id, first_password, accepted=True, ca_cert=out / "tls" / "ca.crt")
        argv = [*sim, "--no-register", "--credentials", str(creds), "--until", "m:1", "--timeout", "60"]
        assert _simulate_while_deploying(server, argv, online=4) == 0
    finally:
        if server is not None:
            server.stop()
        proc.terminate()
        proc.wait(timeout=10)
