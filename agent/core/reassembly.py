"""Sans-IO chunk reassembly with a resume bitmap.

Theory of operation
    Chunks arrive in any order, any number of times, from the shared artifact topic or from
    per-device re-sends. ``Reassembly`` decides what to do with each one; the bytes go to a
    ``ChunkSink`` (memory here, a file in agent.runtime). Rules:

    * sizes are capped before anything is stored: the declared total against ``max_bytes``,
      every chunk against its exact expected length (full ``chunk_size``, shorter only last);
    * a duplicate with identical bytes is a no-op (``Added.DUPLICATE``);
    * a duplicate with different bytes raises ConflictingChunkError and changes nothing;
    * completion is reported only after the sink's SHA-256 matches the manifest (``finish``);
      a mismatch raises IntegrityError and clears the bitmap so the transfer starts over (a
      matching digest under a bitmap that lacks chunks, restored from an older snapshot, passes).

    Resume: ``to_bytes()`` snapshots the bitmap and the per-chunk fingerprints. The shell must
    make the chunk data durable (fsync) *before* it persists a snapshot that mentions it; on
    restart ``from_bytes()`` restores it and ``missing_ranges()`` says what to request again.
    A snapshot that fails its CRC or describes another artifact raises StorageError, and the
    shell starts that transfer from zero (it is always safe to forget chunks).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from agent.errors import (
    ArtifactTooLargeError,
    ChunkOutOfRangeError,
    ConflictingChunkError,
    EdgeError,
    IntegrityError,
    StorageError,
)
from agent.protocol.envelope import TAG_SIZE, ChunkOpener, parse_chunk_header
from agent.protocol.messages import ArtifactInfo

FINGERPRINT_SIZE = 16
_SNAPSHOT_MAGIC = b"EFR1"
_SNAPSHOT_HEADER = struct.Struct(">4s16sIIQ32s")


class ChunkSink(Protocol):
    """Where reassembled bytes go: random-access writes and a digest of the whole."""

    def write_at(self, offset: int, data: bytes) -> None: ...

    def sha256(self) -> bytes: ...


class MemorySink:
    """In-memory sink for tests and for small artifacts."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)

    def write_at(self, offset: int, data: bytes) -> None:
        self.buffer[offset : offset + len(data)] = data

    def sha256(self) -> bytes:
        return hashlib.sha256(self.buffer).digest()


