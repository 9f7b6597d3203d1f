"""Running and configuring MQTT brokers: a private mosquitto (tests, benchmarks, demo) and configs.

``MosquittoBroker`` starts a mosquitto on a free loopback port with a generated config that
always sets ``set_tcp_nodelay true`` (without it, QoS 1 with paho stalls on delayed ACKs:
~17 msg/s measured here instead of ~3,000). ``BrokerSecurity`` adds TLS (a generated CA and
server certificate), per-client username/password and an ACL in which a device reads only its
own down-topics and the shared artifact topics, and writes only its own up-topics.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.protocol.envelope import MAX_CHUNK_MESSAGE
from agent.protocol.messages import MAX_CONTROL_MESSAGE
from agent.protocol.topics import MAX_TOPIC_LENGTH, ROOT, Channel
from server.identity import SERVER_USER

__all__ = ["SERVER_USER"]

#: The largest MQTT packet the protocol needs: a full chunk (1 MiB + header + tag, the largest chunk
#: any profile may use) or a control message, plus the fixed header, topic and packet id. mosquitto's
#: ``max_packet_size`` is one global limit, so devices are held to this; their own messages are capped
#: much lower again when the server decodes them.
PROTOCOL_MAX_PACKET = max(MAX_CHUNK_MESSAGE, MAX_CONTROL_MESSAGE) + 5 + 2 + MAX_TOPIC_LENGTH + 2


class BrokerError(RuntimeError):
    """mosquitto is missing, failed to start, or exited."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


#: how many ports the first start of a broker tries when the picked one was taken before mosquitto bound it
BIND_ATTEMPTS = 5


def _listen_inodes(host: str, port: int) -> set[str] | None:
    """Socket inodes listening on ``host:port`` (IPv4) from /proc/net/tcp; None where there is no /proc."""
    try:
        address = int(ipaddress.IPv4Address(host))
        table = Path("/proc/net/tcp").read_text()
    except (OSError, ValueError):  # no /proc, or a name or an IPv6 address
        return None
    want = f"{socket.htonl(address):08X}:{port:04X}"
    any_addr = f"00000000:{port:04X}"
    inodes = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[1] in (want, any_addr) and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(fields[9])
    return inodes


