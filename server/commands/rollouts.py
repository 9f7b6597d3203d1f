"""Rollout commands: ``deploy``, ``deployments list|show|halt`` and ``rollback``, all API clients."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from server.commands.common import (
    add_command,
    api_client,
    console,
    err_console,
    fetch_for_table,
    local_time,
    percent_arg,
    print_events,
    print_json,
    styled,
)
from server.commands.term import ChangeLog, can_redraw
from server.config import RolloutSection
from server.registry.rollouts import FINISHED_STATUSES
from server.textsafe import clean, plain, safe

#: the defaults of the flags below are the [rollout] section's (server.toml), written once in server.config
_ROLLOUT = RolloutSection()


def deployment_view(d: Mapping[str, Any], *, devices: bool = False) -> Group:
    head = Text.assemble(
        (clean(f"{d['deployment_id']}  "), "bold"), clean(f"{d['model']}:{d['version']} -> {d['target']}  "),
        styled(d["status"]),
        f"  wave {d['current_wave']}/{d['wave_count'] - 1}  canary {d['canary_percent']:g}%  "
        f"wave {d['wave_percent']:g}%  max failures {d['max_failures_percent']:g}%"
        + (f"  probation {d['probation_s']:g}s" if d.get("probation_s") is not None else ""),
    )
    parts: list[Any] = [head, plain(f"created {local_time(d['created_at'])} by {d['created_by']}", "dim")]
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
            table.add_row(safe(r["device_id"]), safe(r["profile"]), str(r["wave"]), styled(r["state"]), prog,
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
    client = api_client(args)
    body: dict[str, Any] = {"model": args.model, "target": args.to}
    for key, value in (("canary_percent", args.canary), ("wave_percent", args.wave),
                       ("max_failures_percent", args.max_failures), ("probation_s", args.probation)):
        if value is not None:
            body[key] = value
    dep = client.call("deploy", body=body)
    if args.json and not args.watch:
        print_json(dep)
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
    deps = fetch_for_table(args, "list_deployments", query={"limit": args.limit})
    if deps is None:
        return 0
    table = Table("id", "model", "target", "status", "wave", "devices", "by", "created", box=box.SIMPLE_HEAD)
    for d in deps:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(d["counts"].items()))
        table.add_row(safe(d["deployment_id"]), safe(f"{d['model']}:{d['version']}"), safe(d["target"]),
                      styled(d["status"]), f"{d['current_wave']}/{d['wave_count'] - 1}", safe(counts),
                      safe(d["created_by"]), local_time(d["created_at"]))
    console.print(table)
    return 0


def cmd_deployments_show(args: argparse.Namespace) -> int:
    client = api_client(args)
    if args.watch:
        final = _watch_deployment(client, args.deployment_id, devices=args.devices)
        return 0 if final["status"] == "completed" else 3
    d = client.call("get_deployment", path={"deployment_id": args.deployment_id})
    if args.json:
        print_json(d)
        return 0
    console.print(deployment_view(d, devices=args.devices))
    if args.events:
        print_events(d.get("events") or [], title="events")
    return 0


def cmd_deployments_halt(args: argparse.Namespace) -> int:
    d = api_client(args).call("halt_deployment", path={"deployment_id": args.deployment_id},
                           body={"rollback": not args.no_rollback, "reason": args.reason})
    console.print(deployment_view(d))
    return 0


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
    client = api_client(args)
    out = client.call("rollback", body={"target": args.to, "model": args.model, "version": args.version})
    for s in out.get("skipped", []):
        err_console.print(f"[yellow]skipped[/] {safe(s['device_id'])}: {safe(s['reason'])}")
    console.print(f"rollback batch [bold]{safe(out['batch_id'])}[/]: {len(out['devices'])} device(s)")
    if args.json:
        print_json(out)
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


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "deploy", "roll MODEL:VERSION out in canary and waves", cmd_deploy)
    p.add_argument("model", metavar="MODEL:VERSION")
    p.add_argument("--to", required=True, metavar="TARGET", help="group:NAME, device:ID or all")
    p.add_argument("--canary", type=percent_arg, metavar="N%",
                   help=f"canary size (default from server.toml, {_ROLLOUT.canary_percent:g}%%)")
    p.add_argument("--wave", type=percent_arg, metavar="N%",
                   help=f"size of each later wave (default {_ROLLOUT.wave_percent:g}%%)")
    p.add_argument("--max-failures", type=percent_arg, metavar="N%",
                   help="halt and roll back when more than this share of released devices failed "
                        f"(default {_ROLLOUT.max_failures_percent:g}%%)")
    p.add_argument("--probation", type=float, metavar="SECONDS",
                   help="device-side probation before a version commits (default: the build's)")
    p.add_argument("--watch", action="store_true", help="follow the rollout until it finishes")
    p.add_argument("--json", action="store_true")

    deployments = subparsers.add_parser("deployments", help="rollouts: list, show, halt", description="Rollouts.")
    dps = deployments.add_subparsers(dest="deployments_command", metavar="COMMAND", required=True)
    p = add_command(dps, "list", "recent deployments", cmd_deployments_list)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p = add_command(dps, "show", "per-wave progress, failures and why", cmd_deployments_show, "deployment_id")
    p.add_argument("--devices", action="store_true", help="also list every device's phase")
    p.add_argument("--events", action="store_true", help="also list the deployment's events")
    p.add_argument("--watch", action="store_true", help="refresh until the rollout finishes")
    p.add_argument("--json", action="store_true")
    p = add_command(dps, "halt", "halt a rollout and roll its devices back", cmd_deployments_halt, "deployment_id")
    p.add_argument("--no-rollback", action="store_true", help="only stop releasing waves")
    p.add_argument("--reason", help="recorded with the halt")

    p = add_command(subparsers, "rollback", "switch devices back to a version they keep (no download)", cmd_rollback)
    p.add_argument("--to", required=True, metavar="TARGET", help="group:NAME, device:ID or all")
    p.add_argument("--version", type=int, help="the version to go back to (default: each device's previous one)")
    p.add_argument("--model", help="model name (default: what each device runs)")
    p.add_argument("--timeout", type=float, default=60.0, help="how long to wait for confirmations (s)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for the devices to confirm")
    p.add_argument("--json", action="store_true")
