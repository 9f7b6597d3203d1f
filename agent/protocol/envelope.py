"""The security envelope, version 1: the one module that defines the bytes.

Server side (``seal_*``) and device side (``open_*``) live together so the layout is
written once. Byte layouts are in docs/protocol.md; in short:

Signed control payloads (DesiredState, Command) use DSSE (github.com/secure-systems-lab/dsse):
    {"payloadType": T, "payload": b64(canonical JSON), "signatures": [{"keyid": K, "sig": b64(Ed25519)}]}
    signature = Ed25519(PAE(T, payload)),  PAE = "DSSEv1" SP len(T) SP T SP len(payload) SP payload
    K = first 8 bytes of SHA-256(raw 32-byte public key), hex

Artifact chunks (binary, big-endian), one MQTT message each:
    offset size field
    0      4    magic "EFC1"
    4      1    envelope version (1)
    5      1    flags (0)
    6      2    reserved (0)
    8      16   artifact id
    24     4    chunk index
    28     4    chunk count
    32     4    ciphertext length L (plaintext length + 16)
    36     L    AES-256-GCM ciphertext || 16-byte tag
    nonce = 4 zero bytes || index as u64;  associated data = bytes 0..35 (the whole header)
The data key is random per artifact, so index-derived nonces never repeat under one key;
the header as associated data makes reordering, truncation, splicing and header edits fail.

Data-key wrapping, per device: X25519(ephemeral, device) -> HKDF-SHA256(salt = epk || device_pk,
info = "edgefleet/v1/key-wrap" || artifact id || device id) -> AES-256-GCM(zero nonce,
aad = "edgefleet/v1/data-key") over the 32-byte data key. The ephemeral key is fresh per wrap.

Verification order on the device (open_desired / open_command):
    size cap -> signature -> decode -> recipient -> expiry -> sequence (replay) -> version (downgrade)
and for the artifact: unwrap key -> per-chunk AEAD as chunks arrive -> digests after reassembly.
Nothing is decrypted before the manifest that carries its key has passed every check above.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import (
    ArtifactTooLargeError,
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
from agent.protocol.codec import compress, decompress
from agent.protocol.messages import (
    MAX_CONTROL_MESSAGE,
    ArtifactInfo,
    Command,
    DesiredState,
    WrappedKey,
    decode_payload,
    dump_json,
    strict_b64decode,
)

ENVELOPE_VERSION = 1
CHUNK_MAGIC = b"EFC1"
CHUNK_HEADER = struct.Struct(">4sBBH16sIII")
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 36
TAG_SIZE = 16
DATA_KEY_SIZE = 32
ARTIFACT_ID_SIZE = 16
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 1 << 20
MAX_CHUNK_MESSAGE = CHUNK_HEADER_SIZE + MAX_CHUNK_SIZE + TAG_SIZE
DEFAULT_CHUNK_SIZE = 64 * 1024

PAYLOAD_TYPES: Mapping[str, str] = {
    "desired": "application/vnd.edgefleet.desired+json; version=1",
    "command": "application/vnd.edgefleet.command+json; version=1",
}
WRAP_INFO = b"edgefleet/v1/key-wrap"
WRAP_AAD = b"edgefleet/v1/data-key"
#: Tolerance for device clocks (boards without an RTC boot with a stale clock until NTP syncs).
DEFAULT_CLOCK_SKEW_S = 300.0

Kind = Literal["desired", "command"]


# -- keys -----------------------------------------------------------------------------------------


def raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short stable identifier of a signing key (first 8 bytes of SHA-256 of the raw key, hex)."""
    return hashlib.sha256(raw_public(public_key)).digest()[:8].hex()


@dataclass(frozen=True)
class TrustAnchor:
    """The server signing keys a device accepts, by key id (more than one during key rotation)."""

    keys: Mapping[str, Ed25519PublicKey]

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> TrustAnchor:
        return cls({key_id(k): k for k in public_keys})


