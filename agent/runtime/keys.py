"""Device and server keys on disk.

* The device's X25519 private key (``device.key``, PKCS#8 PEM, mode 0600) is created on the
  device by ``edgefleet-agent init`` and never leaves it; its public half goes to the server at
  enrollment, identified by a fingerprint the operator compares.
* The server's Ed25519 public keys (``server.pub``, PEM or raw base64) are the trust anchor:
  signed desired states and commands must verify against one of them. Several files are
  allowed during a key rotation.

A private key file readable by group or others is refused (as ssh does): the key may have leaked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.errors import ConfigError
from agent.protocol.envelope import TrustAnchor, raw_public
from agent.runtime.fsutil import atomic_write

MAX_KEY_FILE = 16 * 1024


def generate_device_key(path: Path) -> X25519PrivateKey:
    """Create a fresh X25519 key at ``path`` (0600, atomic); refuses to overwrite an existing key."""
    if path.exists():
        raise ConfigError(f"{path} already exists; refusing to replace a device key", field="keys.device_key")
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, pem, mode=0o600)
    atomic_write(path.with_suffix(".pub"), (public_key_b64(key.public_key()) + "\n").encode(), mode=0o644)
    return key


def load_device_key(path: Path) -> X25519PrivateKey:
    data = _read_key_file(path, "keys.device_key")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is readable by group or others (mode {stat.S_IMODE(mode):o}); chmod 600 it",
            field="keys.device_key",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}", field="keys.device_key") from exc
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an X25519 key", field="keys.device_key")
    return key


def load_server_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or 32 raw bytes in base64."""
    data = _read_key_file(path, "keys.server_keys").strip()
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM public key: {exc}", field="keys.server_keys") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{path} holds a {type(key).__name__}, not Ed25519", field="keys.server_keys")
        return key
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{path}: expected PEM or base64 of 32 raw bytes", field="keys.server_keys") from exc
    if len(raw) != 32:
        raise ConfigError(f"{path}: an Ed25519 public key is 32 bytes, got {len(raw)}", field="keys.server_keys")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_trust_anchor(paths: tuple[Path, ...] | list[Path]) -> TrustAnchor:
    return TrustAnchor.of(*(load_server_key(p) for p in paths))


def write_server_key(path: Path, key: Ed25519PublicKey) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(path, pem, mode=0o644)


def public_key_b64(key: X25519PublicKey) -> str:
    """The form the StateReport and EnrollRequest carry."""
    return base64.b64encode(raw_public(key)).decode("ascii")


def fingerprint(key: X25519PublicKey | Ed25519PublicKey) -> str:
    """What an operator compares at enrollment (docs/protocol.md 4.5): first 8 bytes of SHA-256 of the raw key, hex."""
    return hashlib.sha256(raw_public(key)).digest()[:8].hex()


def _read_key_file(path: Path, field_name: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise ConfigError(f"{path} is {size} bytes; not a key file", field=field_name)
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", field=field_name) from exc
