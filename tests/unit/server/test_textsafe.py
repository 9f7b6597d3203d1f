"""Untrusted strings on the operator's terminal (server/textsafe.py) and the CLI that shows them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from server.cli import main as edgefleet
from server.config import load_config
from server.keys import init_signing_key
from server.registry.fleet import EnrollmentRequest, open_registry
from server.textsafe import clean, safe, untrusted

HOSTILE = "[/]\x1b[2J[bold red]FAKE[/]\r\u202eevil"


def test_clean_and_safe() -> None:
    assert "\x1b" not in clean(HOSTILE) and "\r" not in clean(HOSTILE) and "\u202e" not in clean(HOSTILE)
    assert clean("a\nb") == "a b" and clean("a\nb", multiline=True) == "a\nb"
    assert safe("[/]") == "\\[/]"
    assert untrusted({"k\x07": ["x\x1by", 3]}) == {"k\ufffd": ["x\ufffdy", 3]}


def test_devices_pending_shows_a_hostile_hostname_literally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    init_signing_key(load_config(home).paths)
    registry = open_registry(load_config(home))
    with registry.tx() as tx:
        registry.record_enroll_request(EnrollmentRequest(
            device_id="dev-x", public_key="A" * 43 + "=", fingerprint="ab:cd", profile="rpi4", agent_version=HOSTILE,
            arch="[link=http://x]arm[/link]", hostname=HOSTILE, requested_at=time.time(), received_at=time.time(),
            status="pending"), tx=tx)
    registry.db.close()
    assert edgefleet(["--home", str(home), "devices", "pending"]) == 0  # a hostname `[/]` used to crash it
    out = capsys.readouterr().out
    assert "[/]" in out and "FAKE" in out and "\x1b[2J" not in out and "\u202e" not in out
