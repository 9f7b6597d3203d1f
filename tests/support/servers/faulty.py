"""The real edgefleet server as a separate process (so a test can kill -9 it), with a static build table.

    python -m tests.support.servers.faulty SPEC.json

SPEC: {"home": str, "config": {section: {key: value}}, "builds": [{model, version, profile, path, input}]}.
It runs ``server.app.FleetServer`` exactly as ``edgefleet server run`` does, only with the builds
given (the compression pipeline is not what these tests exercise), and prints one JSON ``ready``
line on stderr. ``ServerProcess`` starts it, waits for that line and kills it with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.support.servers.settings import server_settings
from tests.support.waiting import wait_progress

ROOT = Path(__file__).resolve().parents[3]


def _builds(items: list[dict[str, Any]]) -> Any:
    from agent.protocol.messages import RuntimeSpec
    from server.builds import Build, StaticBuilds
    from tests.support.models.agent import digits_health

    builds = StaticBuilds()
    for b in items:
        builds.add(Build(
            model=b["model"], version=b["version"], profile=b["profile"], variant="fp32", path=Path(b["path"]),
            runtime=RuntimeSpec("onnx", "onnxruntime"), health=digits_health(b["input"], probation_s=b["probation_s"]),
            chunk_size=b.get("chunk_size", 4096), compression="lzma",
        ))
    return builds


def main(spec_path: str) -> int:
    from server.app import FleetServer
    from server.config import config_from_mapping

    spec = json.loads(Path(spec_path).read_text())
    config = config_from_mapping(Path(spec["home"]), spec["config"])
    server = FleetServer(config, builds=_builds(spec["builds"]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(json.dumps({"event": "ready", "pid": os.getpid()}), file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


class ServerProcess:
    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        self.spec_path = workdir / "server-spec.json"
        self.spec_path.write_text(json.dumps(spec))
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, stall_s: float = 120.0) -> ServerProcess:
        """Start it and wait for its "ready" line: as long as its log grows (a loaded machine is slow, not
        stuck), failing at once if it exits."""
        log = self.log_path.open("ab")
        proc = self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.servers.faulty", str(self.spec_path)],
            cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

        def this_run() -> str:
            return self.log_path.read_text(errors="replace").split("--- start ---")[-1]

        wait_progress(lambda: '"event": "ready"' in this_run(), what="the server starting", stall_s=stall_s,
                      progress=lambda: self.log_path.stat().st_size, describe=lambda: this_run()[-3000:],
                      failed=lambda: None if proc.poll() is None else f"the server exited {proc.returncode}",
                      interval_s=0.05)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        with self.log_path.open("a") as f:
            f.write("\n--- start ---\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))


class RealServer:
    """A server home on a test broker: the server runs in its own process; the test drives the same registry.

    Also the ``server=`` argument of ``AgentProcess``: it writes this server's public key and registers
    the device (profile ``PROFILE``, group ``g``) with its real X25519 key.
    """

    PROFILE = "x86-64-avx2"

    def __init__(self, workdir: Path, host: str, port: int, builds: list[dict[str, Any]],
                 overrides: dict[str, dict[str, Any]] | None = None) -> None:
        from server.artifacts import ArtifactStore
        from server.client import default_profiles
        from server.config import ServerConfig, config_from_mapping
        from server.keys import init_signing_key
        from server.registry.fleet import open_registry
        from server.service import FleetService

        self.home = workdir / "srv-home"
        self.home.mkdir(parents=True, exist_ok=True)
        data = server_settings(f"mqtt://{host}:{port}", f"srv-{workdir.name[-20:]}", device_timeout_s=60.0,
                               overrides=overrides)
        init_signing_key(ServerConfig(home=self.home).paths)
        self.config = config_from_mapping(self.home, data)
        self.registry = open_registry(self.config)
        self.service = FleetService(self.config, self.registry, builds=_builds(builds),
                                    artifacts=ArtifactStore(self.config.paths.artifacts_dir, self.registry),
                                    profiles=default_profiles())
        self.process = ServerProcess({"home": str(self.home), "config": data, "builds": builds}, workdir)

    def write_public_key(self, path: Path) -> Path:
        from cryptography.hazmat.primitives import serialization

        from server.keys import load_signing_key

        pem = load_signing_key(self.config.paths).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.write_bytes(pem)
        return path

    def enroll(self, device_id: str, public_key: Any) -> None:
        import base64

        self.service.register_device(device_id, profile=self.PROFILE, groups=("g",), broker_password=False,
                                     public_key=base64.b64encode(public_key.public_bytes_raw()).decode())

    def counts(self) -> dict[str, int]:
        """Rows per registry table (what a crash must not lose)."""
        conn = self.registry.db.connection()
        return {t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in self.registry.db.table_names()}
