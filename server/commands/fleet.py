"""Fleet control commands: keys, tokens, broker config, devices, groups, deploy, rollback, status,
deployments, events, audit, and ``server run``.

Commands that act on the fleet are API clients (``server.client``): with a server configured or
running on this home they go over HTTP; otherwise they call the same handlers on the local
registry. ``keys``, ``tokens``, ``broker config`` and ``server run`` are local administration of
the server machine itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from server.commands.term import ChangeLog, can_redraw, make_console
from server.errors import ServerError
from server.textsafe import clean, plain, safe, untrusted

console = make_console()
err_console = make_console(stderr=True)

Handler = Callable[[argparse.Namespace], int]


# -- plumbing -----------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", default=None,
                        help="server API URL (default: $EDGEFLEET_SERVER, [client] server, or the server running "
                             "on this home; none = work on the local registry)")
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help="server config file (default: HOME/server.toml)")


def _client(args: argparse.Namespace) -> Any:
    from server.client import connect  # noqa: PLC0415

    return _Cleaned(connect(args.home, server=args.server, config_path=args.config))


class _Cleaned:
    """The API client, with every string it returns cleaned of control characters (server.textsafe)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return untrusted(self._client.call(*args, **kwargs))


def _run(fn: Handler) -> Handler:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ServerError as exc:
            err_console.print(f"[bold red]error[/]: {safe(exc.message)}", highlight=False)
            return 1
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)  # Ctrl-C: one line, no traceback
            return 130

    return wrapper


def _sub(parent: Any, name: str, help_text: str, fn: Handler, *, common: bool = True) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
    if common:
        _common(p)
    p.set_defaults(handler=_run(fn))
    return p


def _percent(text: str) -> float:
    value = text.strip().rstrip("%")
    try:
        v = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 10 or 10%)") from exc
    if not 0.0 <= v <= 100.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be within 0..100%")
    return v


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    if delta < 86400:
        return f"{delta / 3600:.1f}h ago"
    return f"{delta / 86400:.1f}d ago"


def _clock(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def _print_json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


STATE_STYLE = {
    "committed": "green", "failed": "bold red", "rolled_back": "yellow", "rolling_back": "yellow",
    "pending": "dim", "skipped": "dim", "superseded": "dim", "cancelled": "dim", "dispatched": "cyan",
    "accepted": "cyan", "downloading": "cyan", "installing": "cyan", "probation": "magenta",
    "running": "cyan", "completed": "green", "halted": "red",
}
SEVERITY_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}


def _styled(value: str) -> Text:
    return plain(value, STATE_STYLE.get(value, ""))


# -- keys, tokens, broker config (local administration) ---------------------------------------------------


def cmd_keys_init(args: argparse.Namespace) -> int:
    from server.app import open_registry  # noqa: PLC0415
    from server.config import ServerPaths, load_config  # noqa: PLC0415
    from server.keys import init_signing_key, new_token, token_digest, write_cli_token  # noqa: PLC0415

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
    from server.access import local_actor  # noqa: PLC0415

    return local_actor().removeprefix("local:")


