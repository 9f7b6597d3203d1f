#!/usr/bin/env python3
"""Artifact delivery through mosquitto: the edgefleet path against raw paho, same bytes, same run.

    scripts/bench_transfer.py [--quick] [--json PATH] [--mb N] [--chunk-kb K] [--repeats R] [--baseline-agent DIR]

One private mosquitto (``set_tcp_nodelay true``) carries both, run after run, interleaved:
  * edgefleet: the real server (in-process: registry, artifact store, chunk server, MQTT link) deploys
    one encrypted artifact (a real ONNX model of ``--mb`` MB, ``compression = "none"`` so the wire carries
    exactly that many bytes) to one real agent process (``python -m agent run``). Timed from the
    agent's ``download.started`` event (it has the signed desired state and is about to ask for the
    chunks) to its ``download.completed`` event: chunk request, the server reading and publishing the
    sealed chunks (QoS 1), the broker, and the agent authenticating/decrypting each chunk, writing it
    at its offset, fsyncing and snapshotting its resume state. Both timestamps come from the agent.
  * raw: the same sealed chunk bytes published with paho (QoS 1, the server's in-flight window) to one
    topic and received by a bare paho subscriber in its own process, which only counts bytes. Timed
    from the first publish to the last byte received.

Reported: artifact size (MB = 2**20 bytes), each path's MB/s (median over the repeats) and their
ratio (target >= 0.6, issue 15). ``--baseline-agent DIR`` adds a second agent process run from another checkout
(DIR, e.g. the main branch, with its own ``.venv``) on the same server and broker: each version is sent raw, to
this agent and to that one, in alternating order, so a change to the agent is compared in the same conditions
(``baseline_*`` in the results). Full artifacts only (``publisher.delta_max_ratio = 0``). The server's chunk-request
window is set to 50 ms (default 0.5 s, which is there to gather a group's requests into one broadcast round;
with one device it is pure latency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support (agent process helper, model writer) lives beside the packages

import paho.mqtt.client as mqtt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from agent.protocol.envelope import seal_artifact  # noqa: E402
from agent.protocol.messages import RuntimeSpec  # noqa: E402
from agent.runtime.keys import public_key_b64  # noqa: E402
from server.app import FleetServer  # noqa: E402
from server.broker import MosquittoBroker  # noqa: E402
from server.builds import Build, StaticBuilds  # noqa: E402
from tests.support.devices.agent_process import AgentProcess  # noqa: E402
from tests.support.servers.fleet import health, public_key, server_config, write_onnx  # noqa: E402

MIB = 1 << 20
PROFILE = "bench"
RAW_TOPIC = "bench/raw"
MAX_INFLIGHT = 64

RECEIVER = textwrap.dedent(
    """
    import json, sys, threading, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    host, port, topic, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    got = [0, 0, None, None]  # bytes, messages, first_ts, last_ts
    done, ready = threading.Event(), threading.Event()
    def on_connect(c, u, f, rc, p):
        c.subscribe(topic, qos=1)
    def on_subscribe(c, u, mid, rc, p):
        ready.set()
    def on_message(c, u, msg):
        now = time.time()
        if got[2] is None:
            got[2] = now
        got[0] += len(msg.payload); got[1] += 1; got[3] = now
        if got[0] >= total:
            done.set()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-rx", clean_session=True,
                    protocol=mqtt.MQTTv311)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not ready.wait(10):
        sys.exit("receiver: no SUBACK")
    print("ready", flush=True)
    ok = done.wait(300)
    print(json.dumps({"ok": ok, "bytes": got[0], "messages": got[1], "first": got[2], "last": got[3]}), flush=True)
    c.disconnect(); c.loop_stop()
    """
)


class _Enroller:
    """What AgentProcess needs from "the server": its public key file, and the device registered."""

    def __init__(self, server: FleetServer) -> None:
        self.server = server

    def write_public_key(self, path: Path) -> Path:
        pem = public_key(self.server.config).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.write_bytes(pem)
        return path

    def enroll(self, device_id: str, key: X25519PublicKey) -> None:
        self.server.service.register_device(device_id, profile=PROFILE, public_key=public_key_b64(key), groups=())


def raw_run(broker: MosquittoBroker, chunks: tuple[bytes, ...]) -> float:
    """Seconds from the first raw publish to the last byte at a bare subscriber process."""
    total = sum(len(c) for c in chunks)
    rx = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, broker.host, str(broker.port), RAW_TOPIC, str(total)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert rx.stdout is not None
        if rx.stdout.readline().strip() != "ready":
            raise RuntimeError("raw receiver did not subscribe")
        tx = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-tx", clean_session=True,
                         protocol=mqtt.MQTTv311)
        tx.max_inflight_messages_set(MAX_INFLIGHT)
        tx.max_queued_messages_set(0)
        tx.connect(broker.host, broker.port, keepalive=30)
        tx.loop_start()
        try:
            start = time.time()
            infos = [tx.publish(RAW_TOPIC, c, qos=1) for c in chunks]
            for info in infos:
                info.wait_for_publish(60)
            line = rx.stdout.readline()
        finally:
            tx.disconnect()
            tx.loop_stop()
        result = json.loads(line)
        if not result["ok"] or result["bytes"] != total:
            raise RuntimeError(f"raw receiver got {result['bytes']} of {total} bytes")
        return float(result["last"]) - start
    finally:
        rx.wait(10)


def wait_event(server: FleetServer, device_id: str, kind: str, deployment_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = server.service.events(device_id=device_id, deployment_id=deployment_id, kind=kind)["events"]
        rows = [r for r in rows if r["kind"] == kind]
        if rows:
            return dict(rows[-1])
        time.sleep(0.05)
    raise TimeoutError(f"{device_id}: no {kind} event for {deployment_id} within {timeout}s")


def edgefleet_run(server: FleetServer, agent: AgentProcess, version: int, timeout: float,
                  model: str = "bench") -> float:
    dep = server.service.deploy(f"{model}:{version}", target=f"device:{agent.device_id}", canary_percent=0,
                                probation_s=0.1, actor="bench")
    dep_id = dep["deployment_id"]
    started = wait_event(server, agent.device_id, "download.started", dep_id, timeout)
    done = wait_event(server, agent.device_id, "download.completed", dep_id, timeout)
    if done["data"].get("bytes") != done["data"].get("total_bytes"):
        raise RuntimeError(f"download.completed without every byte: {done['data']}")
    # let it commit before the next version, so runs do not overlap
    deadline = time.monotonic() + timeout
    while server.service.deployment_detail(dep_id)["status"] not in ("completed", "halted", "rolled_back"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {dep_id} did not finish")
        time.sleep(0.1)
    return float(done["ts"]) - float(started["ts"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="16 MB, three runs per path (under a minute)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    ap.add_argument("--mb", type=float, default=None, help="artifact size in MB (default 32, quick 16)")
    ap.add_argument("--chunk-kb", type=int, default=64, help="chunk size in KB (default 64, the protocol default)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per path, interleaved (default 5, quick 3)")
    ap.add_argument("--baseline-agent", type=Path, default=None, metavar="DIR",
                    help="also time the agent of this checkout (its .venv), interleaved with this one's")
    args = ap.parse_args(argv)
    mb = args.mb or (16.0 if args.quick else 32.0)
    repeats = args.repeats or (3 if args.quick else 5)
    chunk_size = args.chunk_kb * 1024
    console = Console()

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp_name:
        tmp = Path(tmp_name)
        hidden = max(16, int(mb * MIB / ((64 + 10) * 4)))
        builds = StaticBuilds()
        models: list[bytes] = []
        for v in range(1, repeats + 1):
            path = write_onnx(tmp / f"bench-v{v}.onnx", seed=v, hidden=hidden)
            models.append(path.read_bytes())
            for model in ("bench", "bench-baseline") if args.baseline_agent else ("bench",):
                builds.add(Build(model=model, version=v, profile=PROFILE, variant="fp32", path=path,
                                 runtime=RuntimeSpec("onnx", "onnxruntime"), health=health(probation_s=0.1),
                                 chunk_size=chunk_size, compression="none"))
        with MosquittoBroker(workdir=tmp / "mosquitto") as broker:
            config = server_config(tmp / "home", broker, {
                # delta_max_ratio 0: every version is an unrelated model (its own seed), so no delta would be worth
                # sending, and building one (LZMA over the whole patch, on the server's background thread) costs
                # more CPU than the transfer being measured and overlapped it on this 2-core machine
                "publisher": {"chunk_window_s": 0.05, "max_inflight": MAX_INFLIGHT, "delta_max_ratio": 0.0},
                "rollout": {"tick_s": 0.1, "device_timeout_s": 300.0},
            })
            server = FleetServer(config, builds=builds).start()
            agent = AgentProcess(tmp / "agents", "bench-dev", broker_host=broker.host, broker_port=broker.port,
                                 server=_Enroller(server),  # type: ignore[arg-type]
                                 settings={"profile": PROFILE, "log": {"level": "warning"}})
            agents = [agent]
            if args.baseline_agent:
                agents.append(AgentProcess(tmp / "agents", "bench-baseline", broker_host=broker.host,
                                           broker_port=broker.port, server=_Enroller(server),  # type: ignore[arg-type]
                                           settings={"profile": PROFILE, "log": {"level": "warning"}},
                                           checkout=args.baseline_agent.resolve()))
            try:
                for a in agents:
                    a.start()
                deadline = time.monotonic() + 30
                while sum(d.online for d in server.registry.list_devices()) < len(agents):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"agent did not come online:\n{agent.log_text()[-2000:]}")
                    time.sleep(0.05)
                edge_s: list[float] = []
                raw_s: list[float] = []
                base_s: list[float] = []
                wire = 0
                for v in range(1, repeats + 1):
                    sealed = seal_artifact(models[v - 1], chunk_size=chunk_size, compression="none")
                    wire = sealed.wire_bytes
                    raw_s.append(raw_run(broker, sealed.chunks))
                    if len(agents) == 1:
                        edge_s.append(edgefleet_run(server, agent, v, timeout=120.0))
                        console.print(f"run {v}: raw {raw_s[-1]:.3f} s, edgefleet {edge_s[-1]:.3f} s")
                        continue
                    for a in agents if v % 2 else agents[::-1]:  # alternate which agent goes first
                        model = "bench" if a is agent else "bench-baseline"
                        (edge_s if a is agent else base_s).append(edgefleet_run(server, a, v, 120.0, model))
                    console.print(f"run {v}: raw {raw_s[-1]:.3f} s, edgefleet {edge_s[-1]:.3f} s, "
                                  f"baseline agent {base_s[-1]:.3f} s")
            finally:
                for a in agents:
                    a.stop()
                server.stop()
    artifact_mb = len(models[0]) / MIB
    edge_mb_s = artifact_mb / statistics.median(edge_s)
    raw_mb_s = artifact_mb / statistics.median(raw_s)
    result = {
        "artifact_mb": round(artifact_mb, 2),
        "wire_mb": round(wire / MIB, 2),
        "chunk_kb": args.chunk_kb,
        "repeats": repeats,
        "edgefleet_s": [round(s, 3) for s in edge_s],
        "raw_mqtt_s": [round(s, 3) for s in raw_s],
        "edgefleet_mb_s": round(edge_mb_s, 1),
        "raw_mqtt_mb_s": round(raw_mb_s, 1),
        "ratio": round(edge_mb_s / raw_mb_s, 2),
        # best run of each path: less sensitive to other work on a shared machine
        "edgefleet_best_mb_s": round(artifact_mb / min(edge_s), 1),
        "raw_mqtt_best_mb_s": round(artifact_mb / min(raw_s), 1),
        "best_ratio": round(min(raw_s) / min(edge_s), 2),
        "target_ratio": 0.6,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # this machine is shared: read the figures with it
        "cpus": os.cpu_count(),
    }
    if base_s:
        base_mb_s = artifact_mb / statistics.median(base_s)
        result |= {
            "baseline_agent": str(args.baseline_agent),
            "baseline_s": [round(s, 3) for s in base_s],
            "baseline_mb_s": round(base_mb_s, 1),
            "baseline_ratio": round(base_mb_s / raw_mb_s, 2),
            "baseline_best_ratio": round(min(raw_s) / min(base_s), 2),
            # runs in which this agent finished its download before the baseline's (same version, back to back)
            "faster_than_baseline_runs": sum(e < b for e, b in zip(edge_s, base_s, strict=True)),
        }
    table = Table(title=f"artifact transfer: {artifact_mb:.1f} MB in {args.chunk_kb} KB chunks, median of {repeats}")
    for col in ("path", "seconds", "MB/s"):
        table.add_column(col, justify="right" if col != "path" else "left")
    table.add_row("edgefleet (server -> mosquitto -> agent)", f"{statistics.median(edge_s):.3f}", f"{edge_mb_s:.1f}")
    table.add_row("raw paho publish -> subscribe", f"{statistics.median(raw_s):.3f}", f"{raw_mb_s:.1f}")
    table.add_row("ratio (target >= 0.6)", "", f"{result['ratio']:.2f}")
    table.add_row("best runs: edgefleet / raw / ratio", "",
                  f"{result['edgefleet_best_mb_s']} / {result['raw_mqtt_best_mb_s']} / {result['best_ratio']:.2f}")
    if base_s:
        table.add_row(f"baseline agent ({args.baseline_agent})", f"{statistics.median(base_s):.3f}",
                      f"{result['baseline_mb_s']}")
        table.add_row("baseline ratio / runs this agent was faster", "",
                      f"{result['baseline_ratio']:.2f} / {result['faster_than_baseline_runs']} of {repeats}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
