"""The demo's processes (``scripts/demo.py``): start them, wait on them by what they show, stop them all.

Long-running children (broker, server, agents) each run in their own process group, recorded in the
wrapper's pidfile the moment they exist. Waits have no fixed budget: a busy machine makes every step
slower, not wrong. ``Processes.wait_for`` goes on as long as something moves (a child's log grows, or
what is waited on changes), fails at once, with the child's log, when a child exits, and gives up only
after ``stall_s`` without any change (or ``cap_s`` in all); ``Processes.run`` runs an operator command
the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.runtime.procs import process_alive

#: a wait fails after this long without any child's log growing and without its own progress
STALL_S = 180.0
#: ... or after this long in all, even while things move
CAP_S = 1800.0


class DemoError(Exception):
    """A step of the story did not do what it should; the message says which and why."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Processes:
    """Long-running children (broker, server, agents), each in its own process group.

    Every group id is appended to ``pidfile`` (from ``scripts/demo``) the moment it exists, so the
    wrapper can kill what is left even if this driver is killed with SIGKILL.
    """

    def __init__(self, cwd: Path, logs: Path, pidfile: Path | None) -> None:
        self.cwd = cwd
        self.logs = logs
        self.pidfile = pidfile
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Child:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=self.cwd, start_new_session=True)
        child = Child(name, proc, log_path)
        self.children.append(child)
        if self.pidfile is not None:
            with self.pidfile.open("a") as f:
                f.write(f"{proc.pid} {name}\n")
        return child

    def forget(self, child: Child) -> None:
        """A child that exited during start-up and is replaced by a new attempt."""
        self.children.remove(child)

    def check(self) -> None:
        """Fail the story loudly when a child died on its own."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise DemoError(f"{c.name} (pid {c.proc.pid}) exited with status {code}:\n{tail(c.log)}")

    def log_sizes(self) -> tuple[int, ...]:
        sizes = []
        for c in self.children:
            try:
                sizes.append(c.log.stat().st_size)
            except OSError:
                sizes.append(0)
        return tuple(sizes)

    def wait_for(self, what: str, check: Callable[[], Any], *, progress: Callable[[], Hashable] = lambda: None,
                 stall_s: float = STALL_S, cap_s: float = CAP_S, interval: float = 0.2) -> Any:
        """Poll ``check`` until it returns something true (returned); see the module for when it fails."""
        start = moved = time.monotonic()
        marker: Hashable = (self.log_sizes(), progress())
        while True:
            self.check()
            result = check()
            if result:
                return result
            now = time.monotonic()
            current = (self.log_sizes(), progress())
            if current != marker:
                marker, moved = current, now
            if now - moved >= stall_s:
                raise DemoError(f"waiting for {what}: nothing moved for {stall_s:g}s (waited {now - start:.0f}s)"
                                f"\n{self.describe()}")
            if now - start >= cap_s:
                raise DemoError(f"waiting for {what}: not done after {cap_s:g}s\n{self.describe()}")
            time.sleep(interval)

    def run(self, argv: Sequence[str], *, env: dict[str, str], cwd: Path, capture: bool,
            what: str) -> subprocess.CompletedProcess[str]:
        """Run a command to its end while the children keep going; fail at once when one of them exits.
        No stall window: the operator commands have their own deadlines (a rollout's device timeout,
        ``rollback --timeout``), and a busy machine only makes them slower. The command is killed when
        this fails or is interrupted (Ctrl-C, SIGTERM). ``capture``: its output goes to files, not pipes,
        so a chatty command cannot block on a full pipe while this polls."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(list(argv), env=env, cwd=cwd, text=True, stdin=subprocess.DEVNULL,
                                    stdout=out if capture else None, stderr=err if capture else None)
            try:
                self.wait_for(what, lambda: proc.poll() is not None, stall_s=float("inf"))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if not capture:
                return subprocess.CompletedProcess(proc.args, proc.returncode)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())

    def describe(self, lines: int = 8) -> str:
        return "\n".join(f"--- {c.name} (pid {c.proc.pid}), the end of {c.log.name}:\n{tail(c.log, lines)}"
                         for c in self.children)

    def stop_all(self, timeout: float = 15.0) -> list[tuple[str, int, int | None]]:
        """SIGTERM in reverse start order (agents, server, broker), SIGKILL what lingers; every group."""
        for c in reversed(self.children):
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout)
        result = []
        for c in self.children:
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()
            # a grandchild that outlived its parent would still be in the group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            result.append((c.name, c.proc.pid, c.proc.returncode))
        if self.pidfile is not None and self.pidfile.exists():
            self.pidfile.write_text("")
        return result


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def demo_pids(work: Path) -> list[int]:
    """Processes whose command line or environment names this run's directory (none after stop_all)."""
    needle = str(work).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            named = needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes()
            if named and process_alive(int(entry.name)):
                found.append(int(entry.name))
    return found
