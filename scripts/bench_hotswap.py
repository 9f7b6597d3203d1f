#!/usr/bin/env python3
"""Hot swap under load: closed-loop clients on the local HTTP API while the served version keeps changing.

    scripts/bench_hotswap.py [--quick] [--json PATH] [--clients N] [--swaps N] [--model NAME|PATH]
                             [--driver agent|host]

Who swaps:
  * ``--driver agent`` (the default where the full agent is in the checkout): mosquitto, a stand-in fleet
    server that signs desired states and commands (tests/support), and a real ``edgefleet-agent`` process.
    Versions are deployed (download, verify, warm-up, switch, probation, commit) and rolled back by
    signed ``rollback`` commands over MQTT. Rollback latency comes from the agent's own log: the line
    for the received command -> the host's line for the switch (1 ms resolution). Each rollback follows a
    commit, so the agent (``[models] warm_standby = true``, the default) switches to the previous version
    kept loaded as a warm standby; the same-run baseline is a second agent process with
    ``warm_standby = false`` doing the same cycles under the same load, whose rollbacks load the previous
    version from disk (``rollback_cold_*``; skip it with ``--no-cold-baseline``).
  * ``--driver host``: the serving half alone, a process with ModelHost + the Open Inference Protocol
    server, driven over a line protocol on its stdin: ``deploy`` (load beside, health check, switch; the
    old session drains and is released), ``deploy-keep`` (the same, keeping the old version loaded on
    standby, as the lifecycle does during probation), ``rollback-cold`` (the previous version from disk:
    load, health check, switch) and ``rollback-warm`` (switch back to the standby version).

Load: C client threads in this process, each on its own keep-alive connection, sending the same real
request in a closed loop, through a steady phase (no swaps) and a swap phase (deploys and rollbacks
alternating). Baseline, in the same run: the same request straight to an ``onnxruntime.InferenceSession``
(and through ModelHost in-process, to split HTTP from host costs).

Reported (JSON keys): requests, failed, swaps, p50/p99 steady and during swaps (a request is "during a
swap" when it overlaps the interval from sending the deploy/rollback to 100 ms after its completion: the
old session released, or the commit event / the command's result), rollback latency (command received -> previous
version serving; p50/p95), the first answer from the previous version as the clients saw it, and the
HTTP overhead per request beside the raw session. Targets: failed == 0, p99_swap <= 2x p99_steady,
rollback p95 <= 1000 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (the real models) lives beside the installed packages

from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec, TensorSpec  # noqa: E402
from agent.runtime.host import ModelHost  # noqa: E402
from agent.runtime.http import HttpConfig, InferenceHttpServer  # noqa: E402
from agent.runtime.inference import InferenceOptions  # noqa: E402
from server.broker import MosquittoBroker  # noqa: E402
from tests.support.models import NAMES, real_model  # noqa: E402
from tests.support.models.bad import identity_variant  # noqa: E402

# -- the serving process -------------------------------------------------------------------------


def serve_child() -> int:
    """Runs in the serving process: ModelHost + HTTP, commands on stdin, answers on stdout."""
    runtime = RuntimeSpec(format="onnx", runtime="onnxruntime")
    health = HealthSpec(inputs=(), outputs=(), latency_budget_ms=0.0, warmup_runs=3)
    host = ModelHost(InferenceOptions(intra_op_threads=1))
    server = InferenceHttpServer(host, HttpConfig(port=0)).start()
    print(f"ready {server.port}", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        received = time.monotonic()
        action, path, version = parts[0], Path(parts[1]), int(parts[2])
        try:
            standby = [m for m in host.loaded() if m.ref.version == version and m is not host.active]
            if action == "rollback-warm" and standby:
                model = standby[0]  # kept loaded and warm since the deploy: switch straight back
                loaded = checked = time.monotonic()
            else:
                model = host.load(path, ref=ModelRef("bench", version), runtime=runtime)
                loaded = time.monotonic()
                host.check(model, health)
                checked = time.monotonic()
            # a deploy that will be rolled back warm keeps the old version on standby (as during probation)
            previous = host.activate(model, keep_previous=action == "deploy-keep")
            active = time.monotonic()
            # the replaced session is released when its in-flight requests drain: wait for that
            while action != "deploy-keep" and previous is not None and previous in host.loaded():
                time.sleep(0.0005)
            released = time.monotonic()
            reply = {
                "ok": True,
                "action": action,
                "version": version,
                "received": received,
                "load_ms": (loaded - received) * 1e3,
                "check_ms": (checked - loaded) * 1e3,
                "switch_ms": (active - checked) * 1e3,
                "to_serving_ms": (active - received) * 1e3,
                "drain_ms": (released - active) * 1e3,
                "released": released,
            }
        except Exception as exc:
            reply = {"ok": False, "action": action, "error": repr(exc)}
        print(json.dumps(reply), flush=True)
    server.close()
    host.close()
    return 0


class ServingProcess:
    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "ready":
            raise RuntimeError(f"serving process did not start: {first}")
        self.port = int(first[1])

    def command(self, action: str, path: Path, version: int) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{action} {path} {version}\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline())
        if not reply.get("ok"):
            raise RuntimeError(f"{action} v{version} failed: {reply}")
        return reply

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# -- clients ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    start: float
    end: float
    ok: bool
    version: str


def resolve_model(spec: str) -> tuple[Path, dict[str, np.ndarray] | None]:
    """A shared real model by name (with one sample of its evaluation data) or an ONNX file by path."""
    if spec in NAMES:
        model = real_model(spec)
        if model.format != "onnx":
            raise SystemExit(f"{spec} is a {model.format} model; this benchmark serves ONNX models")
        data = model.load("evaluation", limit=1)
        return model.path, {t.name: data[t.name] for t in model.inputs}
    return Path(spec), None


def request_body(model_path: Path, sample: dict[str, np.ndarray] | None) -> tuple[bytes, dict[str, np.ndarray]]:
    """One request: the real sample when there is one, else probe inputs built from the model's inputs."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    inputs = []
    dtypes = {
        "tensor(float)": ("FP32", np.float32),
        "tensor(int64)": ("INT64", np.int64),
        "tensor(int32)": ("INT32", np.int32),
    }
    for arg in session.get_inputs():
        datatype, dtype = dtypes[arg.type]
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        if sample is not None:
            array = sample[arg.name].astype(dtype)
            shape = list(array.shape)
        elif dtype is np.float32:
            array = np.random.default_rng(0).random(shape, dtype=np.float32)
        else:
            array = np.ones(shape, dtype)
        feeds[arg.name] = array
        inputs.append({"name": arg.name, "shape": shape, "datatype": datatype, "data": array.ravel().tolist()})
    return json.dumps({"inputs": inputs}).encode(), feeds


