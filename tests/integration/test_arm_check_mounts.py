"""scripts/arm_check leaves the host's mounts as it found them: killed while every mount it makes is in place
(SIGKILL to its whole process group, SIGTERM to it alone, Ctrl-C), and after a run that ends on its own.

The real script runs (the shell wrapper, unshare, the Python check, its host-tools step and its mounts) against
a rootfs cache that holds a root filesystem's stamps over empty directories: the check takes it as built and
mounts /proc, /sys, /dev, the Raspberry Pi 5 /proc/cpuinfo and the model cache into it exactly as into the
real one. It stops right after mounting on a FIFO (``EDGEFLEET_ARM_PAUSE_AFTER_MOUNT``) and says so: that is
where the test looks at both sides (mounted in the check's namespace, invisible on the host) and kills it.
Needs root and unshare, like scripts/arm_check itself.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from scripts.arm import rootfs
from scripts.arm.check import PAUSE_AFTER_MOUNT
from tests.support.faults import not_run

REPO = Path(__file__).resolve().parents[2]
PAUSED = "mounted; paused until"


def host_mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def mount_points(mountinfo: str) -> list[str]:
    return [line.split()[4].replace("\\040", " ") for line in mountinfo.splitlines()]


@pytest.fixture
def fake_cache(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        not_run("scripts/arm_check needs root (mount, chroot)")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        not_run(f"no mount/PID namespaces here (unshare: {probe.stderr.decode().strip()})")
    cache = tmp_path / "cache"
    root = cache / "arm64-rootfs" / rootfs.cache_key()
    root.mkdir(parents=True)
    (root / rootfs.STAMP).write_text("{}")
    (root / rootfs.WHEELS_STAMP).write_text(rootfs.requirements_hash(rootfs.REQUIREMENTS) + "\n")
    (cache / "models").mkdir()
    return cache


class PausedCheck:
    """scripts/arm_check started in a process group of its own, run up to its pause after mounting."""

    def __init__(self, cache: Path, tmp_path: Path) -> None:
        self.root = (cache / "arm64-rootfs" / rootfs.cache_key()).resolve()
        self.fifo = tmp_path / "pause.fifo"
        os.mkfifo(self.fifo)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_ARM")}
        env.update({"EDGEFLEET_CACHE": str(cache), PAUSE_AFTER_MOUNT: str(self.fifo), "PYTHON": sys.executable})
        self.proc = subprocess.Popen(
            [str(REPO / "scripts" / "arm_check"), "--skip-unit"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # until it says it has mounted everything (or ends without saying so)
            self.output.append(line)
            if PAUSED in line:
                break
        else:
            self.proc.wait()
            pytest.fail(f"arm_check exited {self.proc.returncode} before mounting:\n{self.text()}")
        self.processes = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def text(self) -> str:
        return "".join(self.output)

    def check_process(self) -> psutil.Process:
        (check,) = [p for p in self.processes if p.name() != "unshare" and "scripts.arm.check" in p.cmdline()]
        return check

    def finish(self, timeout: float = 300) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.output.append(out or "")
        return self.proc.returncode

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


@pytest.fixture
def paused(fake_cache: Path, tmp_path: Path) -> Iterator[PausedCheck]:
    before = host_mountinfo()
    run = PausedCheck(fake_cache, tmp_path)
    try:
        inside = mount_points(Path(f"/proc/{run.check_process().pid}/mountinfo").read_text())
        for point in ("proc", "proc/cpuinfo", "sys", "dev", "opt/edgefleet/cache/models"):
            assert str(run.root / point) in inside, f"the check has not mounted {point} in its namespace"
        assert host_mountinfo() == before, "a mount made by arm_check is visible on the host"
        yield run
    finally:
        run.kill_all()
    _, alive = psutil.wait_procs(run.processes, timeout=60)
    assert not alive, f"processes of the run outlived it: {alive}"
    after = host_mountinfo()
    assert after == before, f"the host's mounts changed:\nbefore:\n{before}\nafter:\n{after}"
    assert "/proc/cpuinfo" not in mount_points(after)
    assert not [p for p in mount_points(after) if p.startswith(str(run.root))]
    if platform.machine() != "aarch64":
        assert "0xd0b" not in Path("/proc/cpuinfo").read_text(), "the host's /proc/cpuinfo shows a Cortex-A76"


@pytest.mark.parametrize(
    ("how", "status"),
    [
        ("SIGKILL to the process group", -signal.SIGKILL),
        ("SIGTERM to the script", 128 + signal.SIGTERM),
        ("Ctrl-C (SIGINT to the process group)", 128 + signal.SIGINT),
    ],
)
def test_killed_while_mounted_leaves_the_host_as_it_was(paused: PausedCheck, how: str, status: int) -> None:
    if how.startswith("SIGKILL"):
        os.killpg(paused.proc.pid, signal.SIGKILL)
    elif how.startswith("SIGTERM"):
        paused.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(paused.proc.pid, signal.SIGINT)
    assert paused.finish() == status, paused.text()


def test_a_run_that_ends_on_its_own_leaves_the_host_as_it_was(paused: PausedCheck) -> None:
    with open(paused.fifo, "wb"):  # let it go on: it installs the agent into the (empty) rootfs and fails there
        pass
    assert paused.finish() == 1, paused.text()
    text = paused.text()
    assert "resumed" in text and "install the agent from this checkout" in text and "arm_check: FAILED" in text
    assert not (paused.root.parent / "work").exists(), "the scratch directory is removed"
