"""A real ``edgefleet server run`` process for end-to-end tests.

The home is prepared with the CLI itself (``edgefleet keys init``, ``edgefleet tokens create``)
and a ``server.toml``; the process runs the production command line, with its builds taken from
a JSON file (``tests.support.servers.main``). ``kill()`` is SIGKILL: no lease released, nothing
flushed. The test talks to it over HTTP with a bearer token, as a CI pipeline would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.runtime.keys import public_key_b64
from server.broker import MosquittoBroker
from server.builds import Build
from server.client import HttpClient
from server.config import ServerConfig
from server.keys import load_signing_key
from tests.support.processes import kill_hard, stop_gently
from tests.support.servers.main import build_row
from tests.support.servers.settings import server_settings
from tests.support.waiting import wait_progress

ROOT = Path(__file__).resolve().parents[3]


def _toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def edgefleet(home: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300.0,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``edgefleet`` command line (``python -m server``) on ``home``.

    ``timeout`` only catches a hung command: a CLI start under a CPU hog took 20-25 s (issue 11's load).
    """
    out = subprocess.run([sys.executable, "-m", "server", "--home", str(home), *args], check=False, cwd=ROOT,
                         text=True, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


class ServerProcess:
    def __init__(self, home: Path, broker: MosquittoBroker, builds: Iterable[Build], *,
                 settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        sections = server_settings(f"mqtt://{broker.host}:{broker.port}", f"e2e-{home.name}",
                                   device_timeout_s=300.0, overrides=settings)
        (home / "server.toml").write_text(_toml(sections))
        self.builds_path = home / "builds.json"
        self.builds_path.write_text(json.dumps([build_row(b) for b in builds], indent=1))
        edgefleet(home, "keys", "init")
        self.token = edgefleet(home, "tokens", "create", "e2e", "--role", "admin").stdout.strip().splitlines()[-1]
        self.log_path = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_url = ""
        self.starts = 0

    @property
    def public_key_pem(self) -> bytes:
        return load_signing_key(ServerConfig(home=self.home).paths).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def start(self, timeout: float = 180.0) -> ServerProcess:
        """Start it and wait for its ``server.json``; fails at once if it exits, ``timeout`` catches a hang
        (on an idle machine it is up in about a second; under a CPU hog in tens of seconds)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        (self.home / "server.json").unlink(missing_ok=True)
        log = self.log_path.open("ab")
        offset = log.tell()
        proc = self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.servers.main", str(self.builds_path), "--home", str(self.home),
             "server", "run", "--log-level", "info"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.starts += 1

        def up() -> bool:
            try:
                info = json.loads((self.home / "server.json").read_text())
                if int(info["pid"]) == proc.pid:
                    self.api_url = str(info["api_url"])
                    return True
            except (OSError, ValueError, KeyError):
                pass
            return False

        def describe() -> str:
            state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
            return f"--- server pid {proc.pid}, {state}; its log:\n{self.log_text()[offset:][-3000:]}"

        wait_progress(up, what="server start", progress=lambda: self.log_path.stat().st_size, describe=describe,
                      failed=lambda: None if proc.poll() is None else f"the server exited with {proc.returncode}",
                      stall_s=timeout, cap_s=timeout, interval_s=0.05)
        return self

    def kill(self) -> None:
        """kill -9: leases stay held until they expire; in-flight work is simply gone."""
        kill_hard(self.proc)

    def stop(self, timeout: float = 20.0) -> int | None:
        return stop_gently(self.proc, timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- the API, as a CI pipeline uses it ----------------------------------------------------------------------

    def client(self) -> HttpClient:
        assert self.api_url, "server not started"
        return HttpClient(self.api_url, self.token, timeout=30.0)

    def call(self, name: str, **kwargs: Any) -> Any:
        return self.client().call(name, **kwargs)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The operator's command line against this server (over HTTP, with the token)."""
        return edgefleet(self.home, *args, check=check,
                         env={"EDGEFLEET_SERVER": self.api_url, "EDGEFLEET_TOKEN": self.token})

    # -- what AgentProcess needs from "the server" ----------------------------------------------------------------

    def enroller(self, profile: str, groups: tuple[str, ...]) -> _Enroller:
        return _Enroller(self, profile, groups)


class _Enroller:
    def __init__(self, server: ServerProcess, profile: str, groups: tuple[str, ...]) -> None:
        self.server, self.profile, self.groups = server, profile, groups

    def write_public_key(self, path: Path) -> Path:
        path.write_bytes(self.server.public_key_pem)
        return path

    def enroll(self, device_id: str, public_key: X25519PublicKey) -> None:
        self.server.call("register_device", body={"device_id": device_id, "profile": self.profile,
                                                  "public_key": public_key_b64(public_key),
                                                  "groups": list(self.groups), "broker_password": False})