def cmd_tokens_create(args: argparse.Namespace) -> int:
    from server.app import open_registry  # noqa: PLC0415
    from server.config import load_config  # noqa: PLC0415
    from server.keys import new_token, token_digest  # noqa: PLC0415

    registry = open_registry(load_config(args.home, args.config))
    token = new_token()
    registry.add_token(args.name, token_digest(token), role=args.role)
    registry.record_audit(actor=f"local:{_user()}", action="token_create", target=f"token:{args.name}",
                          params={"role": args.role}, outcome="ok")
    err_console.print(f"API token for [bold]{safe(args.name)}[/], role {args.role} (shown once; the server keeps only "
                      "its hash):")
    print(token)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from server.app import open_registry  # noqa: PLC0415
    from server.config import load_config  # noqa: PLC0415

    registry = open_registry(load_config(args.home, args.config))
    table = Table("name", "role", "created", "revoked", box=box.SIMPLE)
    for t in registry.list_tokens():
        table.add_row(safe(t["name"]), t["role"], _clock(t["created_at"]),
                      _clock(t["revoked_at"]) if t["revoked_at"] else "")
    console.print(table)
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from server.app import open_registry  # noqa: PLC0415
    from server.config import load_config  # noqa: PLC0415

    registry = open_registry(load_config(args.home, args.config))
    registry.revoke_token(args.name)
    registry.record_audit(actor=f"local:{_user()}", action="token_revoke", target=f"token:{args.name}", params={},
                          outcome="ok")
    console.print(f"token {safe(args.name)} revoked")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from server.app import open_registry  # noqa: PLC0415
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
    from server.config import config_path, load_config  # noqa: PLC0415
    from server.identity import refuse_reserved_logins  # noqa: PLC0415
    from server.keys import (  # noqa: PLC0415
        atomic_write,
        mosquitto_hash,
        server_broker_password,
        server_password_file,
    )

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
    try:
        text = render_config(port=args.port, host=args.listen, workdir=out, run_as=args.run_as,
                             security=BrokerSecurity(tls=tls, users=users, hashed=True, acl=acl_text(logins)),
                             persistence=args.persistence,
                             max_inflight_messages=20, max_queued_bytes=16 << 20,  # bounded per device
                             max_packet_size=PROTOCOL_MAX_PACKET)
        atomic_write(out / "mosquitto.conf", text.encode(), mode=0o644)
        # mosquitto started as root switches to run_as before reading passwd and the TLS key (0600): hand them over
        # (the directory too, for persistence, but only one this command made: never chown an existing /etc/...)
        owned = [*([out] if created else []), out / "passwd", out / "acl", out / "mosquitto.db"]
        if tls is not None and tls.server_key.parent == out / "tls":
            owned += [out / "tls", tls.server_key]
        handed = hand_over(args.run_as, owned)
    except BrokerError as exc:
        raise ServerError(str(exc)) from exc
    scheme = "mqtt" if tls is None else "mqtts"
    connect_host = args.listen if args.listen not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    broker_section = (
        "[broker]\n"
        f'url = "{scheme}://{connect_host}:{args.port}"\n'
        f'username = "{SERVER_USER}"\n'
        'password_file = "keys/broker-server.password"\n'
        + (f'ca_cert = "{tls.ca_cert}"\n' if tls else "")
    )
    cfg = config_path(args.home)
    if not cfg.exists():
        atomic_write(cfg, broker_section.encode())
        wrote = f"wrote {cfg} with this [broker] section"
    else:
        wrote = f"{cfg} exists; make its [broker] section read:"
    registry.record_audit(actor=f"local:{_user()}", action="broker_config", target=str(out),
                          params={"port": args.port, "tls": tls is not None}, outcome="ok",
                          detail=f"{len(devices)} device login(s), {len(logins)} server login(s)")
    console.print(f"mosquitto config: {out / 'mosquitto.conf'}  (run: mosquitto -c {out / 'mosquitto.conf'})")
    console.print(f"logins: {len(logins)} server + {len(devices)} device(s); ACL: {out / 'acl'}")
    for login in logins[1:]:
        console.print(f"another server process: [broker] username = \"{login}\", password_file = "
                      f"\"keys/{server_password_file(login)}\"", highlight=False, markup=False)
    console.print(f"mosquitto runs as user {args.run_as} when started as root"
                  + (f" (its files in {out} now belong to {args.run_as})" if handed else ""))
    if tls:
        console.print(f"TLS: CA {tls.ca_cert} (give it to devices), certificate {tls.server_cert}")
    console.print(f"{wrote}\n{broker_section}", highlight=False, markup=False)
    console.print("after registering or revoking devices, run this again and reload mosquitto (kill -HUP)")
    return 0


# -- devices, enrollment, groups ----------------------------------------------------------------------------


def _device_flags(d: Mapping[str, Any]) -> str:
    flags = []
    if d.get("stale"):
        flags.append("[bold red]stale[/]")
    if d.get("status") == "revoked":
        flags.append("[red]revoked[/]")
    elif d.get("status") == "awaiting_key":
        flags.append("[yellow]awaiting key[/]")
    return " ".join(flags)


