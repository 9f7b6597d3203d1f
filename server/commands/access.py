"""``edgefleet audit verify``: recompute the audit log's hash chain and report the first broken link.

It goes through the API like every fleet command (``GET /v1/audit/verify``, role ``read``): on the
server machine without a server it reads the local registry directly. Exit status 0 when the chain
is intact, 1 when a link is broken (the row and the reason are printed) or the check could not run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from server.commands.common import api_client, console, err_console


def cmd_audit_verify(args: argparse.Namespace) -> int:
    report = api_client(args).call("verify_audit", query={"anchor": args.anchor})
    if args.json:
        print(json.dumps(report))
    elif report["ok"]:
        print(f"audit log intact: {report['rows']} rows; head #{report['head_id']} {report['head_hash']}")
        console.print("(keep the head off this machine; `edgefleet audit verify --anchor ID:HASH` later proves "
                      "nothing up to it was rewritten or truncated)", style="dim", highlight=False)
    else:
        err_console.print(f"[bold red]audit log BROKEN[/] at row #{report['broken_id']}: "
                          f"{escape(str(report['reason']))}", highlight=False)
        last = f"#{report['head_id']}" if report["head_id"] is not None else "none"
        err_console.print(f"rows checked: {report['rows']}; last intact row: {last}", highlight=False)
    return 0 if report["ok"] else 1


def register_audit_verify(audit: argparse.ArgumentParser, sub: Callable[..., Any]) -> None:
    subs = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=False)
    p = sub(subs, "verify", "recompute the audit hash chain; exit 1 and name the first broken row if it is broken",
            cmd_audit_verify)
    p.add_argument("--anchor", metavar="ID:HASH", help="also require row ID to have this hash (a head printed "
                   "earlier and kept elsewhere): catches a rewritten or truncated log")
    p.add_argument("--json", action="store_true")
