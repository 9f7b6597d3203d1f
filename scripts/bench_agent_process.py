#!/usr/bin/env python3
"""Footprint of the whole agent process (MQTT, journal, telemetry, HTTP, model) against a bare session.

    scripts/bench_agent_process.py [--quick] [--json PATH] [--idle-s S]

``bench_agent_footprint.py`` measures the serving stack alone; this one measures what a device really
runs: ``python -m agent run`` connected to a private mosquitto, with the real digits model deployed
through the signed/encrypted path, committed, and a few requests served over HTTP. Beside it, in the
same run, a bare ``python`` holding an ``onnxruntime.InferenceSession`` of the same model file.
Both then sit idle for ``--idle-s`` seconds (30 full, 15 quick) while their CPU time is sampled.

Reported: RSS and USS (MB) of each, the agent's RSS over the bare process (target <= 40 MB), and idle CPU
in percent of one core (target <= 1%), with the agent's telemetry interval at its default (30 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (real models, the test server) lives beside the packages

from server.broker import MosquittoBroker  # noqa: E402
from tests.support import agent_models  # noqa: E402
from tests.support.agent_process import AgentProcess  # noqa: E402
from tests.support.fleet_server import FleetServer  # noqa: E402
from tests.support.models import real_model  # noqa: E402

BARE = """
import sys, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])["pixels"][:1].astype(np.float32)
s.run(None, {"pixels": x})
print("ready", flush=True)
time.sleep(3600)
"""


def memory(pid: int) -> dict[str, float]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20}


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="15 s idle window (finishes within a minute)")
    parser.add_argument("--idle-s", type=float, default=None, help="idle window in seconds (default 30, quick 15)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    idle_s = args.idle_s or (15.0 if args.quick else 30.0)
    model = real_model("digits")

    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp,
        MosquittoBroker(workdir=Path(tmp) / "mqtt") as broker,
    ):
        work = Path(tmp)
        fleet = FleetServer(broker.host, broker.port)
        agent = AgentProcess(
            work,
            "bench-device",
            broker_host=broker.host,
            broker_port=broker.port,
            server=fleet,
            settings={
                "telemetry": {"interval_s": 30.0},
                "log": {"level": "warning"},
                "lifecycle": {"probation_check_s": 1.0},
            },
        )
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE, str(model.path), str(model.evaluation)], stdout=subprocess.PIPE, text=True
        )
        try:
            agent.start()
            fleet.deploy(
                agent.device_id,
                model.path.read_bytes(),
                agent_models.ref(1),
                runtime=agent_models.ONNX,
                health=agent_models.digits_health("pixels", probation_s=1.0),
            )
            fleet.wait_event(agent.device_id, "lifecycle.committed", timeout=60)
            agent.wait_http_ready()
            x = model.load("evaluation", limit=8)["pixels"]
            for i in range(20):
                status, _ = agent.infer("digits", "pixels", x[i % 8 : i % 8 + 1])
                assert status == 200
            assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
            time.sleep(2.0)  # let both settle after the last request
            assert agent.proc is not None
            pids = {"agent": agent.proc.pid, "bare": bare.pid}
            start = {k: cpu_seconds(p) for k, p in pids.items()}
            time.sleep(idle_s)
            cpu = {k: 100.0 * (cpu_seconds(p) - start[k]) / idle_s for k, p in pids.items()}
            mem = {k: memory(p) for k, p in pids.items()}
        finally:
            agent.stop()
            bare.kill()
            bare.wait(5)
            fleet.close()

    result: dict[str, Any] = {
        "model": str(model.path.name),
        "idle_s": idle_s,
        "agent": {**mem["agent"], "idle_cpu_percent": cpu["agent"]},
        "bare": {**mem["bare"], "idle_cpu_percent": cpu["bare"]},
        "rss_over_bare_mb": mem["agent"]["rss_mb"] - mem["bare"]["rss_mb"],
        "uss_over_bare_mb": mem["agent"]["uss_mb"] - mem["bare"]["uss_mb"],
        "targets": {"rss_over_bare_mb": 40.0, "idle_cpu_percent": 1.0},
    }
    print(f"{'process':<8} {'RSS MB':>8} {'USS MB':>8} {'idle CPU %':>11}")
    for name in ("bare", "agent"):
        r = result[name]
        print(f"{name:<8} {r['rss_mb']:>8.1f} {r['uss_mb']:>8.1f} {r['idle_cpu_percent']:>11.2f}")
    print(
        f"agent over bare: RSS +{result['rss_over_bare_mb']:.1f} MB (target <= 40), "
        f"USS +{result['uss_over_bare_mb']:.1f} MB; idle CPU {cpu['agent']:.2f}% of a core (target <= 1%)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