# -- DSSE signing of control payloads -------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the signature actually covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign_payload(kind: Kind, payload: bytes, signing_key: Ed25519PrivateKey) -> bytes:
    payload_type = PAYLOAD_TYPES[kind]
    signature = signing_key.sign(pae(payload_type, payload))
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": key_id(signing_key.public_key()), "sig": base64.b64encode(signature).decode()}],
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def verify_payload(blob: bytes, kind: Kind, trust: TrustAnchor) -> bytes:
    """Check a DSSE envelope's signature against the trust anchor; return the signed payload bytes."""
    if len(blob) > MAX_CONTROL_MESSAGE:
        raise MessageTooLargeError(f"signed {kind}", len(blob), MAX_CONTROL_MESSAGE)
    try:
        env = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedMessageError(f"signed {kind}: not valid JSON") from exc
    if not isinstance(env, dict):
        raise MalformedMessageError(f"signed {kind}: expected a JSON object")
    payload_type = env.get("payloadType")
    if payload_type != PAYLOAD_TYPES[kind]:
        if isinstance(payload_type, str) and payload_type.startswith(PAYLOAD_TYPES[kind].split(";")[0]):
            raise UnsupportedVersionError(f"signed {kind}", payload_type, PAYLOAD_TYPES[kind])
        raise MalformedMessageError(f"signed {kind}: payloadType {payload_type!r} is not {PAYLOAD_TYPES[kind]!r}")
    sigs = env.get("signatures")
    payload_b64 = env.get("payload")
    if not isinstance(payload_b64, str) or not isinstance(sigs, list) or not 1 <= len(sigs) <= 4:
        raise MalformedMessageError(f"signed {kind}: needs a payload and 1-4 signatures")
    payload = strict_b64decode(payload_b64)
    if payload is None:
        raise MalformedMessageError(f"signed {kind}: payload is not canonical base64")
    message = pae(payload_type, payload)
    for sig in sigs:
        if not isinstance(sig, dict):
            continue
        public_key = trust.keys.get(str(sig.get("keyid")))
        sig_b64 = sig.get("sig")
        if public_key is None or not isinstance(sig_b64, str):
            continue
        signature = strict_b64decode(sig_b64)
        if signature is None:
            continue
        try:
            public_key.verify(signature, message)
        except InvalidSignature:
            continue
        return payload
    raise SignatureError(f"signed {kind}: no valid signature by a trusted server key")


def seal_desired(desired: DesiredState, signing_key: Ed25519PrivateKey) -> bytes:
    return sign_payload("desired", dump_json(desired.to_dict()), signing_key)


def seal_command(command: Command, signing_key: Ed25519PrivateKey) -> bytes:
    return sign_payload("command", dump_json(command.to_dict()), signing_key)


def _check_addressing(msg: DesiredState | Command, *, device_id: str, now: float, last_seq: int, skew: float) -> None:
    if msg.device_id != device_id:
        raise WrongRecipientError(device_id, msg.device_id)
    if now > msg.expires_at + skew:
        raise ExpiredError(msg.expires_at, now)
    if msg.seq <= last_seq:
        raise ReplayError(msg.seq, last_seq)


def open_desired(
    blob: bytes,
    *,
    trust: TrustAnchor,
    device_id: str,
    now: float,
    last_seq: int,
    committed_version: Callable[[str], int | None],
    skew: float = DEFAULT_CLOCK_SKEW_S,
) -> DesiredState:
    """Verify and decode a desired state, in the contract's order; raises a SecurityError subclass.

    ``committed_version(model)`` returns the device's committed version of that model, if any:
    a deploy older than it is a downgrade. A ``pin`` may go backwards: it is a signed rollback.
    """
    payload = verify_payload(blob, "desired", trust)
    desired = decode_payload(payload, "desired")
    assert isinstance(desired, DesiredState)
    _check_addressing(desired, device_id=device_id, now=now, last_seq=last_seq, skew=skew)
    if desired.action == "deploy":
        committed = committed_version(desired.model.name)
        if committed is not None and desired.model.version < committed:
            raise DowngradeError(desired.model.name, desired.model.version, committed)
    return desired


def open_command(
    blob: bytes, *, trust: TrustAnchor, device_id: str, now: float, last_seq: int, skew: float = DEFAULT_CLOCK_SKEW_S
) -> Command:
    """Verify and decode a command (signature, recipient, expiry, sequence)."""
    payload = verify_payload(blob, "command", trust)
    command = decode_payload(payload, "command")
    assert isinstance(command, Command)
    _check_addressing(command, device_id=device_id, now=now, last_seq=last_seq, skew=skew)
    return command


# -- data key wrapping ------------------------------------------------------------------------------


def _kek(shared: bytes, epk: bytes, device_pk: bytes, artifact_id: str, device_id: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=epk + device_pk,
        info=WRAP_INFO + bytes.fromhex(artifact_id) + device_id.encode(),
    ).derive(shared)


