"""Stopping the real processes tests start: kill -9 means kill -9, a stop is SIGTERM then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


def kill_hard(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None) -> None:
    """SIGKILL and reap: no clean shutdown, nothing flushed."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def stop_gently(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, timeout: float) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code (None when never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
