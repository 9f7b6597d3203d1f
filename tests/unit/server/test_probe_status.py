"""What ``server.probe`` reads back from the registry: who answered, who refused, aliases, the timeout's names."""

from __future__ import annotations

import time
from pathlib import Path

from agent.protocol.measurement import Measurement
from agent.protocol.messages import Event, ModelRef
from server.probe import ProbePlan, probe_status, wait_probe
from server.registry.db import Database
from server.registry.fleet import FleetRegistry, IngestBatch

KEY = "A" * 43 + "="


def _registry(tmp_path: Path) -> FleetRegistry:
    r = FleetRegistry(Database(tmp_path / "registry.db"))
    r.migrate()
    for d in ("a", "b", "c", "d"):
        r.add_device(d, profile="rpi4", public_key=KEY, broker_hash=None)
    return r


def _probe(device: str, variant: str, p50: float) -> Measurement:
    return Measurement(device_id=device, ts=1.0, model="m", version=1, source="probe", runs=10, p50_ms=p50,
                       p95_ms=p50, variant=variant, probe_id="p1")


def test_answers_refusals_aliases_and_the_missing(tmp_path: Path) -> None:
    r = _registry(tmp_path)
    plan = ProbePlan("p1", "m", 1, "rpi4", ("a", "b", "c", "d"), ("fp32", "int8"), time.monotonic(),
                     aliases={"int8-copy": "int8"}, commands={"a": "ca", "b": "cb", "c": "cc", "d": "cd"})
    batch = IngestBatch(
        measurements=[_probe("a", "fp32", 10.0), _probe("a", "int8", 6.0), _probe("b", "fp32", 12.0),
                      _probe("b", "int8", 8.0), _probe("c", "fp32", 11.0)],
        events=[
            Event("b", 1.0, "e1", "probe.completed", "info", "done", model=ModelRef("m", 1),
                  data={"probe_id": "p1", "measured": ["fp32", "int8"], "failed": {}}),
            Event("c", 1.0, "e2", "command.result", "info", "no", command_id="cc",
                  data={"ok": False, "action": "probe", "message": "busy with probe p0"}),
            Event("d", 1.0, "e3", "probe.completed", "info", "other", data={"probe_id": "p0"}),  # another probe
        ],
    )
    r.write_ingest(batch, bucket_s=60)
    done, failed, measured = probe_status(r, plan)
    assert done == {"a", "b", "c"}  # a: every variant measured; b: completed; c: refused the command
    assert failed == {"c": {"*": "busy with probe p0"}}
    assert measured == {"fp32": 11.0, "int8": 7.0, "int8-copy": 7.0}
    outcome = wait_probe(r, plan, timeout_s=0)
    assert outcome.missing == ["d"] and outcome.answered == ["a", "b", "c"]
    assert outcome.evidence()["same_file"] == {"int8-copy": "int8"}
