"""What the agent's parts share: the host interface, the state they work on, small helpers.

``Agent`` (agent.py) is assembled from parts, one module per concern: reporting.py (events, the
retained state report, telemetry), download.py (the transfer: chunks, resume snapshots,
verification), swap.py (serving, warm-up, switch, probation, commit, rollback, the warm standby).
They share the state declared on ``AgentParts`` and run on the agent's one thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.core.health import WindowStats
from agent.core.intake import Intake
from agent.core.journal import State
from agent.core.lifecycle import Event, UpdateMachine
from agent.core.trust import TrustState
from agent.errors import IntegrityError
from agent.protocol.envelope import TrustAnchor
from agent.protocol.messages import HealthSpec, ModelRef, RuntimeSpec
from agent.runtime.config import AgentConfig
from agent.runtime.download_state import Download
from agent.runtime.mqtt import MqttLink
from agent.runtime.store import ModelStore
from agent.runtime.telemetry import SystemSampler

log = logging.getLogger("agent")


# -- the ModelHost as the agent uses it (CONTRACTS.md section 6; agent.runtime.host implements it) ----------


class LoadedLike(Protocol):
    @property
    def ref(self) -> ModelRef: ...


class HostLike(Protocol):
    def load(
        self, path: Path, *, ref: ModelRef, runtime: RuntimeSpec, variant: str | None = None, options: Any = None,
    ) -> Any: ...

    def check(self, model: Any, health: HealthSpec) -> Any: ...

    def benchmark(
        self, model: Any, health: HealthSpec, *, runs: int, max_s: float, cpu_share: float = 1.0, yield_s: float = 0.0,
        cpu_time: bool = False,
    ) -> Any: ...

    def activate(self, model: Any, *, keep_previous: bool = False) -> Any: ...

    def deactivate(self) -> Any: ...

    def unload(self, model: Any) -> None: ...

    @property
    def active(self) -> Any: ...

    def stats(self, *, since: float | None = None, version: int | None = None, name: str | None = None) -> Any: ...

    def now(self) -> float: ...


class AgentParts:
    """The agent's state, shared by the parts below it (declared here, set in ``Agent.__init__``)."""

    config: AgentConfig
    host: HostLike
    http_url: str | None
    device_key: X25519PrivateKey
    trust: TrustAnchor
    clock: Callable[[], float]
    monotonic: Callable[[], float]
    device_id: str
    inbox: queue.Queue[Any]
    _snapshots: ThreadPoolExecutor
    store: ModelStore
    machine: UpdateMachine
    link: MqttLink | None
    sampler: SystemSampler
    public_key: str
    arch: str
    _download: Download | None
    _candidate: Any
    _standby: Any
    _standby_warm: bool
    _measured: dict[ModelRef, Any]  # this device's own benchmark of each version it warmed up (memory only)
    _probation_since: float | None
    _probation_next: float | None
    _pending_desired: bytes | None
    trusted: TrustState
    intake: Intake
    _error_counts: dict[str, tuple[float, int]]
    _telemetry_next: float
    _telemetry_since: float | None
    _telemetry_window_start: float
    _state_dirty: bool
    _published_lifecycle: State | None
    _birth_sent: bool
    _last_state: bytes | None
    _head_done: bool
    _started: threading.Event
    _stopping: bool

    if TYPE_CHECKING:  # defined by the parts that own them (agent.py, swap.py, download.py)

        def _feed(self, event: Event) -> None: ...

        def _check_memory_budget(self, candidate_bytes: int, what: str) -> None: ...

        def _discard_download(self, artifact_id: str) -> None: ...

        def _subscribe(self, topic: str) -> None: ...


# -- small helpers ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None where it cannot be read."""
    try:
        return int(Path("/proc/self/statm").read_bytes().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> None:
    """Reset this process's resident high-water mark (Linux >= 4.0; a no-op where not allowed)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_bytes(b"5")


def _peak_rss_bytes() -> int | None:
    """The resident high-water mark since the last reset (VmHWM), or the current RSS where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return _rss_bytes()


def _ref(model: Any) -> ModelRef | None:
    return model.ref if model is not None else None


def _ref_text(ref: ModelRef | None) -> str | None:
    return f"{ref.name} v{ref.version}" if ref is not None else None


def _ref_dict(ref: ModelRef | None) -> dict[str, Any] | None:
    return ref.to_dict() if ref is not None else None


def _need(value: Any) -> Any:
    if value is None:
        raise IntegrityError("the desired state lacks a field a deploy needs")
    return value


def _window(stats: Any) -> WindowStats:
    return WindowStats(
        requests=int(getattr(stats, "requests", 0)),
        errors=int(getattr(stats, "errors", 0)),
        p50_ms=getattr(stats, "p50_ms", None),
        p95_ms=getattr(stats, "p95_ms", None),
        p99_ms=getattr(stats, "p99_ms", None),
    )
