"""Models and builds through the HTTP API, as a CI pipeline uses it: register the real digits model
with its data sets, build it behind the accuracy gate, start a rollout, all with one token; and the
``edgefleet model``/``build`` commands going through a configured server instead of the local catalog.

Real parts: the server (in-process, its build source is the catalog of its home, as in production),
mosquitto, the compression pipeline on the real digits CNN; the device is a protocol stand-in.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.broker import MosquittoBroker
from server.client import HttpClient
from server.errors import InvalidRequestError, NotFoundError, ServerError
from server.registry.catalog import Catalog
from tests.support.models import RealModel, real_model
from tests.support.servers.fleet import Fleet

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "x86-64-avx2"
#: one static calibration method and few timing runs: a build of the digits CNN in seconds
FAST_BUILD = {"profile": PROFILE, "calibration_methods": ["minmax"], "latency_runs": 5, "pruning": False}


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def digits() -> RealModel:
    return real_model("digits")


@pytest.fixture
def fleet(tmp_path: Path, fresh_broker: MosquittoBroker) -> Iterator[Fleet]:
    with Fleet(tmp_path, fresh_broker, None) as f:  # type: ignore[arg-type]  # None: the catalog of the home
        yield f


@pytest.fixture
def api(fleet: Fleet) -> HttpClient:
    return HttpClient(fleet.server.api_url, fleet.token("ci", "deploy"))


def test_ci_pipeline_registers_builds_and_rolls_out_over_http(fleet: Fleet, api: HttpClient,
                                                              digits: RealModel) -> None:
    out = api.call("register_model", body={"name": "digits", "filename": "digits.onnx", "model": b64(digits.path),
                                           "calibration": b64(digits.calibration),
                                           "evaluation": b64(digits.evaluation)})
    assert (out["model"], out["version"], out["format"]) == ("digits", 1, "onnx")
    assert out["gate"]["metric"] == "accuracy"  # labelled evaluation data
    assert api.call("list_models") == [{"model": "digits", "version": 1, "format": "onnx", "sha256": out["sha256"],
                                        "size_bytes": digits.path.stat().st_size, "builds": []}]
    # no variant yet: the deploy is refused with the build command to run
    device = fleet.device("ci-1", profile=PROFILE)
    fleet.wait_online(device)
    with pytest.raises(InvalidRequestError, match=f"no variant of digits:1 is built for profile.*{PROFILE}"):
        api.call("deploy", body={"model": "digits:1", "target": "device:ci-1"})

    built = api.call("build_model", path={"model": "digits", "version": "1"}, body=FAST_BUILD, timeout=600)
    assert built["failures"] == 0
    (row,) = built["results"]
    assert row["profile"] == PROFILE and row["fidelity"]["metric"] == "accuracy"
    assert row["size_bytes"] < row["source_size_bytes"]  # something smaller than fp32 passed the gate
    shown = api.call("get_model", path={"model": "digits", "version": "1"})
    assert [b["profile"] for b in shown["builds"]] == [PROFILE]
    assert shown["builds"][0]["provenance"]["fidelity"]["value"] == row["fidelity"]["value"]

    dep = api.call("deploy", body={"model": "digits:1", "target": "device:ci-1", "probation_s": 0.1})
    assert set(dep["artifacts"]) == {PROFILE}
    fleet.wait_deployment(dep["deployment_id"], ("completed",))
    assert device.active == ("digits", 1)

    audit = {(a["action"], a["outcome"]): a for a in fleet.service.audit() if a["actor"] == "ci"}
    assert {("register_model", "ok"), ("build_model", "ok"), ("deploy", "ok"), ("deploy", "error:invalid")} \
        <= set(audit)
    recorded = audit[("register_model", "ok")]["params"]
    assert recorded["name"] == "digits" and recorded["model"].endswith("characters>")  # not the file itself


def test_model_api_bad_input_gets_clear_errors_and_registers_nothing(fleet: Fleet, api: HttpClient,
                                                                     digits: RealModel) -> None:
    with pytest.raises(InvalidRequestError, match=r"body\.model is not valid base64"):
        api.call("register_model", body={"name": "digits", "model": "not base64!"})
    with pytest.raises(InvalidRequestError, match=r"body.filename must end with \.onnx or \.tflite"):
        api.call("register_model", body={"name": "digits", "filename": "x.txt", "model": b64(digits.path)})
    with pytest.raises(InvalidRequestError, match=r"body\.name is required"):
        api.call("register_model", body={"model": b64(digits.path)})
    with pytest.raises(InvalidRequestError, match=r"body\.gate\.colour is not a known field"):
        api.call("register_model", body={"name": "digits", "model": b64(digits.path), "gate": {"colour": 1}})
    with pytest.raises(ServerError, match="not a valid ONNX model"):  # refused by the catalog's own checks
        api.call("register_model", body={"name": "digits", "model": base64.b64encode(b"\x08\x07garbage").decode()})
    assert api.call("list_models") == []
    with pytest.raises(NotFoundError, match="no model version digits:3"):
        api.call("get_model", path={"model": "digits", "version": "3"})
    api.call("register_model", body={"name": "digits", "model": b64(digits.path)})
    with pytest.raises(InvalidRequestError, match=r"unknown profile\(s\) nope"):
        api.call("build_model", path={"model": "digits", "version": "1"}, body={"profile": "nope"})
    with pytest.raises(InvalidRequestError, match="version must be a positive integer"):
        api.call("get_model", path={"model": "digits", "version": "x"})
    assert not list((fleet.config.home).glob(".upload-*")), "uploads are cleaned up"


def test_cli_model_commands_go_through_a_configured_server(fleet: Fleet, api: HttpClient, digits: RealModel,
                                                           tmp_path: Path) -> None:
    local = tmp_path / "laptop"  # the CI runner's own home: it must stay empty
    env = {**os.environ, "EDGEFLEET_SERVER": fleet.server.api_url, "EDGEFLEET_TOKEN": api.token or ""}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server", "--home", str(local), *args], cwd=ROOT, env=env,
                              text=True, capture_output=True, timeout=600, check=False)

    added = cli("model", "add", str(digits.path), "--name", "digits", "--calibration", str(digits.calibration),
                "--evaluation", str(digits.evaluation), "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["version"] == 1
    built = cli("build", "digits", "--profile", PROFILE, "--calibration-method", "minmax", "--latency-runs", "5",
                "--no-pruning", "--json")
    assert built.returncode == 0, built.stderr
    (row,) = json.loads(built.stdout)
    assert row["profile"] == PROFILE and row["fidelity"]["metric"] == "accuracy"
    listed = cli("model", "list", "--json")
    assert json.loads(listed.stdout) == [{"model": "digits", "version": 1, "format": "onnx",
                                          "sha256": json.loads(added.stdout)["sha256"],
                                          "size_bytes": digits.path.stat().st_size, "builds": [PROFILE]}]
    shown = cli("model", "show", "digits")
    assert shown.returncode == 0 and "build x86-64-avx2" in shown.stdout
    missing = cli("build", "digits:7", "--profile", PROFILE)
    assert missing.returncode == 1 and "no model version digits:7" in missing.stderr
    # it all happened on the server: the catalog there has it, the local home has nothing
    server_catalog = Catalog.open(fleet.config.home)
    try:
        assert server_catalog.get_build("digits", 1, PROFILE) is not None
    finally:
        server_catalog.close()
    local_catalog = Catalog.open(local)
    try:
        assert local_catalog.versions() == []
    finally:
        local_catalog.close()
