"""Past one machine: one broadcast rollout to N simulated devices through S server processes and K broker
shards, against the single-node baseline (one server, one mosquitto, SQLite). docs/scale.md.

    .venv/bin/python scripts/bench_scale.py [--quick] [--json PATH] [--devices 1000,10000] [--servers 2]
        [--shards 2] [--registry sqlite|postgresql://...] [--kill] [--secured] [--model-mb 1] [--timeout 600]

Each run: K private mosquittos (``server.broker.MosquittoBroker``, bounded per-client queues as in
bench_fleet.py), one server home whose registry all servers share (SQLite file, or ``[registry] url`` when
--registry is a PostgreSQL URL), S real server processes (``server.app.FleetServer``, each its own
instance id, broker client id and config file, shared subscriptions, connected to every shard;
started by this script in ``--serve`` mode so the artifact comes from a StaticBuilds table as in
bench_fleet.py), N devices registered with their keys, and ``edgefleet simulate`` in a child process
spreading the devices over the shards by ``agent.protocol.shards.shard_of``. Then one deploy to the
whole group in a single wave (no canary, 1 s probation); the clock runs until the registry shows every
device committed. With --kill (and S >= 2) the server process holding the deployment's lease is
SIGKILLed once devices are downloading; the run then checks that no device and no registry row is lost.
Unless --restart-after is given the killed server stays down: the survivor takes over its MQTT session
(server/takeover.py) and receives what the broker queued there. With --secured the brokers are secured as
``edgefleet broker config --server-logins S`` secures them (a password per device and per server process, the
generated ACL, client id bound to login; no TLS): the survivor then takes the session over as the dead server's
login (``[broker] peer_logins``).

Columns (one JSON row per run):
  devices, servers, broker {name, nodes}, registry     the set-up
  rollout_s        deploy -> every device committed in the registry (null: not within --timeout)
  committed        deployment rows committed at the end
  broker_bytes     bytes the brokers received during the rollout, summed over shards ($SYS/broker/bytes/received)
  server_cpu_s     CPU seconds of all server processes over the rollout (a killed one: up to its last sample)
  db_rows_written  registry rows added during the rollout (sum over tables of COUNT(*) after - before;
                   updates in place, e.g. a deployment row changing state, are not counted)
  sim_cpu_s, broker_cpu_s   CPU seconds of the simulator and the brokers over the rollout
  sim_rss_mb, broker_rss_mb peak sampled RSS (with every device connected)
  connect_s        simulator start -> every device online in the registry
  killed           the SIGKILLed server's owner id, or null; lost_devices, lost_rows: what the check found missing
                   (devices, deployment rows, committed rows, commit events, devices serving the version) once
                   the killed server was restarted; lost_before_restart: the same check before that restart;
                   restarted_after_s: when the killed server was restarted (--restart-after; default after the rollout)
--quick: N = 40, one scaled run (2 servers, 2 shards, --kill) and the baseline, 1 MB model (under a minute).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_fleet import MODEL, PROFILE, SysBytes, _rss_mb, builds_for, process_cpu, write_model  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.protocol.envelope import raw_public  # noqa: E402
from server.broker import SERVER_USER, BrokerSecurity, MosquittoBroker, acl_text  # noqa: E402
from server.config import load_config  # noqa: E402
from server.keys import (  # noqa: E402
    atomic_write,
    init_signing_key,
    load_signing_key,
    mosquitto_hash,
    server_broker_password,
    server_password_file,
)
from server.shards import shard_users  # noqa: E402
from server.simulator import device_ids, device_key  # noqa: E402

GROUP = "fleet"
#: per-client QoS 1 window and queue in each mosquitto: 10,000 subscribers x (window x chunk + queue) is what a
#: broker may hold for laggards (bench_fleet.py's 10 x 64 KiB + 2 MiB would be 26 GB at 10,000)
BROKER_INFLIGHT = 5
BROKER_QUEUED_BYTES = 512 << 10


@dataclass
class Row:
    devices: int
    servers: int
    broker: dict[str, Any]
    registry: str
    rollout_s: float | None
    committed: int
    broker_bytes: int
    server_cpu_s: float
    db_rows_written: int | None
    sim_cpu_s: float = 0.0
    sim_rss_mb: int = 0
    broker_cpu_s: float = 0.0
    broker_rss_mb: int = 0
    connect_s: float = 0.0
    artifact_bytes: int = 0
    killed: str | None = None
    lost_devices: int = 0
    lost_rows: list[str] = field(default_factory=list)
    lost_before_restart: list[str] = field(default_factory=list)
    restarted_after_s: float | None = None
    secured: bool = False
    error: str | None = None


# -- a server process (--serve) ------------------------------------------------------------------------------


def serve(home: Path, config_file: Path, model: Path, compression: str) -> int:
    """One real server process on the shared home, until SIGTERM (or SIGKILL from the benchmark)."""
    from server.app import FleetServer  # noqa: PLC0415

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = FleetServer(load_config(home, config_file), builds=builds_for(model, compression)).start()
    print(f"serving {server.owner}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


# -- one run ----------------------------------------------------------------------------------------------------


def _toml(data: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)  # str, int, float: TOML-compatible literals
    return "".join(f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in kv.items()) + "\n" for s, kv in data.items())


def server_logins(servers: int) -> list[str]:
    """What ``broker config --server-logins N`` names them."""
    return [SERVER_USER] + [f"{SERVER_USER}-{i}" for i in range(2, servers + 1)]


def server_settings(brokers: list[MosquittoBroker], index: int, servers: int, registry: str,
                    secured: bool = False) -> dict[str, Any]:
    urls = [b.url for b in brokers]
    logins = server_logins(servers)
    # secured: each server its own login (the broker makes it the client id); every login, for the takeover
    who = ({"username": logins[index], "password_file": f"keys/{server_password_file(logins[index])}",
            **({"peer_logins": logins} if servers > 1 else {})} if secured
           else {"client_id": f"bench-server-{index}"})
    data: dict[str, dict[str, Any]] = {
        "server": {"instance_id": f"bench-{index}"},
        "broker": {**who, "shared_subscriptions": servers > 1,
                   **({"shards": urls} if len(urls) > 1 else {"url": urls[0]})},
        "api": {"host": "127.0.0.1", "port": 0},
        "publisher": {"broadcast": True, "broadcast_egress_mb_s": 150.0, "chunk_window_s": 5.0},
        # a dead driver's lease expires after lease_ttl_s and another server resumes the rollout
        "rollout": {"tick_s": 0.2, "device_timeout_s": 900.0, "lease_ttl_s": 5.0},
    }
    if registry != "sqlite":
        data["registry"] = {"url": registry}  # [registry] url: PostgreSQL (docs/control-plane.md)
    return data


class Db:
    """Counting queries on the shared registry, from this process (qmark SQL through the registry's connection)."""

    def __init__(self, home: Path, config_file: Path) -> None:
        from server.registry.fleet import open_registry  # noqa: PLC0415

        self.registry = open_registry(load_config(home, config_file))

    def one(self, sql: str, *params: object) -> int:
        row = self.registry.db.connection().execute(sql, params).fetchone()
        return int(row[0])

    def table_rows(self) -> dict[str, int] | None:
        try:
            names = [r[0] for r in self.registry.db.connection().execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'").fetchall()]
        except Exception:  # not SQLite
            try:
                names = [r[0] for r in self.registry.db.connection().execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                ).fetchall()]
            except Exception:
                return None
        return {n: self.one(f'SELECT COUNT(*) FROM "{n}"') for n in names}  # names from the catalog


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


def _end(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(work: Path, model: Path, n: int, *, servers: int, shards: int, registry: str, kill: bool,
            compression: str, loops: int, timeout: float, verbose: bool, restart_after: float = -1.0,
            secured: bool = False) -> Row:
    work.mkdir(parents=True)
    begun = time.monotonic()
    row = Row(n, servers, {"name": "mosquitto" if shards == 1 else "mosquitto-shards", "nodes": shards},
              "sqlite" if registry == "sqlite" else "postgresql", None, 0, 0, 0.0, None, secured=secured)

    def phase(what: str) -> None:
        if verbose:
            print(f"    [{time.monotonic() - begun:6.1f}s] {what}", flush=True)

    brokers = [MosquittoBroker(workdir=work / f"mosquitto-{i}", max_inflight_messages=BROKER_INFLIGHT,
                               max_queued_bytes=BROKER_QUEUED_BYTES) for i in range(shards)]
    procs: list[subprocess.Popen[bytes]] = []
    cleanup: list[Callable[[], None]] = []
    sim: subprocess.Popen[bytes] | None = None
    sysbytes: list[SysBytes] = []
    try:
        home = work / "home"
        home.mkdir()
        if registry != "sqlite":
            registry = fresh_database(registry, f"efbench_{os.getpid()}_{work.name.replace('-', '_')}")
            cleanup.append(lambda: drop_database(registry))
        paths = load_config(home).paths
        init_signing_key(paths)
        registry_only = home / "registry.toml"  # registration comes before the brokers (they need the logins)
        registry_only.write_text(_toml({"registry": {"url": registry}} if registry != "sqlite" else {}))
        db = Db(home, registry_only)
        registrar = _service(home, registry_only, model, compression, db)
        ids = device_ids(n, "dev")
        passwords = {}
        for device_id in ids:
            key = raw_public(device_key("bench", device_id).public_key())
            passwords[device_id] = registrar.register_device(
                device_id, profile=PROFILE, groups=[GROUP], broker_password=secured,
                public_key=base64.b64encode(key).decode()).get("broker_password")
        creds = work / "sim.creds"
        bytes_login: tuple[str, str] | None = None
        if secured:  # as `broker config --server-logins S [--shards K]` writes them, less TLS
            logins = server_logins(servers)
            users = {login: mosquitto_hash(str(server_broker_password(paths, login=login))) for login in logins}
            bytes_login = (f"{SERVER_USER}-bench-bytes", secrets.token_urlsafe(16))  # reads $SYS (SysBytes)
            users[bytes_login[0]] = mosquitto_hash(bytes_login[1])
            users |= db.registry.broker_users()
            tables = shard_users(users, [*logins, bytes_login[0]], shards) if shards > 1 else [users]
            for b, table in zip(brokers, tables, strict=True):
                b.security = BrokerSecurity(tls=None, users=table, hashed=True, acl=acl_text([*logins, bytes_login[0]]))
            atomic_write(creds, "".join(f"{d}:{pw}\n" for d, pw in passwords.items()).encode())
        for b in brokers:
            b.start()
        configs = []
        for i in range(servers):
            cfg = home / f"server-{i}.toml"
            cfg.write_text(_toml(server_settings(brokers, i, servers, registry, secured)))
            configs.append(cfg)
        service = _service(home, configs[0], model, compression, db)
        pem = work / "server-key.pem"
        pem.write_bytes(load_signing_key(paths).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        phase(f"{shards} broker(s) up, {n} devices registered")
        for i, cfg in enumerate(configs):
            procs.append(_start([sys.executable, str(Path(__file__).resolve()), "--serve", str(home), str(cfg),
                                 str(model), compression], work / f"server-{i}.log"))
        sysbytes = [SysBytes(b, bytes_login) for b in brokers]
        t_sim = time.perf_counter()
        sim = _start([sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
                      "--home", str(work / "sim-home"), "simulate", "--devices", str(n), "--prefix", "dev",
                      "--seed", "bench", "--no-register", "--broker", ",".join(b.url for b in brokers),
                      "--server-key", str(pem), "--until", f"{MODEL}:1", "--timeout", str(timeout + 300),
                      "--loops", str(loops), "--quiet", "--telemetry-s", "0", "--json", str(work / "sim.json"),
                      *(["--credentials", str(creds)] if secured else [])],
                     work / "sim.log")
        deadline = time.monotonic() + 120 + n * 0.05
        while db.one("SELECT COUNT(*) FROM devices WHERE online = 1") < n:
            dead = [p.args for p in [*procs, sim] if p.poll() is not None]
            if time.monotonic() > deadline or dead:
                raise RuntimeError(f"devices did not come online (exited: {dead}; logs in {work})")  # noqa: TRY301
            time.sleep(0.5)
        row.connect_s = round(time.perf_counter() - t_sim, 1)
        phase(f"every device online after {row.connect_s}s")
        time.sleep(1.0)  # births settle
        rows0 = db.table_rows()
        before = sum(s.fresh() for s in sysbytes)
        pids = [p.pid for p in procs]
        last_cpu = {pid: process_cpu(pid) for pid in pids}
        cpu0 = dict(last_cpu)
        bpids = [b.process.pid for b in brokers if b.process]
        bcpu0 = sum(process_cpu(p) for p in bpids)
        sim_cpu0 = process_cpu(sim.pid)
        t0 = time.perf_counter()
        dep_id = service.deploy(f"{MODEL}:1", target=f"group:{GROUP}", canary_percent=0, wave_percent=100,
                                max_failures_percent=100, probation_s=1.0, actor="bench")["deployment_id"]
        end = time.monotonic() + timeout
        sim_rss = broker_rss = 0
        sim_cpu = 0.0
        killed_pid = -1
        killed_at: float | None = None

        def restart() -> None:
            """What a supervisor does (systemd Restart=always): the same config, so the same MQTT client id."""
            nonlocal killed_at
            gone = next(i for i, p in enumerate(procs) if p.pid == killed_pid)
            procs[gone] = _start([sys.executable, str(Path(__file__).resolve()), "--serve", str(home),
                                 str(configs[gone]), str(model), compression], work / f"server-{gone}.log")
            pids.append(procs[gone].pid)
            last_cpu[procs[gone].pid] = cpu0[procs[gone].pid] = 0.0
            row.restarted_after_s = round(time.monotonic() - (killed_at or time.monotonic()), 1)
            killed_at = None
            phase(f"restarted the killed server after {row.restarted_after_s}s")

        while time.monotonic() < end:
            row.committed = db.one("SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = ? AND state = "
                                   "'committed'", dep_id)
            for pid in pids:
                if pid != killed_pid:
                    last_cpu[pid] = max(last_cpu[pid], process_cpu(pid))
            sim_cpu = max(sim_cpu, process_cpu(sim.pid))
            sim_rss = max(sim_rss, _rss_mb(sim.pid))
            broker_rss = max(broker_rss, sum(_rss_mb(p) for p in bpids))
            if row.committed >= n:
                row.rollout_s = round(time.perf_counter() - t0, 2)
                break
            if kill and row.killed is None and servers > 1 and (
                    row.committed or db.one("SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = ? AND "
                                            "state = 'downloading'", dep_id) >= max(1, n // 4)):
                owner = db.registry.get_deployment(dep_id).lease_owner or ""
                # the owner id is instance:pid:random (server/app.py): the process driving this rollout
                victim = next((p for p in procs if owner.split(":")[1:2] == [str(p.pid)]), procs[0])
                killed_pid = victim.pid
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                row.killed = owner or f"pid {victim.pid}"
                killed_at = time.monotonic()
                phase(f"SIGKILLed server {row.killed} with {row.committed} committed")
            if killed_at is not None and restart_after >= 0 and time.monotonic() - killed_at >= restart_after:
                restart()
            if verbose and int(time.monotonic() * 2) % 10 == 0:
                phase(f"committed {row.committed}/{n}")
            time.sleep(0.5)
        row.server_cpu_s = round(sum(last_cpu[p] - cpu0[p] for p in pids), 2)
        row.broker_cpu_s = round(sum(process_cpu(p) for p in bpids) - bcpu0, 2)
        row.broker_bytes = sum(s.fresh() for s in sysbytes) - before
        rows1 = db.table_rows()
        row.db_rows_written = None if rows0 is None or rows1 is None else sum(rows1.values()) - sum(rows0.values())
        row.sim_rss_mb, row.broker_rss_mb = sim_rss, broker_rss
        row.artifact_bytes = _artifact_bytes(db, dep_id)
        _check_nothing_lost(db, row, ids, dep_id)
        if row.killed and row.lost_rows:
            # mosquitto queues a shared subscription's messages for an offline persistent member (its session
            # outlives the process; eclipse-mosquitto/mosquitto#2662): events the broker had routed to the dead
            # server wait there for its client id, until its restart (same config) drains them
            row.lost_before_restart = row.lost_rows
            if killed_at is not None:
                restart()
            settle = time.monotonic() + 60
            while time.monotonic() < settle:
                _check_nothing_lost(db, row, ids, dep_id)
                if not row.lost_rows:
                    break
                time.sleep(0.5)
            phase(f"after the restart: missing {row.lost_rows}")
        row.sim_cpu_s = round(max(sim_cpu, process_cpu(sim.pid)) - sim_cpu0, 2)
        phase(f"rollout {row.rollout_s}s, {row.committed}/{n} committed")
    except Exception as exc:  # a run that fails is a row with its reason, the next run goes on
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        # a second SIGTERM must not cut the clean-up short: every child goes, whatever fails on the way
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        steps: list[Callable[[], None]] = [lambda: _end(sim)]
        steps += [lambda p=p: _end(p) for p in procs]  # type: ignore[misc]
        steps += [s.close for s in sysbytes] + [b.close for b in brokers] + cleanup
        for step in steps:
            with contextlib.suppress(Exception):
                step()
        signal.signal(signal.SIGTERM, previous)
        phase("stopped")
    return row


def fresh_database(url: str, name: str) -> str:
    """A new, empty PostgreSQL database for one run (every run starts from an empty registry); its URL."""
    psycopg = importlib.import_module("psycopg")  # the postgresql extra, only for --registry postgresql://...
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def drop_database(url: str) -> None:
    psycopg = importlib.import_module("psycopg")
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(urlunsplit(urlsplit(url)._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _service(home: Path, config_file: Path, model: Path, compression: str, db: Db) -> Any:
    """The deploy and registration path of a server, in this process (no broker link: the servers drive it)."""
    from server.artifacts import ArtifactStore  # noqa: PLC0415
    from server.service import FleetService  # noqa: PLC0415

    config = load_config(home, config_file)
    return FleetService(config, db.registry, builds=builds_for(model, compression),
                        artifacts=ArtifactStore(config.paths.artifacts_dir, db.registry))


def _artifact_bytes(db: Db, dep_id: str) -> int:
    with contextlib.suppress(Exception):
        return db.one("SELECT a.wire_bytes FROM artifacts a JOIN deployment_builds b ON a.artifact_id = "
                      "b.artifact_id WHERE b.deployment_id = ?", dep_id)
    return 0


def _check_nothing_lost(db: Db, row: Row, ids: list[str], dep_id: str) -> None:
    """Every device still registered, one deployment row each, committed, and its commit event recorded."""
    n = len(ids)
    row.lost_devices = n - db.one("SELECT COUNT(*) FROM devices WHERE device_id LIKE 'dev-%'")
    checks = {
        "deployment_devices": db.one("SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = ?", dep_id),
        "committed rows": row.committed,
        "lifecycle.committed events": db.one("SELECT COUNT(DISTINCT device_id) FROM events WHERE deployment_id = ? "
                                             "AND kind = 'lifecycle.committed'", dep_id),
        "devices serving v1": db.one("SELECT COUNT(*) FROM devices WHERE active_model = ? AND active_version = 1",
                                     MODEL),
    }
    row.lost_rows = [f"{what}: {got}/{n}" for what, got in checks.items() if got != n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=4, metavar=("HOME", "CONFIG", "MODEL", "COMPRESSION"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="N = 40: one scaled run with --kill and the baseline")
    parser.add_argument("--json", type=Path, help="write the rows as JSON to this path")
    parser.add_argument("--devices", default=None, help="comma-separated N values (default 1000,10000)")
    parser.add_argument("--servers", type=int, default=2, help="server processes in the scaled runs (default 2)")
    parser.add_argument("--shards", type=int, default=2, help="mosquitto shards in the scaled runs (default 2)")
    parser.add_argument("--registry", default="sqlite",
                        help="sqlite (the home's file) or a postgresql:// URL for the scaled runs (default sqlite)")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the lease-holding server mid-rollout")
    parser.add_argument("--secured", action="store_true",
                        help="scaled runs on brokers secured as `broker config --server-logins S` writes them")
    parser.add_argument("--restart-after", type=float, default=-1.0, metavar="S",
                        help="restart the killed server S seconds after the kill, as a supervisor would (default: "
                             "only after the rollout, if rows are missing)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the single-node baseline runs")
    parser.add_argument("--baseline-only", action="store_true", help="only the single-node baseline runs")
    parser.add_argument("--model-mb", type=float, default=1.0, help="model size in MB (default 1)")
    parser.add_argument("--compression", default="none", choices=("none", "zlib", "lzma"))
    parser.add_argument("--loops", type=int, default=2, help="simulator threads (default 2)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-rollout limit in seconds (default 600)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.serve:
        home, cfg, model, compression = args.serve
        return serve(Path(home), Path(cfg), Path(model), compression)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up brokers, servers and simulators on kill
    if args.quick:
        args.kill = True
    sizes = [int(x) for x in args.devices.split(",")] if args.devices else ([40] if args.quick else [1000, 10000])
    rows: list[Row] = []
    baseline_failed = False
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        model = write_model(work / "model.onnx", args.model_mb)
        print(f"model {model.stat().st_size / 1e6:.2f} MB; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
        for n in sizes:
            plans = []
            if not args.baseline_only:
                plans.append((args.servers, args.shards, args.registry, args.kill, args.secured))
            if not args.no_baseline and not baseline_failed:
                plans.append((1, 1, "sqlite", False, False))
            for servers, shards, registry, kill, secured in plans:
                row = run_one(work / f"run-{n}-{servers}-{shards}-{len(rows)}", model, n, servers=servers,
                              shards=shards, registry=registry, kill=kill, compression=args.compression,
                              loops=args.loops, timeout=args.timeout, verbose=args.verbose,
                              restart_after=args.restart_after, secured=secured)
                rows.append(row)
                if (servers, shards, registry) == (1, 1, "sqlite") and (row.rollout_s is None or row.error):
                    baseline_failed = True  # the baseline's largest completed size is the one before
                print(json.dumps(asdict(row)), flush=True)
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    ok = all(r.rollout_s is not None and not r.error and not r.lost_rows and not r.lost_devices for r in rows
             if (r.servers, r.broker["nodes"]) != (1, 1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
