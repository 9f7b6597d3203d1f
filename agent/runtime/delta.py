"""Delta downloads on the device: choose the delta or the full artifact, apply a received patch, fall back.

A deploy may offer a delta (``agent.protocol.delta.DeltaInfo``) beside the full artifact. The agent takes it when
the base version is kept with the named digest and the delta is at most ``transfer.delta_max_ratio`` of the full
artifact; the patch then downloads like any artifact (same chunks, resume snapshots, size caps) into
``partial/<full artifact id>/delta/``, and is applied, streaming, into ``.../delta/target`` (written to a temporary
name, fsynced, renamed: the file exists only complete). Any failure (a corrupted or missing base, a bad patch, a
target digest mismatch) writes ``partial/<full artifact id>/delta.failed`` with the reason, so the same deploy never
tries the delta again, and the caller downloads the full artifact instead: a fallback, never a failed update.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from agent.errors import MalformedMessageError
from agent.files import fsync_dir
from agent.protocol.delta import DeltaError, DeltaInfo, apply_patch, delta_offer
from agent.protocol.messages import ArtifactInfo, DesiredState, ModelRef
from agent.runtime import faults
from agent.runtime.fsutil import atomic_write
from agent.runtime.store import KeptVersion, ModelStore, PartialDownload

FAILED_MARK = "delta.failed"
DELTA_DIR = "delta"
TARGET = "target"
READ = 1 << 16


@dataclass(frozen=True)
class DeltaPlan:
    offer: DeltaInfo
    base: KeptVersion


def plan(
    desired: DesiredState, store: ModelStore, *, artifact_id: str, max_ratio: float
) -> tuple[DeltaPlan | None, str | None]:
    """``(plan, None)``: use the delta. ``(None, reason)``: one was offered and cannot be used (report it).
    ``(None, None)``: none offered, or an earlier attempt for this deploy already fell back."""
    if desired.extra.get("delta") is None:
        return None, None
    if (store.partial_dir / artifact_id / FAILED_MARK).exists():
        return None, None
    try:
        offer = delta_offer(desired)
    except MalformedMessageError as exc:
        return None, f"malformed delta offer: {exc.message}"
    assert offer is not None and desired.artifact is not None
    full = desired.artifact
    if offer.artifact.compressed_size > max_ratio * full.compressed_size:
        return None, (
            f"delta of {offer.artifact.compressed_size} bytes is over {max_ratio:.0%} of the full artifact "
            f"({full.compressed_size} bytes)"
        )
    base = store.find(ModelRef(desired.model.name, offer.base_version))
    if base is None:
        return None, f"base version {offer.base_version} is not kept"
    if base.sha256 != offer.base_sha256:
        return None, f"kept version {offer.base_version} is not the delta's base (digest differs)"
    return DeltaPlan(offer, base), None


def partial(store: ModelStore, artifact_id: str, offer: DeltaInfo) -> PartialDownload:
    return PartialDownload(store.partial_dir / artifact_id / DELTA_DIR, offer.artifact)


def target_path(store: ModelStore, artifact_id: str) -> Path:
    return store.partial_dir / artifact_id / DELTA_DIR / TARGET


def mark_failed(store: ModelStore, artifact_id: str, reason: str) -> None:
    """Remember the fallback for this deploy and drop what the delta transfer left."""
    directory = store.partial_dir / artifact_id
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / FAILED_MARK, reason.encode()[:1000])
    shutil.rmtree(directory / DELTA_DIR, ignore_errors=True)


def as_installable(full: ArtifactInfo) -> ArtifactInfo:
    """The full artifact's manifest for installing the applied target file (already uncompressed)."""
    return replace(full, compression="none")


class _HookedWriter:
    """The output file, reaching the ``delta:apply`` fault point once, after the first write (mid-patch)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._first = True

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        if self._first:
            self._first = False
            self._f.flush()
            if faults.HOOK.armed is not None:
                faults.HOOK.reach("delta:apply")
        return n


def _pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(READ):
            yield block


def apply(store: ModelStore, artifact_id: str, patch_file: Path, p: DeltaPlan, *, max_size: int) -> Path:
    """Apply the received patch over the kept base into the target file; returns its path once the target's
    size and SHA-256 matched. Raises DeltaError (or StorageError); leaves no partial target behind."""
    out = target_path(store, artifact_id)
    tmp = out.with_name(f"{TARGET}.tmp")
    try:
        base = p.base.path.open("rb")
    except OSError as exc:  # evicted (or unreadable) since the deploy arrived
        raise DeltaError(f"base version {p.offer.base_version} is no longer readable: {exc.strerror}") from exc
    try:
        with base, tmp.open("wb") as f:
            apply_patch(
                _pieces(patch_file),
                base,
                _HookedWriter(f),  # type: ignore[arg-type]
                base_sha256=p.offer.base_sha256,
                target_sha256=p.offer.target_sha256,
                max_size=max_size,
            )
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return out