def wrap_key(
    data_key: bytes,
    device_public_key: X25519PublicKey,
    *,
    artifact_id: str,
    device_id: str,
    ephemeral: X25519PrivateKey | None = None,
) -> WrappedKey:
    """Encrypt the artifact's data key so only ``device_id``'s private key opens it."""
    ephemeral = ephemeral or X25519PrivateKey.generate()
    epk = raw_public(ephemeral.public_key())
    device_pk = raw_public(device_public_key)
    kek = _kek(ephemeral.exchange(device_public_key), epk, device_pk, artifact_id, device_id)
    return WrappedKey(epk=epk, ciphertext=AESGCM(kek).encrypt(bytes(12), data_key, WRAP_AAD))


def unwrap_key(wrapped: WrappedKey, device_key: X25519PrivateKey, *, artifact_id: str, device_id: str) -> bytes:
    """Recover the data key; KeyUnwrapError if this device is not the recipient or bytes were altered."""
    try:
        peer = X25519PublicKey.from_public_bytes(wrapped.epk)
        shared = device_key.exchange(peer)
    except ValueError as exc:  # low-order point: the shared secret would be all zeros
        raise KeyUnwrapError("wrapped key has an invalid ephemeral public key") from exc
    kek = _kek(shared, wrapped.epk, raw_public(device_key.public_key()), artifact_id, device_id)
    try:
        data_key = AESGCM(kek).decrypt(bytes(12), wrapped.ciphertext, WRAP_AAD)
    except InvalidTag as exc:
        raise KeyUnwrapError("data key does not open with this device's key (not a recipient, or tampered)") from exc
    if len(data_key) != DATA_KEY_SIZE:
        raise KeyUnwrapError("unwrapped data key has the wrong length")
    return data_key


# -- artifact chunks ----------------------------------------------------------------------------------


def chunk_nonce(index: int) -> bytes:
    return bytes(4) + index.to_bytes(8, "big")


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


@dataclass(frozen=True)
class ChunkHeader:
    raw_artifact_id: bytes
    index: int
    count: int
    length: int

    @property
    def artifact_id(self) -> str:
        return self.raw_artifact_id.hex()


def parse_chunk_header(wire: bytes) -> ChunkHeader:
    """Parse and bound-check a chunk's 36-byte header (nothing is trusted until the AEAD check)."""
    if len(wire) > MAX_CHUNK_MESSAGE:
        raise MessageTooLargeError("chunk", len(wire), MAX_CHUNK_MESSAGE)
    if len(wire) < CHUNK_HEADER_SIZE + TAG_SIZE:
        raise MalformedMessageError(f"chunk of {len(wire)} bytes is shorter than header and tag")
    magic, version, _flags, _reserved, artifact_id, index, count, length = CHUNK_HEADER.unpack_from(wire)
    if magic != CHUNK_MAGIC:
        raise MalformedMessageError("chunk: bad magic")
    if version != ENVELOPE_VERSION:
        raise UnsupportedVersionError("chunk envelope", str(version), str(ENVELOPE_VERSION))
    if length != len(wire) - CHUNK_HEADER_SIZE:
        raise MalformedMessageError(
            f"chunk: header says {length} bytes of ciphertext, message has {len(wire) - CHUNK_HEADER_SIZE}"
        )
    if count == 0 or index >= count:
        raise ChunkOutOfRangeError(f"chunk index {index} outside count {count}", index=index)
    return ChunkHeader(artifact_id, index, count, length)


def seal_chunk(aead: AESGCM, artifact_id: str, index: int, count: int, plaintext: bytes) -> bytes:
    header = CHUNK_HEADER.pack(
        CHUNK_MAGIC, ENVELOPE_VERSION, 0, 0, bytes.fromhex(artifact_id), index, count, len(plaintext) + TAG_SIZE
    )
    return header + aead.encrypt(chunk_nonce(index), plaintext, header)


@dataclass(frozen=True)
class OpenedChunk:
    index: int
    data: bytes
    tag: bytes  # the AEAD tag: a keyed fingerprint of this chunk, reusable for duplicate detection


