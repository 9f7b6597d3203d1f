"""``edgefleet simulate``: a fleet of simulated devices for load tests and demos (docs/simulator.md)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich import box
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from agent.protocol.envelope import TrustAnchor, raw_public
from agent.protocol.messages import ModelRef
from server.commands.term import make_console
from server.config import BrokerSection, load_config
from server.errors import ConflictError, ServerError
from server.keys import atomic_write, load_signing_key
from server.refs import parse_model_ref

console = make_console()
err_console = make_console(stderr=True)

DESCRIPTION = """\
Run N simulated devices against a broker and a server. Each device is its own MQTT connection
(persistent session, Last Will, birth report) running the agent's real protocol code: it verifies
signed desired states and commands, unwraps its data key, authenticates and decrypts every chunk,
reassembles the artifact with the agent's reassembly code and checks both digests, and goes
through the agent's lifecycle state machine (download, verify, warm-up, probation, commit or
rollback), reporting events and retained state as an agent does.

Simulated, not real: the model is not stored (digests are computed as chunks arrive), nothing is
written to disk, and inference is a stand-in: the warm-up health check passes, except for versions
given with --fail-version (a latency failure, so they roll back), and probation sees synthetic
traffic (--requests-per-s at --latency-ms p95). A few threads (--loops) multiplex all the
connections; 1,000 devices run on a 2-core machine.

By default the devices are registered (with their keys) through the API of the server on --home,
in --group, so `edgefleet deploy MODEL:VERSION --to group:sim` reaches them. Keys are derived from
--seed and the device id, so a second run with the same seed is the same fleet.

A secured broker (what `edgefleet broker config` generates: TLS, a login per device, an ACL):
  edgefleet simulate --devices 100 --issue-credentials sim.creds     # register, get each device a
      password from the server (as `devices add` does), write DEVICE_ID:PASSWORD lines (0600), exit
  edgefleet broker config --out /etc/mosquitto/edgefleet ...; kill -HUP $(pidof mosquitto)
  edgefleet simulate --devices 100 --no-register --credentials sim.creds --ca ca.crt --tls
