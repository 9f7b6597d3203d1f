"""The web console's response times with N simulated devices (default 1,000).

    .venv/bin/python scripts/bench_console.py [--quick] [--devices 1000] [--requests 20] [--json PATH]

A private mosquitto, the real server in this process (server.app.FleetServer, its HTTP API and
console on loopback), N devices registered with their keys and ``edgefleet simulate`` in a child
process (N MQTT connections, telemetry every 10 s). One small model is rolled out to all of them
(so every device has a deployment row and a model), then each console page is requested
``--requests`` times over HTTP with a logged-in session while the simulator keeps reporting.
Times are client-side (request sent to last byte read), one request at a time.
Target (issue 16): the device table under 300 ms at 1,000 devices. ``--quick``: 100 devices, 5 requests.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_fleet import MODEL, PROFILE, builds_for, server_config, write_model  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.protocol.envelope import raw_public  # noqa: E402
from server.app import FleetServer  # noqa: E402
from server.broker import MosquittoBroker  # noqa: E402
from server.keys import load_signing_key, new_token, token_digest  # noqa: E402
from server.simulator import device_ids, device_key  # noqa: E402

GROUP = "bench"


class Session:
    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.cookie = ""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/ui/login")
        resp = conn.getresponse()
        page = resp.read().decode()
        nonce_cookie = next(v for k, v in resp.getheaders() if k.lower() == "set-cookie").split(";")[0]
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        assert nonce is not None
        conn.request("POST", "/ui/login", body=urllib.parse.urlencode({"nonce": nonce.group(1), "token": token}),
                     headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": nonce_cookie})
        resp = conn.getresponse()
        resp.read()
        self.cookie = next(v for k, v in resp.getheaders() if k.lower() == "set-cookie" and "ef_session" in v
                           ).split(";")[0]
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers={"Cookie": self.cookie})
        resp = self.conn.getresponse()
        body = resp.read()
        return time.perf_counter() - t0, resp.status, len(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="100 devices, 5 requests per page (under a minute)")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.requests = 100, 5
    n = args.devices
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-console-"))
    with MosquittoBroker(workdir=work / "mosquitto", max_inflight_messages=10, max_queued_bytes=2 << 20) as broker:
        config = server_config(work / "home", broker, broadcast=True, egress_mb_s=150.0)
        builds = builds_for(write_model(work / "model.onnx", 0.5), "zlib")
        server = FleetServer(config, builds=builds).start()
        sim: subprocess.Popen[bytes] | None = None
        try:
            ids = device_ids(n, "dev")
            for device_id in ids:
                key = raw_public(device_key("bench", device_id).public_key())
                four = f"g{int(device_id.rsplit('-', 1)[1]) % 4}"
                server.service.register_device(device_id, profile=PROFILE, groups=[GROUP, four],
                                               broker_password=False, public_key=base64.b64encode(key).decode())
            pem = work / "server-key.pem"
            pem.write_bytes(load_signing_key(config.paths).public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            sim = subprocess.Popen(
                [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
                 "--home", str(work / "home"), "simulate", "--devices", str(n), "--prefix", "dev", "--seed", "bench",
                 "--no-register", "--broker", broker.url, "--server-key", str(pem), "--telemetry-s", "10",
                 "--quiet"],
                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                stderr=(work / "sim.log").open("wb"))
            deadline = time.monotonic() + 60 + n * 0.1
            while sum(d.online for d in server.registry.list_devices()) < n:
                if time.monotonic() > deadline or sim.poll() is not None:
                    raise RuntimeError(f"devices did not come online (see {work / 'sim.log'})")
                time.sleep(0.5)
            print(f"{n} devices online", flush=True)
            dep = server.service.deploy(f"{MODEL}:1", target=f"group:{GROUP}", canary_percent=0, wave_percent=100,
                                        max_failures_percent=100, probation_s=1.0, actor="bench")
            dep_id = dep["deployment_id"]
            while server.service.deployment_detail(dep_id)["status"] != "completed":
                if time.monotonic() > deadline + 240:
                    raise RuntimeError("the rollout did not complete")
                time.sleep(1.0)
            print("rollout completed", flush=True)
            while sum(d.telemetry_at is not None for d in server.registry.list_devices()) < n:
                time.sleep(0.5)
            token = new_token()
            server.registry.add_token("bench", token_digest(token), role="read")
            session = Session(server.http.port, token)
            pages = {
                "device table, page 1 (sorted by id)": "/ui/devices",
                "device table, sorted by p95 desc": "/ui/devices?sort=p95&dir=desc",
                "device table, filtered (group, state) + sorted by CPU": "/ui/devices?group=g1&state=online&sort=cpu",
                "device table, page 10": "/ui/devices?page=10",
                "overview": "/ui/",
                "device page": f"/ui/devices/{ids[0]}",
                "deployment page (1,000 devices, 200 rows shown)": f"/ui/deployments/{dep_id}",
            }
            rows = []
            for label, path in pages.items():
                session.get(path)  # warm
                times, status, size = [], 0, 0
                for _ in range(args.requests):
                    t, status, size = session.get(path)
                    times.append(t * 1000)
                times.sort()
                row = {"page": label, "path": path, "status": status, "bytes": size,
                       "median_ms": round(statistics.median(times), 1),
                       "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1),
                       "max_ms": round(times[-1], 1)}
                rows.append(row)
                print(f"{label:55s} {status} {size:8d} B  median {row['median_ms']:7.1f} ms  "
                      f"p95 {row['p95_ms']:7.1f} ms  max {row['max_ms']:7.1f} ms", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"devices": n, "requests": args.requests, "rows": rows}, indent=1))
        finally:
            if sim is not None and sim.poll() is None:
                sim.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sim.wait(timeout=20)
            server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
