#!/usr/bin/env python3
"""Memory and idle CPU of the agent against a bare Python process holding the same model session.

    scripts/bench_agent_footprint.py [--quick] [--json PATH] [--model NAME|PATH] [--idle-s S]
                                     [--driver agent|serving]

Two processes side by side, both running onnxruntime with one intra-op thread on the same model:
  * bare:  ``python -c`` with ``onnxruntime.InferenceSession(model)``, one inference, then sleep;
  * agent (``--driver agent``, the default where the full agent is in the checkout): a real
    ``edgefleet-agent run`` process with production timings (telemetry every 30 s, MQTT keepalive,
    probation checks), connected to mosquitto, the model deployed to it by a signed desired state
    (download, verify, health check, probation, commit) and served over HTTP;
    or (``--driver serving``) the serving stack alone: ModelHost with the model loaded, checked and
    active, and the Open Inference Protocol server.
Both answer a few requests, settle, then sit idle for ``--idle-s`` seconds (30 full, 15 quick) while
their CPU time is sampled.

Reported: RSS and USS of each (MB), the agent's RSS over the bare process (target <= 40 MB), idle CPU
in percent of one core (target <= 1%; psutil's CPU times tick at 10 ms, so over 30 s the resolution is
0.03%).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (the real models) lives beside the installed packages

from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec, TensorSpec  # noqa: E402
from server.broker import MosquittoBroker  # noqa: E402
from tests.support.models import real_model  # noqa: E402

BARE = """
import sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
shape = lambda i: [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
kind = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
feeds = {i.name: np.ones(shape(i), kind[i.type]) for i in s.get_inputs()}
s.run(None, feeds)
print("ready", flush=True)
sys.stdin.read()
"""

SERVING = """
import sys
from pathlib import Path
from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec
from agent.runtime.host import ModelHost
from agent.runtime.http import HttpConfig, InferenceHttpServer
from agent.runtime.inference import InferenceOptions
host = ModelHost(InferenceOptions(intra_op_threads=1))
model = host.load(Path(sys.argv[1]), ref=ModelRef("bench", 1), runtime=RuntimeSpec("onnx", "onnxruntime"))
host.check(model, HealthSpec(inputs=(), outputs=(), latency_budget_ms=0.0))
host.activate(model)
server = InferenceHttpServer(host, HttpConfig(port=0)).start()
print("ready", server.port, flush=True)
sys.stdin.read()
server.close(); host.close()
"""

DATATYPES = {
    "tensor(float)": ("FP32", "float32"),
    "tensor(int64)": ("INT64", "int64"),
    "tensor(int32)": ("INT32", "int32"),
}


def start_child(code: str, model: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().split()
    if not first or first[0] != "ready":
        proc.kill()
        raise RuntimeError("child did not start")
    return proc, first[1:]


def stop_child(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    except Exception:
        proc.kill()
        proc.wait()


def start_serving(model: Path, work: Path) -> tuple[int, int, Callable[[], None]]:
    proc, extra = start_child(SERVING, model)
    return proc.pid, int(extra[0]), lambda: stop_child(proc)


def start_agent(model: Path, work: Path) -> tuple[int, int, Callable[[], None]]:
    """A real agent process with production timings, the model deployed to it and committed."""
    # agent-core's half: present only in a checkout with the full agent (see agent_available)
    from agent.runtime.config import BrokerConfig, LifecycleConfig, TelemetryConfig, TransferConfig  # noqa: PLC0415
    from tests.support.devices.agent_process import AgentProcess  # noqa: PLC0415
    from tests.support.servers.stub import FleetServer  # noqa: PLC0415

    broker = MosquittoBroker(workdir=work / "mosquitto").start()
    fleet = FleetServer(broker.host, broker.port)
    b, t, lc = BrokerConfig(), TransferConfig(), LifecycleConfig()
    production = {  # undo the test-speed timings the test harness sets
        "transfer": {
            "chunk_timeout_s": t.chunk_timeout_s,
            "chunk_timeout_max_s": t.chunk_timeout_max_s,
            "progress_interval_s": t.progress_interval_s,
        },
        "lifecycle": {"probation_check_s": lc.probation_check_s, "restart_limit": lc.restart_limit},
        "telemetry": {"interval_s": TelemetryConfig().interval_s},
        "broker": {
            "keepalive_s": b.keepalive_s,
            "reconnect_min_s": b.reconnect_min_s,
            "reconnect_max_s": b.reconnect_max_s,
        },
        "inference": {"intra_op_threads": 1},
    }
    agent = AgentProcess.on(broker, fleet, work, "footprint", production).start()
    try:
        deploy_and_wait(fleet, agent.device_id, model)
        agent.wait_http_ready()
    except BaseException:
        agent.kill()
        fleet.close()
        broker.close()
        raise
    assert agent.proc is not None

    def stop() -> None:
        agent.stop()
        fleet.close()
        broker.close()

    return agent.proc.pid, agent.http_port, stop


def deploy_and_wait(fleet: Any, device_id: str, model: Path) -> None:
    """Deploy ``model`` as bench v1 through the stand-in fleet server; wait for the commit."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    health = HealthSpec(
        inputs=tuple(
            TensorSpec(a.name, DATATYPES[a.type][1], tuple(d if isinstance(d, int) else 1 for d in a.shape))
            for a in session.get_inputs()
        ),
        outputs=(),
        latency_budget_ms=0.0,
        probation_s=1.0,
    )
    mark = fleet.event_count(device_id)
    fleet.deploy(
        device_id, model.read_bytes(), ModelRef("bench", 1), runtime=RuntimeSpec("onnx", "onnxruntime"), health=health
    )
    event = fleet.wait_event(
        device_id,
        lambda e: e.kind in ("lifecycle.committed", "lifecycle.rolled_back", "lifecycle.failed"),
        after=mark,
        timeout=120,
    )
    if event.kind != "lifecycle.committed":
        raise RuntimeError(f"deploy failed: {event.kind} {event.message}")


def memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20}


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def exercise(port: int, model: Path) -> None:
    """A few real requests, so the agent holds what serving needs (threads, buffers)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = []
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        data = np.ones(shape, int).ravel().tolist()
        inputs.append({"name": arg.name, "shape": shape, "datatype": DATATYPES[arg.type][0], "data": data})
    body = json.dumps({"inputs": inputs}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(20):
        conn.request("POST", "/v2/models/bench/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the agent answered {response.status}")
    conn.close()


def agent_available() -> bool:
    """Whether this checkout has the full agent and its test server (agent-core's half)."""
    return (ROOT / "tests" / "support" / "agent_process.py").is_file() and (
        ROOT / "agent" / "runtime" / "agent.py"
    ).is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="15 s idle window instead of 30 s")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--model", default="digits", help="a shared real ONNX model by name, or a path (default: digits)"
    )
    parser.add_argument("--idle-s", type=float, help="idle window in seconds")
    parser.add_argument(
        "--driver",
        choices=("agent", "serving"),
        default="agent" if agent_available() else "serving",
        help="agent: a real edgefleet-agent process (default when available); serving: the serving stack alone",
    )
    args = parser.parse_args(argv)
    idle_s = args.idle_s or (15.0 if args.quick else 30.0)
    model = (
        real_model(args.model).path if "/" not in args.model and not args.model.endswith(".onnx") else Path(args.model)
    )

    with tempfile.TemporaryDirectory() as tmp:
        bare, _ = start_child(BARE, model)
        try:
            pid, port, stop = (start_agent if args.driver == "agent" else start_serving)(model, Path(tmp))
            try:
                exercise(port, model)
                time.sleep(1.0)  # let both settle after start-up and the requests
                mem_bare, mem_agent = memory(bare.pid), memory(pid)
                cpu0 = {p: cpu_seconds(p) for p in (bare.pid, pid)}
                time.sleep(idle_s)
                cpu1 = {p: cpu_seconds(p) for p in (bare.pid, pid)}
                mem_agent_after = memory(pid)
            finally:
                stop()
        finally:
            stop_child(bare)

    results: dict[str, Any] = {
        "model": args.model,
        "driver": args.driver,
        "rss_bare_mb": mem_bare["rss_mb"],
        "rss_agent_mb": mem_agent["rss_mb"],
        "rss_over_bare_mb": mem_agent["rss_mb"] - mem_bare["rss_mb"],
        "uss_bare_mb": mem_bare["uss_mb"],
        "uss_agent_mb": mem_agent["uss_mb"],
        "uss_over_bare_mb": mem_agent["uss_mb"] - mem_bare["uss_mb"],
        "rss_agent_after_idle_mb": mem_agent_after["rss_mb"],
        "idle_s": idle_s,
        "idle_cpu_agent_percent": 100.0 * (cpu1[pid] - cpu0[pid]) / idle_s,
        "idle_cpu_bare_percent": 100.0 * (cpu1[bare.pid] - cpu0[bare.pid]) / idle_s,
        "quick": args.quick,
    }
    what = "edgefleet-agent process" if args.driver == "agent" else "serving stack (ModelHost + HTTP)"
    rows = [
        ("RSS bare / agent MB", f"{results['rss_bare_mb']:.1f} / {results['rss_agent_mb']:.1f}", ""),
        ("RSS over bare MB", f"{results['rss_over_bare_mb']:.1f}", "<= 40"),
        ("USS over bare MB", f"{results['uss_over_bare_mb']:.1f}", ""),
        (f"idle CPU over {idle_s:.0f} s, % of a core", f"{results['idle_cpu_agent_percent']:.2f}", "<= 1"),
        ("idle CPU bare, % of a core", f"{results['idle_cpu_bare_percent']:.2f}", "baseline"),
    ]
    width = max(len(a) for a, _, _ in rows)
    print(f"footprint: {what}, model {args.model}")
    print(f"{'':<{width}}  {'measured':<16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<16}  {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = results["rss_over_bare_mb"] <= 40 and results["idle_cpu_agent_percent"] <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
