#!/usr/bin/env python3
"""The whole edgefleet loop on one machine, told as a story (run it through ``scripts/demo``).

An MQTT broker, the server on SQLite in a temporary home, and three real agent processes that play an
x86 gateway, a Raspberry Pi 5 and a Jetson Orin Nano (all three run here, on this CPU). The operator's
side is the real ``edgefleet`` command line, run as subprocesses exactly as a person would type it; the
devices are real ``edgefleet-agent`` processes. The story: register the devices by their keys, a real model
(the digits CNN), build a variant per profile, deploy v1, deploy v2 as a canary followed by waves, watch
the fleet, ask each device's local inference API for an answer, roll back, confirm, and clean up.

    scripts/demo.py [--quick] [--broker auto|mosquitto|amqtt] [--keep]

Every process it starts runs in its own process group; all of them are stopped when the story ends,
when a step fails, and on Ctrl-C, SIGINT, SIGTERM or SIGHUP (exit status 130 or 143, "interrupted").
Exit status: 0 when every check of the story held. A test hook: ``EDGEFLEET_DEMO_PAUSE_AT_STEP=N`` with
``EDGEFLEET_DEMO_BARRIER=PATH`` pauses at the start of step N (creating ``PATH.reached``) until PATH exists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent.runtime.procs import process_alive  # noqa: E402
from scripts.demo_procs import DemoError, Processes, demo_pids, tail  # noqa: E402

console = Console(highlight=False)
if not console.is_terminal:
    console.width = max(120, int(os.environ.get("COLUMNS", "0") or 0))

MODEL = "digits"
GROUP = "demo"
#: (device id, profile): three different boards; all of them run here, on this machine's CPU.
DEVICES = (
    ("gateway-1", "x86-64-avx2"),
    ("pi5-1", "raspberry-pi-5"),
    ("orin-1", "jetson-orin-nano"),
)
STEPS = 14


class Interrupted(Exception):
    """SIGTERM/SIGHUP (Ctrl-C arrives as KeyboardInterrupt)."""


@dataclass(frozen=True)
class Timing:
    """How long each phase takes in this mode (--quick shortens the waits, not the loop)."""

    probation_s: float
    telemetry_s: float
    rollback_timeout_s: float  # `edgefleet rollback --timeout`: how long the operator gives devices to confirm
    samples: int


FULL = Timing(probation_s=3.0, telemetry_s=2.0, rollback_timeout_s=300.0, samples=8)
QUICK = Timing(probation_s=1.0, telemetry_s=1.0, rollback_timeout_s=300.0, samples=4)


# -- test hook ----------------------------------------------------------------------------------------------


def pause_for_test(step: int) -> None:
    """The test hook in the module docstring: hold step ``step`` on a barrier file (deterministic Ctrl-C tests)."""
    barrier = os.environ.get("EDGEFLEET_DEMO_BARRIER")
    if not barrier or os.environ.get("EDGEFLEET_DEMO_PAUSE_AT_STEP") != str(step):
        return
    Path(f"{barrier}.reached").touch()
    while not Path(barrier).exists():
        time.sleep(0.05)


def free_port() -> int:
    from server.broker import free_port as _free  # noqa: PLC0415

    return _free()


# -- the embedded broker ----------------------------------------------------------------------------------


def run_amqtt(port: int) -> int:
    """``--run-amqtt PORT``: an amqtt broker on 127.0.0.1 (anonymous, loopback only) until SIGTERM."""
    import asyncio  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from amqtt.broker import Broker  # noqa: PLC0415

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 64}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        print(f"amqtt broker listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())
    return 0


# -- the story ----------------------------------------------------------------------------------------------


@dataclass
class Demo:
    args: argparse.Namespace
    work: Path
    procs: Processes
    timing: Timing
    env: dict[str, str] = field(default_factory=dict)
    times: list[tuple[str, float]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    step_no: int = 0

    @property
    def home(self) -> Path:
        return self.work / "server"

    # -- narration ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, title: str, why: str) -> Iterator[None]:
        self.step_no += 1
        console.print()
        console.rule(f"[bold]Step {self.step_no}/{STEPS}: {title}", align="left")
        console.print(f"[italic dim]why: {why}[/]")
        start = time.monotonic()
        pause_for_test(self.step_no)
        yield
        self.procs.check()
        elapsed = time.monotonic() - start
        self.times.append((title, elapsed))
        console.print(f"[dim]({elapsed:.1f}s)[/]")

    def say(self, text: str) -> None:
        console.print(text)

    # -- running commands ---------------------------------------------------------------------------------

    def _argv(self, tool: str, args: Sequence[str]) -> list[str]:
        exe = Path(sys.executable).parent / tool
        if exe.exists():
            return [str(exe), *args]
        return [sys.executable, "-m", "server" if tool == "edgefleet" else "agent", *args]

    def run(self, tool: str, *args: str, show: bool = True, capture: bool = False, check: bool = True,
            live: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``edgefleet``/``edgefleet-agent`` as the operator would; print the command unless hidden. It
        runs to its end, however slow the machine (``Processes.run``), and fails at once if a child exits."""
        if show:
            console.print(f"[bold cyan]$ {tool} {shlex.join(args)}[/]")
        proc = self.procs.run(self._argv(tool, args), env=self.env, cwd=self.work, capture=capture,
                              what=f"{tool} {shlex.join(args)}")
        if live and not console.is_terminal:
            print(flush=True)  # off a terminal, a live display (--watch, rollback) ends without a newline
        if check and proc.returncode != 0:
            detail = (proc.stdout or "") + (proc.stderr or "") if capture else ""
            raise DemoError(f"`{tool} {shlex.join(args)}` exited with status {proc.returncode}\n{detail}".rstrip())
        return proc

    def edgefleet_json(self, *args: str) -> Any:
        out = self.run("edgefleet", *args, "--json", show=False, capture=True).stdout
        try:
            return json.loads(out)
        except ValueError as exc:
            raise DemoError(f"`edgefleet {shlex.join(args)} --json` printed no JSON: {out[:500]!r}") from exc

    # -- 1. broker --------------------------------------------------------------------------------------------

    def start_broker(self) -> None:
        from server.broker import current_user, find_mosquitto, listens, render_config  # noqa: PLC0415

        choice = self.args.broker
        mosquitto: str | None = None
        with contextlib.suppress(Exception):
            mosquitto = find_mosquitto()
        if choice == "mosquitto" and mosquitto is None:
            raise DemoError("--broker mosquitto: mosquitto is not installed (Debian: apt-get install mosquitto)")
        use_mosquitto = choice == "mosquitto" or (choice == "auto" and mosquitto is not None)
        broker_dir = self.work / "broker"
        broker_dir.mkdir()
        # mosquitto 2.0 cannot pick a free port itself, so one is picked here; if another program takes it
        # before the broker binds it, the broker exits ("Address already in use") and another is picked
        for attempt in range(1, 6):
            port = free_port()
            offset = (self.work / "logs" / "broker.log").stat().st_size if attempt > 1 else 0
            if use_mosquitto:
                assert mosquitto is not None
                conf = broker_dir / "mosquitto.conf"
                conf.write_text(render_config(port=port, host="127.0.0.1", workdir=broker_dir,
                                               run_as=current_user(), persistence=False))
                child = self.procs.start("broker", [mosquitto, "-c", str(conf)], self.env)
                label = f"mosquitto ({mosquitto})"
            else:
                child = self.procs.start("broker", [sys.executable, str(Path(__file__).resolve()), "--run-amqtt",
                                                    str(port), "--work", str(self.work)], self.env)
                label = "amqtt (embedded, pure Python)"
            pid = child.proc.pid
            try:  # until the broker itself listens there (a connection would also reach a port's thief)
                self.procs.wait_for(f"the broker to listen on 127.0.0.1:{port}",
                                    lambda: listens(pid, "127.0.0.1", port))  # noqa: B023 (called in the loop)
                break
            except DemoError:
                lost = "address already in use" in child.log.read_bytes()[offset:].decode(errors="replace").lower()
                if child.proc.poll() is None or not lost or attempt == 5:
                    raise
                self.procs.forget(child)
        self.facts["broker"] = label
        self.facts["broker_port"] = port
        self.say(f"broker: [bold]{label}[/] on 127.0.0.1:{port}, pid {child.proc.pid} "
                 "(loopback, anonymous; production uses TLS and per-device logins: docs/operations.md)")

    # -- 2. server ------------------------------------------------------------------------------------------

    def start_server(self) -> None:
        self.home.mkdir()
        (self.home / "server.toml").write_text(
            "# written by scripts/demo: a private server for this run\n"
            "[broker]\n"
            f'url = "mqtt://127.0.0.1:{self.facts["broker_port"]}"\n\n'
            "[api]\n"
            'host = "127.0.0.1"\n'
            "port = 0\n\n"
            "[publisher]\n"
            "chunk_window_s = 0.2\n\n"
            "[rollout]\n"
            "tick_s = 0.2\n"
            "device_timeout_s = 120\n\n"
            "[retention]\n"
            f"telemetry_bucket_s = {self.timing.telemetry_s}\n"
        )
        self.say(f"export EDGEFLEET_HOME={self.home}   [dim](the server's state: SQLite registry, keys, builds)[/]")
        self.run("edgefleet", "keys", "init")
        argv = self._argv("edgefleet", ["--home", str(self.home), "server", "run"])
        console.print(f"[bold cyan]$ edgefleet --home {self.home} server run &[/]")
        child = self.procs.start("server", argv, self.env)

        def ready() -> dict[str, Any] | None:
            for line in child.log.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"ready"' in line:
                    with contextlib.suppress(ValueError):
                        info: dict[str, Any] = json.loads(line)
                        if info.get("event") == "ready":
                            return info
            return None

        info = self.procs.wait_for("the server to start", ready)
        self.facts["api_url"] = info["api_url"]
        self.say(f"server: pid {child.proc.pid}, API {info['api_url']}, registry {self.home / 'registry.db'}")

    # -- 3/4. devices --------------------------------------------------------------------------------------------

    def register_devices(self) -> None:
        """``edgefleet-agent init`` on each board, then the operator registers its public key."""
        self.facts["devices"] = {}
        for device_id, profile in DEVICES:
            rel = Path("devices") / device_id
            (self.work / rel).mkdir(parents=True)
            out = self.run(
                "edgefleet-agent", "init", "--device-id", device_id, "--profile", profile,
                "--server-key", "server/keys/signing.pub", "--broker", f"127.0.0.1:{self.facts['broker_port']}",
                "--no-tls", "--config", str(rel / "agent.toml"), "--store-dir", "store", "--http-port", "0",
                capture=True,
            ).stdout
            found = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
            key, fp = found.get("device public key", "").strip(), found.get("fingerprint", "").strip()
            if not key or not fp:
                raise DemoError(f"edgefleet-agent init printed no public key or fingerprint:\n{out}")
            console.print(f"  {device_id}: public key {key}, fingerprint [bold]{fp}[/]")
            tune_agent_config(self.work / rel / "agent.toml", self.timing)
            self.facts["devices"][device_id] = {"profile": profile, "fingerprint": fp, "public_key": key,
                                                "config": str(rel / "agent.toml")}
        self.say("[dim]the operator registers each key (this demo's broker is anonymous on loopback, so no MQTT "
                 "logins; a device can also ask to join by itself: `edgefleet devices pending` / `approve`)[/]")
        for device_id, d in self.facts["devices"].items():
            self.run("edgefleet", "devices", "add", device_id, "--profile", d["profile"], "--public-key",
                     d["public_key"], "--group", GROUP, "--no-broker-password")

    def start_agents(self) -> None:
        for device_id, d in self.facts["devices"].items():
            d["pid"] = self._start_agent(device_id, d)
        console.print("[bold cyan]$ edgefleet-agent run --config devices/ID/agent.toml &[/]  [dim](on each device)[/]")
        online: list[str] = []

        def all_online() -> bool:
            rows = self.status_rows()
            online[:] = [i for i, _ in DEVICES if rows.get(i, {}).get("online")]
            return len(online) == len(DEVICES)

        self.procs.wait_for("all devices online", all_online, progress=lambda: len(online))
        table = Table("device", "profile", "plays", "pid", "local inference API", box=box.SIMPLE_HEAD)
        plays = {"x86-64-avx2": "x86 gateway (AVX2)", "raspberry-pi-5": "Raspberry Pi 5",
                 "jetson-orin-nano": "Jetson Orin Nano"}
        for device_id, d in self.facts["devices"].items():
            table.add_row(device_id, d["profile"], plays.get(d["profile"], d["profile"]), str(d["pid"]),
                          f"http://127.0.0.1:{d['http_port']}")
        console.print(table)
        self.say("[yellow]all three agents run here, on this machine's CPU:[/] the profile decides which variant a "
                 "device gets, but no Pi or Jetson hardware is involved (the Jetson profile's TensorRT and CUDA "
                 "providers are absent here, so ONNX Runtime uses its CPU provider).")

    def status_rows(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in self.edgefleet_json("status")}

    def _start_agent(self, device_id: str, d: dict[str, Any]) -> int:
        """Start one agent and wait until its local API answers. ``http port = 0`` (set at init): the agent
        binds a free port itself and writes it to its store's status.json, so no other program can take it
        between a pick and the bind."""
        config = self.work / d["config"]
        argv = self._argv("edgefleet-agent", ["run", "--config", str(config)])
        child = self.procs.start(device_id, argv, {**self.env, "OMP_NUM_THREADS": "1"})
        status_path = config.parent / "store" / "status.json"

        def bound() -> int | None:
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                status = json.loads(status_path.read_text())
                if status.get("pid") == child.proc.pid and status.get("http"):
                    return int(urlsplit(str(status["http"])).port or 0) or None
            return None

        d["http_port"] = self.procs.wait_for(f"{device_id}'s local API port in {status_path}", bound)

        def live() -> bool:
            with contextlib.suppress(DemoError):
                get_json(f"http://127.0.0.1:{d['http_port']}/v2/health/live", timeout=5.0)
                return True
            return False

        self.procs.wait_for(f"{device_id}'s local API to answer", live)
        return child.proc.pid

    # -- 5/6. model and builds ------------------------------------------------------------------------------------

    def add_model(self, version: int) -> None:
        source = model_dir()
        path = source / "model.onnx" if version == 1 else make_v2(source / "model.onnx", self.work / "digits-v2.onnx")
        self.run("edgefleet", "model", "add", str(path), "--name", MODEL,
                 "--calibration", str(source / "calibration.npz"), "--evaluation", str(source / "evaluation.npz"))

    def build(self, version: int) -> None:
        """Every profile in the full story; in --quick, only the three profiles this fleet has."""
        profiles = ",".join(p for _, p in DEVICES) if self.args.quick else "all"
        self.run("edgefleet", "build", f"{MODEL}:{version}", "--profile", profiles)

    # -- 7/11. deployments --------------------------------------------------------------------------------------

    def deploy(self, version: int, *, canary: int, wave: int) -> dict[str, Any]:
        args = ["deploy", f"{MODEL}:{version}", "--to", f"group:{GROUP}", "--canary", f"{canary}%",
                "--wave", f"{wave}%", "--probation", f"{self.timing.probation_s:g}", "--watch"]
        start = time.monotonic()
        proc = self.run("edgefleet", *args, check=False, live=True)
        elapsed = time.monotonic() - start
        deps = [d for d in self.edgefleet_json("deployments", "list", "--limit", "5")
                if d["model"] == MODEL and d["version"] == version]
        if not deps:
            raise DemoError(f"no deployment of {MODEL}:{version} was recorded")
        detail: dict[str, Any] = self.edgefleet_json("deployments", "show", deps[0]["deployment_id"])
        detail["elapsed_s"] = elapsed
        if proc.returncode != 0 or detail["status"] != "completed":
            self.run("edgefleet", "deployments", "show", detail["deployment_id"], "--devices", "--events",
                     check=False)
            raise DemoError(f"deployment of {MODEL}:{version} ended {detail['status']} "
                            f"(edgefleet deploy exited {proc.returncode})")
        return detail

    def show_status(self, version: int) -> None:
        """Wait until every device reports ``version`` with fresh telemetry, then show the operator's table."""
        there: list[str] = []

        def reported() -> bool:
            rows = self.status_rows()
            there[:] = [i for i, _ in DEVICES if rows.get(i, {}).get("active_model") == MODEL
                        and rows[i].get("active_version") == version and rows[i].get("cpu_percent") is not None]
            return len(there) == len(DEVICES)

        self.procs.wait_for(f"every device to report {MODEL}:{version} with telemetry", reported,
                            progress=lambda: len(there))
        self.run("edgefleet", "status")

    # -- 9. local inference ---------------------------------------------------------------------------------------

    def infer_all(self, version: int) -> None:
        import numpy as np  # noqa: PLC0415

        data = np.load(model_dir() / "evaluation.npz")
        n = self.timing.samples
        pixels = data["pixels"][:n].astype(np.float32)
        labels = [int(x) for x in data["labels"][:n]]
        body = {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32",
                            "data": pixels.ravel().tolist()}]}
        d0 = next(iter(self.facts["devices"].values()))
        console.print(f"[bold cyan]$ curl -s -X POST http://127.0.0.1:{d0['http_port']}/v2/models/{MODEL}/infer "
                      f"-d '{{\"inputs\": [{{\"name\": \"pixels\", \"shape\": {list(pixels.shape)}, "
                      "\"datatype\": \"FP32\", \"data\": [...]}]}'[/]  [dim](and the same on each device)[/]")
        console.print(f"the {n} evaluation images show the digits [bold]{' '.join(map(str, labels))}[/] "
                      "(held-out data the model never trained on)")
        table = Table("device", "profile", "answered by", "variant", "runs on", "digits read", "correct", "latency",
                      box=box.SIMPLE_HEAD)
        for column in table.columns[:5]:
            column.no_wrap = True
        results = {}
        for device_id, d in self.facts["devices"].items():
            start = time.perf_counter()
            reply = post_json(f"http://127.0.0.1:{d['http_port']}/v2/models/{MODEL}/infer", body)
            ms = (time.perf_counter() - start) * 1000
            out = next(o for o in reply["outputs"] if o["name"] == "logits")
            logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            predicted = [int(x) for x in logits.argmax(axis=1)]
            correct = sum(p == t for p, t in zip(predicted, labels, strict=True))
            served = int(reply.get("model_version", -1))
            meta = get_json(f"http://127.0.0.1:{d['http_port']}/v2/models/{MODEL}").get("parameters", {})
            providers = ", ".join(p.removesuffix("ExecutionProvider") for p in meta.get("providers", [])) or "-"
            results[device_id] = {"version": served, "correct": correct, "n": n, "variant": meta.get("variant")}
            table.add_row(device_id, d["profile"], f"{reply['model_name']} v{served}", str(meta.get("variant") or "-"),
                          providers, " ".join(map(str, predicted)), f"{correct}/{n}", f"{ms:.1f} ms")
            if served != version:
                raise DemoError(f"{device_id} answered with {MODEL} v{served}, expected v{version}")
        console.print(table)
        self.facts[f"inference_v{version}"] = results

    # -- 13. rollback -------------------------------------------------------------------------------------------

    def rollback(self, version: int) -> float:
        start = time.monotonic()
        proc = self.run("edgefleet", "rollback", "--to", f"group:{GROUP}", "--version", str(version), "--timeout",
                        f"{self.timing.rollback_timeout_s:g}", check=False, live=True)
        elapsed = time.monotonic() - start
        if proc.returncode != 0:
            raise DemoError(f"edgefleet rollback exited {proc.returncode}: not every device confirmed")
        return elapsed