def listens(pid: int, host: str, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``host:port``: a connection that succeeds proves only that
    some process does (another one may have taken a picked port). Without /proc, a connection it is."""
    inodes = _listen_inodes(host, port)
    if inodes is None:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        return False
    if not inodes:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for fd in fds:
        with contextlib.suppress(OSError):
            if str(fd.readlink()) in wanted:
                return True
    return False


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")


def current_user() -> str:
    """The account this process runs as (what test and benchmark brokers run under)."""
    return pwd.getpwuid(os.getuid()).pw_name


#: Who the generated production config makes mosquitto run as: the Debian package's account.
DEFAULT_RUN_AS = "mosquitto"


def device_acl_lines() -> list[str]:
    """What a device (username = device id) may do: exactly the leaf topics of agent/protocol/topics.py.

    Reads: its own desired, cmd and chunk/{artifact}; the shared art/{artifact}. Writes: its own
    up-leaves. No ``#``: a device can keep at most one retained message per up-leaf, and nothing
    outside the layout can be published or stored under its name."""
    lines = []
    for channel in Channel:
        if channel is Channel.ARTIFACT:
            lines.append(f"pattern read {ROOT}/art/+")
        elif channel is Channel.CHUNK:
            lines.append(f"pattern read {ROOT}/dev/%u/{channel.value}/+")
        else:
            access = "read" if channel.value.startswith("down/") else "write"
            lines.append(f"pattern {access} {ROOT}/dev/%u/{channel.value}")
    return lines


def acl_text(server_logins: Sequence[str] = (SERVER_USER,)) -> str:
    """Device isolation by username (= device id); the server's logins may do everything under the root."""
    servers = "".join(f"user {login}\ntopic readwrite {ROOT}/#\ntopic read $SYS/#\n\n" for login in server_logins)
    return (
        servers
        + "# every other user is a device named by its id, limited to the protocol's leaf topics\n"
        + "".join(line + "\n" for line in device_acl_lines())
    )


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_tls(directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> TLSFiles:
    """A private CA and a server certificate for ``hosts`` (test and demo use; bring your own in production)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.server_key.chmod(0o600)
    return files


@dataclass(frozen=True)
class BrokerSecurity:
    """TLS + password file + ACL. ``users`` maps username -> password (server user and device ids).

    With ``hashed=True`` the values are already mosquitto password hashes (``$7$...``, see
    ``server.keys.mosquitto_hash``): the registry never stores device passwords in clear.
    """

    tls: TLSFiles | None
    users: Mapping[str, str]
    acl: str = field(default_factory=acl_text)
    hashed: bool = False
    #: ``use_username_as_clientid``: a login can only ever be its own client id, so one device cannot
    #: take over another's session (kick it, fire its Will, wipe its queued messages)
    bind_client_id: bool = True


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """Plain ``user:password`` lines hashed in place by ``mosquitto_passwd -U``."""
    path.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    path.chmod(0o600)
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True)


def write_password_hashes(path: Path, hashes: Mapping[str, str]) -> None:
    """A mosquitto password file from precomputed hashes (0600, written atomically)."""
    for user, hashed in hashes.items():
        if ":" in user or "\n" in user or not hashed.startswith("$7$"):
            raise BrokerError(f"refusing to write password entry for {user!r}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))
    tmp.chmod(0o600)
    tmp.replace(path)


def render_config(
    *,
    port: int,
    host: str = "127.0.0.1",
    workdir: Path,
    run_as: str,
    security: BrokerSecurity | None = None,
    persistence: bool = False,
    max_packet_size: int = PROTOCOL_MAX_PACKET,
    max_queued_messages: int = 10_000,
    max_inflight_messages: int = 100,
    max_queued_bytes: int = 0,
) -> str:
    """A mosquitto.conf; ``run_as`` is the account mosquitto switches to when started as root (it must be
    able to read the 0600 files written here: ``passwd``, the TLS key). Started as another user,
    mosquitto ignores it and stays that user."""
    if not run_as or any(c.isspace() for c in run_as):
        raise BrokerError(f"invalid user name {run_as!r} for mosquitto to run as")
    lines = [
        "# generated by edgefleet",
        "per_listener_settings false",
        f"listener {port} {host}",
        "set_tcp_nodelay true",
        f"max_packet_size {max_packet_size}",
        f"max_queued_messages {max_queued_messages}",
        f"max_inflight_messages {max_inflight_messages}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {workdir}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "sys_interval 1",
        f"user {run_as}",
    ]
    if max_queued_bytes:
        # per client, beyond the in-flight window: a slow or offline persistent session subscribed to a
        # shared chunk stream drops what exceeds it (the device re-requests missing chunks) instead of the
        # broker holding every chunk for every laggard
        lines.append(f"max_queued_bytes {max_queued_bytes}")
    if security is None:
        lines.append("allow_anonymous true")
    else:
        if security.tls is not None:
            lines += [
                f"cafile {security.tls.ca_cert}",
                f"certfile {security.tls.server_cert}",
                f"keyfile {security.tls.server_key}",
                "tls_version tlsv1.2",
            ]
        passwd = workdir / "passwd"
        if security.hashed:
            write_password_hashes(passwd, security.users)
        else:
            write_password_file(passwd, security.users)
        acl = workdir / "acl"
        acl.write_text(security.acl)
        lines += ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
        if security.bind_client_id:
            lines.append("use_username_as_clientid true")
    return "\n".join(lines) + "\n"


def hand_over(user: str, paths: list[Path]) -> bool:
    """Make ``paths`` owned by ``user`` when we are root (mosquitto, started as root, switches to that user
    before it reads its password file and TLS key); False when there was nothing to do (not root, or root)."""
    if os.geteuid() != 0 or user == "root":
        return False
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise BrokerError(
            f"there is no user {user!r} on this machine for mosquitto to run as: install the mosquitto package "
            "(it creates the 'mosquitto' account) or pass --run-as USER"
        ) from None
    for p in paths:
        if p.exists():
            os.chown(p, account.pw_uid, account.pw_gid)
    return True


class MosquittoBroker:
    """A private mosquitto process on loopback. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        workdir: Path | None = None,
        security: BrokerSecurity | None = None,
        persistence: bool = False,
        max_inflight_messages: int = 100,
        max_queued_bytes: int = 0,
        run_as: str | None = None,
    ) -> None:
        self.host = host
        #: a private broker stays the invoking user (the files it writes are 0600 and its own)
        self.run_as = run_as or current_user()
        self.max_queued_bytes = max_queued_bytes
        #: QoS 1 messages in flight per client; each one holds a copy of its payload in mosquitto, so with
        #: thousands of subscribers to 64 KiB chunks this bounds the broker's memory (bench_fleet uses 10)
        self.max_inflight_messages = max_inflight_messages
        #: picked here when not given; if another process takes it before mosquitto binds it, the first
        #: start() picks another (so read it after start())
        self.port = port or free_port(host)
        self._port_given = port is not None
        self._started = False
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edgefleet-mosquitto-"))
        self.security = security
        self.persistence = persistence
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.security and self.security.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> MosquittoBroker:
        """Start mosquitto and return once it listens on ``port`` itself (not merely some process there).

        A port picked by ``free_port`` is free only when picked: another process can bind it before
        mosquitto does, and mosquitto then exits with "Address already in use". The first start of a
        broker whose port was not given then picks another port and tries again (up to
        ``BIND_ATTEMPTS`` times); a restart keeps its port (clients are configured with it) and fails.
        ``timeout`` only catches a hang: the wait ends as soon as mosquitto listens or exits."""
        for attempt in range(1, BIND_ATTEMPTS + 1):
            offset = self._spawn()
            error = self._wait_listening(timeout)
            if error is None:
                self._started = True
                return self
            lost_port = "Address already in use" in self._log_since(offset)
            if not lost_port or self._port_given or self._started or attempt == BIND_ATTEMPTS:
                raise BrokerError(error)
            self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _spawn(self) -> int:
        binary = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            render_config(
                port=self.port,
                host=self.host,
                workdir=self.workdir,
                run_as=self.run_as,
                security=self.security,
                persistence=self.persistence,
                max_inflight_messages=self.max_inflight_messages,
                max_queued_bytes=self.max_queued_bytes,
            )
        )
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log,
                                            start_new_session=True)
        return offset

    def _wait_listening(self, timeout: float) -> str | None:
        """None once our mosquitto listens on ``port``; else why not (it exited, or hung: then it is stopped)."""
        proc = self.process
        assert proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.process = None
                return f"mosquitto exited with {proc.returncode} (port {self.port}): {self.log_tail()}"
            if listens(proc.pid, self.host, self.port):
                return None
            time.sleep(0.02)
        self.stop()
        return f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s: {self.log_tail()}"

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, or SIGKILL with ``kill=True``); the port stays reserved for restart()."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def mosquitto_available() -> bool:
    try:
        find_mosquitto()
    except BrokerError:
        return False
    return os.access(find_mosquitto(), os.X_OK)
