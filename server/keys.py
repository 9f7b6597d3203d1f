"""Server secrets on disk: the Ed25519 signing key, API tokens, broker passwords.

Files under ``{home}/keys`` (all 0600, written atomically: temp file, fsync, rename, fsync dir):

    signing.key              Ed25519 private key, PKCS#8 PEM (never leaves the server)
    signing.pub              its public key, PEM; what devices install as their trust anchor
    cli.token                the local operator's API token (``edgefleet keys init`` creates "admin")
    broker-server.password   the server's own MQTT password (``edgefleet broker config`` creates it)
    broker-LOGIN.password    another server login's password (``--server-logins N``; read for [broker] peer_logins)

API tokens and device broker passwords are stored in the registry only as hashes: SHA-256 for
API tokens (they are 256-bit random, so a slow hash adds nothing), and mosquitto's own
``$7$`` PBKDF2-SHA512 format for broker passwords so the password file can be written
straight from the registry without ever storing a plaintext.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol.envelope import key_id, raw_public
from server.config import ServerPaths, private_home
from server.errors import ConfigError, KeyStoreError
from server.identity import SERVER_USER

SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
CLI_TOKEN = "cli.token"  # noqa: S105 - a file name
BROKER_SERVER_PASSWORD = "broker-server.password"  # noqa: S105 - a file name
#: PBKDF2 rounds for broker password hashes; the passwords are 128-bit random, so this only needs
#: to be a valid mosquitto value, not slow (mosquitto pays it on every CONNECT).
BROKER_HASH_ITERATIONS = 1000


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class SigningIdentity:
    key_id: str
    public_key_b64: str  # raw 32-byte Ed25519 public key, base64
    private_path: Path
    public_path: Path
    created: bool


def _keys_dir(paths: ServerPaths) -> Path:
    private_home(paths.home)
    paths.keys_dir.mkdir(parents=True, exist_ok=True)
    paths.keys_dir.chmod(0o700)
    return paths.keys_dir


def init_signing_key(paths: ServerPaths, *, force: bool = False) -> SigningIdentity:
    """Create the signing key pair unless it exists (``force`` replaces it: every device must be re-provisioned)."""
    directory = _keys_dir(paths)
    private_path, public_path = directory / SIGNING_KEY, directory / SIGNING_PUB
    if private_path.exists() and not force:
        key = load_signing_key(paths)
        created = False
    else:
        key = Ed25519PrivateKey.generate()
        atomic_write(
            private_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        created = True
    public = key.public_key()
    atomic_write(
        public_path,
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return SigningIdentity(
        key_id=key_id(public),
        public_key_b64=base64.b64encode(raw_public(public)).decode(),
        private_path=private_path,
        public_path=public_path,
        created=created,
    )


def load_signing_key(paths: ServerPaths) -> Ed25519PrivateKey:
    path = paths.keys_dir / SIGNING_KEY
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyStoreError(f"no signing key at {path}; run `edgefleet keys init` first") from exc
    except OSError as exc:
        raise KeyStoreError(f"cannot read signing key {path}: {exc}") from exc
    if path.stat().st_mode & 0o077:
        raise KeyStoreError(f"signing key {path} is readable by others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(f"signing key {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(f"signing key {path} is not an Ed25519 key")
    return key


def public_key_of(key: Ed25519PrivateKey) -> Ed25519PublicKey:
    return key.public_key()


# -- API tokens -------------------------------------------------------------------------------------


def new_token() -> str:
    return "eft_" + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_cli_token(paths: ServerPaths, token: str) -> Path:
    path = _keys_dir(paths) / CLI_TOKEN
    atomic_write(path, (token + "\n").encode())
    return path


def read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyStoreError(f"cannot read token file {path}: {exc}") from exc


# -- broker passwords ----------------------------------------------------------------------------------


def new_broker_password() -> str:
    return secrets.token_urlsafe(24)


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = BROKER_HASH_ITERATIONS) -> str:
    """mosquitto 2.x password-file hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, encoded: str) -> bool:
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations, salt = int(parts[2]), base64.b64decode(parts[3])
    except ValueError:
        return False
    return hmac.compare_digest(mosquitto_hash(password, salt=salt, iterations=iterations), encoded)


def server_password_file(login: str = SERVER_USER) -> str:
    """Where under keys/ the password of a server broker login lives (one login per server process)."""
    return BROKER_SERVER_PASSWORD if login == SERVER_USER else f"broker-{login}.password"


def server_broker_password(paths: ServerPaths, *, create: bool = True, login: str = SERVER_USER) -> str | None:
    """The server's own MQTT password for ``login`` (created on first use when ``create``)."""
    path = paths.keys_dir / server_password_file(login)
    existing = read_token_file(path)
    if existing or not create:
        return existing
    password = new_broker_password()
    atomic_write(_keys_dir(paths) / server_password_file(login), (password + "\n").encode())
    return password


def peer_broker_passwords(paths: ServerPaths, logins: tuple[str, ...]) -> dict[str, str]:
    """The broker password of every login in ``[broker] peer_logins`` (login -> password), from the files
    ``broker config --server-logins N`` wrote; ConfigError naming each missing file, so a server refuses to
    start rather than find out when a peer dies."""
    found = {login: read_token_file(paths.keys_dir / server_password_file(login)) for login in logins}
    missing = [str(paths.keys_dir / server_password_file(login)) for login, pw in found.items() if not pw]
    if missing:
        raise ConfigError(f"[broker] peer_logins: no password file for {len(missing)} login(s): {', '.join(missing)} "
                          "(copy them, 0600, from the home where `edgefleet broker config --server-logins N` ran)",
                          field="broker.peer_logins")
    return {login: pw for login, pw in found.items() if pw}