A refused login or an untrusted certificate stops the run with exit status 1.
"""

#: a credentials file is one short line per device; refuse anything far bigger before reading it
MAX_CREDENTIALS_BYTES = 20000 * 2048


def _ref(text: str) -> Any:
    try:
        name, version = parse_model_ref(text)
    except ServerError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc
    return ModelRef(name, version)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate", help="run N simulated devices (real MQTT and agent protocol; stand-in inference)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices (1..20000)")
    p.add_argument("--prefix", default="sim", help="device ids are PREFIX-0000, PREFIX-0001, ... (default sim)")
    p.add_argument("--profile", default="raspberry-pi-4",
                   help="device profile they report (firmware_profiles/NAME.toml; default raspberry-pi-4)")
    p.add_argument("--group", default="sim", help="group they are registered in (default sim)")
    p.add_argument("--seed", default="edgefleet", help="seed the device keys are derived from (default edgefleet)")
    p.add_argument("--no-register", action="store_true",
                   help="do not register the devices (they are registered already, e.g. by a benchmark)")
    p.add_argument("--server", metavar="URL", default=None,
                   help="server API URL for registration (default: as the other commands find it)")
    p.add_argument("--config", type=Path, default=None, metavar="PATH",
                   help="server config file (default HOME/server.toml)")
    p.add_argument("--broker", metavar="URL", default=None,
                   help="mqtt://host:port or mqtts://host:port, or several independent brokers (shards) as a "
                        "comma-separated list in their configured order: each device connects to its own "
                        "(default: [broker] url or shards of the server config)")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS (implied by mqtts:// and by a [broker] url of mqtts://)")
    p.add_argument("--ca", "--ca-cert", dest="ca_cert", type=Path, default=None, metavar="FILE",
                   help="CA certificate the broker's certificate must chain to (default: [broker] ca_cert of "
                        "the server config when --broker is not given, else the system CAs)")
    p.add_argument("--no-check-hostname", action="store_true",
                   help="do not check that the broker's certificate names the --broker host (checked by default)")
    creds = p.add_mutually_exclusive_group()
    creds.add_argument("--credentials", type=Path, default=None, metavar="FILE",
                       help="per-device MQTT logins: DEVICE_ID:PASSWORD lines (# comments); each device logs "
                            "in as its id, as the generated ACL expects")
    creds.add_argument("--issue-credentials", type=Path, default=None, metavar="FILE",
                       help="register the devices with a broker password issued by the server (new passwords "
                            "for ones registered already), write them to FILE (0600) and exit: then regenerate "
                            "the broker config, reload mosquitto, and run with --no-register --credentials FILE")
    p.add_argument("--server-key", type=Path, default=None, metavar="PEM",
                   help="the server's Ed25519 public key the devices trust (default: the signing key on --home)")
    p.add_argument("--fail-version", type=int, action="append", default=[], metavar="V",
                   help="this version fails its warm-up health check on every device (repeatable)")
    p.add_argument("--requests-per-s", type=float, default=5.0, help="synthetic requests during probation (default 5)")
    p.add_argument("--latency-ms", type=float, default=2.0, help="synthetic p95 latency (default 2 ms)")
    p.add_argument("--telemetry-s", type=float, default=30.0, help="telemetry interval, 0 = none (default 30 s)")
    p.add_argument("--loops", type=int, default=2, help="threads multiplexing the connections (default 2)")
    p.add_argument("--until", type=_ref, default=None, metavar="MODEL:VERSION",
                   help="exit 0 once every device runs this version committed (exit 1 at --timeout)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write a summary as JSON at the end")
    p.add_argument("--quiet", action="store_true", help="no live view")
    p.set_defaults(handler=cmd_simulate)


def _trust(args: argparse.Namespace, config: Any) -> Any:
    if args.server_key is not None:
        key = serialization.load_pem_public_key(args.server_key.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ServerError(f"{args.server_key} is not an Ed25519 public key")
        return TrustAnchor.of(key)
    return TrustAnchor.of(load_signing_key(config.paths).public_key())


def read_credentials(path: Path, ids: list[str]) -> dict[str, str]:
    """``DEVICE_ID:PASSWORD`` lines (blank lines and ``#`` comments ignored); every device in ``ids`` needs one."""
    if path.stat().st_size > MAX_CREDENTIALS_BYTES:
        raise ServerError(f"{path}: over {MAX_CREDENTIALS_BYTES} bytes; not a credentials file")
    out: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        device_id, sep, password = line.partition(":")
        if not sep or not device_id or not password:
            raise ServerError(f"{path}:{number}: expected DEVICE_ID:PASSWORD")
        out[device_id] = password
    missing = [d for d in ids if d not in out]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ServerError(f"{path} has no password for {', '.join(missing[:3])}{more} "
                          "(use --issue-credentials to get them from the server)")
    return out


def _ca_cert(args: argparse.Namespace, config: Any, broker: Any) -> Path | None:
    """--ca, else the server config's [broker] ca_cert when the broker is the configured one."""
    ca: Path | None = args.ca_cert
    if ca is None and not args.broker and broker.ca_cert:
        ca = config.resolve(broker.ca_cert)
    if ca is not None and not ca.is_file():
        raise ServerError(f"CA certificate {ca} does not exist")
    return ca


def _issue_credentials(args: argparse.Namespace, ids: list[str]) -> int:
    """Register with a server-issued broker password each (the real enrolment path) and write them."""

    if args.no_register:
        raise ServerError("--issue-credentials registers the devices; it does not go with --no-register")
    passwords: dict[str, str] = {}
    existing = _register(args, ids, passwords)
    text = "# edgefleet simulate credentials: DEVICE_ID:PASSWORD (MQTT username = device id)\n"
    text += "".join(f"{d}:{passwords[d]}\n" for d in ids)
    atomic_write(args.issue_credentials, text.encode(), mode=0o600)
    console.print(f"wrote {len(ids)} login(s) to {args.issue_credentials} ({existing} device(s) were registered "
                  "already and got a new password)")
    console.print("next: `edgefleet broker config --out DIR` and reload mosquitto (SIGHUP), then "
                  f"`edgefleet simulate --devices {len(ids)} --no-register --credentials {args.issue_credentials}"
                  " ...` with the same --prefix and --seed")
    return 0


def _register(args: argparse.Namespace, ids: list[str], passwords: dict[str, str] | None = None) -> int:
    """Register ``ids`` through the API; with ``passwords``, each gets a broker password put there."""
    # startup cost: the API client stack and the simulator (paho, the device core) load only for `simulate`
    from server.client import connect  # noqa: PLC0415
    from server.simulator import device_key  # noqa: PLC0415

    client = connect(args.home, server=args.server, config_path=args.config)
    existing = 0
    with Progress(TextColumn("registering devices"), BarColumn(), MofNCompleteColumn(), console=err_console,
                  disable=args.quiet) as bar:
        task = bar.add_task("register", total=len(ids))
        for device_id in ids:
            key = base64.b64encode(raw_public(device_key(args.seed, device_id).public_key())).decode()
            try:
                out = client.call("register_device", body={"device_id": device_id, "profile": args.profile,
                                                           "public_key": key, "groups": [args.group],
                                                           "broker_password": passwords is not None})
            except ConflictError:
                existing += 1  # registered by an earlier run (same seed, same key)
                if passwords is not None:
                    out = client.call("reset_broker_password", path={"device_id": device_id})
            if passwords is not None:
                passwords[device_id] = str(out["broker_password"])
            bar.advance(task)
    return existing


def _view(snap: Any, started: float, until: Any) -> Table:
    table = Table(box=box.SIMPLE, title=f"simulated fleet, {time.monotonic() - started:.0f}s")
    table.add_column("devices", justify="right")
    table.add_column("online", justify="right")
    table.add_column("lifecycle")
    table.add_column("serving")
    table.add_column("chunks in", justify="right")
    table.add_column("sent", justify="right")
    life = ", ".join(f"{k} {v}" for k, v in sorted(snap.lifecycle.items()))
    serving = ", ".join(f"{k}: {v}" for k, v in sorted(snap.active.items()))
    if until is not None:
        serving += f"  (committed {until.name} v{until.version}: {snap.committed_on(until)})"
    table.add_row(str(snap.devices), str(snap.online), life, serving, str(snap.chunks),
                  f"{snap.published_bytes / 1e6:.2f} MB")
    return table


def cmd_simulate(args: argparse.Namespace) -> int:
    # startup cost: the simulator (paho, the device core) loads only for `simulate`
    from server.simulator import BrokerTarget, SimFleet, SimSettings, device_ids  # noqa: PLC0415

    if not 1 <= args.devices <= 20000:
        err_console.print("[bold red]error[/]: --devices must be within 1..20000")
        return 2
    try:
        config = load_config(args.home, args.config)
        if args.broker:
            b = BrokerSection(url=args.broker.split(",")[0].strip(),
                              shards=tuple(u.strip() for u in args.broker.split(",")) if "," in args.broker else ())
            b.validate()
        else:
            b = config.broker
        ids = device_ids(args.devices, args.prefix)
        if args.issue_credentials is not None:
            return _issue_credentials(args, ids)
        trust = _trust(args, config)
        credentials = None if args.credentials is None else read_credentials(args.credentials, ids)
        ca_cert = _ca_cert(args, config, b)
        existing = 0 if args.no_register else _register(args, ids)
    except ServerError as exc:
        err_console.print(f"[bold red]error[/]: {exc.message}", highlight=False)
        return 1
    except OSError as exc:
        err_console.print(f"[bold red]error[/]: {exc}", highlight=False)
        return 1
    if existing:
        err_console.print(f"{existing} device(s) were registered already (keeping their registration)")
    settings = SimSettings(
        profile=args.profile, fail_versions=frozenset(args.fail_version), requests_per_s=args.requests_per_s,
        latency_ms=args.latency_ms, telemetry_s=args.telemetry_s,
    )
    # several brokers (shards): each device connects to its own one, as its agent would (docs/scale.md)
    targets = [BrokerTarget(w.host, w.port, tls=w.tls or args.tls, ca_cert=str(ca_cert) if ca_cert else None,
                            credentials=credentials, check_hostname=not args.no_check_hostname)
               for w in (BrokerSection(url=u) for u in b.urls)]
    fleet = SimFleet(ids, broker=targets, trust=trust, settings=settings, seed=args.seed, loops=args.loops)
    stop = threading.Event()
    previous = {}
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():  # Ctrl-C / SIGTERM: stop cleanly (offline reports)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    started = time.monotonic()
    reached: float | None = None
    code = 0
    fleet.start()
    try:
        live = None if args.quiet else Live(_view(fleet.snapshot(), started, args.until), console=err_console,
                                            auto_refresh=False)
        with live or contextlib.nullcontext():
            while not stop.wait(0.25):
                fleet.check()
                refused = fleet.refusals()
                if refused:
                    device_id, why = sorted(refused.items())[0]
                    more = f" (and {len(refused) - 1} more device(s))" if len(refused) > 1 else ""
                    hint = ("check --ca and the broker's certificate name" if why.startswith("TLS")
                            else "check --credentials: each device logs in as its id with its own password")
                    err_console.print(f"[bold red]error[/]: {device_id}: {why}{more}; {hint}", highlight=False)
                    code = 1
                    break
                snap = fleet.snapshot()
                if live is not None:
                    live.update(_view(snap, started, args.until), refresh=True)
                if args.until is not None and snap.committed_on(args.until) == snap.devices:
                    reached = time.monotonic() - started
                    break
                if args.timeout is not None and time.monotonic() - started > args.timeout:
                    code = 1 if args.until is not None else 0
                    break
    finally:
        snap = fleet.snapshot()
        fleet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signals:  # stopped by Ctrl-C or SIGTERM: one line, and the shell's exit status for that signal
        err_console.print(f"interrupted ({signal.Signals(signals[0]).name}): {snap.devices} simulated device(s) "
                          "stopped", highlight=False)
        code = 128 + signals[0]
    elif args.until is not None:
        if reached is not None:
            console.print(f"all {snap.devices} devices run {args.until.name} v{args.until.version} committed "
                          f"after {reached:.1f}s")
        else:
            console.print(f"[bold red]{snap.committed_on(args.until)} of {snap.devices} devices run "
                          f"{args.until.name} v{args.until.version} committed[/] when it stopped")
            code = 1
    if args.json is not None:
        summary = {"devices": snap.devices, "online": snap.online, "lifecycle": snap.lifecycle,
                   "serving": snap.active, "committed": snap.committed, "chunks": snap.chunks,
                   "duplicate_chunks": snap.duplicate_chunks, "retries": snap.retries,
                   "published_bytes": snap.published_bytes,
                   "measurements_sent": sum(d.counters.measurements for d in fleet.devices),
                   "timeline": fleet.timeline(), "until_reached_s": reached, "ran_s": time.monotonic() - started}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return code