class ChunkOpener:
    """Authenticates and decrypts chunks of one artifact whose manifest has been verified."""

    def __init__(self, data_key: bytes, info: ArtifactInfo) -> None:
        self._aead = AESGCM(data_key)
        self._info = info
        self._artifact_id = bytes.fromhex(info.artifact_id)
        self._last_len = info.compressed_size - (info.chunk_count - 1) * info.chunk_size

    def expected_length(self, index: int) -> int:
        return self._last_len if index == self._info.chunk_count - 1 else self._info.chunk_size

    def open(self, wire: bytes) -> tuple[int, bytes]:
        """Return (index, plaintext) or raise; a chunk of another artifact or count never decrypts."""
        opened = self.open_chunk(wire)
        return opened.index, opened.data

    def open_chunk(self, wire: bytes, header: ChunkHeader | None = None) -> OpenedChunk:
        """Authenticate and decrypt one chunk. ``header``: ``parse_chunk_header(wire)`` if the caller already
        parsed it (it looked at the artifact id first), so the chunk path parses each header once."""
        if header is None:
            header = parse_chunk_header(wire)
        if header.raw_artifact_id != self._artifact_id:
            raise DecryptionError(
                f"chunk belongs to artifact {header.artifact_id}, not {self._info.artifact_id}", index=header.index
            )
        if header.count != self._info.chunk_count:
            raise DecryptionError(
                f"chunk says {header.count} chunks, manifest says {self._info.chunk_count}", index=header.index
            )
        if header.length != self.expected_length(header.index) + TAG_SIZE:
            raise ChunkOutOfRangeError(f"chunk {header.index} has the wrong length", index=header.index)
        view = memoryview(wire)
        try:
            plain = self._aead.decrypt(chunk_nonce(header.index), view[CHUNK_HEADER_SIZE:], view[:CHUNK_HEADER_SIZE])
        except InvalidTag as exc:
            raise DecryptionError(f"chunk {header.index} failed authentication", index=header.index) from exc
        return OpenedChunk(header.index, plain, bytes(view[-TAG_SIZE:]))


# -- whole artifacts (server side) ----------------------------------------------------------------------


@dataclass(frozen=True)
class SealedArtifact:
    """One encrypted artifact: its public description, its data key (server-side secret) and chunks."""

    info: ArtifactInfo
    data_key: bytes
    chunks: tuple[bytes, ...]

    @property
    def wire_bytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def new_artifact_id() -> str:
    return os.urandom(ARTIFACT_ID_SIZE).hex()


def seal_artifact(
    model: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression: str = "lzma",
    artifact_id: str | None = None,
    data_key: bytes | None = None,
    shared_topic: bool = True,
) -> SealedArtifact:
    """Compress, split and encrypt a model file. ``artifact_id``/``data_key`` are injectable for test vectors."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if not model:
        raise ValueError("cannot seal an empty model")
    artifact_id = artifact_id or new_artifact_id()
    data_key = data_key or AESGCM.generate_key(bit_length=256)
    packed = compress(model, compression)
    count = chunk_count(len(packed), chunk_size)
    aead = AESGCM(data_key)
    chunks = tuple(
        seal_chunk(aead, artifact_id, i, count, packed[i * chunk_size : (i + 1) * chunk_size]) for i in range(count)
    )
    from agent.protocol.topics import artifact_topic  # noqa: PLC0415 - keeps topics optional for pure users

    info = ArtifactInfo(
        artifact_id=artifact_id,
        size=len(model),
        sha256=hashlib.sha256(model).hexdigest(),
        compression=compression,
        compressed_size=len(packed),
        compressed_sha256=hashlib.sha256(packed).hexdigest(),
        chunk_size=chunk_size,
        chunk_count=count,
        topic=artifact_topic(artifact_id) if shared_topic else None,
    )
    return SealedArtifact(info=info, data_key=data_key, chunks=chunks)


def open_artifact(
    chunks: Iterator[bytes] | tuple[bytes, ...] | list[bytes], data_key: bytes, info: ArtifactInfo, *, max_size: int
) -> bytes:
    """Whole-artifact open for tools and tests: every chunk, in any order, then both digests."""
    if info.size > max_size:
        raise ArtifactTooLargeError(info.size, max_size)
    opener = ChunkOpener(data_key, info)
    parts: dict[int, bytes] = {}
    for wire in chunks:
        index, plain = opener.open(wire)
        parts[index] = plain
    if len(parts) != info.chunk_count:
        raise IntegrityError(f"artifact incomplete: {len(parts)} of {info.chunk_count} chunks")
    packed = b"".join(parts[i] for i in range(info.chunk_count))
    if hashlib.sha256(packed).hexdigest() != info.compressed_sha256:
        raise IntegrityError("compressed artifact digest mismatch")
    model = decompress(packed, info.compression, expected_size=info.size)
    if hashlib.sha256(model).hexdigest() != info.sha256:
        raise IntegrityError("model digest mismatch")
    return model
