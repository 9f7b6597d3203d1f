"""Property tests: reassembly is order- and duplicate-insensitive; any single bit flip is refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.reassembly import MemorySink, Reassembly
from agent.errors import EdgeError
from agent.protocol import envelope
from agent.protocol.messages import WrappedKey
from tests.unit.protocol.helpers import World, make_world

WORLD: World = make_world(model_size=6000, chunk_size=1024)
INFO = WORLD.sealed.info
CHUNKS = WORLD.sealed.chunks
KEY = WORLD.sealed.data_key
DESIRED = WORLD.desired()
DESIRED_BLOB = envelope.seal_desired(DESIRED, WORLD.server)
COMMAND_BLOB = envelope.seal_command(WORLD.command(), WORLD.server)


def _reassemble(order: list[int]) -> bytes:
    opener = envelope.ChunkOpener(KEY, INFO)
    r = Reassembly.for_artifact(INFO, max_bytes=1 << 20)
    sink = MemorySink(INFO.compressed_size)
    for i in order:
        r.add(*opener.open(CHUNKS[i]), sink)
    r.finish(sink)
    return envelope.decompress(bytes(sink.buffer), INFO.compression, expected_size=INFO.size)


@settings(max_examples=200, deadline=None)
@given(
    st.permutations(range(INFO.chunk_count)), st.lists(st.integers(0, INFO.chunk_count - 1), max_size=20), st.randoms()
)
def test_any_permutation_with_duplicates_reassembles_to_the_same_bytes(perm, dups, rnd) -> None:  # type: ignore[no-untyped-def]
    order = list(perm) + dups
    rnd.shuffle(order)
    # every chunk appears at least once (the permutation), duplicates anywhere
    assert _reassemble(order) == WORLD.model


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@settings(max_examples=600, deadline=None)
@given(st.integers(0, len(CHUNKS) - 1), st.data())
def test_any_single_bit_flip_in_a_chunk_is_refused(index, data) -> None:  # type: ignore[no-untyped-def]
    wire = CHUNKS[index]
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    opener = envelope.ChunkOpener(KEY, INFO)
    with pytest.raises(EdgeError):
        opener.open(_flip(wire, bit))


def test_every_bit_of_every_chunk_header_matters() -> None:
    opener = envelope.ChunkOpener(KEY, INFO)
    for wire in CHUNKS:
        for bit in range(envelope.CHUNK_HEADER_SIZE * 8):
            with pytest.raises(EdgeError):
                opener.open(_flip(wire, bit))


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_any_single_bit_flip_in_a_signed_manifest_is_refused(data) -> None:  # type: ignore[no-untyped-def]
    bit = data.draw(st.integers(0, len(DESIRED_BLOB) * 8 - 1))
    with pytest.raises(EdgeError):
        WORLD.open_desired(_flip(DESIRED_BLOB, bit))


def test_every_bit_of_a_signed_command_matters() -> None:
    for bit in range(len(COMMAND_BLOB) * 8):
        with pytest.raises(EdgeError):
            envelope.open_command(
                _flip(COMMAND_BLOB, bit), trust=WORLD.trust, device_id="dev-a", now=DESIRED.issued_at, last_seq=0
            )


def test_every_bit_of_the_wrapped_key_matters() -> None:
    wk = DESIRED.key
    assert wk is not None
    for field in ("epk", "ciphertext"):
        raw = getattr(wk, field)
        for bit in range(len(raw) * 8):
            flipped = WrappedKey(**{"epk": wk.epk, "ciphertext": wk.ciphertext, field: _flip(raw, bit)})
            with pytest.raises(EdgeError):
                envelope.unwrap_key(flipped, WORLD.device, artifact_id=INFO.artifact_id, device_id="dev-a")


def test_signed_payload_bytes_are_exactly_what_the_signature_covers() -> None:
    env = json.loads(DESIRED_BLOB)
    assert set(env) == {"payloadType", "payload", "signatures"}
