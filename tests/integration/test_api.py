"""The HTTP API and the CLI as its client: auth, errors, OpenAPI, audit, metrics, long-poll events."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api import ROUTES
from server.broker import MosquittoBroker
from server.builds import StaticBuilds
from server.client import HttpClient
from server.errors import AuthError, ConflictError, InvalidRequestError, NotFoundError
from tests.support.servers.fleet import Fleet, onnx_builds

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> StaticBuilds:
    return onnx_builds(tmp_path_factory.mktemp("builds"), "m", [1, 2], ["rpi4"])


@pytest.fixture
def fleet(tmp_path: Path, fresh_broker: MosquittoBroker, builds: StaticBuilds) -> Iterator[Fleet]:
    with Fleet(tmp_path, fresh_broker, builds) as f:
        yield f


@pytest.fixture
def token(fleet: Fleet) -> str:
    return fleet.token("ci-pipeline", "admin")


def _get(url: str, token: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def test_token_is_required_and_refusals_are_audited(fleet: Fleet, token: str) -> None:
    url = fleet.server.api_url
    assert _get(url + "/healthz")[0] == 200
    status, _, body = _get(url + "/v1/devices")
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert _get(url + "/v1/devices", token="eft_wrong")[0] == 401
    with pytest.raises(AuthError):
        HttpClient(url, None).call("register_device", body={"device_id": "x", "profile": "rpi4"})
    [refused] = fleet.service.audit(action="register_device")
    assert refused["actor"] == "anonymous" and refused["outcome"] == "error:unauthorized"
    assert _get(url + "/v1/devices", token=token)[0] == 200


def test_errors_map_to_status_codes_and_every_mutation_is_audited(fleet: Fleet, token: str) -> None:
    api = HttpClient(fleet.server.api_url, token)
    d = fleet.device("api-1", register=False)
    out = api.call("register_device", body={"device_id": "api-1", "profile": "rpi4", "public_key": d.public_key_b64,
                                            "groups": ["g"]})
    assert out["broker_password"] and out["device"]["status"] == "active"
    with pytest.raises(ConflictError, match="already registered"):
        api.call("register_device", body={"device_id": "api-1", "profile": "rpi4"})
    with pytest.raises(InvalidRequestError, match=r"body\.colour is not a known field"):
        api.call("register_device", body={"device_id": "api-2", "profile": "rpi4", "colour": "red"})
    with pytest.raises(InvalidRequestError, match=r"body\.canary_percent must be <= 100"):
        api.call("deploy", body={"model": "m:1", "target": "all", "canary_percent": 150})
    with pytest.raises(NotFoundError, match="unknown deployment"):
        api.call("get_deployment", path={"deployment_id": "d-nope"})
    with pytest.raises(InvalidRequestError, match="invalid device id"):
        api.call("register_device", body={"device_id": "bad/id", "profile": "rpi4"})
    d.connect()
    fleet.wait_online(d)
    dep = api.call("deploy", body={"model": "m:1", "target": "group:g", "probation_s": 0.1})
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    audit = fleet.service.audit()
    by_action = [(a["actor"], a["action"], a["outcome"]) for a in audit]
    assert ("ci-pipeline", "register_device", "ok") in by_action
    assert ("ci-pipeline", "register_device", "error:conflict") in by_action
    assert ("ci-pipeline", "register_device", "error:invalid") in by_action
    assert ("ci-pipeline", "deploy", "ok") in by_action
    ok = next(a for a in audit if a["action"] == "register_device" and a["outcome"] == "ok")
    assert ok["target"] == "device:api-1" and ok["params"]["profile"] == "rpi4"
    assert not any(a["action"] == "get_deployment" for a in audit)  # reads are not operator actions


def test_openapi_document_describes_every_route(fleet: Fleet) -> None:
    status, ctype, body = _get(fleet.server.api_url + "/openapi.json")
    assert status == 200 and ctype.startswith("application/json")
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.1") and doc["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    for r in ROUTES:
        op = ops[(r.method, r.path)]
        assert op["operationId"] == r.name and op["summary"]
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", r.path))
        if r.body is not None:
            assert op["requestBody"]["content"]["application/json"]["schema"] == r.body
    assert len({op["operationId"] for op in ops.values()}) == len(ops)
    assert ops[("POST", "/v1/deployments")]["x-audited"] is True


def test_metrics_and_long_poll_events(fleet: Fleet, token: str) -> None:
    d = fleet.device("met-1")
    fleet.wait_online(d)
    d.send_telemetry(p95=7.5, cpu=33.0)
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline and "edgefleet_fleet_latency_p95_ms_max 7.5" not in text:
        status, ctype, body = _get(fleet.server.api_url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        text = body.decode()
        time.sleep(0.1)
    assert "edgefleet_fleet_latency_p95_ms_max 7.5" in text
    assert 'edgefleet_devices{status="active",profile="rpi4",online="true",lifecycle="idle"} 1' in text
    assert 'edgefleet_ingest_messages_total{type="telemetry"} 1' in text
    api = HttpClient(fleet.server.api_url, token)
    cursor = api.call("events")["cursor"]
    threading.Timer(0.5, lambda: fleet.service.register_device("late-dev", profile="rpi4")).start()
    started = time.monotonic()
    page = api.call("events", query={"after": cursor, "wait": 30})  # [api] max_wait_s: 30 s by default
    # woken by the change 0.5 s in, not by the end of the wait: 25 s leaves a loaded machine room
    assert time.monotonic() - started < 25
    assert [e["kind"] for e in page["events"]] == ["device.registered"] and page["cursor"] > cursor


def _cli(fleet: Fleet, token: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EDGEFLEET_TOKEN=token, COLUMNS="160", EDGEFLEET_HOME=str(fleet.tmp / "cli-home"))
    return subprocess.run([sys.executable, "-m", "server", "--home", str(fleet.tmp / "cli-home"), *args, "--server",
                           fleet.server.api_url], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def test_cli_drives_a_rollout_and_a_rollback_over_the_api(fleet: Fleet, token: str) -> None:
    devices = [fleet.device(f"cli-{i}", seed=("m", 1)) for i in range(3)]
    fleet.wait_online(*devices)
    r = _cli(fleet, token, "deploy", "m:2", "--to", "group:g", "--canary", "34%", "--wave", "100%",
             "--max-failures", "0", "--probation", "0.1", "--watch")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "deployment d-" in r.stdout and "canary" in r.stdout
    assert all(d.active == ("m", 2) for d in devices)
    r = _cli(fleet, token, "status")
    assert r.returncode == 0, r.stderr
    assert "3/3 online" in r.stdout and "m:2" in r.stdout and "cli-0" in r.stdout
    dep_id = fleet.service.list_deployments()[0]["deployment_id"]
    r = _cli(fleet, token, "deployments", "show", dep_id, "--devices")
    assert r.returncode == 0 and "completed" in r.stdout and "cli-2" in r.stdout
    r = _cli(fleet, token, "rollback", "--to", "group:g", "--timeout", "20")
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.count("confirmed") == 3
    assert all(d.active == ("m", 1) for d in devices)
    r = _cli(fleet, token, "deploy", "m:7", "--to", "group:g")
    assert r.returncode == 1 and "unknown model version m:7" in r.stderr
    r = _cli(fleet, token, "audit", "--json")
    records = json.loads(r.stdout)
    assert [(a["actor"], a["action"], a["outcome"]) for a in records][-3:] == [
        ("ci-pipeline", "deploy", "ok"), ("ci-pipeline", "rollback", "ok"), ("ci-pipeline", "deploy", "error:not_found")
    ]
    r = _cli(fleet, token, "events", "--kind", "deployment.", "--json")
    kinds = [json.loads(line)["kind"] for line in r.stdout.splitlines()]
    assert "deployment.created" in kinds and "deployment.completed" in kinds