def status_table(devices: Sequence[Mapping[str, Any]], now: float | None = None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=f"{len(devices)} device(s)", title_justify="left")
    table.add_column("device", no_wrap=True)
    for name in ("profile", "online", "model/version", "state", "p95", "CPU", "mem", "temp", "last seen", ""):
        table.add_column(name)
    for d in devices:
        model = "-"
        if d.get("active_model"):
            model = safe(f"{d['active_model']}:{d['active_version']}")
            if d.get("active_state") == "probation":
                model += " [magenta](probation)[/]"
        online = "[green]●[/]" if d.get("online") else "[dim]○[/]"
        table.add_row(
            safe(d["device_id"]), safe(d["profile"]), online, model, safe(d.get("lifecycle") or "-"),
            _num(d.get("p95_ms"), ".1f", " ms"), _num(d.get("cpu_percent"), ".0f", "%"),
            _num(d.get("memory_percent"), ".0f", "%"), _num(d.get("temperature_c"), ".0f", "°C"),
            _ago(d.get("last_seen"), now), _device_flags(d),
        )
    return table


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)

    def render() -> Any:
        devices = client.call("list_devices")
        if args.json:
            return devices
        summary = client.call("status")
        live = clean(", ".join(f"{d['deployment_id']} ({d['status']})" for d in summary["live_deployments"]) or "none")
        head = Text.assemble(
            (f"{summary['online']}/{summary['devices']} online", "bold"),
            f"   stale: {summary['stale']}   pending enrollments: {summary['pending_enrollments']}   ",
            f"live rollouts: {live}",
        )
        return Group(head, status_table(devices))

    if args.json:
        _print_json(render())
        return 0
    if not args.watch:
        console.print(render())
        return 0
    if not can_redraw(console):  # a pipe or a log: a new snapshot each interval, below the last
        while True:
            console.rule(time.strftime("%H:%M:%S"), style="dim")
            console.print(render())
            time.sleep(args.watch)
    with Live(render(), console=console, refresh_per_second=2) as live:
        while True:
            time.sleep(args.watch)
            live.update(render())


def cmd_devices_list(args: argparse.Namespace) -> int:
    devices = _client(args).call("list_devices")
    if args.json:
        _print_json(devices)
        return 0
    table = Table("device", "profile", "status", "groups", "key fingerprint", "seq", "desired", "enrolled",
                  box=box.SIMPLE_HEAD)
    for d in devices:
        want = d.get("desired")
        desired = "-" if not want else safe(f"{want['action']} {want.get('model') or ''}:{want.get('version') or ''}")
        if want and not want.get("published"):
            desired += " [yellow](unpublished)[/]"
        table.add_row(safe(d["device_id"]), safe(d["profile"]), _styled(d["status"]),
                      safe(",".join(d.get("groups") or [])), safe(d.get("fingerprint") or "-"),
                      str(d["seq"]), desired, _clock(d.get("enrolled_at")))
    console.print(table)
    return 0


def cmd_devices_show(args: argparse.Namespace) -> int:
    d = _client(args).call("get_device", path={"device_id": args.device_id})
    if args.json:
        _print_json(d)
        return 0
    console.print(status_table([d]))
    console.print(safe(f"status {d['status']}, groups {', '.join(d['groups']) or '-'}, "
                       f"key {d.get('fingerprint') or '-'}, "
                       f"kept versions {d['kept']}, last seq {d.get('last_seq')} (server {d['seq']})"))
    if d.get("desired"):
        w = d["desired"]
        console.print(safe(f"desired: {w['action']} {w['model']}:{w['version']} (seq {w['seq']}, expires "
                           f"{_clock(w['expires_at'])}, {'published' if w['published'] else 'not yet published'})"))
    _events_table(d.get("events") or [], title="recent events")
    return 0


def _show_password(out: Mapping[str, Any]) -> None:
    if out.get("broker_password"):
        console.print(f"MQTT login (shown once): username [bold]{safe(out['broker_username'])}[/] password "
                      f"[bold]{safe(out['broker_password'])}[/]")
        console.print("regenerate the broker config (`edgefleet broker config`) and reload mosquitto to activate it")


def cmd_devices_add(args: argparse.Namespace) -> int:
    public_key = args.public_key
    if args.public_key_file:
        public_key = args.public_key_file.read_text().strip()
    out = _client(args).call("register_device", body={
        "device_id": args.device_id, "profile": args.profile, "public_key": public_key,
        "groups": args.group or [], "broker_password": not args.no_broker_password,
    })
    d = out["device"]
    console.print(f"registered [bold]{safe(d['device_id'])}[/] ({safe(d['profile'])}), status {safe(d['status'])}"
                  + (f", key {safe(out['fingerprint'])}" if out.get("fingerprint") else
                     "; it will enroll its key on first connect (approve with `edgefleet devices approve`)"))
    _show_password(out)
    return 0


def cmd_devices_pending(args: argparse.Namespace) -> int:
    pending = _client(args).call("pending_enrollments")
    if args.json:
        _print_json(pending)
        return 0
    table = Table("device", "profile", "fingerprint", "agent", "arch", "hostname", "requested",
                  box=box.SIMPLE_HEAD, title="pending enrollment requests", title_justify="left")
    for r in pending:
        table.add_row(safe(r["device_id"]), safe(r["profile"]), safe(r["fingerprint"]),
                      safe(r.get("agent_version") or "-"), safe(r.get("arch") or "-"),
                      safe(r.get("hostname") or "-"), _ago(r["received_at"]))
    console.print(table)
    return 0


