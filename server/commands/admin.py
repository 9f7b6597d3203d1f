"""Administration of the server machine: ``keys init``, ``tokens``, ``broker config`` and ``server run``.

``tokens create|list|revoke`` are API calls (role admin) like every fleet command. ``keys init``
and ``broker config`` are not on the API on purpose: they write this machine's files (the signing
key, the CLI's token, mosquitto's config, password hashes and TLS key), which no API caller may
read or replace; they write their audit rows directly (actor ``local:<account>``).
``server run`` starts the control plane itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from server import logs
from server.access import local_actor
from server.commands.common import add_command, api_client, console, err_console, local_time
from server.config import ServerPaths, config_path, load_config
from server.errors import ServerError
from server.identity import refuse_reserved_logins
from server.keys import (
    atomic_write,
    init_signing_key,
    mosquitto_hash,
    new_token,
    server_broker_password,
    server_password_file,
    token_digest,
    write_cli_token,
)
from server.registry.fleet import open_registry
from server.textsafe import safe


def cmd_keys_init(args: argparse.Namespace) -> int:

    paths = ServerPaths(args.home)
    ident = init_signing_key(paths, force=args.force)
    config = load_config(args.home, args.config)
    registry = open_registry(config)
    token_path = paths.keys_dir / "cli.token"
    if not token_path.exists() or args.force:
        token = new_token()
        registry.add_token("admin", token_digest(token), role="admin", replace=True)
        write_cli_token(paths, token)
        made_token = True
    else:
        made_token = False
    registry.record_audit(actor=f"local:{_user()}", action="keys_init", target=None,
                          params={"force": args.force}, outcome="ok",
                          detail=f"key {ident.key_id} {'created' if ident.created else 'kept'}")
    console.print(f"signing key {'[green]created[/]' if ident.created else 'exists'}: {ident.private_path} (0600)")
    console.print(f"key id:      [bold]{ident.key_id}[/]")
    console.print(f"public key:  {ident.public_key_b64}")
    console.print(f"             {ident.public_path} (install on every device as its trust anchor)")
    if made_token:
        console.print(f"API token for the local CLI (actor [bold]admin[/], role admin): {token_path} (0600)")
    return 0


def _user() -> str:
    """This process's OS account (from its uid, not $USER/$LOGNAME)."""
    return local_actor().removeprefix("local:")


