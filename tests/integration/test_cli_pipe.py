"""The operator CLI writing into a pipe (a file, a CI log): full-width tables, no redraws.

Real ``edgefleet`` processes with stdout on a pipe, against an in-process server on a private
mosquitto with stand-in devices. A narrow ``$COLUMNS`` must not cut headers to "profi…", and
``deploy --watch`` must log one line per change and end every line before the table that follows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.broker import MosquittoBroker
from tests.support.servers.fleet import Fleet, onnx_builds

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
IDS = [f"pipe-device-with-a-long-name-{i}" for i in range(3)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("cli-pipe")
    with MosquittoBroker(workdir=tmp / "mosquitto") as broker:
        f = Fleet(tmp, broker, onnx_builds(tmp / "builds", "m", [1], ["raspberry-pi-4"]))
        try:
            devices = [f.device(d, profile="raspberry-pi-4", groups=("pipe",)) for d in IDS]
            f.wait_online(*devices)
            for d in devices:
                d.send_telemetry(p95=3.25, cpu=12.5)
            token = f.token("ci", "deploy")
            env = {**os.environ, "EDGEFLEET_SERVER": f"http://127.0.0.1:{f.server.http.port}",
                   "EDGEFLEET_TOKEN": token, "COLUMNS": "80", "TERM": "xterm-256color"}
            env.pop("FORCE_COLOR", None)
            yield f, env
        finally:
            f.close()


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    out = subprocess.run([sys.executable, "-m", "server", "--home", str(ROOT / ".no-home"), *args], cwd=ROOT,
                         env=env, capture_output=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "\x1b[" not in text and "\r" not in text, "no colours or cursor moves in a pipe"
    return text


def test_status_in_a_pipe_keeps_every_column_whole(fleet: tuple[Fleet, dict[str, str]]) -> None:
    _, env = fleet
    text = cli(env, "status")
    assert "…" not in text, text
    header = next(line for line in text.splitlines() if line.strip().startswith("device"))
    for name in ("profile", "online", "model/version", "state", "p95", "CPU", "mem", "temp", "last seen"):
        assert name in header.split("  ") or f" {name} " in f" {header} ", (name, header)
    for d in IDS:
        row = next(line for line in text.splitlines() if d in line)
        assert "raspberry-pi-4" in row and "3.2 ms" in row


def test_deploy_watch_in_a_pipe_logs_lines_and_ends_them(fleet: tuple[Fleet, dict[str, str]]) -> None:
    f, env = fleet
    text = cli(env, "deploy", "m:1", "--to", "group:pipe", "--canary", "34%", "--wave", "100%", "--probation", "0.3",
               "--watch")
    lines = text.splitlines()
    logged = [line for line in lines if " d-" in line and " committed" in line and line[:2].isdigit()]
    assert len(logged) >= 2, text
    assert logged[-1].split(" ", 2)[2].startswith("completed: canary 2/2; wave 1 1/1"), logged[-1]
    assert len(set(logged)) == len(logged), "a line only when something changed"
    # the final view comes after the log, each on lines of its own
    final = lines.index(next(line for line in lines if line.startswith("d-") and "completed" in line))
    assert final > lines.index(logged[-1])
    assert any(line.startswith("  canary ━") and "2/2 committed" in line for line in lines[final:]), text
    assert "…" not in text
    deps = f.service.list_deployments()
    assert deps[0]["status"] == "completed"