# -- helpers ------------------------------------------------------------------------------------------------


def model_dir() -> Path:
    cache = Path(os.environ.get("EDGEFLEET_CACHE") or "~/.cache/edgefleet").expanduser()
    d = cache / "models" / MODEL
    if not (d / "model.onnx").exists():
        raise DemoError(f"the digits model is not in {d}; run scripts/fetch_models.py --only digits "
                        "(scripts/demo does it for you)")
    return d


def make_v2(v1: Path, out: Path) -> Path:
    """Version 2: the same trained network, re-exported with new metadata (a retrained model would go here).

    Different bytes and a new version number, so the rollout, download and hot swap are all real; the
    answers stay the same, which is what lets the story show an honest 'the model still answers'.
    """
    import onnx  # noqa: PLC0415

    model = onnx.load(str(v1))
    model.doc_string = "digits CNN, release 2 (scripts/demo)"
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgefleet.demo.release", "2"
    onnx.save(model, str(out))
    return out


def tune_agent_config(path: Path, timing: Timing) -> None:
    """Demo-speed settings in the config ``edgefleet-agent init`` wrote; each is a documented knob."""
    set_toml(path, {
        "telemetry": {"interval_s": timing.telemetry_s},
        "transfer": {"chunk_timeout_s": 2.0, "progress_interval_s": 0.5},
        "lifecycle": {"probation_check_s": 0.2},
        "broker": {"reconnect_min_s": 0.5, "reconnect_max_s": 2.0},
        "inference": {"intra_op_threads": 1},
        "log": {"format": "text"},
    })


