"""Ctrl-C in the operator commands that wait: ``deploy --watch``, ``events --follow``, ``simulate``.

Each runs as a real process in its own session (as in a terminal) against a real server and mosquitto. The
test waits for an observable sign that the command is in its waiting loop (a line it printed, devices the
registry sees online), then sends SIGINT to the process group, as Ctrl-C does. The command must exit
promptly with 130, print one ``interrupted`` line and no traceback, and leave no process behind.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.protocol.envelope import raw_public
from server.broker import MosquittoBroker
from server.builds import StaticBuilds
from server.simulator import device_ids, device_key
from tests.support.devices.agent_process import ROOT
from tests.support.servers.fleet import Fleet, onnx_builds, public_key
from tests.support.waiting import wait_progress

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> StaticBuilds:
    return onnx_builds(tmp_path_factory.mktemp("builds"), "m", [1], ["rpi4"])


@pytest.fixture
def fleet(tmp_path: Path, fresh_broker: MosquittoBroker, builds: StaticBuilds) -> Iterator[Fleet]:
    # an offline device holds a rollout "running" for as long as the device timeout (far beyond the test)
    with Fleet(tmp_path, fresh_broker, builds, {"rollout": {"device_timeout_s": 3600.0}}) as f:
        yield f


class Command:
    """``python -m server ...`` in its own session; stdout and stderr in files the test polls."""

    def __init__(self, fleet: Fleet, *args: str, api: bool = True) -> None:
        token = fleet.token(f"ctrl-c-{time.monotonic_ns()}", "admin")
        home = fleet.tmp / "cli-home"
        env = {**os.environ, "EDGEFLEET_TOKEN": token, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
        self.out, self.err = fleet.tmp / "cmd.out", fleet.tmp / "cmd.err"
        argv = [sys.executable, "-m", "server", "--home", str(home), *args]
        if api:
            argv += ["--server", fleet.server.api_url]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], stall_s: float = 120.0) -> None:
        """Until ``ready()``, as long as the command's output grows (a loaded machine starts a CLI in 20-25 s),
        failing at once if it exits."""

        def size() -> int:
            return sum(p.stat().st_size for p in (self.out, self.err) if p.exists())

        wait_progress(ready, what="the command reaching the point", progress=size, stall_s=stall_s, interval_s=0.05,
                      failed=lambda: None if self.proc.poll() is None else f"it exited {self.proc.returncode}",
                      describe=self.text)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            rc = self.proc.wait(15)  # promptly: none of them waits on anything that cannot be interrupted
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"still running 15 s after SIGINT:\n{self.text()}") from None
        err = self.err.read_text(errors="replace")
        assert rc == 130, f"exit status {rc}:\n{self.text()}"
        assert "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("interrupted"), err
        with pytest.raises(ProcessLookupError):  # nothing left in its process group
            os.killpg(self.proc.pid, 0)


def test_ctrl_c_in_deploy_watch(fleet: Fleet) -> None:
    fleet.device("ghost-1", connect=False)  # registered, never online: the rollout cannot finish
    cmd = Command(fleet, "deploy", "m:1", "--to", "group:g", "--canary", "0%", "--wave", "100%", "--watch")
    cmd.wait_until(lambda: "deployment " in cmd.out.read_text(errors="replace"))
    (dep,) = fleet.service.list_deployments()
    assert dep["status"] == "running"
    cmd.ctrl_c()
    assert fleet.service.deployment_detail(dep["deployment_id"])["status"] == "running"  # Ctrl-C only stops watching


def test_ctrl_c_in_events_follow(fleet: Fleet) -> None:
    fleet.device("evt-1", connect=False)  # its registration is an event the first page prints
    cmd = Command(fleet, "events", "--follow")
    cmd.wait_until(lambda: "device.registered" in cmd.out.read_text(errors="replace"))
    cmd.ctrl_c()  # now in the long poll (wait=25 s)


def test_ctrl_c_in_simulate(fleet: Fleet, fresh_broker: MosquittoBroker, tmp_path: Path) -> None:
    ids = device_ids(3, "simint")
    for device_id in ids:
        key = base64.b64encode(raw_public(device_key("int", device_id).public_key())).decode()
        fleet.service.register_device(device_id, profile="rpi4", public_key=key, groups=["sim"],
                                      broker_password=False)
    pem = tmp_path / "server.pem"
    pem.write_bytes(public_key(fleet.config).public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    cmd = Command(fleet, "simulate", "--devices", "3", "--prefix", "simint", "--seed", "int", "--no-register",
                  "--broker", fresh_broker.url, "--server-key", str(pem), "--quiet", api=False)

    def online() -> int:
        return sum(d.online for d in fleet.server.registry.list_devices() if d.device_id in ids)

    cmd.wait_until(lambda: online() == 3)
    cmd.ctrl_c()
    # cleanly: each simulated device said goodbye (offline report), as an agent's shutdown does
    deadline = time.monotonic() + 60
    while online() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert online() == 0
