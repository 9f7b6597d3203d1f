"""Reassembly rules: caps, duplicates, conflicts, digest before completion, resume snapshots."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.reassembly import Added, MemorySink, Reassembly
from agent.errors import (
    ArtifactTooLargeError,
    ChunkOutOfRangeError,
    ConflictingChunkError,
    IntegrityError,
    StorageError,
)

DATA = os.urandom(10_000)
CHUNK = 1024
COUNT = -(-len(DATA) // CHUNK)
ART = "ab" * 16


def new(data: bytes = DATA, max_bytes: int = 1 << 20) -> Reassembly:
    return Reassembly(
        artifact_id=ART,
        chunk_count=-(-len(data) // CHUNK),
        chunk_size=CHUNK,
        total_size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        max_bytes=max_bytes,
    )


def piece(i: int, data: bytes = DATA) -> bytes:
    return data[i * CHUNK : (i + 1) * CHUNK]


def test_declared_size_over_the_cap_is_refused_up_front() -> None:
    with pytest.raises(ArtifactTooLargeError):
        new(max_bytes=len(DATA) - 1)


def test_inconsistent_geometry_is_refused() -> None:
    with pytest.raises(ChunkOutOfRangeError):
        Reassembly(
            artifact_id=ART, chunk_count=3, chunk_size=CHUNK, total_size=len(DATA), sha256="00" * 32, max_bytes=1 << 20
        )


def test_wrong_lengths_and_indexes_are_refused() -> None:
    r, sink = new(), MemorySink(len(DATA))
    with pytest.raises(ChunkOutOfRangeError):
        r.add(COUNT, b"x" * CHUNK, sink)
    with pytest.raises(ChunkOutOfRangeError):
        r.add(0, piece(0)[:-1], sink)
    with pytest.raises(ChunkOutOfRangeError):
        r.add(COUNT - 1, piece(0), sink)  # the last chunk is shorter
    assert r.progress().received == 0


def test_duplicates_are_tolerated_and_conflicts_rejected_without_change() -> None:
    r, sink = new(), MemorySink(len(DATA))
    assert r.add(2, piece(2), sink) is Added.NEW
    assert r.add(2, piece(2), sink) is Added.DUPLICATE
    with pytest.raises(ConflictingChunkError) as err:
        r.add(2, bytes(len(piece(2))), sink)
    assert err.value.index == 2
    assert sink.buffer[2 * CHUNK : 3 * CHUNK] == piece(2)


def test_completion_needs_the_digest() -> None:
    r, sink = new(), MemorySink(len(DATA))
    for i in range(COUNT):
        r.add(i, piece(i), sink)
    assert r.complete
    assert not r.verified
    sink.buffer[5] ^= 1  # storage corrupted behind our back
    with pytest.raises(IntegrityError):
        r.finish(sink)
    assert not r.complete  # a failed digest starts the transfer over
    assert r.missing_ranges() == ((0, COUNT),)


def test_finish_before_complete_is_refused() -> None:
    r, sink = new(), MemorySink(len(DATA))
    r.add(0, piece(0), sink)
    with pytest.raises(IntegrityError, match="incomplete"):
        r.finish(sink)
    assert not r.verified and r.missing_ranges() == ((1, COUNT),)  # nothing changed


def test_a_stale_snapshot_over_complete_data_finishes_by_the_digest() -> None:
    """The shell fsyncs the data when the last chunk lands but does not rewrite the snapshot: after a restart
    the restored bitmap lacks the last chunks, and the data's digest decides."""
    r, sink = new(), MemorySink(len(DATA))
    for i in range(COUNT - 3):
        r.add(i, piece(i), sink)
    stale = r.to_bytes()
    for i in range(COUNT - 3, COUNT):
        r.add(i, piece(i), sink)
    restarted = new()
    restarted.restore(stale)
    assert not restarted.complete
    restarted.finish(sink)
    assert restarted.verified and restarted.complete
    assert restarted.progress().bytes_received == len(DATA)


def test_a_stale_snapshot_over_incomplete_data_is_still_refused() -> None:
    r, sink = new(), MemorySink(len(DATA))
    for i in range(COUNT - 1):  # the last chunk never landed
        r.add(i, piece(i), sink)
    restarted = new()
    restarted.restore(r.to_bytes())
    with pytest.raises(IntegrityError, match="incomplete"):
        restarted.finish(sink)
    assert not restarted.verified and restarted.missing_ranges() == ((COUNT - 1, COUNT),)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, COUNT - 1)))