def client_loop(port: int, path: str, body: bytes, stop: threading.Event, out: list[Sample]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    while not stop.is_set():
        start = time.monotonic()
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            ok = response.status == 200
            version = json.loads(payload).get("model_version", "?") if ok else f"HTTP {response.status}"
        except Exception as exc:
            ok, version = False, repr(exc)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out.append(Sample(start, time.monotonic(), ok, version))
    conn.close()


def run_clients(port: int, path: str, body: bytes, clients: int, duration: float, during: Any = None) -> list[Sample]:
    stop = threading.Event()
    buckets: list[list[Sample]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(port, path, body, stop, b)) for b in buckets]
    for t in threads:
        t.start()
    try:
        if during is not None:
            during()
        else:
            time.sleep(duration)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return [s for b in buckets for s in b]


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def ms(samples: list[Sample]) -> list[float]:
    return [(s.end - s.start) * 1e3 for s in samples if s.ok]


# -- the benchmark ---------------------------------------------------------------------------------


def build_models(model: Path, work: Path) -> tuple[Path, Path]:
    v1 = work / "v1.onnx"
    v1.write_bytes(model.read_bytes())
    return v1, identity_variant(model, work / "v2.onnx")


def sequential_baselines(
    v1: Path, feeds: dict[str, np.ndarray], port: int, path: str, body: bytes, n: int
) -> tuple[list[float], list[float], list[float]]:
    """One request at a time, interleaved so machine noise hits all three alike: straight to an
    ``onnxruntime.InferenceSession`` (the baseline), through ModelHost in-process, and over HTTP."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(v1), so, providers=["CPUExecutionProvider"])
    raw: list[float] = []
    hosted: list[float] = []
    over_http: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    with ModelHost(InferenceOptions(intra_op_threads=1)) as host:
        host.activate(
            host.load(v1, ref=ModelRef("bench", 1), runtime=RuntimeSpec(format="onnx", runtime="onnxruntime"))
        )
        for i in range(n + 5):  # the first rounds warm up all three paths
            start = time.monotonic()
            session.run(None, feeds)
            mid = time.monotonic()
            host.infer(feeds)
            end = time.monotonic()
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            done = time.monotonic()
            if response.status != 200:
                raise RuntimeError(f"baseline request answered {response.status}")
            if i >= 5:
                raw.append((mid - start) * 1e3)
                hosted.append((end - mid) * 1e3)
                over_http.append((done - end) * 1e3)
    conn.close()
    return raw, hosted, over_http


SWAP_TAIL_S = 0.1  # how long after a swap completes requests still count as "during the swap"


class HostDriver:
    """Swaps through the serving process's stdin: the serving half alone (ModelHost + HTTP)."""

    name = "serving process (ModelHost + HTTP), commands on stdin"

    def __init__(self, files: dict[int, Path], work: Path) -> None:
        self.files = files
        self.proc = ServingProcess()
        self.proc.command("deploy", files[1], 1)
        self.port = self.proc.port
        self.model = "bench"

    def swap(self, i: int) -> dict[str, Any]:
        warm = (i // 2) % 2 == 1  # pairs alternate: deploy + cold rollback, deploy-keep + warm rollback
        if i % 2 == 0:
            action, version = ("deploy-keep" if warm else "deploy"), 2
        else:
            action, version = ("rollback-warm" if warm else "rollback-cold"), 1
        sent = time.monotonic()
        reply = self.proc.command(action, self.files[version], version)
        return {**reply, "sent": sent, "done": reply["released"], "serving": str(version)}

    def finish(self, swaps: list[dict[str, Any]]) -> None:
        return None

    def close(self) -> None:
        self.proc.close()


class AgentDriver:
    """Swaps a real agent process: signed deploys and rollback commands over a real mosquitto broker.

    Rollback latency is the agent's own: from its log line for the received command to the host's
    log line for the switch (same process clock, 1 ms resolution).
    """

    name = "edgefleet-agent process: signed MQTT deploys and rollback commands"

    def __init__(
        self, files: dict[int, Path], work: Path, *, warm_standby: bool = True, compression: str = "lzma"
    ) -> None:
        # agent-core's half: present only in a checkout with the full agent (see agent_available)
        from tests.support.devices.agent_process import AgentProcess  # noqa: PLC0415
        from tests.support.servers.stub import FleetServer  # noqa: PLC0415

        self.files = files
        self.compression = compression
        self.broker = MosquittoBroker(workdir=work / "mosquitto").start()
        self.fleet = FleetServer(self.broker.host, self.broker.port)
        self.model = "bench"
        session = ort.InferenceSession(str(files[1]), providers=["CPUExecutionProvider"])
        self.health = HealthSpec(
            inputs=tuple(
                TensorSpec(a.name, _DTYPES[a.type][1].__name__, tuple(d if isinstance(d, int) else 1 for d in a.shape))
                for a in session.get_inputs()
            ),
            outputs=(),
            latency_budget_ms=0.0,
            probation_s=0.3,
            warmup_runs=3,
        )
        self.agent = AgentProcess.on(self.broker, self.fleet, work, "bench", {
            "lifecycle": {"probation_check_s": 0.05},
            "telemetry": {"interval_s": 5.0},
            "models": {"warm_standby": warm_standby},
        }).start()
        self.version = 1
        self._deploy(1)
        self.agent.wait_http_ready()
        self.port = self.agent.http_port

    def _deploy(self, version: int) -> None:
        mark = self.fleet.event_count(self.agent.device_id)
        self.fleet.deploy(
            self.agent.device_id,
            self.files[2 - version % 2].read_bytes(),
            ModelRef(self.model, version),
            runtime=RuntimeSpec(format="onnx", runtime="onnxruntime"),
            health=self.health,
            compression=self.compression,
        )
        event = self.fleet.wait_event(
            self.agent.device_id,
            lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed"),
            after=mark,
            timeout=120,
        )
        if event.kind != "lifecycle.committed":
            raise RuntimeError(f"deploy of v{version}: {event.kind} {event.message}")

    def swap(self, i: int) -> dict[str, Any]:
        sent = time.monotonic()
        if i % 2 == 0:
            self.version += 1
            self._deploy(self.version)
            return {"action": "deploy", "sent": sent, "done": time.monotonic(), "serving": str(self.version)}
        mark = self.fleet.event_count(self.agent.device_id)
        command_id = self.fleet.command(self.agent.device_id, "rollback", model=self.model)
        event = self.fleet.wait_event(
            self.agent.device_id,
            lambda e: e.kind == "command.result" and e.command_id == command_id,
            after=mark,
            timeout=60,
        )
        active = event.data.get("active") or {}
        if not event.data.get("ok") or not active:
            raise RuntimeError(f"rollback failed: {event.message} {event.data}")
        return {
            "action": "rollback",
            "sent": sent,
            "done": time.monotonic(),
            "serving": str(active["version"]),
            "command_id": command_id,
        }

    def finish(self, swaps: list[dict[str, Any]]) -> None:
        """Rollback latency from the agent's own log: command received -> the host switched."""
        records = self.agent.log_records()
        for swap in swaps:
            if swap["action"] != "rollback":
                continue
            received = next(
                (r["ts"] for r in records if r.get("msg") == "command" and r.get("command_id") == swap["command_id"]),
                None,
            )
            switched = next(
                (
                    r["ts"]
                    for r in records
                    if received is not None
                    and r.get("logger") == "agent.runtime.host"
                    and str(r.get("msg", "")).startswith("activated ")
                    and r["ts"] >= received
                ),
                None,
            )
            if received is not None and switched is not None:
                swap["to_serving_ms"] = (switched - received) * 1e3

    def close(self) -> None:
        self.agent.stop()
        self.fleet.close()
        self.broker.close()


_DTYPES = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(int32)": ("INT32", np.int32),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short phases (well under a minute)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop client connections (default 4)")
    parser.add_argument("--swaps", type=int, help="version switches (default 12 quick, 40 full; at least 12)")
    parser.add_argument(
        "--model",
        default="digits",
        help=f"a shared real model ({', '.join(n for n in NAMES if n != 'selfie')}) or an ONNX file (default: digits)",
    )
    parser.add_argument(
        "--driver",
        choices=("agent", "host"),
        default="agent" if agent_available() else "host",
        help="agent: a real edgefleet-agent process, deploys and rollback commands over MQTT (default when "
        "available); host: the serving half alone, swapped through a control pipe",
    )
    parser.add_argument(
        "--compression",
        choices=("lzma", "zlib", "none"),
        default="lzma",
        help="agent driver: artifact compression (default lzma; zlib seals a large model far faster)",
    )
    parser.add_argument(
        "--no-cold-baseline",
        action="store_true",
        help="agent driver: skip the second agent (warm_standby = false) that measures rollback from disk",
    )
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child:
        return serve_child()

    swaps = max(12, args.swaps or (12 if args.quick else 40))
    swaps += swaps % 4  # whole deploy/rollback cycles
    steady_s = 4.0 if args.quick else 15.0
    gap_s = 0.25 if args.quick else 0.5  # between switches, so requests also run between them
    sequential_n = 300 if args.quick else 1000

    with tempfile.TemporaryDirectory() as tmp:
        source, sample = resolve_model(args.model)
        v1, v2 = build_models(source, Path(tmp))
        files = {1: v1, 2: v2}
        raw_body, feeds = request_body(v1, sample)

        driver: HostDriver | AgentDriver = (
            AgentDriver(files, Path(tmp), compression=args.compression)
            if args.driver == "agent"
            else HostDriver(files, Path(tmp))
        )
        body = raw_body
        path = f"/v2/models/{driver.model}/infer"
        try:
            raw, in_process, http_seq = sequential_baselines(v1, feeds, driver.port, path, body, sequential_n)
            steady = run_clients(driver.port, path, body, args.clients, steady_s)
            done: list[dict[str, Any]] = []

            def do_swaps() -> None:
                for i in range(swaps):
                    time.sleep(gap_s)
                    done.append(driver.swap(i))
                time.sleep(gap_s)

            swapping = run_clients(driver.port, path, body, args.clients, 0, during=do_swaps)
            driver.finish(done)
        finally:
            driver.close()
        cold_ms: list[float] = []
        if args.driver == "agent" and not args.no_cold_baseline:
            cold_ms = cold_rollbacks(
                AgentDriver(files, Path(tmp) / "cold", warm_standby=False, compression=args.compression),
                path,
                body,
                args.clients,
                max(4, swaps // 2),
                gap_s,
            )

    # the first requests on a new session pay its lazy allocations: they count as "during the swap" too
    windows = [(r["sent"], r["done"] + SWAP_TAIL_S) for r in done]
    during = [s for s in swapping if any(s.start <= end and s.end >= begin for begin, end in windows)]
    rollback_ms = [
        r["to_serving_ms"] for r in done if r["action"] in ("rollback", "rollback-cold") and "to_serving_ms" in r
    ]
    warm_ms = [r["to_serving_ms"] for r in done if r["action"] == "rollback-warm"]
    observed = []
    for reply in done:
        if not reply["action"].startswith("rollback"):
            continue
        first = min(
            (s.end for s in swapping if s.ok and s.start >= reply["sent"] and s.version == reply["serving"]),
            default=None,
        )
        if first is not None:
            observed.append((first - reply["sent"]) * 1e3)
    everything = steady + swapping
    steady_ms, swap_ms = ms(steady), ms(during)
    host_rows = [r for r in done if "load_ms" in r]
    results = {
        "requests": len(everything),
        "failed": sum(not s.ok for s in everything),
        "swaps": len(done),
        "clients": args.clients,
        "p50_steady_ms": pct(steady_ms, 50),
        "p99_steady_ms": pct(steady_ms, 99),
        "p50_swap_ms": pct(swap_ms, 50),
        "p99_swap_ms": pct(swap_ms, 99),
        "requests_during_swaps": len(during),
        "p99_swap_over_steady": (pct(swap_ms, 99) or 0) / (pct(steady_ms, 99) or 1),
        "throughput_steady_rps": len(steady) / steady_s,
        "rollback_p50_ms": pct(rollback_ms, 50),
        "rollback_p95_ms": pct(rollback_ms, 95),
        "rollback_samples": len(rollback_ms),
        "rollback_warm_p50_ms": pct(warm_ms, 50),
        "rollback_warm_p95_ms": pct(warm_ms, 95),
        "rollback_observed_p95_ms": pct(observed, 95),
        "rollback_cold_p50_ms": pct(cold_ms, 50),
        "rollback_cold_p95_ms": pct(cold_ms, 95),
        "rollback_cold_samples": len(cold_ms),
        "rollback_cold_over_standby_p50": (
            (pct(cold_ms, 50) or 0) / (pct(rollback_ms, 50) or 1) if cold_ms and rollback_ms else None
        ),
        "swap_load_ms_p50": pct([r["load_ms"] for r in host_rows if r["load_ms"] > 0.05], 50),
        "swap_check_ms_p50": pct([r["check_ms"] for r in host_rows if r["check_ms"] > 0.0], 50),
        "swap_switch_ms_max": max((r["switch_ms"] for r in host_rows), default=None),
        "drain_ms_max": max((r["drain_ms"] for r in host_rows), default=None),
        "raw_p50_ms": pct(raw, 50),
        "raw_p99_ms": pct(raw, 99),
        "host_p50_ms": pct(in_process, 50),
        "host_overhead_p50_ms": (pct(in_process, 50) or 0) - (pct(raw, 50) or 0),
        "http_p50_ms": pct(http_seq, 50),
        "http_p99_ms": pct(http_seq, 99),
        "http_overhead_p50_ms": (pct(http_seq, 50) or 0) - (pct(raw, 50) or 0),
        "http_over_raw_p50": (pct(http_seq, 50) or 0) / (pct(raw, 50) or 1),
        "driver": args.driver,
        "command_path": driver.name,
        "model": args.model,
        "quick": args.quick,
    }
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = results["failed"] == 0 and results["p99_swap_over_steady"] <= 2.0 and (results["rollback_p95_ms"] or 0) <= 1000
    return 0 if ok else 1


def cold_rollbacks(
    driver: AgentDriver, path: str, body: bytes, clients: int, swaps: int, gap_s: float
) -> list[float]:
    """The same-run baseline for the agent driver: rollback after a commit with ``warm_standby = false``.

    A second agent process, the same deploy/rollback cycles under the same client load; each rollback
    must load the previous version from disk (the main run's agent keeps it loaded as a warm standby).
    """
    done: list[dict[str, Any]] = []
    try:

        def do_swaps() -> None:
            for i in range(swaps + swaps % 2):
                time.sleep(gap_s)
                done.append(driver.swap(i))

        run_clients(driver.port, path, body, clients, 0, during=do_swaps)
        driver.finish(done)
    finally:
        driver.close()
    return [r["to_serving_ms"] for r in done if r["action"] == "rollback" and "to_serving_ms" in r]


def agent_available() -> bool:
    """Whether this checkout has the full agent and its test server (agent-core's half)."""
    return (ROOT / "tests" / "support" / "agent_process.py").is_file() and (
        ROOT / "agent" / "runtime" / "agent.py"
    ).is_file()


def print_table(r: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))

    rows = [
        ("requests (failed)", f"{r['requests']} ({r['failed']})", "failed == 0"),
        ("swaps / clients", f"{r['swaps']} / {r['clients']}", ">= 10 swaps"),
        ("p50 / p99 steady ms", f"{f(r['p50_steady_ms'])} / {f(r['p99_steady_ms'])}", ""),
        (
            "p50 / p99 during swaps ms",
            f"{f(r['p50_swap_ms'])} / {f(r['p99_swap_ms'])}",
            f"{r['requests_during_swaps']} requests",
        ),
        ("p99 swap / steady", f(r["p99_swap_over_steady"]), "<= 2.0"),
        (
            "rollback p50 / p95 ms",
            f"{f(r['rollback_p50_ms'])} / {f(r['rollback_p95_ms'])}",
            f"<= 1000 (p95), {r['rollback_samples']} rollbacks",
        ),
        ("rollback to standby p50 / p95 ms", f"{f(r['rollback_warm_p50_ms'])} / {f(r['rollback_warm_p95_ms'])}", ""),
        (
            "rollback from disk p50 / p95 ms (agent, warm_standby off)",
            f"{f(r['rollback_cold_p50_ms'])} / {f(r['rollback_cold_p95_ms'])}",
            f"{r['rollback_cold_samples']} rollbacks, {f(r['rollback_cold_over_standby_p50'])}x the p50 above",
        ),
        ("rollback seen by clients p95 ms", f(r["rollback_observed_p95_ms"]), "command sent -> first answer"),
        ("raw session p50 / p99 ms", f"{f(r['raw_p50_ms'])} / {f(r['raw_p99_ms'])}", "baseline"),
        ("ModelHost in-process p50 ms (overhead)", f"{f(r['host_p50_ms'])} ({f(r['host_overhead_p50_ms'])})", ""),
        ("HTTP p50 / p99 ms (1 client)", f"{f(r['http_p50_ms'])} / {f(r['http_p99_ms'])}", ""),
        ("HTTP overhead p50 ms (ratio)", f"{f(r['http_overhead_p50_ms'])} ({f(r['http_over_raw_p50'])}x)", ""),
    ]
    if r["swap_load_ms_p50"] is not None:
        rows.append(
            (
                "swap: load / check p50, switch max ms",
                f"{f(r['swap_load_ms_p50'])} / {f(r['swap_check_ms_p50'])}, {f(r['swap_switch_ms_max'])}",
                "",
            )
        )
    width = max(len(a) for a, _, _ in rows)
    print(f"hot swap under load: {r['command_path']}, model {r['model']}")
    print(f"{'':<{width}}  {'measured':<24}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<24}  {target}")


if __name__ == "__main__":
    sys.exit(main())
