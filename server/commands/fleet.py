"""Fleet commands: ``status``, ``devices``, ``groups``, ``events`` and ``audit``, all API clients.

The rollout commands are in ``server.commands.rollouts``, the administration of the server machine
(keys, tokens, broker config, ``server run``) in ``server.commands.admin``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from server.commands.access import register_audit_verify
from server.commands.common import (
    add_command,
    ago,
    api_client,
    console,
    event_line,
    fetch_for_table,
    local_time,
    num,
    print_events,
    print_json,
    styled,
)
from server.commands.term import can_redraw
from server.textsafe import clean, plain, safe


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
            num(d.get("p95_ms"), ".1f", " ms"), num(d.get("cpu_percent"), ".0f", "%"),
            num(d.get("memory_percent"), ".0f", "%"), num(d.get("temperature_c"), ".0f", "°C"),
            ago(d.get("last_seen"), now), _device_flags(d),
        )
    return table


def cmd_status(args: argparse.Namespace) -> int:
    client = api_client(args)

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
        over = summary.get("measured_over_budget") or []
        if not over:
            return Group(head, status_table(devices))
        flagged = Text(clean("measured over budget: " + ", ".join(
            f"{o['model']}:{o['version']} {o['variant']} on {o['profile']} p95 {o['p95_ms']:.1f} ms > "
            f"{o['budget_ms']:g} ms ({o['devices']} device(s))" for o in over)), style="yellow")
        return Group(head, flagged, status_table(devices))

    if args.json:
        print_json(render())
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
    devices = fetch_for_table(args, "list_devices")
    if devices is None:
        return 0
    table = Table("device", "profile", "status", "groups", "key fingerprint", "seq", "desired", "enrolled",
                  box=box.SIMPLE_HEAD)
    for d in devices:
        want = d.get("desired")
        desired = "-" if not want else safe(f"{want['action']} {want.get('model') or ''}:{want.get('version') or ''}")
        if want and not want.get("published"):
            desired += " [yellow](unpublished)[/]"
        table.add_row(safe(d["device_id"]), safe(d["profile"]), styled(d["status"]),
                      safe(",".join(d.get("groups") or [])), safe(d.get("fingerprint") or "-"),
                      str(d["seq"]), desired, local_time(d.get("enrolled_at")))
    console.print(table)
    return 0


def cmd_devices_show(args: argparse.Namespace) -> int:
    d = fetch_for_table(args, "get_device", path={"device_id": args.device_id})
    if d is None:
        return 0
    console.print(status_table([d]))
    console.print(safe(f"status {d['status']}, groups {', '.join(d['groups']) or '-'}, "
                       f"key {d.get('fingerprint') or '-'}, "
                       f"kept versions {d['kept']}, last seq {d.get('last_seq')} (server {d['seq']})"))
    if d.get("desired"):
        w = d["desired"]
        console.print(safe(f"desired: {w['action']} {w['model']}:{w['version']} (seq {w['seq']}, expires "
                           f"{local_time(w['expires_at'])}, {'published' if w['published'] else 'not yet published'})"))
    print_events(d.get("events") or [], title="recent events")
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
    out = api_client(args).call("register_device", body={
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
    pending = fetch_for_table(args, "pending_enrollments")
    if pending is None:
        return 0
    table = Table("device", "profile", "fingerprint", "agent", "arch", "hostname", "requested",
                  box=box.SIMPLE_HEAD, title="pending enrollment requests", title_justify="left")
    for r in pending:
        table.add_row(safe(r["device_id"]), safe(r["profile"]), safe(r["fingerprint"]),
                      safe(r.get("agent_version") or "-"), safe(r.get("arch") or "-"),
                      safe(r.get("hostname") or "-"), ago(r["received_at"]))
    console.print(table)
    return 0


def cmd_devices_approve(args: argparse.Namespace) -> int:
    out = api_client(args).call("approve_device", path={"device_id": args.device_id},
                             body={"fingerprint": args.fingerprint, "profile": args.profile,
                                   "groups": args.group or []})
    console.print(f"approved [bold]{safe(args.device_id)}[/] with key {safe(out['fingerprint'])}")
    return 0


def cmd_devices_reject(args: argparse.Namespace) -> int:
    api_client(args).call("reject_enrollment", path={"device_id": args.device_id})
    console.print(f"rejected the enrollment request of {safe(args.device_id)}")
    return 0


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    out = api_client(args).call("revoke_device", path={"device_id": args.device_id})
    console.print(f"revoked [bold]{safe(args.device_id)}[/]; next: {safe(out['next'])}")
    return 0


def cmd_devices_password(args: argparse.Namespace) -> int:
    _show_password(api_client(args).call("reset_broker_password", path={"device_id": args.device_id}))
    return 0


def cmd_groups_list(args: argparse.Namespace) -> int:
    groups = fetch_for_table(args, "list_groups")
    if groups is None:
        return 0
    table = Table("group", "devices", "members", box=box.SIMPLE_HEAD)
    for name, members in sorted(groups.items()):
        shown = ", ".join(members[:12]) + (" ..." if len(members) > 12 else "")
        table.add_row(safe(name), str(len(members)), safe(shown))
    console.print(table)
    return 0


def cmd_groups_add(args: argparse.Namespace) -> int:
    out = api_client(args).call("group_add", path={"group": args.group}, body={"devices": args.devices})
    console.print(f"group {safe(out['group'])}: {len(out['members'])} device(s)")
    return 0


def cmd_groups_remove(args: argparse.Namespace) -> int:
    out = api_client(args).call("group_remove", path={"group": args.group}, body={"devices": args.devices})
    console.print(f"group {safe(out['group'])}: removed {safe(out['removed'])}, {len(out['members'])} left")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    client = api_client(args)
    query: dict[str, Any] = {"device": args.device, "deployment": args.deployment, "kind": args.kind,
                             "limit": args.limit}
    page = client.call("events", query=query)
    while True:
        for e in page["events"]:
            if args.json:
                print(json.dumps(e, default=str), flush=True)
            else:
                console.print(event_line(e), highlight=False)
        if not args.follow:
            return 0
        page = client.call("events", query={**query, "after": page["cursor"], "wait": 25, "limit": 500}, timeout=60)


def _short(value: Any, limit: int = 24) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cmd_audit(args: argparse.Namespace) -> int:
    records = fetch_for_table(args, "audit", query={"limit": args.limit, "actor": args.actor, "action": args.action})
    if records is None:
        return 0
    table = Table("#", "when", "who", "what", "target", "outcome", "detail", box=box.SIMPLE_HEAD)
    for a in records:
        outcome = plain(a["outcome"], "green" if a["outcome"] == "ok" else "red")
        params = {k: _short(v) for k, v in a["params"].items() if not k.startswith("path.") and v not in (None, [], "")}
        what = a["action"] + (" " + " ".join(f"{k}={v}" for k, v in params.items()) if params else "")
        table.add_row(str(a["id"]), local_time(a["ts"]), safe(a["actor"]), safe(what), safe(a.get("target") or "-"),
                      outcome, safe(a.get("detail") or ""))
    console.print(table)
    return 0


def register(subparsers: Any) -> None:
    devices = subparsers.add_parser("devices", help="devices, enrollment, revocation", description="Devices.")
    ds = devices.add_subparsers(dest="devices_command", metavar="COMMAND", required=True)
    add_command(ds, "list", "every registered device", cmd_devices_list, json=True)
    add_command(ds, "show", "one device: state, desired state, recent events", cmd_devices_show, "device_id", json=True)
    p = add_command(ds, "add", "register a device (with its public key, or let it enroll)",
                    cmd_devices_add, "device_id")
    p.add_argument("--profile", required=True, help="device profile (firmware_profiles/NAME.toml)")
    p.add_argument("--public-key", help="the device's X25519 public key, base64 (from edgefleet-agent init)")
    p.add_argument("--public-key-file", type=Path, help="read the public key from a file")
    p.add_argument("--group", action="append", help="add it to a group (repeatable)")
    p.add_argument("--no-broker-password", action="store_true", help="do not issue an MQTT login")
    add_command(ds, "pending", "enrollment requests waiting for approval", cmd_devices_pending, json=True)
    p = add_command(ds, "approve", "accept a device's enrollment request", cmd_devices_approve, "device_id")
    p.add_argument("--fingerprint", required=True,
                   help="the key fingerprint the device printed (compared out of band; approval refuses any other)")
    p.add_argument("--profile", help="override the profile the device announced")
    p.add_argument("--group", action="append")
    add_command(ds, "reject", "reject a device's enrollment request", cmd_devices_reject, "device_id")
    add_command(ds, "revoke", "revoke a device (its messages are refused from now on)", cmd_devices_revoke, "device_id")
    add_command(ds, "password", "issue a new MQTT password for a device", cmd_devices_password, "device_id")

    groups = subparsers.add_parser("groups", help="device groups", description="Device groups.")
    gs = groups.add_subparsers(dest="groups_command", metavar="COMMAND", required=True)
    add_command(gs, "list", "groups and members", cmd_groups_list, json=True)
    p = add_command(gs, "add", "add devices to a group", cmd_groups_add, "group")
    p.add_argument("devices", nargs="+")
    p = add_command(gs, "remove", "remove devices from a group", cmd_groups_remove, "group")
    p.add_argument("devices", nargs="+")

    p = add_command(subparsers, "status", "fleet table: state, model, latency, CPU, memory, temperature", cmd_status)
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2)")
    p.add_argument("--json", action="store_true")

    p = add_command(subparsers, "events", "fleet events (--follow to stream them)", cmd_events)
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--device")
    p.add_argument("--deployment")
    p.add_argument("--kind", help="kind prefix, e.g. lifecycle. or deployment.")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = add_command(subparsers, "audit", "who did what, when, and the outcome (`audit verify` checks the hash chain)",
             cmd_audit)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--actor")
    p.add_argument("--action")
    p.add_argument("--json", action="store_true")
    register_audit_verify(p, add_command)
