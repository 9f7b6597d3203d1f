"""Probe builds: every gate-passing candidate timed on a few of the profile's own devices, then chosen again.

``start_probe`` seals each passing candidate of a fresh build (its file still in the build share) as an
artifact, grants the target devices those artifacts (``probe_artifacts``, so the chunk scheduler serves
them) and queues one signed ``probe`` command per device whose args carry every variant with its data key
wrapped to that device (agent/protocol/probe.py). The devices fetch, load in a side slot, benchmark under
their CPU budget, report ``measurement`` messages (``source: "probe"``) and delete the files.
``wait_probe`` watches the registry (observable state: the measurements and ``probe.completed`` events
that ingest wrote) until every device answered or the timeout passed, and names the devices that did not.
The caller then builds again with the measured figures (``BuildOptions.measured``): the share makes that
re-selection cheap, and the provenance records the evidence (``selection.probe``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.envelope import wrap_key
from agent.protocol.messages import ArtifactInfo, ModelRef, RuntimeSpec
from agent.protocol.probe import MAX_PROBE_VARIANTS, ProbeRequest, ProbeVariant
from server.builds import Build
from server.compression.pipeline import Candidate, ProfileResult
from server.errors import InvalidRequestError
from server.measured import measured_latency
from server.profiles import DeviceProfile
from server.registry.devices import DEVICE_ACTIVE
from server.registry.fleet import ArtifactRecord, StoredCommand
from server.rollout.driver import parse_target
from server.signing import device_public_key

#: how long a device may fetch a probe's artifacts, and how long its command stays valid
PROBE_TTL_S = 3600.0
PROBE_COMPRESSION = "zlib"  # quick to make on the server, and what a board undoes fastest


@dataclass(frozen=True)
class ProbePlan:
    probe_id: str
    model: str
    version: int
    profile: str
    devices: tuple[str, ...]
    variants: tuple[str, ...]  # the variants sent (one per distinct artifact)
    started: float
    #: a candidate whose file is byte-identical to a sent one's (e.g. two calibration methods that agree):
    #: measured through that one
    aliases: Mapping[str, str] = field(default_factory=dict)
    commands: Mapping[str, str] = field(default_factory=dict)  # device -> command id


@dataclass
class ProbeOutcome:
    plan: ProbePlan
    answered: list[str]
    missing: list[str]
    measured: dict[str, float]  # variant -> median probe p50 over the devices
    seconds: float
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> variant -> reason

    def evidence(self) -> dict[str, Any]:
        """What the provenance keeps (``selection.probe``)."""
        return {"probe_id": self.plan.probe_id, "devices": list(self.plan.devices), "answered": self.answered,
                "missing": self.missing, "variants": list(self.plan.variants), "same_file": dict(self.plan.aliases),
                "measured_p50_ms": self.measured,
                "failed": self.failed, "seconds": round(self.seconds, 3)}


def _runtime_for(result: ProfileResult, c: Candidate) -> RuntimeSpec:
    extra = {**result.runtime.extra, "precision": c.recipe.precision}
    if c.opset:
        extra["opset"] = c.opset
    return dataclasses.replace(result.runtime, extra=extra)


def start_probe(
    service: Any, result: ProfileResult, *, model: str, version: int, profile: DeviceProfile, target: str,
    actor: str, ttl_s: float = PROBE_TTL_S, clock: Callable[[], float] = time.time,
) -> ProbePlan:
    """Seal the passing candidates and queue a signed ``probe`` command to each of ``target``'s devices."""
    registry = service.registry
    kind, value = parse_target(target)
    devices = [d for d in registry.target_devices(kind, value)
               if d.status == DEVICE_ACTIVE and d.profile == profile.id and d.public_key]
    if not devices:
        raise InvalidRequestError(f"target {target} has no active {profile.id} device with an enrolled key to probe")
    candidates = [c for c in result.candidates if c.passed and c.path is not None and c.path.exists()]
    if not candidates:
        raise InvalidRequestError(f"no candidate of {model}:{version} passed the gate for {profile.id}")
    candidates = candidates[:MAX_PROBE_VARIANTS]
    health = dataclasses.replace(result.health, golden=())  # the chosen variant's outputs say nothing of others
    sealed: list[tuple[Candidate, ArtifactRecord, RuntimeSpec]] = []
    aliases: dict[str, str] = {}
    for c in candidates:
        assert c.path is not None
        runtime = _runtime_for(result, c)
        record = service.artifacts.seal_build(Build(model, version, profile.id, c.recipe.name, c.path, runtime,
                                                    health, chunk_size=profile.chunk_size,
                                                    compression=PROBE_COMPRESSION))
        same = next((s for s in sealed if s[1].artifact_id == record.artifact_id), None)
        if same is not None:
            aliases[c.recipe.name] = same[0].recipe.name
            continue
        sealed.append((c, record, runtime))
    probe_id = uuid.uuid4().hex[:16]
    ref = ModelRef(model, version)
    keys = {d.device_id: d.public_key for d in devices}

    def sign(stored: StoredCommand) -> bytes:
        public = device_public_key(stored.device_id, keys[stored.device_id])
        variants = tuple(
            ProbeVariant(c.recipe.name, ArtifactInfo.from_dict(rec.info),
                         wrap_key(rec.data_key, public, artifact_id=rec.artifact_id, device_id=stored.device_id),
                         runtime)
            for c, rec, runtime in sealed
        )
        blob: bytes = service.signer.command(stored, ProbeRequest(probe_id, ref, health, variants).to_args())
        return blob

    now = clock()
    with registry.tx() as tx:
        registry.record_probe(tx, probe_id, device_ids=list(keys),
                              artifacts=[(rec.artifact_id, c.recipe.name) for c, rec, _ in sealed],
                              model=model, version=version, profile=profile.id, now=now, expires_at=now + ttl_s)
        commands = {d: uuid.uuid4().hex for d in keys}
        registry.store_commands([(cid, d, "probe", model, version) for d, cid in commands.items()], sign,
                                batch_id=probe_id, ttl_s=ttl_s, created_by=actor, deployment_id=None, tx=tx, now=now)
    service.kick()
    return ProbePlan(probe_id, model, version, profile.id, tuple(keys), tuple(c.recipe.name for c, _, _ in sealed),
                     time.monotonic(), aliases, commands)