def cmd_devices_approve(args: argparse.Namespace) -> int:
    out = _client(args).call("approve_device", path={"device_id": args.device_id},
                             body={"fingerprint": args.fingerprint, "profile": args.profile,
                                   "groups": args.group or []})
    console.print(f"approved [bold]{safe(args.device_id)}[/] with key {safe(out['fingerprint'])}")
    return 0


def cmd_devices_reject(args: argparse.Namespace) -> int:
    _client(args).call("reject_enrollment", path={"device_id": args.device_id})
    console.print(f"rejected the enrollment request of {safe(args.device_id)}")
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    out = _client(args).call("revoke_device", path={"device_id": args.device_id})
    console.print(f"revoked [bold]{safe(args.device_id)}[/]; next: {safe(out['next'])}")
    return 0


def cmd_devices_password(args: argparse.Namespace) -> int:
    _show_password(_client(args).call("reset_broker_password", path={"device_id": args.device_id}))
    return 0


def cmd_groups_list(args: argparse.Namespace) -> int:
    groups = _client(args).call("list_groups")
    if args.json:
        _print_json(groups)
        return 0
    table = Table("group", "devices", "members", box=box.SIMPLE_HEAD)
    for name, members in sorted(groups.items()):
        shown = ", ".join(members[:12]) + (" ..." if len(members) > 12 else "")
        table.add_row(safe(name), str(len(members)), safe(shown))
    console.print(table)
    return 0


def cmd_groups_add(args: argparse.Namespace) -> int:
    out = _client(args).call("group_add", path={"group": args.group}, body={"devices": args.devices})
    console.print(f"group {safe(out['group'])}: {len(out['members'])} device(s)")
    return 0


def cmd_groups_remove(args: argparse.Namespace) -> int:
    out = _client(args).call("group_remove", path={"group": args.group}, body={"devices": args.devices})
    console.print(f"group {safe(out['group'])}: removed {safe(out['removed'])}, {len(out['members'])} left")
    return 0


# -- deployments ----------------------------------------------------------------------------------------


def deployment_view(d: Mapping[str, Any], *, devices: bool = False) -> Group:
    head = Text.assemble(
        (clean(f"{d['deployment_id']}  "), "bold"), clean(f"{d['model']}:{d['version']} -> {d['target']}  "),
        _styled(d["status"]),
        f"  wave {d['current_wave']}/{d['wave_count'] - 1}  canary {d['canary_percent']:g}%  "
        f"wave {d['wave_percent']:g}%  max failures {d['max_failures_percent']:g}%"
        + (f"  probation {d['probation_s']:g}s" if d.get("probation_s") is not None else ""),
    )
    parts: list[Any] = [head, plain(f"created {_clock(d['created_at'])} by {d['created_by']}", "dim")]
    if d.get("reason"):
        parts.append(plain(f"reason: {d['reason']}", "yellow"))
    progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=30),
                        TextColumn("{task.completed}/{task.total} committed"), TextColumn("{task.fields[detail]}"),
                        console=console)
    for w in d.get("waves", []):
        label = "canary" if w["wave"] == 0 and d["canary_percent"] > 0 else f"wave {w['wave']}"
        detail = ", ".join(f"{n} {k}" for k, n in (("failed", w["failed"]), ("working", w["in_flight"]),
                                                   ("offline", w["deferred"]), ("pending", w["pending"]),
                                                   ("other", w["other"])) if n)
        progress.add_task(f"{label:>8}", total=w["size"] or 1, completed=w["committed"], detail=detail)
    parts.append(progress.get_renderable())
    if (t := d.get("transfer")) and t.get("bytes_full"):
        parts.append(plain(f"bytes sent {t['bytes_sent']:,} vs {t['bytes_full']:,} full "
                           f"({t['bytes_sent'] / t['bytes_full']:.0%}); deltas applied {t['devices_delta']}, "
                           f"fell back {t['devices_fallback']}", "dim"))
    if d.get("failures"):
        table = Table("device", "wave", "code", "why", box=box.SIMPLE_HEAD, title="failures", title_justify="left",
                      title_style="bold red")
        for f in d["failures"]:
            table.add_row(safe(f["device_id"]), str(f["wave"]), safe(f.get("code") or "-"),
                          safe(f.get("reason") or "-"))
        parts.append(table)
    if devices:
        table = Table("device", "profile", "wave", "phase", "progress", "online", "why", box=box.SIMPLE_HEAD)
        for r in d.get("devices", []):
            prog = "-" if r.get("progress") is None else f"{100 * r['progress']:.0f}%"
            table.add_row(safe(r["device_id"]), safe(r["profile"]), str(r["wave"]), _styled(r["state"]), prog,
                          "●" if r.get("online") else "○", safe(r.get("reason") or ""))
        parts.append(table)
    return Group(*parts)


