"""Keys and sealed material shared by the protocol tests."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.protocol import envelope
from agent.protocol.messages import Command, DesiredState, HealthSpec, ModelRef, RuntimeSpec, TensorSpec

NOW = time.time()


@dataclass
class World:
    server: Ed25519PrivateKey
    device: X25519PrivateKey
    other_device: X25519PrivateKey
    trust: envelope.TrustAnchor
    model: bytes
    sealed: envelope.SealedArtifact

    def desired(
        self,
        *,
        device_id: str = "dev-a",
        seq: int = 5,
        version: int = 3,
        action: str = "deploy",
        expires_in: float = 3600.0,
    ) -> DesiredState:
        info = self.sealed.info
        wrapped = envelope.wrap_key(
            self.sealed.data_key, self.device.public_key(), artifact_id=info.artifact_id, device_id=device_id
        )
        deploy = action == "deploy"
        return DesiredState(
            device_id=device_id,
            seq=seq,
            issued_at=NOW,
            expires_at=NOW + expires_in,
            action=action,
            model=ModelRef("m", version),
            artifact=info if deploy else None,
            key=wrapped if deploy else None,
            runtime=RuntimeSpec("onnx", "onnxruntime") if deploy else None,
            health=HealthSpec((TensorSpec("x", "float32", (1, 4)),), (), 10.0) if deploy else None,
        )

    def command(self, *, device_id: str = "dev-a", seq: int = 6, expires_in: float = 600.0) -> Command:
        return Command(
            device_id=device_id, seq=seq, issued_at=NOW, expires_at=NOW + expires_in, command_id="c1", action="ping"
        )

    def open_desired(
        self,
        blob: bytes,
        *,
        device_id: str = "dev-a",
        last_seq: int = 0,
        committed: int | None = None,
        now: float = NOW,
    ) -> DesiredState:
        return envelope.open_desired(
            blob,
            trust=self.trust,
            device_id=device_id,
            now=now,
            last_seq=last_seq,
            committed_version=lambda _m: committed,
        )


def make_world(model_size: int = 5000, chunk_size: int = 1024) -> World:
    server = Ed25519PrivateKey.generate()
    model = os.urandom(model_size // 2) + bytes(model_size - model_size // 2)
    return World(
        server=server,
        device=X25519PrivateKey.generate(),
        other_device=X25519PrivateKey.generate(),
        trust=envelope.TrustAnchor.of(server.public_key()),
        model=model,
        sealed=envelope.seal_artifact(model, chunk_size=chunk_size, compression="zlib"),
    )


__all__ = ["NOW", "World", "make_world", "replace"]
