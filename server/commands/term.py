"""Consoles for the command line that read well on a terminal, in a pipe and in a CI log.

On a terminal rich fits its width and redraws live views in place. Anywhere else (a file, a pipe,
a CI log) there is no width to fit and nothing can be redrawn: tables get ``PIPE_WIDTH`` columns
(or ``$COLUMNS`` when that is wider) instead of rich's default of 80, so no header or cell is cut
to "profi…", and a watched view is logged: one timestamped line whenever it changes
(``ChangeLog``), then its full form once at the end.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console

PIPE_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty():
        columns = os.environ.get("COLUMNS", "")
        width = max(PIPE_WIDTH, int(columns) if columns.isdigit() else 0)
    return Console(stderr=stderr, width=width)


def can_redraw(console: Console) -> bool:
    """Whether live views may redraw in place (a real terminal, not a pipe, file or dumb terminal)."""
    return console.is_terminal and not console.is_dumb_terminal


class ChangeLog:
    """Prints a timestamped line when it differs from the one printed before (a watched view, logged)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last: str | None = None

    def __call__(self, line: str) -> bool:
        if line == self.last:
            return False
        self.last = line
        self.console.print(f"{time.strftime('%H:%M:%S')} {line}", markup=False, highlight=False, soft_wrap=True)
        return True
