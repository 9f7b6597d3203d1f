#!/usr/bin/env python3
"""Memory and idle CPU of the serving agent against a bare Python process holding the same session.

    scripts/bench_agent_footprint.py [--quick] [--json PATH] [--model PATH.onnx] [--idle-s S]

Two processes are started side by side, both with onnxruntime at one intra-op thread and the same model:
  * bare:    ``python -c`` with ``onnxruntime.InferenceSession(model)``, one inference, then sleep;
  * serving: the agent's serving stack (ModelHost with the model loaded, health-checked and active,
             and the Open Inference Protocol server on 127.0.0.1), after a few HTTP requests.
Then both sit idle for ``--idle-s`` seconds (30 full, 15 quick) while their CPU time is sampled.

Reported: RSS and USS of each (MB), the serving stack's RSS over the bare process (target <= 40 MB),
idle CPU in percent of one core (target <= 1%). The MQTT runtime, journal and telemetry of the full
agent are not in the serving process measured here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (the real models) lives beside the installed packages

from tests.support.serving_models import digits_onnx  # noqa: E402

BARE = """
import sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
shape = lambda i: [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
feeds = {i.name: np.ones(shape(i), np.float32) for i in s.get_inputs()}
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


def start(code: str, model: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().split()
    if not first or first[0] != "ready":
        proc.kill()
        raise RuntimeError("child did not start")
    return proc, first[1:]


def memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20}


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def exercise(port: int, model: Path) -> None:
    """A few real requests, so the serving process holds what serving needs (threads, buffers)."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = []
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        inputs.append({"name": arg.name, "shape": shape, "datatype": "FP32", "data": np.ones(shape).ravel().tolist()})
    body = json.dumps({"inputs": inputs}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(20):
        conn.request("POST", "/v2/models/bench/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"serving process answered {response.status}")
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="15 s idle window instead of 30 s")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", type=Path, help="ONNX model (default: the digits classifier)")
    parser.add_argument("--idle-s", type=float, help="idle window in seconds")
    args = parser.parse_args(argv)
    idle_s = args.idle_s or (15.0 if args.quick else 30.0)
    model = args.model
    if model is None:
        model = digits_onnx()

    bare, _ = start(BARE, model)
    serving, extra = start(SERVING, model)
    try:
        exercise(int(extra[0]), model)
        time.sleep(1.0)  # let both settle after start-up and the requests
        mem_bare, mem_serving = memory(bare.pid), memory(serving.pid)
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in (bare, serving)}
        time.sleep(idle_s)
        cpu1 = {p.pid: cpu_seconds(p.pid) for p in (bare, serving)}
        mem_serving_after = memory(serving.pid)
    finally:
        for p in (bare, serving):
            try:
                assert p.stdin is not None
                p.stdin.close()
                p.wait(timeout=10)
            except Exception:
                p.kill()
                p.wait()

    results: dict[str, Any] = {
        "model": str(model.name),
        "rss_bare_mb": mem_bare["rss_mb"],
        "rss_agent_mb": mem_serving["rss_mb"],
        "rss_over_bare_mb": mem_serving["rss_mb"] - mem_bare["rss_mb"],
        "uss_bare_mb": mem_bare["uss_mb"],
        "uss_agent_mb": mem_serving["uss_mb"],
        "uss_over_bare_mb": mem_serving["uss_mb"] - mem_bare["uss_mb"],
        "rss_agent_after_idle_mb": mem_serving_after["rss_mb"],
        "idle_s": idle_s,
        "idle_cpu_agent_percent": 100.0 * (cpu1[serving.pid] - cpu0[serving.pid]) / idle_s,
        "idle_cpu_bare_percent": 100.0 * (cpu1[bare.pid] - cpu0[bare.pid]) / idle_s,
        "measured": "serving stack (ModelHost + OIP HTTP server); MQTT runtime, journal and telemetry not included",
    }
    rows = [
        ("RSS bare / serving MB", f"{results['rss_bare_mb']:.1f} / {results['rss_agent_mb']:.1f}", ""),
        ("RSS over bare MB", f"{results['rss_over_bare_mb']:.1f}", "<= 40"),
        ("USS over bare MB", f"{results['uss_over_bare_mb']:.1f}", ""),
        (f"idle CPU over {idle_s:.0f} s, % of a core", f"{results['idle_cpu_agent_percent']:.2f}", "<= 1"),
        ("idle CPU bare, % of a core", f"{results['idle_cpu_bare_percent']:.2f}", "baseline"),
    ]
    width = max(len(a) for a, _, _ in rows)
    print(f"{'agent footprint':<{width}}  {'measured':<16}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<16}  {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = results["rss_over_bare_mb"] <= 40 and results["idle_cpu_agent_percent"] <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
