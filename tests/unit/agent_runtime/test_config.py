"""Agent configuration: defaults, relative paths, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.runtime.config import AgentConfig, BrokerConfig, KeysConfig, load_config, render_config

MINIMAL = 'device_id = "pi-0042"\nprofile = "rpi4-aarch64-tflite-int8"\nstore_dir = "store"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.device_id == "pi-0042"
    assert config.store_dir == tmp_path / "store", "relative paths are relative to the config file"
    assert config.keys.device_key == tmp_path / "device.key"
    assert config.models.keep_versions == 3
    assert config.transfer.chunk_timeout_s == 5.0
    assert (config.broker.host, config.broker.port, config.broker.tls) == ("127.0.0.1", 8883, True), "TLS by default"
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8080)
    assert config.log.format == "json"
    assert config.lifecycle.latency_scale == 1.0, "real budgets unless a board says it is slower"


def test_plain_mqtt_must_be_asked_for_and_changes_the_default_port(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "[broker]\ntls = false\n"))
    assert (config.broker.port, config.broker.tls) == (1883, False)


def test_tls_changes_the_default_port_and_password_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    config = load_config(write(tmp_path, MINIMAL + '[broker]\ntls = true\npassword_file = "pw"\nusername = "pi"\n'))
    assert config.broker.port == 8883
    assert config.broker.password == "s3cret"
    assert "s3cret" not in repr(config), "secrets stay out of logs"


#: (config text, the field its error names): bad values after a valid minimal config, then bad identities
BAD_CONFIGS = [
    (MINIMAL + "[models]\nkeep_versions = 0\n", "models.keep_versions"),
    (MINIMAL + '[models]\nkeep_versions = "3"\n', "models.keep_versions"),
    (MINIMAL + "[transfer]\nchunk_timeout_s = -1\n", "transfer.chunk_timeout_s"),
    (MINIMAL + "[transfer]\nchunk_timeout_s = 10\nchunk_timeout_max_s = 5\n", "transfer.chunk_timeout_max_s"),
    (MINIMAL + "[broker]\nport = 70000\n", "broker.port"),
    (MINIMAL + '[broker]\ntls = "yes"\n', "broker.tls"),
    (MINIMAL + '[broker]\npassword = "a"\npassword_file = "b"\n', "broker.password"),
    (MINIMAL + '[broker]\nclient_cert = "c.pem"\n', "broker.client_cert"),
    (MINIMAL + '[log]\nformat = "xml"\n', "log.format"),
    (MINIMAL + "[telemetry]\nintervall_s = 5\n", "telemetry.intervall_s"),
    (MINIMAL + "surprise = 1\n", "surprise"),
    (MINIMAL + "[http]\nport = true\n", "http.port"),
    (MINIMAL + "[lifecycle]\nlatency_scale = 0.5\n", "lifecycle.latency_scale"),
    ('profile = "p"\nstore_dir = "s"\n', "device_id"),
    ('device_id = "has space"\nprofile = "p"\nstore_dir = "s"\n', "device_id"),
    ('device_id = "d"\nstore_dir = "s"\n', "profile"),
]


@pytest.mark.parametrize(("text", "field"), BAD_CONFIGS)
def test_bad_values_name_their_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.field == field, info.value.message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "device_id = \n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_rendered_config_loads_back_identically(tmp_path: Path) -> None:
    original = AgentConfig(
        device_id="jetson-7",
        profile="jetson-orin-onnx-fp16",
        store_dir=tmp_path / "store",
        broker=BrokerConfig(host="mqtt.local", port=8883, tls=True, ca_cert=tmp_path / "ca.crt", username="jetson-7"),
        keys=KeysConfig(device_key=tmp_path / "device.key", server_keys=(tmp_path / "a.pub", tmp_path / "b.pub")),
    )
    path = write(tmp_path, render_config(original))
    loaded = load_config(path)
    assert (loaded.device_id, loaded.profile, loaded.store_dir) == (
        "jetson-7",
        "jetson-orin-onnx-fp16",
        tmp_path / "store",
    )
    assert loaded.broker == original.broker
    assert loaded.keys == original.keys
    assert loaded.models == original.models
    assert loaded.transfer == original.transfer
    assert loaded.http == original.http


def test_latency_scale_is_read_and_rendered(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "[lifecycle]\nlatency_scale = 50\n"))
    assert config.lifecycle.latency_scale == 50.0
    assert load_config(write(tmp_path, render_config(config))).lifecycle.latency_scale == 50.0


def test_warm_standby_defaults_on_and_round_trips(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).models.warm_standby is True
    config = load_config(write(tmp_path, MINIMAL + "[models]\nwarm_standby = false\n"))
    assert config.models.warm_standby is False
    assert load_config(write(tmp_path, render_config(config))).models.warm_standby is False
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + '[models]\nwarm_standby = "no"\n'))
    assert err.value.field == "models.warm_standby"


def test_a_minimal_config_gets_the_dataclass_defaults() -> None:
    """The defaults are written once (the dataclasses); the parser reads them from ``DEFAULTS``."""
    import dataclasses

    from agent.runtime.config import DEFAULTS, parse_config

    config = parse_config({"device_id": "d1", "profile": "p", "store_dir": "/var/lib/x"}, base=Path("/etc/x"))
    for section in dataclasses.fields(config):
        got, want = getattr(config, section.name), getattr(DEFAULTS, section.name)
        if not dataclasses.is_dataclass(got) or section.name == "keys":  # keys: paths resolve against ``base``
            continue
        assert got == want, section.name
    assert config.keys.device_key == Path("/etc/x") / DEFAULTS.keys.device_key
