"""The web console in a real headless Chromium against a real ``edgefleet server run`` process.

One fleet for the module: mosquitto, the server process, and simulated devices
(``server.simulator``: the agent's protocol, key unwrap, chunk decryption and lifecycle code on
real MQTT connections). The tests run in file order and each starts where the previous one left
the fleet: a rollout watched live to completion, a second version committed and one device rolled
back from its page, a rollout halted while its devices are away, an enrollment approved by typing
the fingerprint, and a ``read`` token that can look but not act.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.envelope import TrustAnchor, raw_public
from server.broker import MosquittoBroker
from server.config import ServerConfig
from server.keys import load_signing_key
from server.simulator import BrokerTarget, SimFleet, SimSettings, device_key
from tests.support.browser import Browser
from tests.support.servers.fleet import onnx_builds
from tests.support.servers.process import ServerProcess, edgefleet

pytestmark = [pytest.mark.broker, pytest.mark.e2e]

PROFILE = "raspberry-pi-4"
SEED = "console"
DEVICES = [f"web-{i}" for i in range(4)]
NEWCOMER = "web-new"  # not registered: asks to enroll


@dataclass
class ConsoleFleet:
    tmp: Path
    broker: MosquittoBroker
    server: ServerProcess
    tokens: dict[str, str]
    sims: list[SimFleet] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.server.api_url.rstrip("/")

    def start_devices(self, ids: list[str]) -> SimFleet:
        trust = TrustAnchor.of(load_signing_key(ServerConfig(home=self.server.home).paths).public_key())
        fleet = SimFleet(ids, broker=BrokerTarget(self.broker.host, self.broker.port), trust=trust,
                         settings=SimSettings(profile=PROFILE, telemetry_s=1.0, probation_check_s=0.2), seed=SEED,
                         loops=1).start()
        self.sims.append(fleet)
        return fleet

    def stop_devices(self) -> None:
        while self.sims:
            self.sims.pop().stop()

    def wait_api(self, name: str, predicate: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.server.call(name, **kwargs)
            if predicate(value):
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{name}: {value}")

    def deploy(self, ref: str) -> str:
        out = self.server.call("deploy", body={"model": ref, "target": "group:web", "canary_percent": 25,
                                               "wave_percent": 100, "max_failures_percent": 0, "probation_s": 0.3})
        return str(out["deployment_id"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleFleet]:
    tmp = tmp_path_factory.mktemp("console")
    builds = list(onnx_builds(tmp / "builds", "m", [1, 2, 3], [PROFILE]).builds.values())
    with MosquittoBroker(workdir=tmp / "mosquitto") as broker:
        server = ServerProcess(tmp / "home", broker, builds)
        tokens = {"admin": server.token}
        for name, role in (("operator", "deploy"), ("viewer", "read")):
            out = edgefleet(server.home, "tokens", "create", name, "--role", role).stdout
            tokens[role] = out.strip().splitlines()[-1]
        server.start()
        f = ConsoleFleet(tmp, broker, server, tokens)
        try:
            for d in DEVICES:
                key = base64.b64encode(raw_public(device_key(SEED, d).public_key())).decode()
                server.call("register_device", body={"device_id": d, "profile": PROFILE, "public_key": key,
                                                     "groups": ["web"], "broker_password": False})
            yield f
        finally:
            f.stop_devices()
            server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser() as b:
        yield b


def test_login_then_a_rollout_progresses_live_to_completion(fleet: ConsoleFleet, browser: Browser) -> None:
    browser.get(f"{fleet.base}/ui/devices")
    assert "/ui/login" in browser.driver.current_url, "pages need a session"
    browser.css("#token").send_keys("eft_not-a-token")
    browser.submit("#login")
    assert "Unknown or revoked" in browser.text("#login-error")
    browser.login(fleet.base, fleet.tokens["deploy"])
    cookie = browser.driver.get_cookie("ef_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # the devices are away: the rollout is released and waits for them
    dep = fleet.deploy("m:1")
    browser.get(f"{fleet.base}/ui/deployments/{dep}")
    assert browser.text("#deployment-status") == "running"
    assert browser.text("#deployment-progress").startswith("0 of 4 committed")
    browser.driver.execute_script("window.__sameDocument = 42;")

    fleet.start_devices([*DEVICES, NEWCOMER])
    browser.wait(lambda: browser.text("#deployment-status") == "completed", 60, "the page shows completion")
    assert browser.text("#deployment-progress").startswith("4 of 4 committed")
    # it came by live updates into the same document, not by reloading the page
    assert browser.driver.execute_script("return window.__sameDocument") == 42
    assert int(browser.attr("body", "data-updates") or 0) >= 1
    assert browser.css("#wave-0").text.split()[:2] == ["canary", "1"]

    browser.get(f"{fleet.base}/ui/")
    browser.wait(lambda: browser.text("#count-online").split()[0] == "4", 20, "4 devices online")
    browser.wait(lambda: NEWCOMER in browser.text("#issues"), 20, "the enrollment request listed as an issue")


def test_a_device_is_rolled_back_from_its_page(fleet: ConsoleFleet, browser: Browser) -> None:
    dep = fleet.deploy("m:2")
    fleet.wait_api("get_deployment", lambda d: d["status"] == "completed", path={"deployment_id": dep})
    device = DEVICES[1]
    fleet.wait_api("get_device", lambda d: d["active_version"] == 2 and 1 in d["kept"], path={"device_id": device})
    browser.get(f"{fleet.base}/ui/devices/{device}")
    assert browser.text("#current-version").startswith("m:2")
    assert browser.css("svg.chart"), "telemetry charts are drawn on the server"
    # without the confirmation nothing is sent
    browser.driver.execute_script("document.querySelector('#rollback-form input[name=confirm]').required = false;")
    browser.submit("#rollback-button")
    assert "tick the confirmation box" in browser.text("#flash")
    browser.css("#rollback-form input[name=confirm]").click()
    browser.submit("#rollback-button")
    assert "Rollback of web-1 requested" in browser.text("#flash")
    browser.wait(lambda: browser.text("#current-version").startswith("m:1"), 30, "the device reports v1")
    audit = fleet.server.call("audit", query={"action": "rollback"})
    assert audit[-1]["actor"] == "operator" and audit[-1]["target"] == f"device:{device}"
    assert audit[-1]["outcome"] == "ok"


def test_a_rollout_is_halted_from_its_page(fleet: ConsoleFleet, browser: Browser) -> None:
    fleet.stop_devices()
    fleet.wait_api("list_devices", lambda ds: not any(d["online"] for d in ds if d["device_id"] in DEVICES))
    dep = fleet.deploy("m:3")
    browser.get(f"{fleet.base}/ui/deployments/{dep}")
    assert browser.text("#deployment-status") == "running"
    browser.type("#halt-form input[name=reason]", "<b>bad</b> batch")
    browser.css("#halt-form input[name=confirm]").click()
    browser.submit("#halt-button")
    assert f"{dep} halted" in browser.text("#flash")
    assert browser.text("#deployment-status") == "halted"
    assert "<b>bad</b> batch" in browser.text(".reason"), "shown as text, not markup"
    assert fleet.server.call("get_deployment", path={"deployment_id": dep})["status"] == "halted"


def test_an_enrollment_is_approved_by_typing_its_fingerprint(fleet: ConsoleFleet, browser: Browser) -> None:
    pending = {p["device_id"]: p for p in fleet.server.call("pending_enrollments")}
    assert NEWCOMER in pending
    fingerprint = pending[NEWCOMER]["fingerprint"]
    browser.get(f"{fleet.base}/ui/enrollment")
    assert browser.attr(f"#enroll-{NEWCOMER} button.approve", "disabled"), "deploy is not admin"
    browser.submit("button.link")  # log out, back in as admin
    browser.login(fleet.base, fleet.tokens["admin"])
    browser.get(f"{fleet.base}/ui/enrollment")
    assert browser.text(f"#enroll-{NEWCOMER} .fingerprint") == fingerprint
    browser.type(f"#enroll-{NEWCOMER} input[name=fingerprint]", "0" * len(fingerprint))
    browser.submit(f"#enroll-{NEWCOMER} button.approve")
    assert "does not match" in browser.text("#flash") or "fingerprint" in browser.text("#flash")
    assert (browser.attr(".flash", "class") or "").endswith("flash-error")
    browser.type(f"#enroll-{NEWCOMER} input[name=fingerprint]", fingerprint)
    browser.submit(f"#enroll-{NEWCOMER} button.approve")
    assert f"{NEWCOMER} approved" in browser.text("#flash")
    device = fleet.server.call("get_device", path={"device_id": NEWCOMER})
    assert device["status"] == "active" and device["fingerprint"] == fingerprint


def test_a_read_token_sees_but_cannot_act(fleet: ConsoleFleet) -> None:
    halted = [d for d in fleet.server.call("list_deployments") if d["status"] == "halted"]
    before = len(fleet.server.call("list_deployments"))
    with Browser() as browser:
        browser.login(fleet.base, fleet.tokens["read"])
        browser.get(f"{fleet.base}/ui/deployments/{halted[0]['deployment_id']}")
        assert browser.attr("#resume-button", "disabled")
        assert "can look, not act" in browser.text("#deployment-actions")
        # the button is only greyed out: the server is what refuses
        browser.driver.execute_script(
            "var b = document.getElementById('resume-button'); b.disabled = false;"
            "document.querySelector('#resume-form input[name=confirm]').checked = true; b.click();")
        browser.wait(lambda: "403" in browser.text("h1"), 10, "a 403 page")
        assert "needs deploy" in browser.text("#error-message")
        browser.get(f"{fleet.base}/ui/audit?actor=viewer")
        assert "error:forbidden" in browser.text("#audit-rows")
        assert "verifies" in browser.text("#chain-status")
    assert len(fleet.server.call("list_deployments")) == before, "nothing was started"
