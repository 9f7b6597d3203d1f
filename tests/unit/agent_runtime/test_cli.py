"""``edgefleet-agent init`` / ``install-service`` / ``status`` on real files (no broker, no agent running)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cli import main
from agent.protocol.shards import shard_of
from agent.runtime.config import load_config
from agent.runtime.keys import fingerprint, load_device_key, load_trust_anchor


def server_key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "from-operator.pub"
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key, path


def init(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    _, pub = server_key(tmp_path)
    (tmp_path / "pw.txt").write_text("device-secret\n")
    config = tmp_path / "etc" / "agent.toml"
    code = main(
        [
            "init",
            "--device-id", "pi-0042",
            "--profile", "rpi4-aarch64-tflite-int8",
            "--server-key", str(pub),
            "--broker", "mqtt.example.com:8883",
            "--tls",
            "--username", "pi-0042",
            "--password-file", str(tmp_path / "pw.txt"),
            "--config", str(config),
            "--store-dir", str(tmp_path / "store"),
            *extra,
        ]
    )  # fmt: skip
    return code, config


def test_init_writes_keys_and_a_loadable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, config_path = init(tmp_path)
    assert code == 0
    config = load_config(config_path)
    assert (config.device_id, config.broker.host, config.broker.port, config.broker.tls) == (
        "pi-0042",
        "mqtt.example.com",
        8883,
        True,
    )
    assert config.broker.password == "device-secret"
    device_key = config.keys.device_key
    for secret in (device_key, config_path.parent / "mqtt-password"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    out = capsys.readouterr().out
    assert fingerprint(load_device_key(device_key).public_key()) in out
    assert len(load_trust_anchor(config.keys.server_keys).keys) == 1
    assert "device-secret" not in config_path.read_text()

    # a second init refuses to overwrite, and --force keeps the device key (the server knows it)
    before = device_key.read_bytes()
    assert init(tmp_path)[0] == 78
    assert init(tmp_path, "--force")[0] == 0
    assert device_key.read_bytes() == before


def test_init_with_shard_brokers_keeps_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    brokers = ["mq0.example.com:8883", "mq1.example.com:8884", "mq2.example.com:8885"]
    code, config_path = init(tmp_path, "--broker", ",".join(brokers))  # the last --broker wins
    assert code == 0
    config = load_config(config_path)
    own = brokers[shard_of("pi-0042", 3)]
    assert f"{config.broker.host}:{config.broker.port}" == own
    assert f"broker shard for pi-0042: {own}" in capsys.readouterr().out


def test_install_service_renders_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, config_path = init(tmp_path)
    capsys.readouterr()
    assert main(["install-service", "--config", str(config_path), "--print", "--user", "edge"]) == 0
    unit = capsys.readouterr().out
    assert f"run --config {config_path}" in unit
    assert "@" not in unit.replace("@system-service", ""), "every placeholder is filled"
    assert "User=edge" in unit and "Restart=always" in unit and "NoNewPrivileges=yes" in unit
    assert f"ReadWritePaths={tmp_path / 'store'}" in unit
    target = tmp_path / "edgefleet-agent.service"
    assert main(["install-service", "--config", str(config_path), "--path", str(target)]) == 0
    assert target.read_text() == unit.replace("User=edge", "User=root")


def test_status_of_a_device_that_never_ran(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, config_path = init(tmp_path)
    capsys.readouterr()
    assert main(["status", "--config", str(config_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is False
    assert status["committed"] is None and status["kept"] == []
    assert main(["status", "--config", str(config_path)]) == 0
    assert "not running" in capsys.readouterr().out


def test_config_errors_exit_78_and_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "x"\nprofile = "p"\nstore_dir = "s"\n[models]\nkeep_versions = 0\n')
    assert main(["status", "--config", str(bad)]) == 78
    assert "models.keep_versions" in capsys.readouterr().err
