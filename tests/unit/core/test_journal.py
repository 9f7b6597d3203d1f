"""Journal records round-trip, refuse damage, and the resume table says what each state becomes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.journal import (
    LOOP_TABLE,
    RESUME_TABLE,
    Failure,
    JournalRecord,
    Resume,
    State,
    Via,
    recover_replay_floor,
    resume_action,
)
from agent.errors import StorageError
from agent.protocol.messages import ModelRef

refs = st.builds(ModelRef, st.sampled_from(["digits", "ocr-det", "m.v_2"]), st.integers(0, 2**31))
records = st.builds(
    JournalRecord,
    state=st.sampled_from(State),
    committed=st.none() | refs,
    committed_versions=st.dictionaries(st.sampled_from(["a", "b", "digits"]), st.integers(0, 2**31), max_size=3),
    target=st.none() | refs,
    artifact_id=st.none() | st.text("0123456789abcdef", min_size=32, max_size=32),
    deployment_id=st.none() | st.text(min_size=1, max_size=20),
    via=st.none() | st.sampled_from(Via),
    restore=st.none() | refs,
    swapped=st.booleans(),
    failure=st.none()
    | st.builds(Failure, st.sampled_from(["warming", "probation"]), st.just("health_check"), st.text(max_size=50)),
    last_seq=st.integers(0, 2**40),
    attempts=st.integers(0, 10),
    serial=st.integers(0, 2**40),
)


@given(records)
def test_round_trip(record: JournalRecord) -> None:
    assert JournalRecord.from_bytes(record.to_bytes()) == record


@given(records, st.data())
def test_any_single_byte_change_is_detected(record: JournalRecord, data: st.DataObject) -> None:
    blob = bytearray(record.to_bytes())
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(StorageError):
        JournalRecord.from_bytes(bytes(blob))


@pytest.mark.parametrize("cut", [0, 3, 11, 12, 40])
def test_truncated_record_is_refused(cut: int) -> None:
    blob = JournalRecord(committed=ModelRef("digits", 3)).to_bytes()
    with pytest.raises(StorageError):
        JournalRecord.from_bytes(blob[:cut])


def test_oversized_record_is_refused_before_parsing() -> None:
    with pytest.raises(StorageError, match="cap"):
        JournalRecord.from_bytes(b"EFJ1" + bytes(70_000))


def test_next_bumps_serial_and_clears_attempts() -> None:
    r = JournalRecord(serial=4, attempts=2)
    n = r.next(state=State.DOWNLOADING)
    assert (n.serial, n.attempts, n.state) == (5, 0, State.DOWNLOADING)


#: state -> (what a restart does, what it does once the restart limit is reached)
EXPECTED = {
    State.IDLE: (Resume.SERVE, Resume.SERVE_FALLBACK),
    State.DOWNLOADING: (Resume.CONTINUE_DOWNLOAD, Resume.ABANDON),
    State.VERIFYING: (Resume.REVERIFY, Resume.ABANDON),
    State.STAGED: (Resume.CONTINUE_WARMUP, Resume.ABANDON),
    State.WARMING: (Resume.ROLL_BACK, Resume.ROLL_BACK),
    State.PROBATION: (Resume.ROLL_BACK, Resume.ROLL_BACK),
    State.ROLLING_BACK: (Resume.FINISH_ROLLBACK, Resume.ABANDON),
}


@pytest.mark.parametrize("state", list(State))
def test_resume_table(state: State) -> None:
    assert set(RESUME_TABLE) == set(State)
    assert set(LOOP_TABLE) == set(RESUME_TABLE.values())
    resume, looping = EXPECTED[state]
    assert resume_action(JournalRecord(state=state, attempts=0), restart_limit=3) is resume
    assert resume_action(JournalRecord(state=state, attempts=2), restart_limit=3) is resume
    assert resume_action(JournalRecord(state=state, attempts=3), restart_limit=3) is looping


# -- the replay floor after a lost journal ---------------------------------------------------------------------


def test_replay_floor_never_drops_below_what_any_record_vouches_for() -> None:
    lost = JournalRecord(committed=ModelRef("digits", 2))  # both slots gone: rebuilt from the store, last_seq=0
    assert recover_replay_floor(lost, 41, 17).last_seq == 41
    assert recover_replay_floor(lost, None, 17).last_seq == 17  # only the stored desired state survived
    assert recover_replay_floor(lost, None, None) is lost  # nothing recorded: a fresh device, nothing to keep
    rec = recover_replay_floor(lost, 41, None)
    assert rec.committed == lost.committed and rec.serial == lost.serial  # only the floor moves


@given(records, st.lists(st.none() | st.integers(0, 2**62), max_size=3))
def test_replay_floor_is_the_max_and_never_lowers_the_journal(record: JournalRecord, others: list[int | None]) -> None:
    out = recover_replay_floor(record, *others)
    assert out.last_seq == max([record.last_seq, *(s for s in others if s is not None)])
    assert out.last_seq >= record.last_seq
    assert replace(out, last_seq=record.last_seq) == record  # nothing but the floor changes
