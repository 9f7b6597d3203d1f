"""A real agent process for tests: ``python -m agent run --config ...`` with a generated config.

Keys are real files made by the agent's own key code; the device is enrolled with the test
server; timeouts are short through the config (never sleeps in product code). ``kill()`` is
SIGKILL. Logs (JSON lines) go to ``agent.log`` in the device's directory; ``describe()`` says
whether the process runs and shows its log since it started (for a failing wait's message).

The local inference API binds ``port = 0``: the agent picks a free port itself and writes it to
its ``status.json``, which ``http_port`` reads. A port picked here and handed over would be free
only when picked: on a busy machine another process can take it in the seconds before the agent
binds it, and the agent exits ("cannot serve HTTP"), which looked like a device that never came
online (issue 11).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from agent.core.journal import JournalRecord
from agent.runtime import faults
from agent.runtime.keys import generate_device_key
from agent.runtime.store import ModelStore
from tests.support.processes import kill_hard, stop_gently
from tests.support.servers.stub import FleetServer, unique_device_id
from tests.support.waiting import WaitError, wait_progress

ROOT = Path(__file__).resolve().parents[3]

#: Test-speed settings; each is a documented config knob.
FAST = {
    "transfer": {"chunk_timeout_s": 0.5, "chunk_timeout_max_s": 2.0, "progress_interval_s": 0.5},
    "lifecycle": {"probation_check_s": 0.1, "restart_limit": 3},
    "telemetry": {"interval_s": 1.0},
    "broker": {"reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "keepalive_s": 10},
    "log": {"format": "json", "level": "info"},
    "inference": {"intra_op_threads": 1},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    lines: list[str] = []
    tables = {k: v for k, v in settings.items() if isinstance(v, dict)}
    for key, value in settings.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for table, values in tables.items():
        lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    @classmethod
    def on(
        cls, broker: Any, server: FleetServer, workdir: Path, prefix: str, settings: dict[str, Any] | None = None
    ) -> AgentProcess:
        """A new agent with a fresh device id (``prefix``-...) on ``broker`` (its host and port) and ``server``."""
        return cls(workdir, unique_device_id(prefix), broker_host=broker.host, broker_port=broker.port, server=server,
                   settings=settings)

    def __init__(
        self,
        workdir: Path,
        device_id: str,
        *,
        broker_host: str,
        broker_port: int,
        server: FleetServer,
        settings: dict[str, Any] | None = None,
        checkout: Path | None = None,
    ) -> None:
        """``checkout``: run the agent of another checkout of this repository (its ``.venv`` Python, its tree;
        scripts/bench_transfer.py ``--baseline-agent`` compares two agents in one run); default this one."""
        self.checkout = checkout
        self.device_id = device_id
        self.dir = workdir / device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.dir / "store"
        self.log_path = self.dir / "agent.log"
        key = generate_device_key(self.dir / "device.key")
        server.write_public_key(self.dir / "server.pub")
        server.enroll(device_id, key.public_key())
        merged: dict[str, Any] = {
            "device_id": device_id,
            "profile": "x86_64-onnx-test",
            "store_dir": str(self.store_dir),
            "broker": {"host": broker_host, "port": broker_port, "tls": False},  # test brokers are plain
            "keys": {"device_key": "device.key", "server_keys": ["server.pub"]},
            "http": {"port": 0},  # the agent picks a free one and writes it to status.json (http_port)
        }
        for section, values in FAST.items():
            merged[section] = {**values, **merged.get(section, {})}
        for key_name, value in (settings or {}).items():
            if isinstance(value, dict):
                merged[key_name] = {**merged.get(key_name, {}), **value}
            else:
                merged[key_name] = value
        self.config_path = write_config(self.dir / "agent.toml", merged)
        self._configured_port = int(merged["http"].get("port", 8080)) if merged["http"].get("enabled", True) else None
        self._bound_port: int | None = None  # read from status.json, per start
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0
        self._started_at = 0.0

    # -- process control ---------------------------------------------------------------------------------------

    def start(self, *, fault_at: str | None = None, barrier: Path | None = None) -> AgentProcess:
        """Start ``edgefleet-agent run``; ``fault_at`` arms the agent's fault hook (agent/runtime/faults.py):
        it SIGKILLs itself at that point, or with ``barrier`` creates ``<barrier>.reached`` and waits for
        ``barrier`` to exist."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        env = {k: v for k, v in os.environ.items() if k not in (faults.ENV_AT, faults.ENV_WAIT)}
        env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if fault_at is not None:
            env[faults.ENV_AT] = fault_at
            if barrier is not None:
                env[faults.ENV_WAIT] = str(barrier)
        python, cwd = sys.executable, ROOT
        if self.checkout is not None:
            python, cwd = str(self.checkout / ".venv" / "bin" / "python"), self.checkout
        self.proc = subprocess.Popen(
            [python, "-m", "agent", "run", "--config", str(self.config_path)],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.starts += 1
        self._started_at = time.monotonic()
        self._bound_port = None
        return self

    def kill(self) -> None:
        """kill -9: no clean shutdown, no Last Will suppression, nothing flushed."""
        kill_hard(self.proc)

    def stop(self, timeout: float = 15.0) -> int | None:
        return stop_gently(self.proc, timeout)

    def wait_fault_kill(self, timeout: float = 60.0) -> None:
        """Wait for the agent to SIGKILL itself at its armed fault point (its exit status says so)."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the agent never reached its fault point:\n{self.log_text()[-3000:]}") from None
        assert code == -signal.SIGKILL, f"agent exited {code}, not by its fault hook:\n{self.log_text()[-3000:]}"
        since_start = self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
        assert "fault point reached" in since_start, since_start[-3000:]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- looking inside ------------------------------------------------------------------------------------------

    def journal(self) -> JournalRecord | None:
        record, _ = ModelStore(self.store_dir).read_journal()
        return record

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        """What this run of the process logged (earlier runs append to the same file)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
        return ""

    def log_size(self) -> int:
        """Bytes logged so far (a waiter's progress marker: a starting agent logs each step)."""
        with contextlib.suppress(OSError):
            return self.log_path.stat().st_size
        return 0

    def exited(self) -> int | None:
        """The exit status of the last run, None while it runs (or before the first start)."""
        return None if self.proc is None else self.proc.poll()

    def describe(self, lines: int = 25) -> str:
        """Whether the process runs, and the end of its log since it started (for failure messages)."""
        if self.proc is None:
            state = "never started"
        elif self.proc.poll() is None:
            state = f"running as pid {self.proc.pid} for {time.monotonic() - self._started_at:.0f}s"
        else:
            state = f"exited with {self.proc.returncode} (pid {self.proc.pid})"
        tail = self.log_since_start().splitlines()[-lines:]
        body = "\n".join(f"    {line}" for line in tail) or "    (nothing logged)"
        return f"--- agent {self.device_id}: {state}; its log since it started ({self.log_path}):\n{body}"

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # -- the local inference API ---------------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[], bool], what: str, *, stall_s: float = 60.0) -> None:
        """Until ``condition`` holds, while this agent runs and makes progress (its log grows); a failure
        says why (it exited, or stalled) and shows its log."""
        proc = self.proc
        assert proc is not None, f"{self.device_id}: not started"
        wait_progress(condition, what=f"{self.device_id}: {what}", progress=self.log_size, describe=self.describe,
                      failed=lambda: None if proc.poll() is None else "the agent exited", stall_s=stall_s)

    @property
    def http_port(self) -> int:
        """The port the running agent's local API bound (its status.json says; waits for it while it starts)."""
        if self._configured_port is None:
            raise RuntimeError(f"{self.device_id}: its local API is disabled ([http] enabled = false)")
        if self._configured_port:
            return self._configured_port
        if self._bound_port is None:
            self._bound_port = self._wait_bound_port()
        return self._bound_port

    def _wait_bound_port(self, stall_s: float = 120.0) -> int:
        assert self.proc is not None, f"{self.device_id}: not started"
        proc = self.proc
        found: list[int] = []

        def bound() -> bool:
            try:  # read directly: a ModelStore would create the store's directories before the agent does
                status = json.loads((self.store_dir / "status.json").read_text())
            except (OSError, ValueError):
                return False
            if not isinstance(status, dict):
                return False
            url = status.get("http")
            if status.get("pid") == proc.pid and isinstance(url, str):
                found.append(int(urlsplit(url).port or 0))
            return bool(found)

        self.wait_until(bound, "its local API's port in status.json", stall_s=stall_s)
        return found[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def http(self, path: str, body: dict[str, Any] | None = None, *, timeout: float = 10.0) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                return exc.code, json.loads(payload or b"null")
            except ValueError:
                return exc.code, payload.decode(errors="replace")

    def infer(self, model: str, name: str, array: np.ndarray) -> tuple[int, Any]:
        body = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "data": array.astype(np.float32).ravel().tolist(),
                }
            ]
        }
        return self.http(f"/v2/models/{model}/infer", body)

    def infer_inputs(self, model: str, arrays: dict[str, np.ndarray]) -> tuple[int, Any]:
        """Every input by name, in its own dtype and shape (scalars and int64 included)."""
        types = {"float32": "FP32", "int64": "INT64", "int32": "INT32", "uint8": "UINT8"}
        body = {"inputs": [{"name": name, "shape": list(a.shape), "datatype": types[a.dtype.name],
                            "data": a.ravel().tolist()} for name, a in arrays.items()]}
        return self.http(f"/v2/models/{model}/infer", body)

    def wait_http_ready(self, timeout: float = 30.0) -> None:
        """Until the local API answers ready; ``timeout`` is how long the agent may show no progress
        (its log does not grow), not a budget for the whole start: a loaded machine is slow, not stuck."""

        def ready() -> bool:
            try:
                status, _ = self.http("/v2/health/ready", timeout=1.0)
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                if isinstance(exc, WaitError):
                    raise
                return False
            return status == 200

        self.wait_until(ready, "local API ready", stall_s=timeout)