def deployment_line(d: Mapping[str, Any]) -> str:
    """One line of a watched deployment: its status and each wave's progress."""
    waves = []
    for w in d.get("waves", []):
        label = "canary" if w["wave"] == 0 and d["canary_percent"] > 0 else f"wave {w['wave']}"
        detail = ", ".join(f"{n} {k}" for k, n in (("failed", w["failed"]), ("working", w["in_flight"]),
                                                   ("offline", w["deferred"]), ("pending", w["pending"])) if n)
        waves.append(f"{label} {w['committed']}/{w['size']}" + (f" ({detail})" if detail else ""))
    return f"{d['deployment_id']} {d['status']}: " + "; ".join(waves) + " committed"


def _watch_deployment(client: Any, deployment_id: str, *, devices: bool, interval: float = 1.0) -> dict[str, Any]:
    from server.registry.fleet import FINISHED_STATUSES  # noqa: PLC0415

    d: dict[str, Any] = client.call("get_deployment", path={"deployment_id": deployment_id})
    if not can_redraw(console):  # a pipe or a log: a line per change, the full view at the end
        log = ChangeLog(console)
        log(deployment_line(d))
        while d["status"] not in FINISHED_STATUSES:
            time.sleep(interval)
            d = client.call("get_deployment", path={"deployment_id": deployment_id})
            log(deployment_line(d))
        console.print(deployment_view(d, devices=devices))
        return d
    with Live(deployment_view(d, devices=devices), console=console, refresh_per_second=4) as live:
        while d["status"] not in FINISHED_STATUSES:
            time.sleep(interval)
            d = client.call("get_deployment", path={"deployment_id": deployment_id})
            live.update(deployment_view(d, devices=devices))
    return d


def cmd_deploy(args: argparse.Namespace) -> int:
    client = _client(args)
    body: dict[str, Any] = {"model": args.model, "target": args.to}
    for key, value in (("canary_percent", args.canary), ("wave_percent", args.wave),
                       ("max_failures_percent", args.max_failures), ("probation_s", args.probation)):
        if value is not None:
            body[key] = value
    dep = client.call("deploy", body=body)
    if args.json and not args.watch:
        _print_json(dep)
        return 0
    console.print(f"deployment [bold]{safe(dep['deployment_id'])}[/]: "
                  + safe(f"{dep['model']}:{dep['version']} -> {dep['target']}, waves {dep['waves']}, artifacts "
                         f"{', '.join(f'{p}={a[:8]}' for p, a in dep['artifacts'].items())}"))
    if not dep.get("driver_running"):
        console.print("[yellow]no edgefleet server is running on this registry: the rollout starts when "
                      "`edgefleet server run` does[/]")
        return 0
    if not args.watch:
        console.print(f"follow it with: edgefleet deployments show {safe(dep['deployment_id'])} --watch")
        return 0
    final = _watch_deployment(client, dep["deployment_id"], devices=False)
    return 0 if final["status"] == "completed" else 3


def cmd_deployments_list(args: argparse.Namespace) -> int:
    deps = _client(args).call("list_deployments", query={"limit": args.limit})
    if args.json:
        _print_json(deps)
        return 0
    table = Table("id", "model", "target", "status", "wave", "devices", "by", "created", box=box.SIMPLE_HEAD)
    for d in deps:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(d["counts"].items()))
        table.add_row(safe(d["deployment_id"]), safe(f"{d['model']}:{d['version']}"), safe(d["target"]),
                      _styled(d["status"]), f"{d['current_wave']}/{d['wave_count'] - 1}", safe(counts),
                      safe(d["created_by"]), _clock(d["created_at"]))
    console.print(table)
    return 0


