"""Server configuration (TOML, frozen, validated) and key files (0600, atomic, mosquitto hashes)."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from agent.protocol.envelope import TrustAnchor, verify_payload
from server.config import ServerConfig, config_from_mapping, load_config
from server.errors import ConfigError, KeyStoreError
from server.keys import (
    atomic_write,
    init_signing_key,
    load_signing_key,
    mosquitto_hash,
    mosquitto_verify,
    server_broker_password,
)


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = load_config(tmp_path)
    assert cfg.broker.port == 1883 and not cfg.broker.tls
    assert cfg.rollout.canary_percent == 10.0 and cfg.publisher.max_inflight == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rollout.tick_s = 1.0  # type: ignore[misc]


def test_toml_file_is_read_and_coerced(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text(
        '[broker]\nurl = "mqtts://broker.example:8884"\nusername = "edgefleet-server"\n'
        "[rollout]\ncanary_percent = 5\nprobation_s = 30\n[api]\nport = 9000\n"
    )
    cfg = load_config(tmp_path)
    assert cfg.broker.tls and cfg.broker.host == "broker.example" and cfg.broker.port == 8884
    assert cfg.rollout.canary_percent == 5.0 and isinstance(cfg.rollout.canary_percent, float)
    assert cfg.rollout.probation_s == 30.0 and cfg.api.port == 9000


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"rollout": {"canary_percent": 150}}, "rollout.canary_percent"),
        ({"rollout": {"wave_percent": 0}}, "rollout.wave_percent"),
        ({"rollout": {"tick_s": 5.0, "lease_ttl_s": 8.0}}, "rollout.lease_ttl_s"),
        ({"broker": {"url": "http://x"}}, "broker.url"),
        ({"broker": {"keepalive_s": "30"}}, "broker.keepalive_s"),
        ({"publisher": {"resign_margin_s": 10 * 86400}}, "publisher.resign_margin_s"),
        ({"publisher": {"broadcast": 1}}, "publisher.broadcast"),
        ({"rollout": {"canary": 5}}, "rollout.canary"),
        ({"nonsense": {}}, "nonsense"),
        ({"client": {"server": "ftp://x"}}, "client.server"),
    ],
)
def test_invalid_values_name_their_field(tmp_path: Path, data: dict[str, dict[str, object]], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(tmp_path, data)
    assert info.value.field == field


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text("[broker\nurl=")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path, tmp_path / "missing.toml")


def test_signing_key_is_private_atomic_and_stable(tmp_path: Path) -> None:
    paths = ServerConfig(home=tmp_path).paths
    ident = init_signing_key(paths)
    assert ident.created
    assert stat.S_IMODE(ident.private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.keys_dir.stat().st_mode) == 0o700
    again = init_signing_key(paths)
    assert not again.created and again.key_id == ident.key_id
    key = load_signing_key(paths)
    from agent.protocol.envelope import sign_payload

    blob = sign_payload("command", b"{}", key)
    assert verify_payload(blob, "command", TrustAnchor.of(key.public_key())) == b"{}"
    ident.private_path.chmod(0o644)
    with pytest.raises(KeyStoreError, match="readable by others"):
        load_signing_key(paths)
    shutil.rmtree(paths.keys_dir)
    with pytest.raises(KeyStoreError, match="keys init"):
        load_signing_key(paths)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "d" / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["f"]


def test_mosquitto_hash_is_accepted_by_mosquittos_own_format(tmp_path: Path) -> None:
    encoded = mosquitto_hash("s3cret")
    assert encoded.startswith("$7$") and mosquitto_verify("s3cret", encoded)
    assert not mosquitto_verify("wrong", encoded)
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed (the mosquitto package provides it)")
    pw = tmp_path / "pw"
    pw.write_text("u:s3cret\n")
    subprocess.run([tool, "-U", str(pw)], check=True)
    theirs = pw.read_text().strip().split(":", 1)[1]
    assert mosquitto_verify("s3cret", theirs)  # we verify what mosquitto hashed


def test_server_broker_password_is_created_once(tmp_path: Path) -> None:
    paths = ServerConfig(home=tmp_path).paths
    assert server_broker_password(paths, create=False) is None
    first = server_broker_password(paths)
    assert first and server_broker_password(paths) == first
    assert stat.S_IMODE((paths.keys_dir / "broker-server.password").stat().st_mode) == 0o600
