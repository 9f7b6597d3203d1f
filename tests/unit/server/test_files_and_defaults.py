"""Private server home, TLS on by default on the agent, one model-name rule for server and agent."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.errors import MalformedMessageError
from agent.protocol.messages import ModelRef
from server.cli import main as edgefleet
from server.config import load_config
from server.errors import InvalidRequestError
from server.refs import parse_model_ref, parse_ref
from server.registry.fleet import open_registry


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_home_is_private_and_so_is_everything_written_under_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert edgefleet(["--home", str(home), "keys", "init"]) == 0
    assert _mode(home) == 0o700
    for f in (p for p in home.rglob("*") if p.is_file()):
        assert _mode(f) & 0o077 == 0, f"{f} is {oct(_mode(f))}"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    open_registry(load_config(shared)).db.close()
    assert _mode(shared) == 0o700, "an existing home is tightened"


@pytest.mark.parametrize("name", ["..", "a..b", "../x", "a/b", "a\\b", "é", "x٣", ".hidden", "", "x" * 65])
def test_agent_and_server_refuse_the_same_model_names(name: str) -> None:
    with pytest.raises(MalformedMessageError):
        ModelRef(name, 1)
    with pytest.raises(MalformedMessageError):
        ModelRef.from_dict({"name": name, "version": 1})
    with pytest.raises(InvalidRequestError):
        parse_model_ref(f"{name}:1")
    with pytest.raises(InvalidRequestError):
        parse_ref(f"{name}:1")


def test_ordinary_model_names_pass_both() -> None:
    assert ModelRef("digits-cnn_v2.1", 3).name == "digits-cnn_v2.1"
    assert parse_model_ref("digits-cnn_v2.1:3") == ("digits-cnn_v2.1", 3)


@pytest.mark.parametrize("ref", ["digits:v3", "digits:0", "digits:-1", "digits:3.0", "digits: 3", "digits:\u0661",
                                 "digits:99999999999", "digits"])
def test_one_model_version_grammar_refuses_what_it_refused_anywhere(ref: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_model_ref(ref)


def test_cli_api_and_service_share_the_parser() -> None:
    import server.commands.models as models_cli
    import server.commands.simulate as simulate_cli
    import server.registry.catalog as catalog
    import server.service as service

    assert all(getattr(m, "parse_model_ref") is parse_model_ref for m in (service, simulate_cli))  # noqa: B009
    assert all(getattr(m, "parse_ref") is parse_ref for m in (catalog, models_cli))  # noqa: B009
    assert parse_model_ref(" digits:3 ") == ("digits", 3)
