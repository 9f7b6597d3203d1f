"""scripts/demo_procs.py: the demo's waits end on what its processes show, never on a fixed budget."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from agent.runtime.procs import process_alive
from scripts.demo_procs import DemoError, Processes


def _procs(tmp_path: Path) -> Processes:
    (tmp_path / "logs").mkdir()
    return Processes(tmp_path, tmp_path / "logs", tmp_path / "pids")


def test_a_wait_fails_at_once_with_the_log_when_a_child_exits(tmp_path: Path) -> None:
    procs = _procs(tmp_path)
    child = procs.start("agent-x", [sys.executable, "-c", "print('cannot serve HTTP'); raise SystemExit(3)"], {})
    child.proc.wait()
    start = time.monotonic()
    with pytest.raises(DemoError, match=r"(?s)agent-x \(pid \d+\) exited with status 3.*cannot serve HTTP"):
        procs.wait_for("something that never comes", lambda: False)
    assert time.monotonic() - start < 5  # not after a stall window
    assert (tmp_path / "pids").read_text() == f"{child.proc.pid} agent-x\n"
    procs.stop_all()


def test_a_wait_fails_only_when_nothing_moved_for_the_stall_window(tmp_path: Path) -> None:
    procs = _procs(tmp_path)
    procs.start("quiet", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    ticks = iter(range(1000))
    try:
        # the waited-on progress moves for 5 polls, then stops: the stall window counts from the last move
        with pytest.raises(DemoError, match=r"nothing moved for 0\.3s"):
            procs.wait_for("a stuck thing", lambda: False, progress=lambda: min(next(ticks), 5), stall_s=0.3,
                           interval=0.01)
        assert next(ticks) > 5
        assert procs.wait_for("a value", lambda: "found") == "found"
    finally:
        procs.stop_all()


def test_run_captures_a_command_and_stops_it_when_a_child_dies(tmp_path: Path) -> None:
    procs = _procs(tmp_path)
    done = procs.run([sys.executable, "-c", "import sys; print('x' * 200000); print('err', file=sys.stderr)"],
                     env={}, cwd=tmp_path, capture=True, what="chatty")
    assert done.returncode == 0 and len(done.stdout) == 200001 and done.stderr == "err\n"
    pidfile = tmp_path / "command.pid"
    # the "server" dies once the command runs (it wrote its pid): run() must fail then, and kill the command
    procs.start("server", [sys.executable, "-c", "import os, sys, time\n"
                           f"while not os.path.exists({str(pidfile)!r}): time.sleep(0.01)\nsys.exit(1)"], {})
    tmp = tmp_path / "command.tmp"  # written, then renamed: the server never sees a half-written pid
    command = (f"import os, time, pathlib; pathlib.Path({str(tmp)!r}).write_text(str(os.getpid())); "
               f"os.rename({str(tmp)!r}, {str(pidfile)!r}); time.sleep(600)")
    with pytest.raises(DemoError, match=r"server .* exited with status 1"):
        procs.run([sys.executable, "-c", command], env={}, cwd=tmp_path, capture=False, what="a long command")
    procs.stop_all()
    assert not process_alive(int(pidfile.read_text()))  # the command was killed, not left behind
