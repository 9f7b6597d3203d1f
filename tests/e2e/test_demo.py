"""The README's first command, run from this checkout as a newcomer would: ``scripts/demo --quick``.

Real processes throughout: a broker, ``edgefleet server run``, three ``edgefleet-agent run`` processes,
and the operator's ``edgefleet`` commands. The test reads the summary the demo prints, and then looks at
every process on the machine for anything that still names the demo's directory: nothing may be left
running, neither after a clean finish nor after Ctrl-C in the middle.

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
from pathlib import Path

import pytest

from server.broker import mosquitto_available

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


def _run_demo(*args: str, timeout: float = 540.0) -> tuple[int, str]:
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


def test_ctrl_c_in_the_middle_stops_every_process(tmp_path: Path) -> None:
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(DEMO), "--quick"], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    work, reached = "", False
    try:
        deadline = time.monotonic() + 300
        # once the agents run, every kind of child (broker, server, agents) exists
        while "Step 5/14" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the demo did not reach step 5"
            time.sleep(0.2)
        output = log_path.read_text(errors="replace")
        work = _demo_dir(output)
        assert len(_processes_naming(work)) >= 5  # broker, server, three agents (+ possibly a CLI call)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        rc = proc.wait(60)
        reached = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if not reached and work:
            _reap(work)  # the test failed early: leak nothing
    output = log_path.read_text(errors="replace")
    assert rc == 130, output[-4000:]
    assert "interrupted" in output
    assert _reap(work) == []
    shutil.rmtree(work, ignore_errors=True)  # kept by the demo for inspection after a failure


def test_driver_killed_with_sigkill_the_wrapper_still_stops_every_process(tmp_path: Path) -> None:
    """scripts/demo kills the process groups the driver recorded, even when the driver could not clean up."""
    log_path = tmp_path / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(DEMO), "--quick"], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    work, reached = "", False
    try:
        deadline = time.monotonic() + 400
        # the moment `edgefleet deploy ... --watch` runs: an operator command that would outlive the driver
        while "$ edgefleet deploy digits:1" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "the demo did not reach the first deploy"
            time.sleep(0.2)
        work = _demo_dir(log_path.read_text(errors="replace"))
        time.sleep(0.5)
        assert len(_processes_naming(work)) >= 6  # broker, server, three agents, the deploy command
        drivers = [pid for pid, cmd in _processes_naming("scripts/demo.py") if _parent(pid) == proc.pid]
        assert len(drivers) == 1
        os.kill(drivers[0], signal.SIGKILL)  # no finally, no atexit: only the wrapper's trap is left
        rc = proc.wait(60)
        reached = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if not reached and work:
            _reap(work)  # the test failed early: leak nothing
    assert rc == 128 + signal.SIGKILL
    deadline = time.monotonic() + 3
    while _processes_naming(work) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
        time.sleep(0.1)
    assert _reap(work) == []
    shutil.rmtree(work, ignore_errors=True)


def _parent(pid: int) -> int:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
