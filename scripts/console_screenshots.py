#!/usr/bin/env python3
"""Start a demo fleet and write a PNG of every console page (run it through ``scripts/console_screenshots``).

    scripts/console_screenshots OUTDIR

The fleet: a private mosquitto, ``edgefleet server run`` on a temporary home, the real digits model
registered and built for two profiles (v1 and a re-exported v2) by the compression pipeline, and
simulated devices (``server.simulator``) on real MQTT connections: eight Raspberry Pi 4 and four
Jetson Orin Nano, one registered device that never comes online and one that asks to enroll. v1
goes to everything, v2 fails its health check on the Jetsons (rolled back) and is in the middle of
its rollout on the Pis (long probation) when the pictures are taken with headless Chromium.
Everything it starts is stopped when it ends or fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.protocol.envelope import TrustAnchor, raw_public  # noqa: E402
from server.broker import MosquittoBroker  # noqa: E402
from server.client import HttpClient  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.keys import load_signing_key  # noqa: E402
from server.simulator import BrokerTarget, SimFleet, SimSettings, device_key  # noqa: E402
from tests.support.browser import Browser  # noqa: E402

SEED = "screens"
PIS = [f"pi-{i:02d}" for i in range(8)]
ORINS = [f"orin-{i}" for i in range(4)]
NEVER_SEEN = "pi-spare"
NEWCOMER = "orin-new"
PI, ORIN = "raspberry-pi-4", "jetson-orin-nano"


def log(msg: str) -> None:
    print(f"[screens] {msg}", file=sys.stderr, flush=True)


def edgefleet(home: Path, *args: str, timeout: float = 900.0) -> str:
    out = subprocess.run([sys.executable, "-m", "server", "--home", str(home), *args], cwd=ROOT, text=True,
                         capture_output=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout}s")


def model_files(work: Path) -> tuple[Path, Path, Path]:
    cache = Path(os.environ.get("EDGEFLEET_CACHE") or "~/.cache/edgefleet").expanduser() / "models" / "digits"
    if not (cache / "model.onnx").exists():
        raise SystemExit(f"the digits model is not in {cache}: run scripts/fetch_models.py --only digits")
    import onnx  # noqa: PLC0415 - the server extra

    model = onnx.load(str(cache / "model.onnx"))
    model.doc_string = "digits CNN, release 2 (console screenshots)"
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgefleet.release", "2"
    v2 = work / "digits-v2.onnx"
    onnx.save(model, str(v2))
    return cache, cache / "model.onnx", v2


class Demo:
    def __init__(self, work: Path, broker: MosquittoBroker) -> None:
        self.work, self.broker = work, broker
        self.home = work / "home"
        self.server: subprocess.Popen[bytes] | None = None
        self.sims: list[SimFleet] = []
        self.api: HttpClient | None = None
        self.url = ""
        self.token = ""

    def prepare(self) -> None:
        self.home.mkdir(parents=True)
        (self.home / "server.toml").write_text(
            f'[broker]\nurl = "mqtt://{self.broker.host}:{self.broker.port}"\nclient_id = "screens"\n'
            '[api]\nhost = "127.0.0.1"\nport = 0\n[publisher]\nchunk_window_s = 0.2\n'
            '[rollout]\ntick_s = 0.2\n[retention]\ntelemetry_bucket_s = 5\n')
        edgefleet(self.home, "keys", "init")
        self.token = edgefleet(self.home, "tokens", "create", "alice", "--role", "admin").strip().splitlines()[-1]
        cache, v1, v2 = model_files(self.work)
        for path in (v1, v2):
            edgefleet(self.home, "model", "add", str(path), "--name", "digits", "--calibration",
                      str(cache / "calibration.npz"), "--evaluation", str(cache / "evaluation.npz"))
        for version in (1, 2):
            log(f"building digits:{version} for {PI} and {ORIN} (the compression pipeline, a minute or two)")
            edgefleet(self.home, "build", f"digits:{version}", "--profile", f"{PI},{ORIN}")

    def start_server(self) -> None:
        logf = (self.work / "server.log").open("ab")
        self.server = subprocess.Popen([sys.executable, "-m", "server", "--home", str(self.home), "server", "run",
                                        "--log-level", "warning"], cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        logf.close()

        def up() -> bool:
            assert self.server is not None
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited:\n{(self.work / 'server.log').read_text()[-3000:]}")
            try:
                info = json.loads((self.home / "server.json").read_text())
            except (OSError, ValueError):
                return False
            self.url = str(info["api_url"]).rstrip("/")
            return True

        wait("the server", up, 60)
        self.api = HttpClient(self.url, self.token, timeout=60)

    def call(self, name: str, **kw: Any) -> Any:
        assert self.api is not None
        return self.api.call(name, **kw)

    def register(self, device_id: str, profile: str, groups: list[str]) -> None:
        key = base64.b64encode(raw_public(device_key(SEED, device_id).public_key())).decode()
        self.call("register_device", body={"device_id": device_id, "profile": profile, "public_key": key,
                                           "groups": groups, "broker_password": False})

    def fleet(self, ids: list[str], profile: str, **settings: Any) -> SimFleet:
        trust = TrustAnchor.of(load_signing_key(ServerConfig(home=self.home).paths).public_key())
        sim = SimFleet(ids, broker=BrokerTarget(self.broker.host, self.broker.port), trust=trust,
                       settings=SimSettings(profile=profile, telemetry_s=2.0, **settings), seed=SEED, loops=1)
        self.sims.append(sim.start())
        return sim

    def deploy(self, target: str, ref: str, **kw: Any) -> str:
        body = {"model": ref, "target": target, **kw}
        return str(self.call("deploy", body=body)["deployment_id"])

    def status(self, dep: str) -> dict[str, Any]:
        detail: dict[str, Any] = self.call("get_deployment", path={"deployment_id": dep})
        return detail

    def run(self) -> str:
        self.prepare()
        self.start_server()
        for d in PIS:
            self.register(d, PI, ["demo", "pi"])
        for d in ORINS:
            self.register(d, ORIN, ["demo", "orin"])
        self.register(NEVER_SEEN, PI, ["demo", "pi"])
        self.fleet(PIS, PI, latency_ms=3.0)
        self.fleet([*ORINS, NEWCOMER], ORIN, fail_versions=frozenset({2}), latency_ms=6.0)
        wait("the devices online", lambda: sum(d["online"] for d in self.call("list_devices")) >= len(PIS + ORINS))
        log("v1 to every device")
        v1 = self.deploy("group:demo", "digits:1", canary_percent=10, wave_percent=50, probation_s=1)
        wait("v1 rollout", lambda: self.status(v1)["status"] in ("completed", "halted", "rolled_back"), 180)
        log("v2 to the Jetsons (fails its health check there)")
        bad = self.deploy("group:orin", "digits:2", canary_percent=25, wave_percent=100, probation_s=1,
                          max_failures_percent=0)
        wait("v2 on the Jetsons to stop", lambda: self.status(bad)["status"] in ("rolled_back", "halted"), 180)
        log("v2 to the Pis, with a long probation: it stays in progress")
        live = self.deploy("group:pi", "digits:2", canary_percent=25, wave_percent=40, probation_s=600,
                           max_failures_percent=20)
        wait("the canary in probation", lambda: any(
            d["state"] == "probation" for d in self.status(live)["devices"]), 180)
        time.sleep(30)  # a few more telemetry buckets (5 s each) for the charts
        return live

    def close(self) -> None:
        for sim in self.sims:
            sim.stop()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()


def shoot(demo: Demo, live: str, out: Path) -> list[Path]:
    pages = [
        ("overview", "/ui/"),
        ("devices", "/ui/devices?sort=p95&dir=desc"),
        ("device", f"/ui/devices/{PIS[0]}"),
        ("deployments", "/ui/deployments"),
        ("deployment", f"/ui/deployments/{live}"),
        ("models", "/ui/models"),
        ("model", "/ui/models/digits/2"),
        ("enrollment", "/ui/enrollment"),
        ("audit", "/ui/audit?limit=14"),
    ]
    written = []
    with Browser(width=1280, height=900) as b:
        b.login(demo.url, demo.token)
        for name, path in pages:
            b.driver.set_window_size(1280, 900)
            b.get(demo.url + path)
            b.wait(lambda: b.css("#live-state").get_attribute("class") == "live-dot on", 10, "the live stream")
            target = out / f"{name}.png"
            b.screenshot(target, max_height=1500)
            written.append(target)
            log(f"{target} ({target.stat().st_size // 1024} KB)")
    with Browser(width=500, height=844) as b:  # a phone-sized screen (390 CSS pixels, emulated)
        b.login(demo.url, demo.token)
        for name, path in (("phone-overview", "/ui/"), ("phone-deployment", f"/ui/deployments/{live}")):
            b.get(demo.url + path)
            height = int(b.driver.execute_script("return document.documentElement.scrollHeight"))
            b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": 390, "height": min(height, 1700), "deviceScaleFactor": 1, "mobile": True})
            height = int(b.driver.execute_script("return document.documentElement.scrollHeight"))
            b.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": 390, "height": min(height, 1700), "deviceScaleFactor": 1, "mobile": True})
            target = out / f"{name}.png"
            b.screenshot(target, full_height=False)
            written.append(target)
            log(f"{target} ({target.stat().st_size // 1024} KB)")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the temporary fleet home (path printed)")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-screens-"))
    try:
        with MosquittoBroker(workdir=work / "mosquitto") as broker:
            demo = Demo(work, broker)
            try:
                live = demo.run()
                shoot(demo, live, args.outdir)
            finally:
                demo.close()
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
