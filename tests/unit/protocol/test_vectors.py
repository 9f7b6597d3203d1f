"""Golden vectors: fixed keys must give fixed bytes, and the stored bytes must still open."""

from __future__ import annotations

import json
from pathlib import Path

from agent.protocol import envelope
from agent.protocol.messages import ArtifactInfo, WrappedKey, strict_b64decode
from tests.vectors import envelope_v1 as v

VECTORS = json.loads((Path(__file__).parents[2] / "vectors" / "envelope_v1.json").read_text())


def test_sealing_reproduces_the_stored_bytes_exactly() -> None:
    assert v.build() == VECTORS


def test_stored_vectors_open_with_the_current_code() -> None:
    signing, device, _ = v.keys()
    trust = envelope.TrustAnchor.of(signing.public_key())
    desired = envelope.open_desired(
        VECTORS["desired"].encode(),
        trust=trust,
        device_id=v.DEVICE_ID,
        now=v.ISSUED_AT,
        last_seq=0,
        committed_version=lambda _m: None,
    )
    assert desired.artifact == ArtifactInfo.from_dict(VECTORS["artifact"])
    wk = VECTORS["wrapped_key"]
    wrapped = WrappedKey(epk=strict_b64decode(wk["epk"]) or b"", ciphertext=strict_b64decode(wk["ct"]) or b"")
    assert desired.key == wrapped
    data_key = envelope.unwrap_key(wrapped, device, artifact_id=v.ARTIFACT_ID, device_id=v.DEVICE_ID)
    assert data_key == v.DATA_KEY
    chunks = [bytes.fromhex(c) for c in VECTORS["chunks"]]
    assert envelope.open_artifact(chunks, data_key, desired.artifact, max_size=1 << 20) == v.MODEL
    command = envelope.open_command(
        VECTORS["command"].encode(), trust=trust, device_id=v.DEVICE_ID, now=v.ISSUED_AT, last_seq=7
    )
    assert (command.action, command.model, command.version, command.seq) == ("rollback", "digits", 1, 8)


def test_vector_chunk_layout_matches_the_documented_offsets() -> None:
    first = bytes.fromhex(VECTORS["chunks"][0])
    assert first[0:4] == b"EFC1"
    assert first[4] == envelope.ENVELOPE_VERSION
    assert first[8:24] == bytes.fromhex(v.ARTIFACT_ID)
    assert int.from_bytes(first[24:28], "big") == 0
    assert int.from_bytes(first[28:32], "big") == 4
    assert int.from_bytes(first[32:36], "big") == len(first) - 36 == v.CHUNK_SIZE + 16
