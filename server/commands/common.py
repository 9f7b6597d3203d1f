"""What the command modules share: the API client, error handling, argument types and rendering helpers.

Every fleet command is an API client (``server.client.connect``): with a server configured or
running on this home it goes over HTTP; otherwise it calls the same route handlers in-process on
the local registry. Either way the CLI can do only what the API can.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from server.commands.term import make_console
from server.errors import ServerError
from server.textsafe import clean, plain, safe, untrusted

console = make_console()
err_console = make_console(stderr=True)

Handler = Callable[[argparse.Namespace], int]


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", default=None,
                        help="server API URL (default: $EDGEFLEET_SERVER, [client] server, or the server running "
                             "on this home; none = work on the local registry)")
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help="server config file (default: HOME/server.toml)")


def api_client(args: argparse.Namespace) -> Any:
    # startup cost: server.client pulls in the API, the service layer and the rollout code (~0.4 s); a
    # command only pays it when it calls the server, `edgefleet --help` does not
    from server.client import connect  # noqa: PLC0415

    # not every subcommand takes --server/--config (``build`` does not; ``build --probe`` still needs the fleet)
    return _Cleaned(connect(args.home, server=getattr(args, "server", None),
                            config_path=getattr(args, "config", None)))


class _Cleaned:
    """The API client, with every string it returns cleaned of control characters (server.textsafe)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.description: str = getattr(client, "description", "")

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return untrusted(self._client.call(*args, **kwargs))


def guarded(fn: Handler, *, show_code: bool = False, errors: Console | None = None) -> Handler:
    """``fn`` with a ServerError printed as one line (exit 1) and Ctrl-C as "interrupted" (exit 130)."""
    out = errors or err_console

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ServerError as exc:
            code = f" ({exc.code})" if show_code else ""
            out.print(f"[bold red]error[/]{code}: {safe(exc.message)}", highlight=False)
            return 1
        except KeyboardInterrupt:
            out.print("interrupted", highlight=False)  # Ctrl-C: one line, no traceback
            return 130

    return wrapper


def add_command(parent: Any, name: str, help_text: str, fn: Handler, *positionals: str,
                common: bool = True, json: bool = False) -> argparse.ArgumentParser:
    """A subcommand run by ``fn``: its plain positional arguments, ``--json`` (machine-readable output) if asked."""
    p: argparse.ArgumentParser = parent.add_parser(name, help=help_text, description=help_text)
    for positional in positionals:
        p.add_argument(positional)
    if json:
        p.add_argument("--json", action="store_true")
    if common:
        add_common(p)
    p.set_defaults(handler=guarded(fn))
    return p


def percent_arg(text: str) -> float:
    value = text.strip().rstrip("%")
    try:
        v = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 10 or 10%)") from exc
    if not 0.0 <= v <= 100.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be within 0..100%")
    return v


def ago(ts: float | None, now: float | None = None) -> str:
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


def local_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def print_json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


def fetch_for_table(args: argparse.Namespace, action: str, **request: Any) -> Any | None:
    """The API's answer to ``action``; with ``--json`` it is printed as JSON and None is returned (no table)."""
    value = api_client(args).call(action, **request)
    if args.json:
        print_json(value)
        return None
    return value


STATE_STYLE = {
    "committed": "green", "failed": "bold red", "rolled_back": "yellow", "rolling_back": "yellow",
    "pending": "dim", "skipped": "dim", "superseded": "dim", "cancelled": "dim", "dispatched": "cyan",
    "accepted": "cyan", "downloading": "cyan", "installing": "cyan", "probation": "magenta",
    "running": "cyan", "completed": "green", "halted": "red",
}


SEVERITY_STYLE = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}


def styled(value: str) -> Text:
    return plain(value, STATE_STYLE.get(value, ""))


def event_line(e: Mapping[str, Any]) -> Text:
    style = SEVERITY_STYLE.get(e["severity"], "")
    who = e.get("device_id") or "server"
    model = f" {e['model']}:{e['version']}" if e.get("model") else ""
    dep = f" [{e['deployment_id']}]" if e.get("deployment_id") else ""
    return Text.assemble((time.strftime("%H:%M:%S", time.localtime(e["ts"])), "dim"), " ",
                         (clean(f"{who:<16}"), "bold"), " ", (clean(e["kind"]), style or "cyan"),
                         clean(model), clean(dep), " ",
                         clean(e.get("message") or ""))


def print_events(events: Iterable[Mapping[str, Any]], *, title: str) -> None:
    events = list(events)
    if not events:
        return
    console.print(Text(title, style="bold"))
    for e in events:
        console.print(event_line(e), highlight=False)
