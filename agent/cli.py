"""``edgefleet-agent``: the device-side command line.

    edgefleet-agent init --device-id pi-0042 --profile rpi4-aarch64-tflite-int8 \\
        --server-key server.pub --broker mqtt.example.com:8883 --tls --ca-cert ca.crt \\
        --username pi-0042 --password-file pw.txt
    edgefleet-agent run --config /etc/edgefleet-agent/agent.toml
    edgefleet-agent status [--json]
    edgefleet-agent install-service
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from agent import __version__
from agent.errors import ConfigError, EdgeError
from agent.protocol.shards import pick
from agent.runtime import faults
from agent.runtime.agent import Agent
from agent.runtime.config import AgentConfig, BrokerConfig, KeysConfig, load_config, render_config
from agent.runtime.fsutil import atomic_write
from agent.runtime.host import ModelHost
from agent.runtime.http import HttpConfig, InferenceHttpServer
from agent.runtime.keys import (
    fingerprint,
    generate_device_key,
    load_device_key,
    load_server_key,
    load_trust_anchor,
    public_key_b64,
    write_server_key,
)
from agent.runtime.logs import configure_logging
from agent.runtime.procs import process_alive
from agent.runtime.store import ModelStore

DEFAULT_CONFIG = Path(os.environ.get("EDGEFLEET_AGENT_CONFIG", "/etc/edgefleet-agent/agent.toml"))
DEFAULT_STORE = Path("/var/lib/edgefleet-agent")
SERVICE_PATH = Path("/etc/systemd/system/edgefleet-agent.service")

log = logging.getLogger("agent.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description=(
            "The edgefleet device agent: receives signed, encrypted models over MQTT, verifies and "
            "hot-swaps them, serves local inference (Open Inference Protocol on 127.0.0.1), reports "
            "telemetry and rolls back on command or when a new model misbehaves."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "first time on a device:\n"
            "  edgefleet-agent init --device-id ID --profile PROFILE --server-key server.pub --broker HOST:PORT\n"
            "  (give the printed fingerprint to the operator, who approves the device)\n"
            "  edgefleet-agent install-service && systemctl enable --now edgefleet-agent"
        ),
    )
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    init = sub.add_parser(
        "init",
        help="create this device's key pair and a configuration file",
        description=(
            "Create the device's X25519 key pair (private key 0600, never leaves the device), store the "
            "server's Ed25519 public key (the trust anchor) and write a TOML configuration. Prints the "
            "device public key and its fingerprint for enrollment."
        ),
    )
    init.add_argument("--device-id", required=True, help="this device's id (1-64 of A-Z a-z 0-9 . _ -)")
    init.add_argument("--profile", required=True, help="device profile name, e.g. rpi4-aarch64-tflite-int8")
    init.add_argument("--server-key", required=True, type=Path, help="the server's Ed25519 public key file")
    init.add_argument("--broker", required=True,
                      help="MQTT broker as HOST or HOST:PORT; several independent brokers (shards) as a "
                           "comma-separated list in the server's order: the device keeps its own one (docs/scale.md)")
    init.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                      help="connect to the broker with TLS (the default; --no-tls for plain MQTT on a trusted network)")
    init.add_argument("--ca-cert", type=Path, help="CA certificate for the broker (default: system CAs)")
    init.add_argument("--username", help="MQTT username (usually the device id)")
    secret = init.add_mutually_exclusive_group()
    secret.add_argument("--password-file", type=Path, help="file holding the MQTT password (copied, 0600)")
    secret.add_argument("--password-prompt", action="store_true", help="ask for the MQTT password")
    init.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config to write (default {DEFAULT_CONFIG})")
    init.add_argument("--store-dir", type=Path, default=DEFAULT_STORE, help=f"model store (default {DEFAULT_STORE})")
    init.add_argument("--http-port", type=int, default=8080, help="local inference port on 127.0.0.1 (default 8080)")
    init.add_argument("--force", action="store_true", help="overwrite an existing config (never the device key)")
    init.set_defaults(handler=cmd_init)

    _command(sub, "run", cmd_run, help="run the agent (foreground; systemd runs this)",
             description="Connect, serve the committed model on the local HTTP API, and apply updates until stopped.")
    status = _command(sub, "status", cmd_status, help="show what this device runs and where its update stands",
                      description="Reads the journal and model store (and the local API, if the agent is running).")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    service = _command(sub, "install-service", cmd_install_service, help="install the systemd unit",
                       description="Write the systemd unit for this installation (paths filled in) and print how "
                       "to enable it.")
    service.add_argument("--path", type=Path, default=SERVICE_PATH, help=f"where to write it (default {SERVICE_PATH})")
    service.add_argument("--user", default="root", help="user the agent runs as (default root)")
    service.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    return parser


def _command(
    sub: Any, name: str, handler: Callable[[argparse.Namespace], int], *, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand that reads the agent's config (``--config``), run by ``handler``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    parser.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = getattr(args, "handler", None)
    if handler is None:  # pragma: no cover - every subcommand sets a handler
        parser.error(f"no handler for {args.command}")
    try:
        return int(handler(args))
    except ConfigError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"edgefleet-agent: configuration error{where}: {exc.message}", file=sys.stderr)
        return 78  # EX_CONFIG: systemd shows it; restarting will not help
    except EdgeError as exc:
        print(f"edgefleet-agent: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


# -- init --------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:

    config_path: Path = args.config.resolve()
    if config_path.exists() and not args.force:
        raise ConfigError(f"{config_path} exists; pass --force to replace it", field="config")
    broker = args.broker
    if "," in broker:  # several independent brokers (shards, in the server's order): this device's own one
        try:
            broker = pick(args.device_id, [b.strip() for b in broker.split(",")])
        except ValueError as exc:
            raise ConfigError(f"--broker: {exc}", field="broker.host") from exc
        print(f"broker shard for {args.device_id}: {broker}")
    host, _, port_text = broker.rpartition(":") if ":" in broker else (broker, "", "")
    if not port_text.isdigit() and port_text:
        raise ConfigError(f"--broker {args.broker!r}: the port must be a number", field="broker.port")
    port = int(port_text) if port_text else (8883 if args.tls else 1883)
    directory = config_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    server_key = load_server_key(args.server_key)

    device_key_path = directory / "device.key"
    if device_key_path.exists():
        device_key = load_device_key(device_key_path)
        print(f"keeping the existing device key {device_key_path}")
    else:
        device_key = generate_device_key(device_key_path)
    server_key_path = directory / "server.pub"
    write_server_key(server_key_path, server_key)

    password_file: Path | None = None
    if args.password_file is not None or args.password_prompt:
        secret = (
            args.password_file.read_text().strip()
            if args.password_file is not None
            else getpass.getpass("MQTT password: ")
        )
        password_file = directory / "mqtt-password"
        atomic_write(password_file, (secret + "\n").encode(), mode=0o600)

    ca_cert: Path | None = None
    if args.ca_cert is not None:
        ca_cert = directory / "ca.crt"
        if args.ca_cert.resolve() != ca_cert:
            atomic_write(ca_cert, args.ca_cert.read_bytes(), mode=0o644)

    config = AgentConfig(
        device_id=args.device_id,
        profile=args.profile,
        store_dir=args.store_dir,
        broker=BrokerConfig(
            host=host,
            port=port,
            tls=args.tls,
            ca_cert=ca_cert,
            username=args.username,
            password_file=password_file,
        ),
        keys=KeysConfig(device_key=device_key_path, server_keys=(server_key_path,)),
        http=HttpConfig(port=args.http_port),
    )
    atomic_write(config_path, render_config(config).encode(), mode=0o640)
    load_config(config_path)  # what we wrote must load: fail here, not at the first start
    public = device_key.public_key()
    print(f"wrote {config_path}")
    print(f"device id:          {args.device_id}")
    print(f"device public key:  {public_key_b64(public)}")
    print(f"fingerprint:        {fingerprint(public)}")
    print(f"server key:         {fingerprint(server_key)} (trusted)")
    print("Give the operator the device id and fingerprint; they approve it with `edgefleet devices approve`.")
    return 0


# -- run ------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    configure_logging(config.log.format, config.log.level)
    faults.arm_from_env()  # a test/fault hook: off unless EDGEFLEET_FAULT_AT is set (docs/faults.md)
    device_key = load_device_key(config.keys.device_key)
    trust = load_trust_anchor(config.keys.server_keys)
    host = _make_host(config)
    server = _start_http(config, host)
    agent = Agent(config, host=host, device_key=device_key, trust=trust,
                  http_url=server.url if server is not None else None)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        faults.HOOK.release()
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.run()
    finally:
        if server is not None:
            server.close()
        host.close()
    return 0


def _make_host(config: AgentConfig) -> ModelHost:
    """The serving runtime, configured from ``[inference]``."""
    return ModelHost(config.inference)


def _start_http(config: AgentConfig, host: ModelHost) -> InferenceHttpServer | None:
    h = config.http
    if not h.enabled:
        return None
    try:
        return InferenceHttpServer(host, h).start()
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {h.host}:{h.port}: {exc.strerror or exc}", field="http.port") from exc


# -- status -----------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    store = ModelStore(config.store_dir, keep=config.models.keep_versions)
    record, problems = store.read_journal()
    saved = store.read_status() or {}
    pid = saved.get("pid")
    running = isinstance(pid, int) and process_alive(pid)
    serving_name = record.committed.name if record and record.committed else None
    api = _local_api(config, serving_name, saved.get("http")) if running and config.http.enabled else None
    kept = [
        {
            "version": v.ref.version,
            "name": v.ref.name,
            "artifact_id": v.artifact_id,
            "variant": v.variant,
            "committed_at": v.committed_at,
            "size": v.size,
        }
        for v in store.kept()
    ]
    status: dict[str, Any] = {
        "device_id": config.device_id,
        "profile": config.profile,
        "running": running,
        "pid": pid if running else None,
        "lifecycle": record.state.value if record else None,
        "committed": record.committed.to_dict() if record and record.committed else None,
        "target": record.target.to_dict() if record and record.target else None,
        "serving": saved.get("active") if running else None,
        "kept": kept,
        "last_seq": record.last_seq if record else None,
        "desired_expires_at": saved.get("desired_expires_at"),
        "desired_expired": _expired(saved.get("desired_expires_at")),
        "journal_problems": problems,
        "local_api": api,
        "store_dir": str(config.store_dir),
    }
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(_status_table(status))
    return 0


def _local_api(config: AgentConfig, model: str | None, running_url: Any = None) -> dict[str, Any]:
    """Readiness, and what the running agent's HTTP API says it serves (its live view, not the journal's).

    ``running_url`` is what the running agent wrote in status.json: the port it bound (``port = 0`` picks one).
    """
    base = running_url if isinstance(running_url, str) and running_url.startswith("http://") else (
        f"http://{config.http.host}:{config.http.port}")
    out: dict[str, Any] = {"url": base, "ready": _get_json(f"{base}/v2/health/ready") is not None}
    if model is not None:
        meta = _get_json(f"{base}/v2/models/{model}")
        if isinstance(meta, dict):
            out["model"] = {
                "name": meta.get("name"),
                "versions": meta.get("versions"),
                "platform": meta.get("platform"),
            }
        stats = _get_json(f"{base}/v2/models/{model}/stats")
        if isinstance(stats, dict):
            out["stats"] = stats
    return out


def _get_json(url: str) -> Any:
    """GET a loopback URL of the agent; None on any failure or non-200."""
    with (
        contextlib.suppress(OSError, urllib.error.URLError, ValueError),
        urllib.request.urlopen(url, timeout=1.0) as response,  # noqa: S310 - the agent's own loopback URL
    ):
        body = response.read()
        return json.loads(body) if response.status == 200 and body else ({} if response.status == 200 else None)
    return None


def _status_table(s: dict[str, Any]) -> str:
    def ref(d: Any) -> str:
        return f"{d['name']} v{d['version']}" if isinstance(d, dict) else "-"

    serving = s.get("serving")
    serving_text = f"{ref(serving)} ({serving.get('state')})" if isinstance(serving, dict) else "-"
    api = s.get("local_api")
    api_text = "-"
    if api:
        api_text = f"{api['url']} ({'ready' if api['ready'] else 'not ready'})"
        stats = api.get("stats")
        if isinstance(stats, dict):
            api_text += f", v{stats.get('version')}: {stats.get('requests')} requests, {stats.get('errors')} errors"
    kept = ", ".join(f"v{k['version']}" for k in s["kept"]) or "-"
    rows = [
        ("device", f"{s['device_id']} ({s['profile']})"),
        ("agent", f"running (pid {s['pid']})" if s["running"] else "not running"),
        ("lifecycle", s["lifecycle"] or "-"),
        ("serving", serving_text),
        ("committed", ref(s["committed"])),
        ("target", ref(s["target"])),
        ("kept", kept),
        ("last seq", str(s["last_seq"] if s["last_seq"] is not None else "-")),
        ("desired expires", _when(s.get("desired_expires_at")) + (
            "  EXPIRED: no fresh desired state (server stuck or updates withheld?)" if s.get("desired_expired") else ""
        )),
        ("local API", api_text),
        ("store", s["store_dir"]),
    ]
    if s["journal_problems"]:
        rows.append(("journal", "; ".join(s["journal_problems"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _expired(ts: Any) -> bool:
    """Freeze detection: the last signed desired state expired and nothing fresh replaced it."""
    return isinstance(ts, (int, float)) and ts < time.time()


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- install-service ----------------------------------------------------------------------------------------


def service_unit(*, config: Path, store: Path, user: str, executable: str | None = None) -> str:
    template = resources.files("agent").joinpath("data/edgefleet-agent.service").read_text()
    exe = executable or shutil.which("edgefleet-agent") or f"{sys.executable} -m agent"
    return (
        template.replace("@EXEC@", exe)
        .replace("@CONFIG@", str(config))
        .replace("@CONFIG_DIR@", str(config.parent))
        .replace("@STORE@", str(store))
        .replace("@USER@", user)
    )


def cmd_install_service(args: argparse.Namespace) -> int:

    config_path = args.config.resolve()
    config = load_config(config_path)
    unit = service_unit(config=config_path, store=config.store_dir, user=args.user)
    if args.print:
        print(unit, end="")
        return 0
    atomic_write(args.path, unit.encode(), mode=0o644)
    print(f"wrote {args.path}")
    print("now: systemctl daemon-reload && systemctl enable --now edgefleet-agent")
    return 0
