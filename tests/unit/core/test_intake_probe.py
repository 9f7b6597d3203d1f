"""The intake parses a probe command's arguments once, for the agent's runtime and the simulator alike."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.intake import Answered, Intake, KeptVersions
from agent.core.lifecycle import Seen, UpdateMachine
from agent.core.trust import TrustState
from agent.protocol.envelope import TrustAnchor
from agent.protocol.messages import Command, ModelRef

NOW = 1_900_000_000.0


class _NothingKept:
    def committed_refs(self, name: str | None = None) -> list[ModelRef]:
        return []

    def committed_artifact(self, ref: ModelRef) -> str | None:
        return None


def _decide(args: dict[str, Any]) -> object:
    intake = Intake(TrustState(TrustAnchor({}), device_id="d"))
    cmd = Command("d", 7, NOW - 1, NOW + 60, "c-7", "probe", args=args)
    kept: KeptVersions = _NothingKept()
    return intake.command(cmd, UpdateMachine(), kept, NOW)


@pytest.mark.parametrize("args", [{}, {"probe": {"variants": []}}, {"probe": "not an object"}])
def test_a_probe_whose_arguments_do_not_parse_is_answered_bad_probe(args: dict[str, Any]) -> None:
    decision = _decide(args)
    assert isinstance(decision, Answered)
    assert not decision.ok
    assert decision.message.startswith("bad probe: ")
    assert decision.seen == Seen(NOW, 7)
    assert decision.error is None
