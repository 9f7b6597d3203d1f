#!/usr/bin/env python3
"""Probe builds against blind selection: does timing every candidate on the profile's own devices pick faster?

    scripts/bench_probe.py [--quick] [--json [PATH]] [--model NAME] [--probe-timeout S]

Real parts: mosquitto, the server in its own process (tests/support/servers/faulty.RealServer), real
``edgefleet-agent`` processes, the real compression pipeline on a real model (default: the digits CNN from
the model cache, with its calibration and evaluation data). Two agents stand in for two profiles of
different speed on this machine:

  * ``x86-64-avx2``: not pinned, two inference threads;
  * ``raspberry-pi-4``: pinned to one core (``taskset -a -cp 0``), one inference thread. (No cgroup CPU quota
    here: the container has no writable cgroup.)

Each agent first serves the digits CNN's fp32 file (deployed as ``serve:1``; the application, whatever model is
probed), with one closed-loop client on its local HTTP API for the whole run. Per profile,
``model_ops.build_model`` with ``probe`` builds blind, probes every passing candidate on that profile's agent,
and builds again with the measurements.

Rows (JSON), per profile: ``profile``, ``blind_variant``, ``measured_variant``, ``blind_latency_ms`` and
``measured_latency_ms`` (both the probe's p50 on that profile's device), ``probe_seconds`` (probe start to the
last answer), ``serving_p99_ratio`` (p99 of the client's requests that overlapped the device's probe, from the
probe command's result to ``probe.completed``, over p99 of that profile's steady windows: one of ``--steady-s``
right before its build started and one as long as its probe window (at least ``--steady-s``) right after the
build returned, so a load trend on a shared box weighs on both sides and the sample counts are comparable),
plus the counts and window lengths behind them and every candidate's measured p50. ``load_avg`` is
``os.getloadavg()`` at the start and end.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (real models, real server and agent processes)

from server import model_ops  # noqa: E402
from server.broker import MosquittoBroker  # noqa: E402
from server.compression.gate import GateSpec  # noqa: E402
from server.registry.catalog import Catalog  # noqa: E402
from tests.support.devices.agent_process import AgentProcess  # noqa: E402
from tests.support.models import real_model  # noqa: E402
from tests.support.servers.faulty import RealServer  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_hotswap", ROOT / "scripts" / "bench_hotswap.py")
assert _spec is not None and _spec.loader is not None
hotswap = importlib.util.module_from_spec(_spec)
sys.modules["bench_hotswap"] = hotswap  # its dataclasses look their module up
_spec.loader.exec_module(hotswap)

PROFILES = {  # profile -> (pin to core 0, inference threads)
    "x86-64-avx2": (False, 2),
    "raspberry-pi-4": (True, 1),
}
QUICK_RECIPES = ["fp16-weights", "int8-dynamic", "int8-static-minmax"]
#: ``--legacy-probe``: the probe as it was before SCHED_IDLE (nice 19, the serving thread count, half a core)
LEGACY = {"probe_priority": "nice", "probe_threads": 0, "probe_cpu_share": 0.5}


class _Enroller:
    """What ``AgentProcess`` asks of a server: its public key, and registering the device (here: per profile)."""

    def __init__(self, server: RealServer, profile: str) -> None:
        self.server, self.profile = server, profile

    def write_public_key(self, path: Path) -> Path:
        return self.server.write_public_key(path)

    def enroll(self, device_id: str, public_key: Any) -> None:
        self.server.service.register_device(
            device_id, profile=self.profile, groups=(f"bench-{self.profile}",), broker_password=False,
            public_key=base64.b64encode(public_key.public_bytes_raw()).decode())


def _wait(condition: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # polls observable state (the registry, the agent's status)
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def _window(server: RealServer, device_id: str, probe_id: str) -> tuple[float, float] | None:
    """(probe command answered, probe.completed) on the device's clock (this machine's)."""
    events = server.registry.list_events(device_id=device_id, limit=1000, newest=True)
    start = next((e.ts for e in events if e.kind == "command.result" and e.data.get("action") == "probe"
                  and "probing" in str(e.data.get("message", ""))), None)
    end = next((e.ts for e in events if e.kind == "probe.completed" and e.data.get("probe_id") == probe_id), None)
    return (start, end) if start is not None and end is not None else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = real_model(args.model)
    app = real_model("digits")  # what the devices serve to the clients meanwhile (the probed model may be larger)
    work = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    load_start = os.getloadavg()
    broker = MosquittoBroker(workdir=work / "mosquitto").start()
    serve = [{"model": "serve", "version": 1, "profile": p, "path": str(app.path),
              "input": app.inputs[0].name, "probation_s": 0.5, "chunk_size": 16384} for p in PROFILES]
    server = RealServer(work, broker.host, broker.port, serve)
    agents: dict[str, AgentProcess] = {}
    samples: dict[str, list[Any]] = {}
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        server.process.start()
        for profile, (pin, threads_n) in PROFILES.items():
            agents[profile] = AgentProcess(
                work, f"bench-{profile}", broker_host=broker.host, broker_port=broker.port,
                server=_Enroller(server, profile),  # type: ignore[arg-type]
                settings={"profile": profile, "inference": {"intra_op_threads": threads_n},
                          "lifecycle": {"benchmark_runs": 10 if args.quick else 30,
                                        **(LEGACY if args.legacy_probe else {})}},
            ).start()
            if pin:
                subprocess.run(["taskset", "-a", "-cp", "0", str(agents[profile].proc.pid)],  # type: ignore[union-attr]
                               check=True, capture_output=True)
        ids = {a.device_id for a in agents.values()}
        _wait(lambda: ids <= {d.device_id for d in server.registry.list_devices() if d.online}, "agents online", 120)
        for profile in PROFILES:
            server.service.deploy("serve:1", target=f"group:bench-{profile}", canary_percent=0, wave_percent=100,
                                  max_failures_percent=0, probation_s=0.5, actor="bench")
        _wait(lambda: all(d.active_model == "serve" and d.active_state == "committed"
                          for d in server.registry.list_devices()), "serve:1 committed", 180)
        sample = app.load("evaluation", limit=1)
        body, _ = hotswap.request_body(app.path, {t.name: sample[t.name] for t in app.inputs})
        for profile, agent in agents.items():
            agent.wait_http_ready()
            samples[profile] = []
            t = threading.Thread(target=hotswap.client_loop,
                                 args=(agent.http_port, "/v2/models/serve/infer", body, stop, samples[profile]))
            t.start()
            threads.append(t)
        time.sleep(1.0)  # the clients' first second (connections, first requests) left out

        catalog = Catalog.open(server.home)
        try:
            catalog.add_model(model.path, args.model, calibration=model.calibration, evaluation=model.evaluation,
                              gate=GateSpec(metric=model.metric))
        finally:
            catalog.close()
        rows = []
        for profile, agent in agents.items():
            req: dict[str, Any] = {"profile": profile, "probe": f"group:bench-{profile}",
                                   "probe_timeout_s": args.probe_timeout, "latency_runs": 5 if args.quick else 30}
            if args.quick:
                req["recipes"] = QUICK_RECIPES
                req["calibration_methods"] = ["minmax"]
                req["pruning"] = False
                req["fallback"] = False
            before = (time.monotonic(), time.monotonic() + args.steady_s)
            time.sleep(args.steady_s)  # steady, before: clients only
            out = model_ops.build_model(server.home, f"{args.model}:1", req, service=server.service, actor="bench")
            r = out["results"][0]
            if "error" in r:
                raise RuntimeError(f"{profile}: {r['error']}")
            probe = r["probe"]
            measured = probe["measured_p50_ms"]
            window = _window(server, agent.device_id, probe["probe_id"])
            probe_window_s = (window[1] - window[0]) if window else 0.0
            after = (time.monotonic(), time.monotonic() + max(args.steady_s, probe_window_s))
            time.sleep(after[1] - after[0])  # steady, after: clients only, as long as the probe window
            steady_before = [s for s in samples[profile] if before[0] <= s.start and s.end <= before[1] and s.ok]
            steady_after = [s for s in samples[profile] if after[0] <= s.start and s.end <= after[1] and s.ok]
            steady = steady_before + steady_after
            wall0 = time.time() - time.monotonic()  # client samples are monotonic; events are wall clock
            during = [s for s in samples[profile] if window and s.ok
                      and s.end + wall0 >= window[0] and s.start + wall0 <= window[1]]
            p99_steady = hotswap.pct(hotswap.ms(steady), 99)
            p99_during = hotswap.pct(hotswap.ms(during), 99)
            rows.append({
                "profile": profile, "blind_variant": r["blind_variant"], "measured_variant": r["variant"],
                "blind_latency_ms": measured.get(r["blind_variant"]),
                "measured_latency_ms": measured.get(r["variant"]),
                "probe_seconds": probe["seconds"],
                "serving_p99_ratio": (p99_during / p99_steady) if p99_during and p99_steady else None,
                "serving_p99_steady_ms": p99_steady, "serving_p99_probe_ms": p99_during,
                "requests_steady": len(steady), "requests_during_probe": len(during),
                "requests_steady_before": len(steady_before), "requests_steady_after": len(steady_after),
                "serving_p99_steady_before_ms": hotswap.pct(hotswap.ms(steady_before), 99),
                "serving_p99_steady_after_ms": hotswap.pct(hotswap.ms(steady_after), 99),
                "window_s": {"steady_before": round(before[1] - before[0], 2),
                             "probe": round(probe_window_s, 2), "steady_after": round(after[1] - after[0], 2)},
                "failed_requests": sum(1 for s in samples[profile] if not s.ok),
                "candidates_measured_p50_ms": measured, "missing": probe["missing"],
            })
        return {"model": args.model, "quick": args.quick, "legacy_probe": args.legacy_probe, "rows": rows,
                "load_avg_start": load_start,
                "load_avg_end": os.getloadavg(), "cpus": os.cpu_count()}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for a in agents.values():
            a.kill()
        server.process.kill()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="three recipes, fewer runs (under a minute on an idle box)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write the result as JSON (- = stdout)")
    p.add_argument("--model", default="digits", help="a model from the cache (default digits)")
    p.add_argument("--probe-timeout", type=float, default=180.0)
    p.add_argument("--legacy-probe", action="store_true",
                   help="the agents probe at nice 19 with their serving thread count and half a core (the baseline)")
    p.add_argument("--steady-s", type=float, default=None,
                   help="steady window right before each profile's build (s); the one after is at least as long")
    args = p.parse_args(argv)
    args.steady_s = args.steady_s if args.steady_s is not None else (4.0 if args.quick else 8.0)
    started = time.monotonic()
    result = run(args)
    result["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
    if args.json and args.json != "-":
        Path(args.json).write_text(text + "\n")
    if args.json == "-" or not args.json:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