def cmd_tokens_create(args: argparse.Namespace) -> int:
    out = api_client(args).call("token_create", body={"name": args.name, "role": args.role})
    err_console.print(f"API token for [bold]{safe(out['name'])}[/], role {out['role']} (shown once; the server keeps "
                      "only its hash):")
    print(out["token"])
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    table = Table("name", "role", "created", "revoked", box=box.SIMPLE)
    for t in api_client(args).call("token_list"):
        table.add_row(safe(t["name"]), safe(t["role"]), local_time(t["created_at"]),
                      local_time(t["revoked_at"]) if t["revoked_at"] else "")
    console.print(table)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    api_client(args).call("token_revoke", path={"name": args.name})
    console.print(f"token {safe(args.name)} revoked")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    # startup cost: server.broker loads the X.509 toolkit of cryptography; only this command needs it
    from server.broker import (  # noqa: PLC0415
        PROTOCOL_MAX_PACKET,
        SERVER_USER,
        BrokerError,
        BrokerSecurity,
        TLSFiles,
        acl_text,
        generate_tls,
        hand_over,
        render_config,
    )
    from server.shards import shard_users  # noqa: PLC0415

    if args.port + args.shards - 1 > 65535:
        raise ServerError(f"--port {args.port} + {args.shards} shards runs past port 65535")
    config = load_config(args.home, args.config)
    registry = open_registry(config)
    out: Path = args.out.resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tls: TLSFiles | None = None
    if not args.no_tls:
        if args.ca_cert or args.server_cert or args.server_key:
            if not (args.ca_cert and args.server_cert and args.server_key):
                raise ServerError("--ca-cert, --server-cert and --server-key go together")
            tls = TLSFiles(args.ca_cert.resolve(), args.server_cert.resolve(), args.server_key.resolve())
        elif (out / "tls" / "ca.crt").exists():
            tls = TLSFiles(out / "tls" / "ca.crt", out / "tls" / "server.crt", out / "tls" / "server.key")
        else:
            tls = generate_tls(out / "tls", hosts=tuple(h.strip() for h in args.cert_hosts.split(",") if h.strip()))
    devices = registry.broker_users()
    refuse_reserved_logins(devices, config.broker.username)
    # one login per server process: the broker binds client id to username, so two processes sharing one
    # login would take the session from each other
    logins = [SERVER_USER] + [f"{SERVER_USER}-{i}" for i in range(2, args.server_logins + 1)]
    servers = {login: str(server_broker_password(config.paths, login=login)) for login in logins}
    users = {login: mosquitto_hash(pw) for login, pw in servers.items()} | devices
    # --shards N: N independent mosquittos (docs/scale.md), each with only its own devices' logins and the
    # same ACL and server logins, in OUT/shard-I/ listening on PORT + I; one broker: OUT itself, as always
    tables = shard_users(users, logins, args.shards) if args.shards > 1 else [users]
    dirs = [out / f"shard-{i}" for i in range(args.shards)] if args.shards > 1 else [out]
    scheme = "mqtt" if tls is None else "mqtts"
    connect_host = args.listen if args.listen not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    urls = [f"{scheme}://{connect_host}:{args.port + i}" for i in range(len(dirs))]
    handed = False
    try:
        for i, (where, table) in enumerate(zip(dirs, tables, strict=True)):
            fresh = not where.exists()
            where.mkdir(parents=True, exist_ok=True)
            text = render_config(port=args.port + i, host=args.listen, workdir=where, run_as=args.run_as,
                                 security=BrokerSecurity(tls=tls, users=table, hashed=True, acl=acl_text(logins)),
                                 persistence=args.persistence,
                                 max_inflight_messages=20, max_queued_bytes=16 << 20,  # bounded per device
                                 max_packet_size=PROTOCOL_MAX_PACKET)
            atomic_write(where / "mosquitto.conf", text.encode(), mode=0o644)
            # mosquitto started as root switches to run_as before reading passwd and the TLS key (0600): hand them
            # over (the directory too, for persistence, but only one this command made: never chown /etc/...)
            owned = [*([where] if fresh or (created and where == out) else []), where / "passwd", where / "acl",
                     where / "mosquitto.db"]
            if tls is not None and tls.server_key.parent == out / "tls":
                owned += [out / "tls", tls.server_key]
            handed = hand_over(args.run_as, owned) or handed
    except BrokerError as exc:
        raise ServerError(str(exc)) from exc
    where_line = (f'url = "{urls[0]}"\n' if len(urls) == 1
                  else "shards = [" + ", ".join(f'"{u}"' for u in urls) + "]\n")
    broker_section = (
        "[broker]\n"
        + where_line
        + f'username = "{SERVER_USER}"\n'
        'password_file = "keys/broker-server.password"\n'
        + (f'ca_cert = "{tls.ca_cert}"\n' if tls else "")
        # several servers: they split device traffic, and a survivor takes over a dead one's session as its login
        + ("shared_subscriptions = true\npeer_logins = [" + ", ".join(f'"{login}"' for login in logins) + "]\n"
           if len(logins) > 1 else "")
    )
    cfg = config_path(args.home)
    if not cfg.exists():
        atomic_write(cfg, broker_section.encode())
        wrote = f"wrote {cfg} with this [broker] section"
    else:
        wrote = f"{cfg} exists; make its [broker] section read:"
    registry.record_audit(actor=f"local:{_user()}", action="broker_config", target=str(out),
                          params={"port": args.port, "tls": tls is not None, "shards": args.shards}, outcome="ok",
                          detail=f"{len(devices)} device login(s), {len(logins)} server login(s)")
    for where, table in zip(dirs, tables, strict=True):
        console.print(f"mosquitto config: {where / 'mosquitto.conf'}  (run: mosquitto -c {where / 'mosquitto.conf'})")
        console.print(f"logins: {len(logins)} server + {len(table) - len(logins)} device(s); ACL: {where / 'acl'}")
    if len(dirs) > 1:
        console.print("each device connects to its own shard only: `edgefleet broker shard DEVICE_ID` names it, and "
                      "`edgefleet-agent init --broker` takes the shards' list in this order")
    for login in logins[1:]:
        console.print(f"another server process: [broker] username = \"{login}\", password_file = "
                      f"\"keys/{server_password_file(login)}\"", highlight=False, markup=False)
    if len(logins) > 1:
        console.print(f"every server's home needs all {len(logins)} keys/broker-*.password files (0600): a survivor "
                      "takes over a dead server's session with its login ([broker] peer_logins, docs/scale.md)",
                      highlight=False, markup=False)
    console.print(f"mosquitto runs as user {args.run_as} when started as root"
                  + (f" (its files in {out} now belong to {args.run_as})" if handed else ""))
    if tls:
        console.print(f"TLS: CA {tls.ca_cert} (give it to devices), certificate {tls.server_cert}")
    console.print(f"{wrote}\n{broker_section}", highlight=False, markup=False)
    console.print("after registering or revoking devices, run this again and reload mosquitto (kill -HUP)")
    return 0


