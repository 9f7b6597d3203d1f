"""The agent's test/fault hook (agent/runtime/faults.py): off unless armed, strict about point names."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.runtime import faults
from agent.runtime.faults import FaultHook, FaultPoint, parse


def test_unset_means_off() -> None:
    hook = FaultHook()
    assert faults.arm_from_env({}) is None
    assert faults.HOOK.armed is None
    hook.reach("journal:verifying")  # nothing happens


@pytest.mark.parametrize(
    ("spec", "point", "nth"),
    [
        ("journal:verifying", "journal:verifying", 1),
        ("journal:probation#3", "journal:probation", 3),
        ("download:chunk:17", "download:chunk:17", 1),
        ("download:snapshot#2", "download:snapshot", 2),
        ("switched", "switched", 1),
        ("probation:sample#2", "probation:sample", 2),
        ("commit", "commit", 1),
        ("write:tmp#8", "write:tmp", 8),
        ("probe:stored#2", "probe:stored", 2),
    ],
)
def test_points_parse(spec: str, point: str, nth: int) -> None:
    assert parse(spec) == FaultPoint(point, nth)


@pytest.mark.parametrize("spec", ["journal:nope", "download:chunk:0", "switched#0", "rm -rf", "commit#", "x" * 200])
def test_a_malformed_point_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="not a fault point"):
        parse(spec)


def test_the_nth_occurrence_opens_a_barrier(tmp_path: Path) -> None:
    barrier = tmp_path / "go"
    hook = FaultHook()
    hook.arm(parse("journal:warming#2", str(barrier)))
    hook.reach("journal:warming")  # the first: passes
    hook.reach("journal:staged")  # another point: passes
    waiter = threading.Thread(target=hook.reach, args=("journal:warming",))
    waiter.start()
    reached = Path(f"{barrier}.reached")
    waiter.join(0.05)
    for _ in range(500):
        if reached.exists():
            break
        waiter.join(0.01)
    assert reached.exists() and waiter.is_alive(), "the second occurrence must block on the barrier"
    barrier.touch()
    waiter.join(10)
    assert not waiter.is_alive()
    hook.reach("journal:warming")  # the third: passes


def test_a_stop_releases_the_barrier(tmp_path: Path) -> None:
    hook = FaultHook()
    hook.arm(parse("switched", str(tmp_path / "never")))
    waiter = threading.Thread(target=hook.reach, args=("switched",))
    waiter.start()
    hook.release()  # what the agent's SIGTERM/SIGINT handler does
    waiter.join(10)
    assert not waiter.is_alive()


def test_kill_action_is_sigkill(tmp_path: Path) -> None:
    code = (
        "from agent.runtime import faults\n"
        "faults.HOOK.arm(faults.parse('commit'))\n"
        "faults.HOOK.reach('switched')\n"
        "print('alive', flush=True)\n"
        "faults.HOOK.reach('commit')\n"
        "print('survived', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == -9, done.stderr
    assert done.stdout == "alive\n"