def test_snapshot_round_trip_preserves_what_is_missing(have) -> None:  # type: ignore[no-untyped-def]
    r, sink = new(), MemorySink(len(DATA))
    for i in sorted(have):
        r.add(i, piece(i), sink)
    restored = new()
    restored.restore(r.to_bytes())
    assert restored.missing_ranges() == r.missing_ranges()
    assert restored.progress() == r.progress()
    missing = {i for a, b in restored.missing_ranges() for i in range(a, b)}
    assert missing == set(range(COUNT)) - have
    # finishing from the restored state works once the rest arrives
    for i in sorted(missing):
        restored.add(i, piece(i), sink)
    restored.finish(sink)
    assert restored.verified


def test_restored_snapshot_still_rejects_conflicting_duplicates() -> None:
    r, sink = new(), MemorySink(len(DATA))
    r.add(1, piece(1), sink)
    restored = new()
    restored.restore(r.to_bytes())
    assert restored.add(1, piece(1), sink) is Added.DUPLICATE
    with pytest.raises(ConflictingChunkError):
        restored.add(1, bytes(CHUNK), sink)


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-artifact", "trailing"])
def test_unusable_snapshots_are_refused(damage: str) -> None:
    r, sink = new(), MemorySink(len(DATA))
    r.add(0, piece(0), sink)
    snap = r.to_bytes()
    target = new()
    if damage == "truncate":
        snap = snap[:-9]
    elif damage == "flip":
        snap = snap[:10] + bytes([snap[10] ^ 4]) + snap[11:]
    elif damage == "other-artifact":
        target = Reassembly(
            artifact_id="cd" * 16,
            chunk_count=COUNT,
            chunk_size=CHUNK,
            total_size=len(DATA),
            sha256=hashlib.sha256(DATA).hexdigest(),
            max_bytes=1 << 20,
        )
    else:
        import struct
        import zlib

        body = snap[:-4] + b"extra"
        snap = body + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(StorageError):
        target.restore(snap)
    assert target.progress().received == 0


def test_missing_ranges_are_runs_and_capped() -> None:
    r, sink = new(), MemorySink(len(DATA))
    for i in (0, 3, 4, 8):
        r.add(i, piece(i), sink)
    assert r.missing_ranges() == ((1, 3), (5, 8), (9, COUNT))
    assert r.missing_ranges(limit=2) == ((1, 3), (5, 8))


def test_progress_is_reported_per_quarter_and_not_more_often_than_the_interval() -> None:
    from agent.core.reassembly import progress_due

    assert not progress_due(0.0, 0.2, 60.0, 5.0)  # still in the first quarter
    assert progress_due(0.0, 0.3, 6.0, 5.0)
    assert not progress_due(0.0, 0.3, 1.0, 5.0)  # a fast transfer: too soon
    assert not progress_due(0.3, 0.45, 60.0, 5.0)  # same quarter as the last report
    assert progress_due(0.3, 0.8, 5.0, 5.0)  # skipped a quarter: one event, not two
    assert not progress_due(0.8, 1.0, 60.0, 5.0)  # 100% is download.completed


@given(st.lists(st.integers(0, COUNT - 1), max_size=3 * COUNT))
@settings(max_examples=60, deadline=None)
def test_running_progress_totals_match_the_bitmap_through_duplicates_resets_and_restores(order) -> None:  # type: ignore[no-untyped-def]
    r, sink = new(), MemorySink(len(DATA))
    for n, i in enumerate(order):
        r.add(i, piece(i), sink)
        if n % 7 == 6:  # now and then: a snapshot round trip in the middle of the transfer
            restored = new()
            restored.restore(r.to_bytes())
            assert restored.progress() == r.progress()
            r = restored
        stored = sorted(set(order[: n + 1]))
        p = r.progress()
        assert p.received == len(stored)
        assert p.bytes_received == sum(len(piece(j)) for j in stored)
    r.reset()
    assert r.progress().bytes_received == 0 and r.progress().received == 0


def test_is_duplicate_only_for_a_stored_chunk_with_the_same_fingerprint() -> None:
    r, sink = new(), MemorySink(len(DATA))
    tag = b"t" * 16
    assert not r.is_duplicate(0, tag)  # nothing stored yet
    r.add(0, piece(0), sink, fingerprint=tag)
    assert r.is_duplicate(0, tag)
    assert not r.is_duplicate(0, b"u" * 16)  # a different tag: add() decides, after authentication
    assert not r.is_duplicate(1, tag)
    assert not r.is_duplicate(COUNT, tag)  # out of range: never a duplicate (add() refuses it)
    r.reset()
    assert not r.is_duplicate(0, tag)