def cmd_deployments_show(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.watch:
        final = _watch_deployment(client, args.deployment_id, devices=args.devices)
        return 0 if final["status"] == "completed" else 3
    d = client.call("get_deployment", path={"deployment_id": args.deployment_id})
    if args.json:
        _print_json(d)
        return 0
    console.print(deployment_view(d, devices=args.devices))
    if args.events:
        _events_table(d.get("events") or [], title="events")
    return 0


def cmd_deployments_halt(args: argparse.Namespace) -> int:
    d = _client(args).call("halt_deployment", path={"deployment_id": args.deployment_id},
                           body={"rollback": not args.no_rollback, "reason": args.reason})
    console.print(deployment_view(d))
    return 0


# -- rollback ----------------------------------------------------------------------------------------------


def rollback_table(plan: Sequence[Mapping[str, Any]], devices: Mapping[str, Mapping[str, Any]],
                   commands: Mapping[str, Mapping[str, Any]]) -> tuple[Table, int]:
    table = Table("device", "model", "from", "to", "command", "device reports", "", box=box.SIMPLE_HEAD)
    waiting = 0
    for p in plan:
        dev = devices.get(p["device_id"], {})
        cmd = commands.get(p["device_id"])
        running = dev.get("active_model") == p["model"] and dev.get("active_version") == p["to"]
        if cmd is None:
            cstate = "not needed" if p.get("command") is False else "-"
        else:
            cstate = cmd["status"]
            if cmd.get("result") and cmd["result"].get("message") and cmd["status"] == "failed":
                cstate += f": {cmd['result']['message']}"
            cstate = safe(cstate)
        if running:
            note = "[green]confirmed[/]"
        elif not dev.get("online"):
            note = "[dim]offline: converges on reconnect[/]"
        elif cmd is not None and cmd["status"] == "failed":
            note = "[red]refused[/]"
        else:
            note = "[cyan]waiting[/]"
            waiting += 1
        reported = "-" if not dev.get("active_model") else f"{dev['active_model']}:{dev['active_version']}"
        table.add_row(safe(p["device_id"]), safe(p["model"]), safe(p.get("from")), safe(p["to"]), cstate,
                      safe(reported), note)
    return table, waiting


def cmd_rollback(args: argparse.Namespace) -> int:
    client = _client(args)
    out = client.call("rollback", body={"target": args.to, "model": args.model, "version": args.version})
    for s in out.get("skipped", []):
        err_console.print(f"[yellow]skipped[/] {safe(s['device_id'])}: {safe(s['reason'])}")
    console.print(f"rollback batch [bold]{safe(out['batch_id'])}[/]: {len(out['devices'])} device(s)")
    if args.json:
        _print_json(out)
        return 0
    plan = out["devices"]
    deadline = time.monotonic() + args.timeout

    def snapshot() -> tuple[Table, int]:
        devices = {d["device_id"]: d for d in client.call("list_devices")}
        commands = {c["device_id"]: c for c in client.call("command_batch", path={"batch_id": out["batch_id"]})
                    ["commands"]}
        return rollback_table(plan, devices, commands)

    table, waiting = snapshot()
    if args.no_wait:
        console.print(table)
        return 0
    if not can_redraw(console):  # a pipe or a log: a line when the count changes, the table at the end
        log = ChangeLog(console)
        while waiting and time.monotonic() < deadline:
            log(f"{len(plan) - waiting} of {len(plan)} device(s) settled, {waiting} online device(s) to confirm")
            time.sleep(0.5)
            table, waiting = snapshot()
        console.print(table)
    else:
        table, waiting = _rollback_live(table, waiting, snapshot, deadline)
    if waiting:
        err_console.print(f"[yellow]{waiting} online device(s) did not confirm within {args.timeout:g}s[/]")
        return 2
    return 0


def _rollback_live(table: Table, waiting: int, snapshot: Callable[[], tuple[Table, int]],
                   deadline: float) -> tuple[Table, int]:
    with Live(table, console=console, refresh_per_second=4) as live:
        while waiting and time.monotonic() < deadline:
            time.sleep(0.5)
            table, waiting = snapshot()
            live.update(table)
    return table, waiting


# -- events and audit ----------------------------------------------------------------------------------


def _event_line(e: Mapping[str, Any]) -> Text:
    style = SEVERITY_STYLE.get(e["severity"], "")
    who = e.get("device_id") or "server"
    model = f" {e['model']}:{e['version']}" if e.get("model") else ""
    dep = f" [{e['deployment_id']}]" if e.get("deployment_id") else ""
    return Text.assemble((time.strftime("%H:%M:%S", time.localtime(e["ts"])), "dim"), " ",
                         (clean(f"{who:<16}"), "bold"), " ", (clean(e["kind"]), style or "cyan"),
                         clean(model), clean(dep), " ",
                         clean(e.get("message") or ""))


def _events_table(events: Iterable[Mapping[str, Any]], *, title: str) -> None:
    events = list(events)
    if not events:
        return
    console.print(Text(title, style="bold"))
    for e in events:
        console.print(_event_line(e), highlight=False)


def cmd_events(args: argparse.Namespace) -> int:
    client = _client(args)
    query: dict[str, Any] = {"device": args.device, "deployment": args.deployment, "kind": args.kind,
                             "limit": args.limit}
    page = client.call("events", query=query)
    for e in page["events"]:
        if args.json:
            print(json.dumps(e, default=str), flush=True)
        else:
            console.print(_event_line(e), highlight=False)
    if not args.follow:
        return 0
    cursor = page["cursor"]
    while True:
        page = client.call("events", query={**query, "after": cursor, "wait": 25, "limit": 500}, timeout=60)
        for e in page["events"]:
            if args.json:
                print(json.dumps(e, default=str), flush=True)
            else:
                console.print(_event_line(e), highlight=False)
        cursor = page["cursor"]


def _short(value: Any, limit: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cmd_audit(args: argparse.Namespace) -> int:
    records = _client(args).call("audit", query={"limit": args.limit, "actor": args.actor, "action": args.action})
    if args.json:
        _print_json(records)
        return 0
    table = Table("#", "when", "who", "what", "target", "outcome", "detail", box=box.SIMPLE_HEAD)
    for a in records:
        outcome = plain(a["outcome"], "green" if a["outcome"] == "ok" else "red")
        params = {k: _short(v) for k, v in a["params"].items() if not k.startswith("path.") and v not in (None, [], "")}
        what = a["action"] + (" " + " ".join(f"{k}={v}" for k, v in params.items()) if params else "")
        table.add_row(str(a["id"]), _clock(a["ts"]), safe(a["actor"]), safe(what), safe(a.get("target") or "-"),
                      outcome, safe(a.get("detail") or ""))
    console.print(table)
    return 0


# -- server run --------------------------------------------------------------------------------------------


def cmd_server_run(args: argparse.Namespace) -> int:
    from server import logs  # noqa: PLC0415
    from server.app import FleetServer  # noqa: PLC0415
    from server.config import load_config  # noqa: PLC0415

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


# -- registration ------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="the server's signing key", description="The server's signing key.")
    ks = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    p = _sub(ks, "init", "create the Ed25519 signing key (0600) and the local CLI's API token", cmd_keys_init)
    p.add_argument("--force", action="store_true", help="replace an existing key (every device must then trust the "
                   "new one)")

    tokens = subparsers.add_parser("tokens", help="API tokens (for CI pipelines and operators)",
                                   description="API tokens. The server stores only their SHA-256.")
    ts = tokens.add_subparsers(dest="tokens_command", metavar="COMMAND", required=True)
    p = _sub(ts, "create", "create a token for NAME with a role and print it once", cmd_tokens_create)
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=("read", "deploy", "admin"),
                   help="read: status, events, audit; deploy: also deploy, rollback, halt, model add/build; "
                        "admin: also devices, enrollment, groups, broker passwords")
    _sub(ts, "list", "list tokens", cmd_tokens_list)
    p = _sub(ts, "revoke", "revoke NAME's token", cmd_tokens_revoke)
    p.add_argument("name")

    broker = subparsers.add_parser("broker", help="MQTT broker configuration", description="MQTT broker setup.")
    bs = broker.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)
    p = _sub(bs, "config", "write a mosquitto config with TLS, per-device logins and ACLs", cmd_broker_config)
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
    p.add_argument("--run-as", default="mosquitto", metavar="USER",
                   help="account mosquitto switches to when started as root (default mosquitto, the Debian "
                        "package's user); run as root, this command gives it the generated passwd, acl and key")

    devices = subparsers.add_parser("devices", help="devices, enrollment, revocation", description="Devices.")
    ds = devices.add_subparsers(dest="devices_command", metavar="COMMAND", required=True)
    p = _sub(ds, "list", "every registered device", cmd_devices_list)
    p.add_argument("--json", action="store_true")
    p = _sub(ds, "show", "one device: state, desired state, recent events", cmd_devices_show)
    p.add_argument("device_id")
    p.add_argument("--json", action="store_true")
    p = _sub(ds, "add", "register a device (with its public key, or let it enroll)", cmd_devices_add)
    p.add_argument("device_id")
    p.add_argument("--profile", required=True, help="device profile (firmware_profiles/NAME.toml)")
    p.add_argument("--public-key", help="the device's X25519 public key, base64 (from edgefleet-agent init)")
    p.add_argument("--public-key-file", type=Path, help="read the public key from a file")
    p.add_argument("--group", action="append", help="add it to a group (repeatable)")
    p.add_argument("--no-broker-password", action="store_true", help="do not issue an MQTT login")
    p = _sub(ds, "pending", "enrollment requests waiting for approval", cmd_devices_pending)
    p.add_argument("--json", action="store_true")
    p = _sub(ds, "approve", "accept a device's enrollment request", cmd_devices_approve)
    p.add_argument("device_id")
    p.add_argument("--fingerprint", required=True,
                   help="the key fingerprint the device printed (compared out of band; approval refuses any other)")
    p.add_argument("--profile", help="override the profile the device announced")
    p.add_argument("--group", action="append")
    p = _sub(ds, "reject", "reject a device's enrollment request", cmd_devices_reject)
    p.add_argument("device_id")
    p = _sub(ds, "revoke", "revoke a device (its messages are refused from now on)", cmd_devices_revoke)
    p.add_argument("device_id")
    p = _sub(ds, "password", "issue a new MQTT password for a device", cmd_devices_password)
    p.add_argument("device_id")

    groups = subparsers.add_parser("groups", help="device groups", description="Device groups.")
    gs = groups.add_subparsers(dest="groups_command", metavar="COMMAND", required=True)
    p = _sub(gs, "list", "groups and members", cmd_groups_list)
    p.add_argument("--json", action="store_true")
    p = _sub(gs, "add", "add devices to a group", cmd_groups_add)
    p.add_argument("group")
    p.add_argument("devices", nargs="+")
    p = _sub(gs, "remove", "remove devices from a group", cmd_groups_remove)
    p.add_argument("group")
    p.add_argument("devices", nargs="+")

    p = _sub(subparsers, "deploy", "roll MODEL:VERSION out in canary and waves", cmd_deploy)
    p.add_argument("model", metavar="MODEL:VERSION")
    p.add_argument("--to", required=True, metavar="TARGET", help="group:NAME, device:ID or all")
    p.add_argument("--canary", type=_percent, metavar="N%", help="canary size (default from server.toml, 10%%)")
    p.add_argument("--wave", type=_percent, metavar="N%", help="size of each later wave (default 25%%)")
    p.add_argument("--max-failures", type=_percent, metavar="N%",
                   help="halt and roll back when more than this share of released devices failed (default 10%%)")
    p.add_argument("--probation", type=float, metavar="SECONDS",
                   help="device-side probation before a version commits (default: the build's)")
    p.add_argument("--watch", action="store_true", help="follow the rollout until it finishes")
    p.add_argument("--json", action="store_true")

    deployments = subparsers.add_parser("deployments", help="rollouts: list, show, halt", description="Rollouts.")
    dps = deployments.add_subparsers(dest="deployments_command", metavar="COMMAND", required=True)
    p = _sub(dps, "list", "recent deployments", cmd_deployments_list)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p = _sub(dps, "show", "per-wave progress, failures and why", cmd_deployments_show)
    p.add_argument("deployment_id")
    p.add_argument("--devices", action="store_true", help="also list every device's phase")
    p.add_argument("--events", action="store_true", help="also list the deployment's events")
    p.add_argument("--watch", action="store_true", help="refresh until the rollout finishes")
    p.add_argument("--json", action="store_true")
    p = _sub(dps, "halt", "halt a rollout and roll its devices back", cmd_deployments_halt)
    p.add_argument("deployment_id")
    p.add_argument("--no-rollback", action="store_true", help="only stop releasing waves")
    p.add_argument("--reason", help="recorded with the halt")

    p = _sub(subparsers, "rollback", "switch devices back to a version they keep (no download)", cmd_rollback)
    p.add_argument("--to", required=True, metavar="TARGET", help="group:NAME, device:ID or all")
    p.add_argument("--version", type=int, help="the version to go back to (default: each device's previous one)")
    p.add_argument("--model", help="model name (default: what each device runs)")
    p.add_argument("--timeout", type=float, default=60.0, help="how long to wait for confirmations (s)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the devices to confirm")
    p.add_argument("--json", action="store_true")

    p = _sub(subparsers, "status", "fleet table: state, model, latency, CPU, memory, temperature", cmd_status)
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2)")
    p.add_argument("--json", action="store_true")

    p = _sub(subparsers, "events", "fleet events (--follow to stream them)", cmd_events)
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--device")
    p.add_argument("--deployment")
    p.add_argument("--kind", help="kind prefix, e.g. lifecycle. or deployment.")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = _sub(subparsers, "audit", "who did what, when, and the outcome (`audit verify` checks the hash chain)",
             cmd_audit)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--actor")
    p.add_argument("--action")
    p.add_argument("--json", action="store_true")
    from server.commands.access import register_audit_verify  # noqa: PLC0415

    register_audit_verify(p, _sub)

    srv = subparsers.add_parser("server", help="run the control plane", description="The edgefleet server.")
    ss = srv.add_subparsers(dest="server_command", metavar="COMMAND", required=True)
    p = _sub(ss, "run", "run the server: broker link, rollouts, HTTP API, /metrics", cmd_server_run)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