def cmd_broker_shard(args: argparse.Namespace) -> int:
    """Which broker each device belongs to, from the server config's [broker] shards (docs/scale.md)."""
    from agent.protocol.shards import shard_of  # noqa: PLC0415

    urls = load_config(args.home, args.config).broker.urls
    for device_id in args.device_id:
        try:
            index = shard_of(device_id, len(urls))
        except ValueError as exc:
            raise ServerError(str(exc)) from exc
        console.print(f"{device_id}\tshard {index} of {len(urls)}\t{urls[index]}", highlight=False, markup=False)
    return 0


def cmd_server_run(args: argparse.Namespace) -> int:
    # startup cost: the server process (HTTP stack, MQTT client, rollout driver) loads only for `server run`
    from server.app import FleetServer  # noqa: PLC0415

    config = load_config(args.home, args.config)
    os.umask(0o077)  # whatever the server writes (builds, artifacts, uploads, the registry's WAL) is private
    logs.configure(args.log_level or config.server.log_level)
    server = FleetServer(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(json.dumps({"event": "ready", "api_url": server.api_url, "pid": os.getpid()}), file=sys.stderr,
          flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="the server's signing key", description="The server's signing key.")
    ks = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    p = add_command(ks, "init", "create the Ed25519 signing key (0600) and the local CLI's API token", cmd_keys_init)
    p.add_argument("--force", action="store_true", help="replace an existing key (every device must then trust the "
                   "new one)")

    tokens = subparsers.add_parser("tokens", help="API tokens (for CI pipelines and operators)",
                                   description="API tokens. The server stores only their SHA-256.")
    ts = tokens.add_subparsers(dest="tokens_command", metavar="COMMAND", required=True)
    p = add_command(ts, "create", "create a token for NAME with a role and print it once", cmd_tokens_create, "name")
    p.add_argument("--role", required=True, choices=("read", "deploy", "admin"),
                   help="read: status, events, audit; deploy: also deploy, rollback, halt, model add/build; "
                        "admin: also devices, enrollment, groups, broker passwords")
    add_command(ts, "list", "list tokens", cmd_tokens_list)
    add_command(ts, "revoke", "revoke NAME's token", cmd_tokens_revoke, "name")

    broker = subparsers.add_parser("broker", help="MQTT broker configuration", description="MQTT broker setup.")
    bs = broker.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)
    p = add_command(bs, "config", "write a mosquitto config with TLS, per-device logins and ACLs", cmd_broker_config)
    p.add_argument("--out", type=Path, required=True, help="directory for mosquitto.conf, passwd, acl, tls/")
    p.add_argument("--listen", default="0.0.0.0", help="listener address (default 0.0.0.0)")  # noqa: S104
    p.add_argument("--port", type=int, default=8883, help="listener port (default 8883)")
    p.add_argument("--no-tls", action="store_true", help="plain MQTT (only on a trusted network)")
    p.add_argument("--cert-hosts", default="localhost,127.0.0.1",
                   help="host names/IPs for the generated server certificate (comma-separated)")
    p.add_argument("--ca-cert", type=Path, help="use this CA instead of generating one")
    p.add_argument("--server-cert", type=Path)
    p.add_argument("--server-key", type=Path)
    p.add_argument("--persistence", action=argparse.BooleanOptionalAction, default=True,
                   help="persist retained messages and sessions across broker restarts (default on)")
    p.add_argument("--server-logins", type=int, default=1, choices=range(1, 17), metavar="N",
                   help="broker logins for N server processes (edgefleet-server, edgefleet-server-2, ...; default 1)")
    p.add_argument("--shards", type=int, default=1, choices=range(1, 257), metavar="N",
                   help="N independent brokers (OUT/shard-I/, port PORT+I), each device's login on its own shard "
                        "only (docs/scale.md; default 1)")
    p.add_argument("--run-as", default="mosquitto", metavar="USER",
                   help="account mosquitto switches to when started as root (default mosquitto, the Debian "
                        "package's user); run as root, this command gives it the generated passwd, acl and key")

    p = add_command(bs, "shard", "print the broker (shard) each device connects to", cmd_broker_shard)
    p.add_argument("device_id", nargs="+")

    srv = subparsers.add_parser("server", help="run the control plane", description="The edgefleet server.")
    ss = srv.add_subparsers(dest="server_command", metavar="COMMAND", required=True)
    p = add_command(ss, "run", "run the server: broker link, rollouts, HTTP API, /metrics", cmd_server_run)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
