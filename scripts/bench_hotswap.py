#!/usr/bin/env python3
"""Hot swap under load: closed-loop clients on the local HTTP API while the serving process swaps versions.

    scripts/bench_hotswap.py [--quick] [--json PATH] [--clients N] [--swaps N] [--model PATH.onnx]

What runs:
  * a serving process (ModelHost + the Open Inference Protocol server on 127.0.0.1, intra-op threads 1),
    driven over a line protocol on its stdin: ``deploy`` (load beside, health check, switch; the old
    session drains and is released), ``deploy-keep`` (the same, keeping the old version loaded on standby,
    as the lifecycle does during probation), ``rollback-cold`` (the previous version from disk: load,
    health check, switch) and ``rollback-warm`` (switch back to the standby version);
  * C client threads in this process, each on its own keep-alive connection, sending the same request
    in a closed loop, through a steady phase (no swaps) and a swap phase (deploy/rollback alternating);
  * the baseline, in the same run: the same request straight to an ``onnxruntime.InferenceSession``.

Reported (JSON keys): requests, failed, swaps, p50/p99 steady and during swaps (a request is "during
a swap" when it overlaps the interval from sending the command to the process answering that the
old session is released), rollback latency (command received by the serving process -> previous
version serving; p50/p95, from disk and from standby) and the first response from the previous version
as the clients saw it,
HTTP overhead per request beside the raw session. Targets: failed == 0, p99_swap <= 2x p99_steady,
rollback p95 <= 1000 ms.

The command path of the full agent (signed MQTT command -> lifecycle -> ModelHost) is not in this
measurement: it measures the serving half (swap mechanics and HTTP) the agent's command path ends in.
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

from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec  # noqa: E402
from agent.runtime.host import ModelHost  # noqa: E402
from agent.runtime.http import HttpConfig, InferenceHttpServer  # noqa: E402
from agent.runtime.inference import InferenceOptions  # noqa: E402
from tests.support.badmodels import identity_variant  # noqa: E402
from tests.support.serving_models import digits_onnx  # noqa: E402

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


def request_body(model_path: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """One realistic request for the model: a digit for the digits model, probe inputs otherwise."""
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
        if dtype is np.float32:
            array = np.random.default_rng(0).random(shape, dtype=np.float32) * 16
        else:
            array = np.ones(shape, dtype)
        feeds[arg.name] = array
        inputs.append({"name": arg.name, "shape": shape, "datatype": datatype, "data": array.ravel().tolist()})
    return json.dumps({"inputs": inputs}).encode(), feeds


def client_loop(port: int, body: bytes, stop: threading.Event, out: list[Sample]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    while not stop.is_set():
        start = time.monotonic()
        try:
            conn.request("POST", "/v2/models/bench/infer", body=body, headers=headers)
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


def run_clients(port: int, body: bytes, clients: int, duration: float, during: Any = None) -> list[Sample]:
    stop = threading.Event()
    buckets: list[list[Sample]] = [[] for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(port, body, stop, b)) for b in buckets]
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


def build_models(model: Path | None, work: Path) -> tuple[Path, Path]:
    if model is None:
        model = digits_onnx()
    v1 = work / "v1.onnx"
    v1.write_bytes(model.read_bytes())
    return v1, identity_variant(model, work / "v2.onnx")


def raw_baseline(v1: Path, feeds: dict[str, np.ndarray], n: int) -> list[float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(v1), so, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    out = []
    for _ in range(n):
        start = time.monotonic()
        session.run(None, feeds)
        out.append((time.monotonic() - start) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short phases (well under a minute)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop client connections (default 4)")
    parser.add_argument("--swaps", type=int, help="version switches (default 10 quick, 30 full; at least 10)")
    parser.add_argument("--model", type=Path, help="ONNX model to serve (default: the digits classifier)")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_child:
        return serve_child()

    swaps = max(12, args.swaps or (12 if args.quick else 40))
    swaps += swaps % 4  # whole deploy/cold-rollback/deploy/warm-rollback cycles
    steady_s = 4.0 if args.quick else 15.0
    gap_s = 0.25 if args.quick else 0.5  # between switches, so requests also run between them
    sequential_n = 300 if args.quick else 2000

    with tempfile.TemporaryDirectory() as tmp:
        v1, v2 = build_models(args.model, Path(tmp))
        body, feeds = request_body(v1)
        files = {1: v1, 2: v2}
        raw = raw_baseline(v1, feeds, sequential_n)

        proc = ServingProcess()
        try:
            proc.command("deploy", v1, 1)
            # sequential: one client, one request at a time, against the raw session's numbers
            http_seq = ms(run_clients(proc.port, body, 1, 0, during=lambda: time.sleep(max(1.0, sequential_n / 1500))))
            steady = run_clients(proc.port, body, args.clients, steady_s)
            replies: list[dict[str, Any]] = []
            sent: list[float] = []

            def do_swaps() -> None:
                for i in range(swaps):
                    time.sleep(gap_s)
                    warm = (i // 2) % 2 == 1  # pairs alternate: deploy + cold rollback, deploy-keep + warm rollback
                    if i % 2 == 0:
                        action, version = ("deploy-keep" if warm else "deploy"), 2
                    else:
                        action, version = ("rollback-warm" if warm else "rollback-cold"), 1
                    sent.append(time.monotonic())
                    replies.append(proc.command(action, files[version], version))
                time.sleep(gap_s)

            swapping = run_clients(proc.port, body, args.clients, 0, during=do_swaps)
        finally:
            proc.close()

    windows = [(t, r["released"]) for t, r in zip(sent, replies, strict=True)]
    during = [s for s in swapping if any(s.start <= end and s.end >= begin for begin, end in windows)]
    rollback_ms = [r["to_serving_ms"] for r in replies if r["action"] == "rollback-cold"]
    warm_ms = [r["to_serving_ms"] for r in replies if r["action"] == "rollback-warm"]
    observed = []
    for begin, reply in zip(sent, replies, strict=True):
        if not reply["action"].startswith("rollback"):
            continue
        first = min((s.end for s in swapping if s.ok and s.start >= begin and s.version == "1"), default=None)
        if first is not None:
            observed.append((first - begin) * 1e3)
    everything = steady + swapping
    steady_ms, swap_ms = ms(steady), ms(during)
    results = {
        "requests": len(everything),
        "failed": sum(not s.ok for s in everything),
        "swaps": len(replies),
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
        "swap_load_ms_p50": pct([r["load_ms"] for r in replies if r["load_ms"] > 0.05], 50),
        "swap_check_ms_p50": pct([r["check_ms"] for r in replies if r["check_ms"] > 0.0], 50),
        "swap_switch_ms_max": max(r["switch_ms"] for r in replies),
        "drain_ms_max": max(r["drain_ms"] for r in replies),
        "raw_p50_ms": pct(raw, 50),
        "raw_p99_ms": pct(raw, 99),
        "http_p50_ms": pct(http_seq, 50),
        "http_p99_ms": pct(http_seq, 99),
        "http_overhead_p50_ms": (pct(http_seq, 50) or 0) - (pct(raw, 50) or 0),
        "http_over_raw_p50": (pct(http_seq, 50) or 0) / (pct(raw, 50) or 1),
        "command_path": "serving process stdin (ModelHost load+check+activate); MQTT command path not included",
        "quick": args.quick,
    }
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = results["failed"] == 0 and results["p99_swap_over_steady"] <= 2.0 and (results["rollback_p95_ms"] or 0) <= 1000
    return 0 if ok else 1


def print_table(r: dict[str, Any]) -> None:
    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

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
        ("rollback from disk p50 / p95 ms", f"{f(r['rollback_p50_ms'])} / {f(r['rollback_p95_ms'])}", "<= 1000 (p95)"),
        ("rollback to standby p50 / p95 ms", f"{f(r['rollback_warm_p50_ms'])} / {f(r['rollback_warm_p95_ms'])}", ""),
        ("rollback seen by clients p95 ms", f(r["rollback_observed_p95_ms"]), ""),
        (
            "swap: load / check p50, switch max ms",
            f"{f(r['swap_load_ms_p50'])} / {f(r['swap_check_ms_p50'])}, {f(r['swap_switch_ms_max'])}",
            "",
        ),
        ("raw session p50 / p99 ms", f"{f(r['raw_p50_ms'])} / {f(r['raw_p99_ms'])}", "baseline"),
        ("HTTP p50 / p99 ms (1 client)", f"{f(r['http_p50_ms'])} / {f(r['http_p99_ms'])}", ""),
        ("HTTP overhead p50 ms (ratio)", f"{f(r['http_overhead_p50_ms'])} ({f(r['http_over_raw_p50'])}x)", ""),
    ]
    width = max(len(a) for a, _, _ in rows)
    print(f"{'hot swap under load':<{width}}  {'measured':<24}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<24}  {target}")


if __name__ == "__main__":
    sys.exit(main())
