"""Each refusal the envelope promises, by name."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import (
    ChunkOutOfRangeError,
    DecryptionError,
    DowngradeError,
    ExpiredError,
    IntegrityError,
    KeyUnwrapError,
    MalformedMessageError,
    MessageTooLargeError,
    ReplayError,
    SignatureError,
    UnsupportedVersionError,
    WrongRecipientError,
)
from agent.protocol import envelope
from agent.protocol.messages import WrappedKey
from tests.unit.protocol.helpers import NOW, make_world, replace


@pytest.fixture(scope="module")
def world():  # type: ignore[no-untyped-def]
    return make_world()


def test_round_trip_deploy(world) -> None:  # type: ignore[no-untyped-def]
    desired = world.desired()
    opened = world.open_desired(envelope.seal_desired(desired, world.server))
    assert opened == desired
    key = envelope.unwrap_key(opened.key, world.device, artifact_id=opened.artifact.artifact_id, device_id="dev-a")
    assert envelope.open_artifact(world.sealed.chunks, key, opened.artifact, max_size=1 << 20) == world.model


def test_manifest_signed_by_another_key_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    impostor = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError):
        world.open_desired(envelope.seal_desired(world.desired(), impostor))


def test_signature_is_checked_before_anything_else(world) -> None:  # type: ignore[no-untyped-def]
    # an expired, replayed, wrongly addressed downgrade signed by a stranger: the signature is what fails
    impostor = Ed25519PrivateKey.generate()
    blob = envelope.seal_desired(world.desired(device_id="dev-b", seq=1, version=1, expires_in=-1e6), impostor)
    with pytest.raises(SignatureError):
        world.open_desired(blob, last_seq=10, committed=5)


def test_wrong_device_key_cannot_unwrap(world) -> None:  # type: ignore[no-untyped-def]
    desired = world.desired()
    with pytest.raises(KeyUnwrapError):
        envelope.unwrap_key(
            desired.key, world.other_device, artifact_id=desired.artifact.artifact_id, device_id="dev-a"
        )


def test_non_recipient_device_refuses_the_manifest_and_cannot_unwrap(world) -> None:  # type: ignore[no-untyped-def]
    blob = envelope.seal_desired(world.desired(device_id="dev-a"), world.server)
    with pytest.raises(WrongRecipientError):
        world.open_desired(blob, device_id="dev-b")
    desired = world.desired(device_id="dev-a")
    # even with the manifest in hand, dev-b's id in the KDF context does not open dev-a's key
    with pytest.raises(KeyUnwrapError):
        envelope.unwrap_key(desired.key, world.device, artifact_id=desired.artifact.artifact_id, device_id="dev-b")


def test_replayed_manifest_and_command_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    blob = envelope.seal_desired(world.desired(seq=5), world.server)
    world.open_desired(blob, last_seq=4)
    with pytest.raises(ReplayError) as err:
        world.open_desired(blob, last_seq=5)
    assert (err.value.seq, err.value.last_seq) == (5, 5)
    cmd = envelope.seal_command(world.command(seq=6), world.server)
    envelope.open_command(cmd, trust=world.trust, device_id="dev-a", now=NOW, last_seq=5)
    with pytest.raises(ReplayError):
        envelope.open_command(cmd, trust=world.trust, device_id="dev-a", now=NOW, last_seq=6)


def test_older_version_is_a_downgrade_unless_pinned(world) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DowngradeError) as err:
        world.open_desired(envelope.seal_desired(world.desired(version=2), world.server), committed=3)
    assert (err.value.version, err.value.committed) == (2, 3)
    # same version is not a downgrade; a signed pin (retained rollback) may go back
    world.open_desired(envelope.seal_desired(world.desired(version=3), world.server), committed=3)
    pinned = world.open_desired(
        envelope.seal_desired(world.desired(version=1, action="pin"), world.server), committed=3
    )
    assert pinned.action == "pin"
    assert pinned.model.version == 1


def test_expired_manifest_and_command_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    blob = envelope.seal_desired(world.desired(expires_in=10), world.server)
    world.open_desired(blob, now=NOW + 10 + envelope.DEFAULT_CLOCK_SKEW_S)  # inside the skew allowance
    with pytest.raises(ExpiredError):
        world.open_desired(blob, now=NOW + 11 + envelope.DEFAULT_CLOCK_SKEW_S)
    cmd = envelope.seal_command(world.command(expires_in=-1000), world.server)
    with pytest.raises(ExpiredError):
        envelope.open_command(cmd, trust=world.trust, device_id="dev-a", now=NOW, last_seq=0)


def test_truncated_artifact_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    info, key = world.sealed.info, world.sealed.data_key
    with pytest.raises(IntegrityError, match="incomplete"):
        envelope.open_artifact(world.sealed.chunks[:-1], key, info, max_size=1 << 20)
    last = world.sealed.chunks[-1]
    with pytest.raises(MalformedMessageError):
        envelope.ChunkOpener(key, info).open(last[:-5])
    with pytest.raises(MalformedMessageError):
        envelope.ChunkOpener(key, info).open(last[:20])


def test_chunks_spliced_from_another_artifact_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    other = envelope.seal_artifact(world.model, chunk_size=1024, compression="zlib")
    opener = envelope.ChunkOpener(world.sealed.data_key, world.sealed.info)
    with pytest.raises(DecryptionError):
        opener.open(other.chunks[0])
    # rewrite the foreign chunk's header to claim our artifact id: the tag (keyed, header as AAD) fails
    forged = other.chunks[0][:8] + bytes.fromhex(world.sealed.info.artifact_id) + other.chunks[0][24:]
    with pytest.raises(DecryptionError):
        opener.open(forged)


def test_reordered_chunk_index_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    opener = envelope.ChunkOpener(world.sealed.data_key, world.sealed.info)
    c0, c1 = world.sealed.chunks[0], world.sealed.chunks[1]
    swapped = c0[:24] + c1[24:28] + c0[28:]  # claims to be chunk 1 but carries chunk 0's ciphertext
    with pytest.raises(DecryptionError):
        opener.open(swapped)
    out_of_range = c0[:24] + (99).to_bytes(4, "big") + c0[28:]
    with pytest.raises(ChunkOutOfRangeError):
        opener.open(out_of_range)


def test_unknown_envelope_and_schema_versions_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    chunk = bytearray(world.sealed.chunks[0])
    chunk[4] = 2
    with pytest.raises(UnsupportedVersionError):
        envelope.ChunkOpener(world.sealed.data_key, world.sealed.info).open(bytes(chunk))
    env = json.loads(envelope.seal_desired(world.desired(), world.server))
    env["payloadType"] = "application/vnd.edgefleet.desired+json; version=2"
    with pytest.raises(UnsupportedVersionError):
        world.open_desired(json.dumps(env).encode())
    # a v2 *payload* correctly signed is refused after the signature check, by the schema check
    payload = json.loads(envelope.seal_desired(world.desired(), world.server))
    import base64

    body = json.loads(base64.b64decode(payload["payload"]))
    body["schema"] = "2.0"
    blob = envelope.sign_payload("desired", json.dumps(body).encode(), world.server)
    with pytest.raises(UnsupportedVersionError):
        world.open_desired(blob)


def test_oversized_inputs_are_refused_before_parsing(world) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MessageTooLargeError):
        world.open_desired(b"{" + b" " * (1 << 20) + b"}")
    with pytest.raises(MessageTooLargeError):
        envelope.parse_chunk_header(b"EFC1" + bytes(envelope.MAX_CHUNK_MESSAGE))
    with pytest.raises(Exception) as err:
        envelope.open_artifact(world.sealed.chunks, world.sealed.data_key, world.sealed.info, max_size=100)
    assert type(err.value).__name__ == "ArtifactTooLargeError"


def test_low_order_ephemeral_key_is_a_typed_error(world) -> None:  # type: ignore[no-untyped-def]
    desired = world.desired()
    bad = WrappedKey(epk=bytes(32), ciphertext=desired.key.ciphertext)
    with pytest.raises(KeyUnwrapError):
        envelope.unwrap_key(bad, world.device, artifact_id=desired.artifact.artifact_id, device_id="dev-a")


def test_decompression_bomb_is_capped() -> None:
    bomb = envelope.compress(bytes(10_000_000), "lzma")
    with pytest.raises(Exception) as err:
        envelope.decompress(bomb, "lzma", expected_size=1000)
    assert type(err.value).__name__ == "ArtifactTooLargeError"


def test_key_rotation_accepts_either_trusted_key(world) -> None:  # type: ignore[no-untyped-def]
    new_key = Ed25519PrivateKey.generate()
    trust = envelope.TrustAnchor.of(world.server.public_key(), new_key.public_key())
    for key in (world.server, new_key):
        envelope.open_desired(
            envelope.seal_desired(world.desired(), key),
            trust=trust,
            device_id="dev-a",
            now=NOW,
            last_seq=0,
            committed_version=lambda _m: None,
        )
    _ = replace


def test_open_chunk_with_a_parsed_header_is_the_same_open() -> None:
    art = envelope.seal_artifact(os.urandom(5000), chunk_size=1024, compression="none")
    opener = envelope.ChunkOpener(art.data_key, art.info)
    for wire in art.chunks:
        assert opener.open_chunk(wire, envelope.parse_chunk_header(wire)) == opener.open_chunk(wire)
    forged = art.chunks[1][:-1] + bytes([art.chunks[1][-1] ^ 1])
    with pytest.raises(DecryptionError):  # a header parsed by the caller does not skip authentication
        opener.open_chunk(forged, envelope.parse_chunk_header(forged))
