"""Building and signing what the server sends devices: deploy and pin desired states, commands."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.protocol.delta import DESIRED_FIELD, DeltaInfo
from agent.protocol.envelope import TrustAnchor, seal_command, seal_desired, verify_payload, wrap_key
from agent.protocol.messages import (
    ArtifactInfo,
    Command,
    DesiredState,
    HealthSpec,
    ModelRef,
    RuntimeSpec,
    WrappedKey,
    decode_payload,
)
from agent.protocol.topics import artifact_topic
from server.errors import InvalidRequestError, RegistryError
from server.registry.fleet import ArtifactRecord, StoredCommand, StoredDesired

if TYPE_CHECKING:
    from server.delta import DeltaOffer


def device_public_key(device_id: str, public_key_b64: str | None) -> X25519PublicKey:
    if not public_key_b64:
        raise InvalidRequestError(f"device {device_id!r} has no enrolled public key yet (approve its enrollment)")
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise RegistryError(f"device {device_id!r} has an invalid stored public key") from exc


def parse_public_key(text: str) -> str:
    """Validate a base64 X25519 public key given by an operator; returns it normalised."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise InvalidRequestError("public key is not valid base64") from exc
    if len(raw) != 32:
        raise InvalidRequestError(f"public key must be 32 bytes (X25519), got {len(raw)}")
    return base64.b64encode(raw).decode()


def fingerprint(public_key_b64: str) -> str:
    """The key fingerprint operators compare (docs/protocol.md 4.5): first 8 bytes of SHA-256, hex."""
    return hashlib.sha256(base64.b64decode(public_key_b64)).digest()[:8].hex()


def _desired(stored: StoredDesired, **fields: Any) -> DesiredState:
    """A desired state with the seq and lifetime the registry allocated (``store_desired``)."""
    return DesiredState(device_id=stored.device_id, seq=stored.seq, issued_at=stored.issued_at,
                        expires_at=stored.expires_at, **fields)


def _for_device(
    artifact: ArtifactRecord, stored: StoredDesired, public_key_b64: str | None, broadcast: bool
) -> tuple[ArtifactInfo, WrappedKey]:
    """The artifact's manifest as this device is told it (the shared topic when broadcast) and its data key
    wrapped for this device."""
    info = ArtifactInfo.from_dict(artifact.info)
    info = dataclasses.replace(info, topic=artifact_topic(info.artifact_id) if broadcast else None)
    key = wrap_key(artifact.data_key, device_public_key(stored.device_id, public_key_b64),
                   artifact_id=info.artifact_id, device_id=stored.device_id)
    return info, key


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._trust = TrustAnchor.of(key.public_key())

    def deploy(
        self,
        stored: StoredDesired,
        *,
        device_public_key_b64: str | None,
        model: str,
        version: int,
        deployment_id: str,
        artifact: ArtifactRecord,
        runtime: Mapping[str, Any],
        health: Mapping[str, Any],
        variant: str | None,
        probation_s: float | None,
        broadcast: bool,
        delta: DeltaOffer | None = None,
    ) -> bytes:
        info, key = _for_device(artifact, stored, device_public_key_b64, broadcast)
        health_spec = HealthSpec.from_dict(health)
        if probation_s is not None:
            health_spec = dataclasses.replace(health_spec, probation_s=probation_s)
        desired = _desired(
            stored,
            action="deploy",
            model=ModelRef(model, version),
            deployment_id=deployment_id,
            artifact=info,
            key=key,
            runtime=RuntimeSpec.from_dict(runtime),
            health=health_spec,
            variant=variant,
            extra=self._delta_field(stored, device_public_key_b64, info, delta, broadcast),
        )
        return seal_desired(desired, self._key)

    @staticmethod
    def _delta_field(
        stored: StoredDesired, public_key_b64: str | None, full: ArtifactInfo, delta: DeltaOffer | None, broadcast: bool
    ) -> dict[str, Any]:
        """The signed delta offer (agent/protocol/delta.py DeltaInfo), or nothing."""
        if delta is None:
            return {}
        info, key = _for_device(delta.artifact, stored, public_key_b64, broadcast)
        offer = DeltaInfo(info, key, delta.base_version, delta.base_sha256, full.sha256, full.size)
        return {DESIRED_FIELD: offer.to_dict()}

    def pin(self, stored: StoredDesired, *, model: str, version: int, deployment_id: str | None) -> bytes:
        desired = _desired(stored, action="pin", model=ModelRef(model, version), deployment_id=deployment_id)
        return seal_desired(desired, self._key)

    def command(self, c: StoredCommand, args: Mapping[str, Any] | None = None) -> bytes:
        """The stored command as signed: ``StoredCommand`` holds the wire command's fields; ``args`` are a
        command's parameters (a probe's variants), kept with the probe, not in the outbox row."""
        return seal_command(Command(**dataclasses.asdict(c), args=dict(args or {})), self._key)

    def resign(self, blob: bytes, stored: StoredDesired) -> bytes:
        """The same desired state with a new seq and lifetime (before expiry, or after a command)."""
        payload = verify_payload(blob, "desired", self._trust)
        desired = decode_payload(payload, "desired")
        assert isinstance(desired, DesiredState)
        renewed = dataclasses.replace(
            desired, seq=stored.seq, issued_at=stored.issued_at, expires_at=stored.expires_at
        )
        return seal_desired(renewed, self._key)
