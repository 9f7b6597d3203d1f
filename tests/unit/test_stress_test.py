"""scripts/stress_test: reading scripts/test's output, and the CPU hog's lifetime (it dies with its owner)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from scripts import stress_test
from scripts.stress_test import Run, parse_output

REPO = Path(__file__).resolve().parents[2]

OUTPUT = """\
[setup] ready
[test] ruff (setup took 40 s)
[test] mypy (at 45 s)
[test] pytest (at 100 s)
tests/unit/test_a.py ....F
=========================== short test summary info ============================
SKIPPED [1] tests/faults/test_resources.py:36: NOT RUN: needs root
FAILED tests/e2e/test_demo.py::test_ctrl_c_in_the_middle_stops_every_process - AssertionError: exit 0
ERROR tests/integration/test_x.py::test_y - RuntimeError: broker
============ 2 failed, 535 passed, 3 skipped, 1 error, 2 warnings in 541.20s (0:09:01) ============
[test] pytest_postgresql on tests/integration/test_rollout.py tests/faults (at 600 s)
FAILED tests/faults/test_crashes.py::test_z - AssertionError: lost a row
============ 1 failed, 101 passed in 30.00s ============
[test] py310_check (the agent on Python 3.10; at 641 s)
335 passed in 29.84s
py310_check: PASSED (Python 3.10.14)
[test] arm_check (the agent on emulated aarch64; EDGEFLEET_ARM_CHECK=0 skips, =require fails if impossible; at 700 s)
arm_check NOT RUN: needs root (debootstrap, mount, chroot); run as root or set EDGEFLEET_ARM_CHECK=0
[test] done in 701 s
"""


def test_the_summary_failures_and_both_checks_are_read_from_the_output() -> None:
    run = Run(1, "abc")
    parse_output(OUTPUT, run)
    # the pytest phases' counts (both passes), not py310_check's own pytest summary printed after them
    assert run.counts == {"failed": 3, "passed": 636, "skipped": 3, "errors": 1, "warnings": 2}
    assert run.failures == [
        "FAILED tests/e2e/test_demo.py::test_ctrl_c_in_the_middle_stops_every_process - AssertionError: exit 0",
        "ERROR tests/integration/test_x.py::test_y - RuntimeError: broker",
        "FAILED tests/faults/test_crashes.py::test_z - AssertionError: lost a row",
    ]
    assert run.checks == {
        "py310_check": "PASSED",
        "arm_check": "NOT RUN: needs root (debootstrap, mount, chroot); run as root or set EDGEFLEET_ARM_CHECK=0",
    }
    assert run.phases_s == {"setup": 40, "ruff": 5, "mypy": 55, "pytest": 500, "pytest_postgresql": 41,
                            "py310_check": 59, "arm_check": 1}
    quiet = Run(2, "abc")
    parse_output("..\n2 passed, 530 deselected in 3.10s\n", quiet)
    assert quiet.counts == {"passed": 2, "deselected": 530} and not quiet.failures
    table = stress_test.table([run, quiet])
    assert "636" in table and "run 1: FAILED tests/e2e/test_demo.py" in table and "pytest 500 s" in table


def test_arguments_after_the_double_dash_go_to_scripts_test() -> None:
    args, rest = stress_test.parse_args(["--runs", "2", "--pytest-only", "--", "-k", "test_layering"])
    assert (args.runs, args.load, args.pytest_only, rest) == (2, 2, True, ["-k", "test_layering"])
    with pytest.raises(SystemExit):
        stress_test.parse_args(["--runs", "0"])


@pytest.mark.parametrize("hog", ["stress-ng", "python"])
@pytest.mark.parametrize("how", ["owner SIGKILLed", "owner leaves the block"])
def test_the_cpu_hog_dies_with_its_owner(how: str, hog: str) -> None:
    fallback = "s.ensure_stress_ng = lambda: None\n" if hog == "python" else ""
    owner = subprocess.Popen(
        [sys.executable, "-c", f"import sys\nimport scripts.stress_test as s\n{fallback}"
         "with s.cpu_hog(2) as what:\n    print(what, flush=True)\n    sys.stdin.read()\n"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert owner.stdout is not None and owner.stdin is not None
    what = owner.stdout.readline()
    assert what.startswith("stress-ng --cpu 2" if hog == "stress-ng" else "2 busy Python"), what
    processes = psutil.Process(owner.pid).children(recursive=True)  # cpu_hog() has waited for its workers
    assert len([p for p in processes if p.name() in stress_test.WORKER_NAMES]) == 2, processes
    if how == "owner SIGKILLed":
        os.kill(owner.pid, signal.SIGKILL)
    else:
        owner.stdin.close()
    owner.wait(60)
    _, alive = psutil.wait_procs(processes, timeout=60)
    assert not alive, f"the hog outlived its owner: {alive}"


def test_the_guardian_stops_the_watched_process_groups_when_the_script_is_sigkilled(tmp_path: Path) -> None:
    (tmp_path / "clone" / "sub").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys\nfrom pathlib import Path\nimport scripts.stress_test as s\n"
         "g = s.Guardian()\n"
         "run = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
         "done = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
         "g.watch(run.pid); g.watch(done.pid); g.watch(done.pid, on=False)\n"
         f"g.watch(Path({str(tmp_path / 'clone')!r})); g.watch(Path({str(tmp_path / 'logs')!r}), on=False)\n"
         "print(run.pid, done.pid, g.proc.pid, flush=True)\nsys.stdin.read()\n"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert owner.stdout is not None
    run_pid, done_pid, guardian_pid = (int(x) for x in owner.stdout.readline().split())
    watched, unwatched, guardian = psutil.Process(run_pid), psutil.Process(done_pid), psutil.Process(guardian_pid)
    try:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(60)
        _, alive = psutil.wait_procs([watched, guardian], timeout=60)
        assert not alive, f"still running after the script was SIGKILLed: {alive}"
        assert unwatched.is_running(), "a group taken off the list is left alone"
        assert not (tmp_path / "clone").exists(), "the watched directory is removed"
        assert (tmp_path / "logs").is_dir(), "a directory taken off the list is kept"
    finally:
        for p in (watched, unwatched):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_a_guardian_that_is_gone_does_not_break_our_own_cleanup(capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM sent to every process (an interrupted session) also stops the guardian: watch/close go on."""
    guardian = stress_test.Guardian()
    guardian.proc.kill()
    guardian.proc.wait(60)
    guardian.watch(12345)  # was: BrokenPipeError, and a cascade of tracebacks instead of exit 143
    guardian.watch(12345, on=False)
    guardian.close()
    assert capsys.readouterr().err.count("the guardian process exited") == 1
