"""The transfer in progress and its resume snapshots (state only; download.py does the work)."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

from agent.core.reassembly import Reassembly
from agent.errors import StorageError
from agent.protocol.envelope import ChunkOpener
from agent.protocol.messages import ArtifactInfo, DesiredState, ModelRef
from agent.runtime import faults
from agent.runtime.delta import DeltaPlan
from agent.runtime.store import PartialDownload

log = logging.getLogger("agent")

#: A resume snapshot (fsync of the chunk data, then an atomic snapshot write) is taken once this many new
#: bytes or this many seconds have passed since the last one, whichever comes first: by bytes, not chunks,
#: so small chunks do not multiply fsyncs; by time, so a slow link still loses at most ~0.2 s of transfer on a crash.
SNAPSHOT_EVERY_BYTES = 8 << 20
SNAPSHOT_EVERY_S = 0.2


@dataclass
class Download:
    """The transfer in progress (the durable part is the partial directory in the store)."""

    target: ModelRef
    desired: DesiredState
    info: ArtifactInfo
    opener: ChunkOpener
    reassembly: Reassembly
    partial: PartialDownload
    last_new_at: float
    timeout: float
    unsnapshotted: int = 0  # bytes stored since the last resume snapshot
    snapshot_job: Future[None] | None = None  # a snapshot being written in the background
    last_snapshot_at: float = 0.0
    last_progress_at: float = 0.0
    last_progress_fraction: float = 0.0
    complete: bool = False
    artifact_id: str = ""  # the deploy's (full) artifact: what the lifecycle and the store's partial dir name
    delta: DeltaPlan | None = None  # set when the transfer is the delta patch, not the full artifact


def _write_snapshot(partial: PartialDownload, blob: bytes) -> None:
    try:
        partial.write_snapshot(blob)  # fsyncs the chunk data first
    except StorageError as exc:
        log.warning("cannot save the resume snapshot: %s", exc.message)
        return
    if faults.HOOK.armed is not None:
        faults.HOOK.reach("download:snapshot")
