"""``[broker] peer_logins``: the server logins a survivor may take a dead peer's session over with, on a broker
that binds client id to login (docs/scale.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import config_from_mapping, load_config
from server.errors import ConfigError
from server.keys import atomic_write, peer_broker_passwords, server_broker_password

SECURED = {"username": "edgefleet-server", "shared_subscriptions": True}


def test_peer_logins_parse_from_toml(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text('[broker]\nusername = "edgefleet-server"\nshared_subscriptions = true\n'
                                          'peer_logins = ["edgefleet-server", "edgefleet-server-2"]\n')
    assert load_config(tmp_path).broker.peer_logins == ("edgefleet-server", "edgefleet-server-2")


@pytest.mark.parametrize("broker, why", [
    ({"peer_logins": ["edgefleet-server-2"], "shared_subscriptions": True}, "needs \\[broker\\] username"),
    ({"peer_logins": ["edgefleet-server-2"], "username": "edgefleet-server"}, "shared_subscriptions"),
    (SECURED | {"peer_logins": ["edgefleet-server-2"], "client_id": "other"}, "client_id empty"),
    (SECURED | {"peer_logins": ["a", "a"]}, "twice"),
    (SECURED | {"peer_logins": ["a b"]}, "letters, digits"),
    (SECURED | {"peer_logins": [""]}, "1..64"),
    (SECURED | {"peer_logins": "edgefleet-server-2"}, "expected tuple"),
])
def test_bad_peer_logins_are_refused_with_the_field(tmp_path: Path, broker: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        config_from_mapping(tmp_path, {"broker": broker})
    assert info.value.field == "broker.peer_logins"


def test_every_peer_password_is_read_and_a_missing_one_is_named_without_any_secret(tmp_path: Path) -> None:
    paths = config_from_mapping(tmp_path, {}).paths
    one = server_broker_password(paths)
    atomic_write(paths.keys_dir / "broker-edgefleet-server-2.password", b"second-secret\n")
    assert peer_broker_passwords(paths, ("edgefleet-server", "edgefleet-server-2")) == {
        "edgefleet-server": one, "edgefleet-server-2": "second-secret"}
    assert peer_broker_passwords(paths, ()) == {}
    with pytest.raises(ConfigError, match=r"broker-edgefleet-server-3\.password") as info:
        peer_broker_passwords(paths, ("edgefleet-server", "edgefleet-server-2", "edgefleet-server-3"))
    assert info.value.field == "broker.peer_logins"
    assert "second-secret" not in str(info.value) and str(one) not in str(info.value)