class Added(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Progress:
    received: int
    total: int
    bytes_received: int
    total_bytes: int

    @property
    def fraction(self) -> float:
        return self.received / self.total if self.total else 1.0


def progress_due(last_fraction: float, fraction: float, since_last_s: float, interval_s: float) -> bool:
    """Whether a ``download.progress`` event is due: a later quarter than the last report (25, 50, 75%)
    and at least ``interval_s`` since it (or since the start). A transfer faster than the interval reports
    only started and completed; any transfer reports at most three times in between."""
    return int(fraction * 4) > int(last_fraction * 4) and fraction < 1.0 and since_last_s >= interval_s


class Taken(Enum):
    """What one chunk message did (``take_chunk``)."""

    NEW = "new"  # stored
    DUPLICATE = "duplicate"  # the same bytes again: nothing to do
    FOREIGN = "foreign"  # another artifact's stream (an older rollout still running): not ours, no error
    MALFORMED = "malformed"  # the header does not parse: dropped
    CONFLICT = "conflict"  # other bytes for a stored chunk: dropped, nothing changed
    DROPPED = "dropped"  # failed authentication, wrong length, the sink failed: never stored


@dataclass(frozen=True)
class TakenChunk:
    outcome: Taken
    data: bytes = b""
    error: EdgeError | None = None
    #: the message of the ``error.<code>`` event the shell reports (when ``error`` is set)
    note: str = ""


def take_chunk(payload: bytes, opener: ChunkOpener, reassembly: Reassembly, sink: ChunkSink) -> TakenChunk:
    """Parse, authenticate and store one chunk message of the transfer in progress.

    One rule for the agent's runtime and the simulator: what each outcome means is in ``Taken``; the
    shell reports ``error`` (a StorageError from the sink is the shell's to treat as a failed download).
    """
    try:
        header = parse_chunk_header(payload)
    except EdgeError as exc:
        return TakenChunk(Taken.MALFORMED, error=exc, note=f"dropped a malformed chunk: {exc.message}")
    if header.artifact_id != reassembly.artifact_id:
        return TakenChunk(Taken.FOREIGN)
    if reassembly.is_duplicate(header.index, payload[-TAG_SIZE:]):
        # already stored with this very tag (a round streamed for other devices): no decryption
        return TakenChunk(Taken.DUPLICATE)
    try:
        opened = opener.open_chunk(payload, header)
        added = reassembly.add(opened.index, opened.data, sink, fingerprint=opened.tag)
    except ConflictingChunkError as exc:
        return TakenChunk(Taken.CONFLICT, error=exc, note=exc.message)
    except EdgeError as exc:
        return TakenChunk(Taken.DROPPED, error=exc, note=f"dropped chunk {header.index}: {exc.message}")
    return TakenChunk(Taken.NEW if added is Added.NEW else Taken.DUPLICATE, opened.data)


def _fingerprint(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=FINGERPRINT_SIZE).digest()


class Reassembly:
    """Tracks which chunks of one artifact are stored; see the module docstring for the rules."""

    @classmethod
    def for_artifact(cls, info: ArtifactInfo, *, max_bytes: int) -> Reassembly:
        """The reassembly of the compressed artifact ``info`` describes (its chunks, size and digest)."""
        return cls(
            artifact_id=info.artifact_id,
            chunk_count=info.chunk_count,
            chunk_size=info.chunk_size,
            total_size=info.compressed_size,
            sha256=info.compressed_sha256,
            max_bytes=max_bytes,
        )

    def __init__(
        self,
        *,
        artifact_id: str,
        chunk_count: int,
        chunk_size: int,
        total_size: int,
        sha256: str,
        max_bytes: int,
    ) -> None:
        if total_size > max_bytes:
            raise ArtifactTooLargeError(total_size, max_bytes)
        if chunk_size <= 0 or chunk_count != -(-total_size // chunk_size):
            raise ChunkOutOfRangeError(
                f"{chunk_count} chunks of {chunk_size} bytes cannot hold {total_size} bytes", index=chunk_count
            )
        self.artifact_id = artifact_id
        self.chunk_count = chunk_count
        self.chunk_size = chunk_size
        self.total_size = total_size
        self.sha256 = bytes.fromhex(sha256)
        self._prints: list[bytes | None] = [None] * chunk_count
        self._received = 0
        self._bytes = 0  # running total of stored bytes: progress() is O(1) per chunk
        self._verified = False

    # -- feeding ----------------------------------------------------------------------------------

    def expected_length(self, index: int) -> int:
        if index == self.chunk_count - 1:
            return self.total_size - index * self.chunk_size
        return self.chunk_size

    def add(self, index: int, data: bytes, sink: ChunkSink, *, fingerprint: bytes | None = None) -> Added:
        """Store one decrypted chunk; idempotent for identical duplicates.

        ``fingerprint`` identifies the chunk's content for duplicate detection; pass the AEAD tag
        (``OpenedChunk.tag``, already a keyed 16-byte MAC of the chunk) to skip hashing it again.
        Use the same kind of fingerprint for the whole transfer, snapshots included.
        """
        if not 0 <= index < self.chunk_count:
            raise ChunkOutOfRangeError(f"chunk index {index} outside 0..{self.chunk_count - 1}", index=index)
        if len(data) != self.expected_length(index):
            raise ChunkOutOfRangeError(
                f"chunk {index} is {len(data)} bytes, expected {self.expected_length(index)}", index=index
            )
        fp = fingerprint if fingerprint is not None else _fingerprint(data)
        if len(fp) != FINGERPRINT_SIZE:
            raise ValueError(f"fingerprint must be {FINGERPRINT_SIZE} bytes")
        known = self._prints[index]
        if known is not None:
            if known != fp:
                raise ConflictingChunkError(index)
            return Added.DUPLICATE
        sink.write_at(index * self.chunk_size, data)
        self._prints[index] = fp
        self._received += 1
        self._bytes += len(data)
        return Added.NEW

    def is_duplicate(self, index: int, fingerprint: bytes) -> bool:
        """Whether chunk ``index`` is stored with exactly this fingerprint: a re-delivery the caller may drop
        before decrypting it (with AEAD tags as fingerprints: the stored chunk was authenticated with this tag,
        so a forged copy carrying it cannot change anything either). A different fingerprint is not a duplicate:
        ``add`` decides (after authentication) whether it conflicts."""
        return 0 <= index < self.chunk_count and self._prints[index] == fingerprint

    def has(self, index: int) -> bool:
        return 0 <= index < self.chunk_count and self._prints[index] is not None

    @property
    def complete(self) -> bool:
        """Every chunk is stored (not yet digest-checked: see ``finish``)."""
        return self._received == self.chunk_count

    @property
    def verified(self) -> bool:
        return self._verified

    def finish(self, sink: ChunkSink) -> None:
        """Check the whole artifact's digest; the only way to reach ``verified``.

        A bitmap that still lacks chunks passes too when the data's digest matches: the shell makes the data
        durable when the last chunk lands but does not rewrite the resume snapshot then, so after a restart the
        restored bitmap may predate the last chunks; data matching the manifest's SHA-256 is the artifact,
        whatever the bitmap says. Anything else incomplete raises IntegrityError and changes nothing."""
        if not self.complete:
            if sink.sha256() != self.sha256:
                raise IntegrityError(f"artifact incomplete: {self._received} of {self.chunk_count} chunks")
            self._received, self._bytes, self._verified = self.chunk_count, self.total_size, True
            return
        if sink.sha256() != self.sha256:
            self.reset()
            raise IntegrityError("reassembled artifact does not match its SHA-256; starting the transfer over")
        self._verified = True

    def reset(self) -> None:
        self._prints = [None] * self.chunk_count
        self._received = 0
        self._bytes = 0
        self._verified = False

    # -- what is missing --------------------------------------------------------------------------

    def progress(self) -> Progress:
        """Chunks and bytes stored so far: O(1), from running totals (called for every chunk)."""
        return Progress(self._received, self.chunk_count, self._bytes, self.total_size)

    def missing_ranges(self, limit: int = 1024) -> tuple[tuple[int, int], ...]:
        """Half-open [start, end) runs of missing chunk indexes, at most ``limit`` of them."""
        ranges: list[tuple[int, int]] = []
        start: int | None = None
        for i, p in enumerate(self._prints):
            if p is None and start is None:
                start = i
            elif p is not None and start is not None:
                ranges.append((start, i))
                start = None
                if len(ranges) >= limit:
                    return tuple(ranges)
        if start is not None:
            ranges.append((start, self.chunk_count))
        return tuple(ranges[:limit])

    # -- resume snapshots ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Snapshot: header, bitmap, fingerprints, CRC-32 of everything before it."""
        bitmap = bytearray(-(-self.chunk_count // 8))
        prints = bytearray()
        for i, p in enumerate(self._prints):
            if p is not None:
                bitmap[i // 8] |= 1 << (i % 8)
                prints += p
        body = (
            _SNAPSHOT_HEADER.pack(
                _SNAPSHOT_MAGIC,
                bytes.fromhex(self.artifact_id),
                self.chunk_count,
                self.chunk_size,
                self.total_size,
                self.sha256,
            )
            + bytes(bitmap)
            + bytes(prints)
        )
        return body + struct.pack(">I", zlib.crc32(body))

    def restore(self, snapshot: bytes) -> None:
        """Load a snapshot taken by ``to_bytes`` for this same artifact; StorageError if unusable."""
        if len(snapshot) < _SNAPSHOT_HEADER.size + 4:
            raise StorageError("resume snapshot truncated")
        body, crc = snapshot[:-4], struct.unpack(">I", snapshot[-4:])[0]
        if zlib.crc32(body) != crc:
            raise StorageError("resume snapshot fails its checksum")
        magic, art, count, size, total, digest = _SNAPSHOT_HEADER.unpack_from(body)
        if (magic, art.hex(), count, size, total, digest) != (
            _SNAPSHOT_MAGIC,
            self.artifact_id,
            self.chunk_count,
            self.chunk_size,
            self.total_size,
            self.sha256,
        ):
            raise StorageError("resume snapshot describes a different artifact")
        offset = _SNAPSHOT_HEADER.size
        bitmap = body[offset : offset + -(-count // 8)]
        offset += len(bitmap)
        prints: list[bytes | None] = [None] * count
        received = 0
        stored = 0
        for i in range(count):
            if bitmap[i // 8] & (1 << (i % 8)):
                fp = body[offset : offset + FINGERPRINT_SIZE]
                if len(fp) != FINGERPRINT_SIZE:
                    raise StorageError("resume snapshot truncated")
                prints[i] = fp
                offset += FINGERPRINT_SIZE
                received += 1
                stored += self.expected_length(i)
        if offset != len(body):
            raise StorageError("resume snapshot has trailing bytes")
        self._prints = prints
        self._received = received
        self._bytes = stored
        self._verified = False
