"""Fault injection for the fault suite (tests/faults): a TCP proxy, small filesystems, journal peeking, a ledger.

* ``TcpProxy`` sits between an MQTT client and mosquitto: it can throttle the link (bytes per second),
  cut every open connection (a connection drop seen by both ends), or refuse new ones (an outage).
* ``small_fs`` mounts a size-limited tmpfs (root only) so a download can really hit ENOSPC;
  without root it yields None and the caller reports NOT RUN.
* ``read_journal`` reads the agent's two journal slots the way the agent does (highest valid serial).
* ``FaultLedger`` collects per-scenario trial outcomes; ``scripts/fault_report.py`` aggregates them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.core.journal import JournalRecord

#: env var: a JSON-lines file each scenario appends its outcome to (set by scripts/fault_report.py)
LEDGER_ENV = "EDGEFLEET_FAULT_LEDGER"
#: env var: "1" runs the soak sizes (>= 50 crash trials); "quick" shrinks trial counts
MODE_ENV = "EDGEFLEET_FAULT_MODE"


def fault_mode() -> str:
    return os.environ.get(MODE_ENV, "default")


def trials(default: int, *, soak: int, quick: int | None = None) -> int:
    mode = fault_mode()
    if mode == "soak":
        return soak
    if mode == "quick" and quick is not None:
        return quick
    return default


# -- TCP proxy -----------------------------------------------------------------------------------------------


class TcpProxy:
    """A loopback TCP proxy to ``target``; ``rate_bps`` throttles, ``cut()`` drops, ``refuse`` keeps clients out."""

    def __init__(self, target_host: str, target_port: int, *, rate_bps: float | None = None) -> None:
        self.target = (target_host, target_port)
        self.rate_bps = rate_bps
        self.refuse = False
        self.bytes_down = 0  # broker -> client
        self.connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.host, self.port = self._listener.getsockname()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        socks = [client, upstream]
        try:
            while not self._closed:
                readable, _, _ = select.select(socks, [], [], 0.5)
                for s in readable:
                    data = s.recv(4096)
                    if not data:
                        return
                    other = upstream if s is client else client
                    if s is upstream:
                        self.bytes_down += len(data)
                        if self.rate_bps:
                            time.sleep(len(data) / self.rate_bps)
                    other.sendall(data)
        except OSError:
            return
        finally:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> int:
        """Drop every open connection (RST-less close on both sides); returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()


# -- small filesystems ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_fs(path: Path, size_bytes: int) -> Iterator[Path | None]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (needs root and ``mount``); None when not available."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def not_run(reason: str) -> None:
    """Say plainly that a check could not run here (printed in the pytest summary via -rs)."""
    import pytest

    pytest.skip(f"NOT RUN: {reason}")


# -- looking at the agent's disk ------------------------------------------------------------------------------


def read_journal(store: Path) -> JournalRecord | None:
    best: JournalRecord | None = None
    for slot in ("journal.0", "journal.1"):
        try:
            record = JournalRecord.from_bytes((store / slot).read_bytes())
        except Exception:
            continue
        if best is None or record.serial > best.serial:
            best = record
    return best


def kept_versions(store: Path, name: str = "digits") -> set[int]:
    """Committed versions on disk (``models/<name>/<version>-<artifact>/``)."""
    root = store / "models" / name
    if not root.is_dir():
        return set()
    out: set[int] = set()
    for p in root.iterdir():
        head = p.name.split("-", 1)[0]
        if p.is_dir() and head.isdigit():
            out.add(int(head))
    return out


# -- the ledger -----------------------------------------------------------------------------------------------


@dataclass
class ScenarioOutcome:
    name: str
    trials: int = 0
    passed: int = 0
    unserving: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


class FaultLedger:
    """Per-test trial recorder: ``trial(ok, unserving=, lost=)``; the conftest hook writes it out."""

    def __init__(self, name: str) -> None:
        self.outcome = ScenarioOutcome(name)

    def trial(self, ok: bool = True, *, unserving: int = 0, lost: int = 0) -> None:
        self.outcome.trials += 1
        self.outcome.passed += int(ok)
        self.outcome.unserving += unserving
        self.outcome.lost += lost

    def note(self, text: str) -> None:
        self.outcome.notes.append(text)

    def finish(self, test_passed: bool, *, not_run: str | None = None) -> dict[str, Any] | None:
        o = self.outcome
        if not_run is not None:
            record: dict[str, Any] = asdict(o) | {"not_run": not_run}
        else:
            if not test_passed and o.passed == o.trials:
                o.trials += 1  # the trial that raised (unless it was recorded as failed already)
            elif o.trials == 0:
                o.trials = o.passed = 1
            record = asdict(o)
        path = os.environ.get(LEDGER_ENV)
        if path:
            with Path(path).open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record
