"""Untrusted text on the operator's terminal: one helper for every string a device or API caller supplied.

Device-reported strings (hostname, model names, event messages, reasons) and anything an API
caller chose (group names, targets, token names) must neither restyle the terminal nor crash
it: Rich parses ``[...]`` as markup (a hostname ``[/]`` crashed ``edgefleet devices pending``;
markup could restyle the fingerprint an operator compares), and control characters (escape
sequences, carriage returns, bidi overrides) can rewrite what is already on screen.

    clean(value)      the text with control and bidi-override characters replaced by U+FFFD
    safe(value)       clean + rich.markup.escape: for a markup string or a Table cell
    plain(value, st)  clean, as a rich Text (never parsed as markup)
    untrusted(obj)    clean every string in a JSON-like value (what the CLI gets from the API)
"""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape
from rich.text import Text

#: C0 (except tab/newline), DEL, C1, zero-width and bidi controls
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_LINE_BREAKS = re.compile("[\n\t]")


def clean(value: object, *, multiline: bool = False) -> str:
    text = _CONTROL.sub("\ufffd", value if isinstance(value, str) else str(value))
    return text if multiline else _LINE_BREAKS.sub(" ", text)


def safe(value: object) -> str:
    return escape(clean(value))


def plain(value: object, style: str = "") -> Text:
    return Text(clean(value), style=style)


def untrusted(obj: Any) -> Any:
    if isinstance(obj, str):
        return clean(obj, multiline=True)
    if isinstance(obj, dict):
        return {untrusted(k): untrusted(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [untrusted(v) for v in obj]
    return obj