def set_toml(path: Path, settings: dict[str, dict[str, Any]]) -> None:
    """Set ``[section] key = value`` lines in a flat TOML file (sections and keys are added when missing)."""
    lines = path.read_text().splitlines()
    for section, values in settings.items():
        header = f"[{section}]"
        if header not in lines:
            lines += ["", header]
        start = lines.index(header) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        for key, value in values.items():
            text = f"{key} = {json.dumps(value)}"
            hit = next((i for i in range(start, end) if lines[i].split("=")[0].strip() == key), None)
            if hit is None:
                lines.insert(end, text)
                end += 1
            else:
                lines[hit] = text
    path.write_text("\n".join(lines) + "\n")


def get_json(url: str, timeout: float = 10.0) -> Any:
    return post_json(url, None, timeout)


def post_json(url: str, body: Any, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else {}
    except urllib.error.HTTPError as exc:
        raise DemoError(f"{request.get_method()} {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc
    except (OSError, ValueError) as exc:
        raise DemoError(f"{request.get_method()} {url}: {exc}") from exc


def wave_text(detail: dict[str, Any]) -> str:
    parts = []
    for w in detail.get("waves", []):
        if detail["canary_percent"] > 0:
            label = "canary" if w["wave"] == 0 else f"wave {w['wave']}"
        else:
            label = f"wave {w['wave'] + 1}"
        parts.append(f"{label} {w['committed']}/{w['size']}")
    return ", ".join(parts)


# -- main ---------------------------------------------------------------------------------------------------


def story(demo: Demo) -> None:
    with demo.step("start an MQTT broker",
                   "devices never talk to the server directly: everything goes through a broker they all reach"):
        demo.start_broker()
    with demo.step("start the server (SQLite registry in a temporary home)",
                   "the server signs every model and command with its own Ed25519 key; devices trust only that key"):
        demo.start_server()
    with demo.step("give three devices an identity, and register their keys",
                   "each board makes its own key pair (the private key never leaves it); the server accepts "
                   "messages only from keys the operator registered"):
        demo.register_devices()
    with demo.step("start the three agents",
                   "each agent keeps one MQTT session, serves its model locally and reports state and telemetry"):
        demo.start_agents()
    with demo.step("register a real model: the digits CNN, version 1",
                   "the model owner hands over the fp32 model, calibration data and held-out evaluation data"):
        demo.add_model(1)
    with demo.step("build a variant for every profile",
                   "each board gets the smallest, fastest variant that still passes the accuracy gate"):
        demo.build(1)
    with demo.step("deploy v1 to the whole group at once",
                   "the first install has no earlier version to protect, so one wave is enough"):
        v1 = demo.deploy(1, canary=0, wave=100)
        demo.facts["v1"] = v1
    with demo.step("look at the fleet",
                   "one table shows what every device runs, and how it is doing (latency, CPU, memory)"):
        demo.show_status(1)
    with demo.step("ask each device's local inference API",
                   "applications on a board call the model on 127.0.0.1 (Open Inference Protocol); no cloud involved"):
        demo.infer_all(1)
    with demo.step("register and build version 2",
                   "a new release goes through the same pipeline and the same accuracy gate"):
        demo.add_model(2)
        demo.build(2)
    with demo.step("deploy v2: a canary first, then waves",
                   "a bad release hurts only the canary; each wave waits until the previous one committed healthy"):
        v2 = demo.deploy(2, canary=33, wave=33)
        demo.facts["v2"] = v2
    with demo.step("watch v2 serve",
                   "the swap happened under a running service: new requests already get v2"):
        demo.show_status(2)
        demo.infer_all(2)
    with demo.step("roll the group back to v1",
                   "the devices keep earlier versions, so going back needs no download; each one confirms"):
        demo.facts["rollback_s"] = demo.rollback(1)
    with demo.step("confirm the fleet is back on v1",
                   "the operator trusts what the devices report, not what was sent"):
        demo.show_status(1)
        demo.infer_all(1)
        demo.facts["rolled_back"] = demo.status_rows()


def summary(demo: Demo, stopped: list[tuple[str, int, int | None]], leftover: list[int], total: float) -> None:
    f = demo.facts
    n = len(DEVICES)
    console.print()
    console.rule("[bold]Summary", align="left")
    table = Table("step", "took", box=box.SIMPLE_HEAD)
    for title, seconds in demo.times:
        table.add_row(title, f"{seconds:.1f}s")
    console.print(table)
    lines = [f"broker: {f.get('broker')}"]
    v1, v2 = f.get("v1"), f.get("v2")
    if v1:
        ok = sum(1 for r in v1["devices"] if r["state"] == "committed")
        lines.append(f"v1: committed on {ok}/{n} devices ({v1['deployment_id']}, {v1['elapsed_s']:.1f}s; "
                     f"{wave_text(v1)})")
    if v2:
        ok = sum(1 for r in v2["devices"] if r["state"] == "committed")
        waves = max(0, len(v2.get("waves", [])) - 1)
        lines.append(f"v2: canary then {waves} wave(s) completed on {ok}/{n} devices ({v2['deployment_id']}, "
                     f"{v2['elapsed_s']:.1f}s; {wave_text(v2)})")
    rows = f.get("rolled_back")
    if rows is not None:
        back = sum(1 for d, _ in DEVICES if rows.get(d, {}).get("active_version") == 1)
        lines.append(f"rollback: {back}/{n} devices confirmed back on v1 ({f.get('rollback_s', 0):.1f}s, no download)")
    for key in ("inference_v1", "inference_v2"):
        if key in f:
            correct = sum(r["correct"] for r in f[key].values())
            total_n = sum(r["n"] for r in f[key].values())
            lines.append(f"local inference {key[-2:]}: {correct}/{total_n} evaluation digits right across {n} devices")
    lines.append(f"processes: started {len(stopped)} (broker, server, {n} agents), stopped {len(stopped)}, "
                 f"left running {len(leftover)}")
    lines.append(f"total: {total:.1f}s")
    for line in lines:
        console.print(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="The whole edgefleet loop on this machine: broker, server, three agents, a real model built "
                    "per profile, v1, a v2 canary + waves, live status, local inference, rollback, summary.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="the same loop with shorter probation, fewer samples, and builds for the fleet's three "
                        "profiles only (CI smoke test)")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                        help="auto (default): mosquitto when installed, else the embedded amqtt broker")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, registry, stores)")
    parser.add_argument("--run-amqtt", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)  # only marks the amqtt child's command line
    args = parser.parse_args(argv)
    if args.run_amqtt:
        return run_amqtt(args.run_amqtt)

    def on_signal(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    # SIGINT too, explicitly: started in the background of a script (as scripts/demo starts it), a process
    # inherits SIGINT *ignored*, and so would the operator commands it runs; a handler resets that for them
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # our own process group: the operator commands we run join it, so scripts/demo can kill it whole
    # (with the agents', server's and broker's groups) even if this process dies without cleaning up
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    (work / "logs").mkdir()
    pidfile = Path(os.environ["EDGEFLEET_DEMO_PIDFILE"]) if os.environ.get("EDGEFLEET_DEMO_PIDFILE") else None
    procs = Processes(work, work / "logs", pidfile)
    env = {**os.environ, "EDGEFLEET_HOME": str(work / "server"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    for name in ("EDGEFLEET_SERVER", "EDGEFLEET_TOKEN"):  # the private server of this run, its own token
        env.pop(name, None)
    env.setdefault("COLUMNS", str(max(120, shutil.get_terminal_size((120, 40)).columns)))
    demo = Demo(args, work, procs, QUICK if args.quick else FULL, env)
    console.print(f"[bold]edgefleet demo[/]{' (quick)' if args.quick else ''}: the whole loop on this machine, "
                  f"in {STEPS} steps")
    console.print(f"demo directory: {work}  (logs in {work / 'logs'})")
    rc = 1
    stopped: list[tuple[str, int, int | None]] = []
    leftover: list[int] = []
    try:
        story(demo)
        rc = 0
    except DemoError as exc:
        console.print(f"\n[bold red]the demo stopped at step {demo.step_no}:[/] {exc}")
    except (KeyboardInterrupt, Interrupted) as exc:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        console.print(f"\n[yellow]interrupted ({exc or 'Ctrl-C'}) at step {demo.step_no}; stopping everything[/]")
        rc = 130
    finally:
        if rc != 0:
            for c in procs.children:
                console.print(f"[dim]--- last lines of {c.log.name}[/]")
                console.print(tail(c.log, 12), markup=False)
        with contextlib.suppress(KeyboardInterrupt, Interrupted):
            stopped = procs.stop_all()
        leftover = [pid for _, pid, _ in stopped if process_alive(pid)]
        leftover += demo_pids(work)
    if rc == 0:
        summary(demo, stopped, leftover, time.monotonic() - started)
        if leftover:
            console.print(f"[bold red]processes still running: {leftover}[/]")
            rc = 1
    if args.keep or rc != 0:
        console.print(f"kept {work} for inspection")
    else:
        shutil.rmtree(work, ignore_errors=True)
    console.print("[bold green]demo finished: every check held[/]" if rc == 0 else f"[red]demo failed ({rc})[/]")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