def probe_status(registry: Any, plan: ProbePlan) -> tuple[set[str], dict[str, dict[str, str]], dict[str, float]]:
    """(devices done, failures per device, measured p50 per variant) from what ingest has written so far."""
    rows = registry.measurements(plan.model, plan.version, profile=plan.profile, sources=("probe",),
                                 probe_id=plan.probe_id)
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r.device_id, set()).add(r.variant)
    done = {d for d, variants in seen.items() if variants >= set(plan.variants)}
    failed: dict[str, dict[str, str]] = {}
    for d in plan.devices:
        for ev in registry.list_events(device_id=d, kind_prefix="probe.", limit=1000, newest=True):
            if ev.kind == "probe.completed" and ev.data.get("probe_id") == plan.probe_id:
                done.add(d)
                failed[d] = {str(k): str(v) for k, v in dict(ev.data.get("failed") or {}).items()}
        for ev in registry.list_events(device_id=d, kind_prefix="command.result", limit=1000, newest=True):
            if ev.command_id == plan.commands.get(d) and not ev.data.get("ok", True):  # refused the probe
                done.add(d)
                failed[d] = {"*": str(ev.data.get("message") or "refused")}
    measured = measured_latency(rows, plan.profile)
    measured |= {alias: measured[sent] for alias, sent in plan.aliases.items() if sent in measured}
    return done, {d: f for d, f in failed.items() if f}, measured


def wait_probe(
    registry: Any, plan: ProbePlan, *, timeout_s: float, poll_s: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeOutcome:
    """Until every device answered (measurements for every variant, or ``probe.completed``) or ``timeout_s``."""
    deadline = plan.started + timeout_s
    while True:
        done, failed, measured = probe_status(registry, plan)
        if done >= set(plan.devices) or time.monotonic() >= deadline:
            break
        sleep(poll_s)
    return ProbeOutcome(plan, sorted(done & set(plan.devices)), sorted(set(plan.devices) - done), measured,
                        time.monotonic() - plan.started, failed)
