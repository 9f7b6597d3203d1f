"""``[broker] shards``: several independent brokers in the server config (docs/scale.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import config_from_mapping, load_config
from server.errors import ConfigError


def test_shards_parse_from_toml_and_replace_url(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text('[broker]\nshards = ["mqtt://127.0.0.1:1883", "mqtts://mq1.example.com:8883"]\n')
    config = load_config(tmp_path)
    assert config.broker.shards == ("mqtt://127.0.0.1:1883", "mqtts://mq1.example.com:8883")
    assert config.broker.urls == config.broker.shards
    assert config_from_mapping(tmp_path, {}).broker.urls == ("mqtt://127.0.0.1:1883",)


@pytest.mark.parametrize("shards, why", [
    (["http://a:1"], "mqtt://"),
    (["mqtt://a:1", "mqtt://a:1"], "twice"),
    (["mqtt://a:99999"], "port"),
    ("mqtt://a:1", "expected tuple"),
    ([1, 2], "expected tuple"),
])
def test_bad_shards_are_refused_with_the_field(tmp_path: Path, shards: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        config_from_mapping(tmp_path, {"broker": {"shards": shards}})
    assert info.value.field == "broker.shards"
