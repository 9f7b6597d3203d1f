"""Fixed inputs for the envelope v1 golden vectors, and the function that seals them.

``scripts/gen_test_vectors.py`` writes ``envelope_v1.json`` from ``build()``; the test
recomputes ``build()`` and compares byte for byte, so any change to the format shows up.
Never regenerate the JSON to make a failing test pass unless the format change is intended
(then bump ENVELOPE_VERSION and keep the old vectors).
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol import envelope
from agent.protocol.messages import Command, DesiredState, HealthSpec, ModelRef, RuntimeSpec, TensorSpec, b64


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"edgefleet test vector {label}".encode()).digest()


SIGNING_SEED = _seed("server signing key")
DEVICE_SEED = _seed("device x25519 key")
EPHEMERAL_SEED = _seed("ephemeral x25519 key")
DATA_KEY = _seed("data key")
ARTIFACT_ID = _seed("artifact id")[:16].hex()
DEVICE_ID = "pi5-vector-01"
MODEL = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(100))  # 3200 bytes
CHUNK_SIZE = 1024
ISSUED_AT = 1_790_000_000.0
EXPIRES_AT = ISSUED_AT + 7 * 86400


def keys() -> tuple[Ed25519PrivateKey, X25519PrivateKey, X25519PrivateKey]:
    return (
        Ed25519PrivateKey.from_private_bytes(SIGNING_SEED),
        X25519PrivateKey.from_private_bytes(DEVICE_SEED),
        X25519PrivateKey.from_private_bytes(EPHEMERAL_SEED),
    )


def build() -> dict[str, Any]:
    signing, device, ephemeral = keys()
    # compression "none": zlib/lzma output may differ between library builds; the vectors pin our format
    sealed = envelope.seal_artifact(
        MODEL, chunk_size=CHUNK_SIZE, compression="none", artifact_id=ARTIFACT_ID, data_key=DATA_KEY
    )
    wrapped = envelope.wrap_key(
        DATA_KEY, device.public_key(), artifact_id=ARTIFACT_ID, device_id=DEVICE_ID, ephemeral=ephemeral
    )
    desired = DesiredState(
        device_id=DEVICE_ID,
        seq=7,
        issued_at=ISSUED_AT,
        expires_at=EXPIRES_AT,
        action="deploy",
        model=ModelRef("digits", 2),
        deployment_id="dep-0001",
        artifact=sealed.info,
        key=wrapped,
        runtime=RuntimeSpec("onnx", "onnxruntime", "1.17.0", ("CPUExecutionProvider",)),
        health=HealthSpec(
            inputs=(TensorSpec("input", "float32", (-1, 64)),),
            outputs=(TensorSpec("logits", "float32", (-1, 10)),),
            latency_budget_ms=25.0,
        ),
        variant="int8-static-qdq",
    )
    command = Command(
        device_id=DEVICE_ID,
        seq=8,
        issued_at=ISSUED_AT + 60,
        expires_at=ISSUED_AT + 3660,
        command_id="cmd-0001",
        action="rollback",
        model="digits",
        version=1,
    )
    return {
        "format": "edgefleet envelope v1 golden vectors",
        "inputs": {
            "signing_seed": SIGNING_SEED.hex(),
            "device_x25519": DEVICE_SEED.hex(),
            "ephemeral_x25519": EPHEMERAL_SEED.hex(),
            "data_key": DATA_KEY.hex(),
            "artifact_id": ARTIFACT_ID,
            "device_id": DEVICE_ID,
            "model_sha256": hashlib.sha256(MODEL).hexdigest(),
            "chunk_size": CHUNK_SIZE,
        },
        "key_id": envelope.key_id(signing.public_key()),
        "chunks": [c.hex() for c in sealed.chunks],
        "artifact": sealed.info.to_dict(),
        "wrapped_key": {"epk": b64(wrapped.epk), "ct": b64(wrapped.ciphertext)},
        "desired": envelope.seal_desired(desired, signing).decode(),
        "command": envelope.seal_command(command, signing).decode(),
    }
