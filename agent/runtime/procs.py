"""Whether a process is still there (the agent's ``status`` command, the demo's process bookkeeping)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists (another user's process counts) and is not a zombie.

    A zombie has exited and waits to be reaped (a child by its parent's wait, others by init): not running.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


__all__ = ["process_alive"]
