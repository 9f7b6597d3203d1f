"""The README's first command, run from this checkout as a newcomer would: ``scripts/demo --quick``.

Real processes throughout: a broker, ``edgefleet server run``, three ``edgefleet-agent run`` processes,
and the operator's ``edgefleet`` commands. The test reads the summary the demo prints, and then looks at
every process on the machine for anything that still names the demo's directory: nothing may be left
running, neither after a clean finish nor after Ctrl-C in the middle. Ctrl-C lands at points held by
barriers (the demo's step hook, the agents' fault hook), never after a guessed delay.

``EDGEFLEET_SKIP_SETUP=1`` in the environment skips ``scripts/setup`` (a machine where it already ran);
CI runs the full entry point.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.broker import mosquitto_available
from tests.support.waiting import wait_progress

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo"


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}


def _demo_dir(output: str) -> str:
    match = re.search(r"demo directory: (\S+)", output)
    assert match, f"the demo did not say where it works:\n{output[-3000:]}"
    return match.group(1)


def _processes_naming(needle: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment contains ``needle`` (zombies excluded).

    The environment catches the operator commands too: they find the server through EDGEFLEET_HOME.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle.encode() in cmdline + environ and state != "Z":
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _reap(work: str) -> list[tuple[int, str]]:
    """The processes still naming ``work``, killed on the way out so that a failing test leaks nothing."""
    left = _processes_naming(work)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def _run_demo(*args: str, timeout: float = 1500.0) -> tuple[int, str]:
    """The demo fails by itself when a process it started exits or its waits stall; ``timeout`` only
    catches a hang of the demo itself (it took 54 s under stress-ng --cpu 2 on a 2-core machine)."""
    proc = subprocess.run([str(DEMO), "--quick", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _check_story(output: str) -> None:
    assert re.search(r"^v1: committed on 3/3 devices", output, re.M), output[-4000:]
    waves = re.search(r"^v2: canary then (\d+) wave\(s\) completed on 3/3 devices", output, re.M)
    assert waves, output[-4000:]
    assert int(waves.group(1)) >= 1  # a canary followed by at least one wave
    assert re.search(r"^rollback: 3/3 devices confirmed back on v1", output, re.M), output[-4000:]
    assert re.search(r"^processes: started 5 .*stopped 5, left running 0", output, re.M), output[-4000:]
    for step in range(1, 15):
        assert f"Step {step}/14:" in output
    # the local inference API answered on every device, for both versions
    assert re.search(r"^local inference v1: \d+/\d+ evaluation digits right across 3 devices", output, re.M)
    assert re.search(r"^local inference v2: \d+/\d+ evaluation digits right across 3 devices", output, re.M)


def test_demo_quick_runs_the_whole_loop_and_leaves_nothing_running() -> None:
    rc, output = _run_demo()
    assert rc == 0, output[-6000:]
    _check_story(output)
    broker = re.search(r"^broker: (\w+)", output, re.M)
    assert broker and broker.group(1) == ("mosquitto" if mosquitto_available() else "amqtt")
    work = _demo_dir(output)
    assert _reap(work) == []
    assert not Path(work).exists()  # the temporary home is removed after a clean run


def test_demo_on_the_embedded_amqtt_broker() -> None:
    """The fresh-machine path: no mosquitto, the pure-Python broker in its own process."""
    rc, output = _run_demo("--broker", "amqtt")
    assert rc == 0, output[-6000:]
    _check_story(output)
    assert re.search(r"^broker: amqtt \(embedded, pure Python\)", output, re.M)
    assert _reap(_demo_dir(output)) == []


def _start_demo(tmp_path: Path, env: dict[str, str], *, sigint_ignored: bool = False) -> tuple[subprocess.Popen[bytes],
                                                                                               Path]:
    """``scripts/demo --quick`` in its own session (a terminal's foreground group), output in a log file.

    ``sigint_ignored``: start it as a background job of a script would be, with SIGINT ignored.
    """
    log_path = tmp_path / "demo.log"
    argv = [str(DEMO), "--quick"]
    if sigint_ignored:  # a shell that ignores SIGINT and execs the demo: the disposition survives the exec
        argv = ["bash", "-c", 'trap "" INT; exec "$0" "$@"', *argv]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**_env(), **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log_path


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log_path: Path, stall_s: float = 300.0) -> None:
    """Until ``path`` (a barrier's ``.reached`` file) exists, as long as the demo's output grows; fail at
    once if the demo ended first."""

    def size() -> int:
        return log_path.stat().st_size if log_path.exists() else 0

    wait_progress(path.exists, what=f"the demo reaching {path.name}", progress=size, stall_s=stall_s, cap_s=1500.0,
                  failed=lambda: None if proc.poll() is None else f"the demo exited with {proc.returncode}",
                  describe=lambda: log_path.read_text(errors="replace")[-4000:])


@dataclass
class _Demo:
    proc: subprocess.Popen[bytes]
    log_path: Path
    work: str = ""  # the demo's working directory (every process it starts names it)
    reached: bool = False  # the test got to stop it: the caller checks what is left

    def stopped(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.reached = True
        return rc


@contextlib.contextmanager
def _held_demo(tmp_path: Path, env: dict[str, str], barrier: Path, *, sigint_ignored: bool = False) -> Iterator[_Demo]:
    """The demo started and held at ``barrier``; on the way out its group is killed if it still runs, and its
    processes are reaped if the test failed before ``stopped`` (leak nothing)."""
    proc, log_path = _start_demo(tmp_path, env, sigint_ignored=sigint_ignored)
    demo = _Demo(proc, log_path)
    try:
        _wait_for_file(Path(f"{barrier}.reached"), proc, log_path)
        demo.work = _demo_dir(log_path.read_text(errors="replace"))
        yield demo
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if not demo.reached and demo.work:
            _reap(demo.work)


#: where Ctrl-C lands: (environment that pauses the demo there, a command line that must be running then)
#: step 5 pauses the demo's own code (its hook); the others hold every agent at a journal point with the
#: agents' fault hook, so the operator command that waits on them cannot finish
CTRL_C_POINTS = {
    "in-a-step": ({"EDGEFLEET_DEMO_PAUSE_AT_STEP": "5", "EDGEFLEET_DEMO_BARRIER": "{barrier}"}, None),
    "during-deploy-watch": ({"EDGEFLEET_FAULT_AT": "journal:probation", "EDGEFLEET_FAULT_WAIT": "{barrier}"},
                            "deploy digits:1"),
    "during-rollback": ({"EDGEFLEET_FAULT_AT": "journal:rolling_back", "EDGEFLEET_FAULT_WAIT": "{barrier}"},
                        "rollback --to group:demo"),
}


@pytest.mark.parametrize("point", list(CTRL_C_POINTS))
def test_ctrl_c_stops_every_process(point: str, tmp_path: Path) -> None:
    """SIGINT to the demo's process group (what Ctrl-C does) at a point held by a barrier, never a delay.

    The first case starts the demo with SIGINT ignored, as a background job of a script is: the wrapper's
    trap could not catch it then, and the demo ran on to "demo finished" and exit 0 (the bug this found).
    """
    barrier = tmp_path / "barrier"  # never created: the demo (or its agents) wait at the point until stopped
    template, command = CTRL_C_POINTS[point]
    env = {k: v.format(barrier=barrier) for k, v in template.items()}
    with _held_demo(tmp_path, env, barrier, sigint_ignored=point == "in-a-step") as demo:
        running = _processes_naming(demo.work)
        assert len(running) >= 5, running  # broker, server, three agents (+ the operator command)
        if command is not None:
            assert any(command in cmd for _, cmd in running), f"`edgefleet {command}` is not running: {running}"
        os.killpg(demo.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rc = demo.stopped(300)  # a hang catcher: it stops five processes, up to 15 s each, on a loaded machine
    work, log_path = demo.work, demo.log_path
    output = log_path.read_text(errors="replace")
    assert rc == 130, output[-4000:]
    assert "interrupted" in output
    assert "demo finished" not in output
    assert _reap(work) == []
    shutil.rmtree(work, ignore_errors=True)  # kept by the demo for inspection after a failure


def test_driver_killed_with_sigkill_the_wrapper_still_stops_every_process(tmp_path: Path) -> None:
    """scripts/demo kills the process groups the driver recorded, even when the driver could not clean up."""
    barrier = tmp_path / "barrier"  # the agents hold at probation: `edgefleet deploy --watch` keeps waiting
    env = {"EDGEFLEET_FAULT_AT": "journal:probation", "EDGEFLEET_FAULT_WAIT": str(barrier)}
    with _held_demo(tmp_path, env, barrier) as demo:
        running = _processes_naming(demo.work)
        # broker, server, three agents, the deploy command: an operator command that would outlive the driver
        assert len(running) >= 6 and any("deploy digits:1" in cmd for _, cmd in running), running
        drivers = [pid for pid, cmd in _processes_naming("scripts/demo.py") if _parent(pid) == demo.proc.pid]
        assert len(drivers) == 1
        os.kill(drivers[0], signal.SIGKILL)  # no finally, no atexit: only the wrapper's trap is left
        rc = demo.stopped(300)  # a hang catcher only: the wrapper's trap kills the recorded groups at once
    work = demo.work
    assert rc == 128 + signal.SIGKILL
    deadline = time.monotonic() + 30  # a hang catcher: the loop ends as soon as the kernel has delivered them
    while _processes_naming(work) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.1)
    assert _reap(work) == []
    shutil.rmtree(work, ignore_errors=True)


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
