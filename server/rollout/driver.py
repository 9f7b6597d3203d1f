"""The rollout driver: applies the planner's decisions to the registry and the broker.

Theory of operation
    Every ``tick_s`` each server process walks the deployments that still need driving
    (running, rolling back, or completed but converging late joiners). For each, it first
    claims the deployment's lease (``claim_deployment``); only the holder acts, so two
    processes never dispatch the same wave, and a crashed holder is replaced after
    ``lease_ttl_s``. Everything the driver decides goes to the registry first: desired states
    and commands are signed and stored as outbox rows in the same transaction that moves the
    device rows; a separate outbox step (under its own lease) publishes them. A server killed
    at any point therefore resumes from the registry: unpublished rows are published, pending
    devices of released waves are dispatched, settled waves advance.

    Halting (failure threshold crossed, or an operator) rolls the fleet back the way Azure
    Device Update does, but without a download: every released device gets a retained ``pin``
    desired state naming the version it ran before (so offline devices converge when they
    reconnect), and devices already running the new version also get a signed ``rollback``
    command, answered with ``command.result``. Devices that never had an earlier version
    cannot go back: their desired state is withdrawn (an empty retained message) and the
    reason is recorded.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from server.artifacts import ArtifactStore
from server.builds import BuildSource
from server.config import ServerConfig
from server.delta import DeltaBuilder, DeltaOffer
from server.errors import PublishError, ServerError
from server.registry.db import Connection
from server.registry.fleet import (
    DEP_COMPLETED,
    DEP_HALTED,
    DEP_ROLLED_BACK,
    DEP_ROLLING_BACK,
    DEP_RUNNING,
    ArtifactRecord,
    Deployment,
    DeploymentBuild,
    FleetRegistry,
    StoredCommand,
    StoredDesired,
)
from server.rollout.planner import (
    IN_FLIGHT,
    TIMEOUT_CODE,
    DeviceView,
    Phase,
    Policy,
    converge,
    decide,
    rollback_settled,
)
from server.signing import Signer

log = logging.getLogger("edgefleet.rollout")

CLEAR = "clear"


def parse_target(target: str) -> tuple[str, str | None]:
    """``all`` | ``group:NAME`` | ``device:ID`` -> (kind, value)."""
    if target == "all":
        return "all", None
    kind, sep, value = target.partition(":")
    if not sep or kind not in ("group", "device") or not value:
        raise ServerError(f"target {target!r} must be group:NAME, device:ID or all")
    return kind, value


def _sent(offer: DeltaOffer | None) -> str | None:
    """The artifact a device offered a delta will ask chunks of first (the full one only on fallback)."""
    return offer.artifact.artifact_id if offer is not None else None


@dataclass(frozen=True)
class RollbackItem:
    device_id: str
    model: str
    version: int
    command: bool  # also send a signed rollback command (the device runs the version being undone)


class Dispatcher:
    """Signs and stores (outbox) desired states and commands; shared by the driver and the service."""

    def __init__(self, registry: FleetRegistry, signer: Signer, artifacts: ArtifactStore, config: ServerConfig) -> None:
        self.registry = registry
        self.signer = signer
        self.artifacts = artifacts
        self.config = config
        self.deltas = DeltaBuilder(artifacts, max_ratio=config.publisher.delta_max_ratio,
                                   wait_s=config.publisher.delta_build_wait_s)

    def dispatch_deploy(self, dep: Deployment, device_ids: Sequence[str], *, now: float) -> dict[str, str]:
        """Desired states for ``device_ids`` of ``dep``; returns device -> artifact id."""
        builds = self.registry.deployment_builds(dep.deployment_id)
        rows = {r.device_id: r for r in self.registry.deployment_devices(dep.deployment_id)}
        devices = {d.device_id: d for d in self.registry.list_devices()}
        artifacts: dict[str, ArtifactRecord] = {}
        offers: dict[str, DeltaOffer | None] = {}
        items, plan = [], {}
        for device_id in device_ids:
            row, dev = rows.get(device_id), devices.get(device_id)
            if row is None or dev is None:
                continue
            build = builds.get(row.profile)
            if build is None:
                continue
            if build.artifact_id not in artifacts:
                artifacts[build.artifact_id] = self.registry.get_artifact(build.artifact_id)
            items.append((device_id, "deploy", dep.model, dep.version, dep.deployment_id))
            # a device that keeps an older version of this model (its state reports say which) gets a delta too
            kept = dev.kept if dev.active_model == dep.model else ()
            offers[device_id] = self.deltas.offer(dep.model, row.profile, kept, artifacts[build.artifact_id])
            plan[device_id] = (dev, build)

        def sign(stored: StoredDesired) -> bytes:
            dev, build = plan[stored.device_id]
            return self.signer.deploy(
                stored,
                device_public_key_b64=dev.public_key,
                model=dep.model,
                version=dep.version,
                deployment_id=dep.deployment_id,
                artifact=artifacts[build.artifact_id],
                runtime=build.runtime,
                health=build.health,
                variant=build.variant,
                probation_s=dep.probation_s,
                broadcast=self.config.publisher.broadcast,
                delta=offers.get(stored.device_id),
            )

        with self.registry.tx() as tx:
            seqs = self.registry.store_desired(items, sign, ttl_s=self.config.publisher.desired_ttl_s, tx=tx, now=now)
            self.registry.mark_dispatched(dep.deployment_id, seqs, tx=tx, now=now)
        return {d: _sent(offers.get(d)) or plan[d][1].artifact_id for d in seqs}

    def store_rollback(
        self,
        items: Sequence[RollbackItem],
        *,
        deployment_id: str | None,
        actor: str,
        now: float,
        tx: Connection,
        clear: Iterable[str] = (),
    ) -> str:
        """Commands first, then retained pins (so each pin's seq is above its command's); one batch id."""
        batch_id = uuid.uuid4().hex[:16]
        cmds = [(uuid.uuid4().hex, i.device_id, "rollback", i.model, i.version) for i in items if i.command]
        if cmds:

            def sign_cmd(c: StoredCommand) -> bytes:
                return self.signer.command(c)

            self.registry.store_commands(
                cmds, sign_cmd, batch_id=batch_id, ttl_s=self.config.publisher.command_ttl_s, created_by=actor,
                deployment_id=deployment_id, tx=tx, now=now,
            )
        pins = {i.device_id: i for i in items}

        def sign_pin(stored: StoredDesired) -> bytes:
            if stored.device_id not in pins:
                return b""
            i = pins[stored.device_id]
            return self.signer.pin(stored, model=i.model, version=i.version, deployment_id=deployment_id)

        desired_items: list[tuple[str, str, str | None, int | None, str | None]] = [
            (i.device_id, "pin", i.model, i.version, deployment_id) for i in items
        ]
        desired_items += [(d, CLEAR, None, None, deployment_id) for d in clear]
        self.registry.store_desired(desired_items, sign_pin, ttl_s=self.config.publisher.desired_ttl_s, tx=tx,
                                    now=now)
        return batch_id


class RolloutDriver:
    def __init__(
        self,
        registry: FleetRegistry,
        dispatcher: Dispatcher,
        builds: BuildSource,
        config: ServerConfig,
        *,
        owner: str,
        expect_requests: Callable[[str, Iterable[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.builds = builds
        self.config = config
        self.owner = owner
        self._expect = expect_requests
        self._clock = clock
        self._membership_checked: dict[str, float] = {}
        self._warned: set[tuple[str, str]] = set()
        self.ticks = 0

    # -- the tick ---------------------------------------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        self.ticks += 1
        ttl = self.config.rollout.lease_ttl_s
        for dep in self.registry.converging_deployments():
            if not self.registry.claim_deployment(dep.deployment_id, self.owner, ttl, now=now):
                continue
            try:
                self.drive(dep, now)
            except (ServerError, PublishError) as exc:
                log.error("deployment %s: %s", dep.deployment_id, exc)  # noqa: TRY400 - expected, no trace

    def release_all(self) -> None:
        for dep in self.registry.converging_deployments():
            self.registry.release_deployment(dep.deployment_id, self.owner)

    def drive(self, dep: Deployment, now: float) -> None:
        online = self.registry.online_device_ids()  # every tick: ids only, not 1,000 full device rows
        if dep.active and dep.status in (DEP_RUNNING, DEP_COMPLETED):
            self._add_late_joiners(dep, now)
        rows = self.registry.deployment_devices(dep.deployment_id)
        # what is decided from these rows happens after them: a device that committed while the tick ran was
        # finished at a time later than the tick's start (seen on PostgreSQL: a later wave "dispatched" before
        # the canary it waited for had "finished")
        now = max(now, self._clock())
        views = [
            DeviceView(
                device_id=r.device_id,
                wave=r.wave,
                phase=Phase(r.state),
                online=r.device_id in online,
                updated_at=r.updated_at,
                code=r.code,
            )
            for r in rows
        ]
        if dep.status == DEP_RUNNING:
            self._drive_running(dep, views, now)
        elif dep.status == DEP_COMPLETED:
            pending = converge(views)
            if pending:
                self._dispatch(dep, pending, views, now)
        elif dep.status == DEP_ROLLING_BACK and rollback_settled(views):
            self._finish(dep, DEP_ROLLED_BACK, DEP_ROLLING_BACK, "deployment.rolled_back",
                         f"deployment {dep.deployment_id}: every online device is back on its previous version",
                         severity="warning", now=now)
            self.registry.release_deployment(dep.deployment_id, self.owner)

    def _finish(self, dep: Deployment, status: str, expect: str, kind: str, message: str, *, severity: str = "info",
                now: float) -> None:
        """Move ``dep`` from ``expect`` to ``status`` and record ``kind`` (once, whichever process gets there)."""
        with self.registry.tx() as tx:
            if self.registry.set_deployment_status(dep.deployment_id, status, expect=[expect], tx=tx, now=now):
                self.registry.server_event(kind, message, deployment_id=dep.deployment_id, severity=severity, tx=tx,
                                           now=now)

    def _drive_running(self, dep: Deployment, views: list[DeviceView], now: float) -> None:
        policy = Policy(dep.canary_percent, dep.wave_percent, dep.max_failures_percent,
                        self.config.rollout.device_timeout_s)
        decision = decide(policy, views, current_wave=dep.current_wave, wave_count=dep.wave_count, now=now)
        if decision.timed_out:
            reason = f"no progress for {self.config.rollout.device_timeout_s:g} s"
            self.registry.update_deployment_devices(
                dep.deployment_id, [(d, Phase.FAILED.value, reason, TIMEOUT_CODE) for d in decision.timed_out],
                now=now,
            )
        if decision.halt_reason is not None:
            self.halt(dep, decision.halt_reason, actor="rollout", now=now)
            return
        if decision.dispatch:
            self._dispatch(dep, decision.dispatch, views, now)
        if decision.advanced:
            self.registry.set_current_wave(dep.deployment_id, decision.current_wave, now=now)
            self.registry.server_event(
                "deployment.wave",
                f"deployment {dep.deployment_id}: wave {dep.current_wave} settled, releasing wave "
                f"{decision.current_wave} of {dep.wave_count - 1}",
                deployment_id=dep.deployment_id, data={"wave": decision.current_wave}, now=now,
            )
        if decision.complete:
            self._finish(dep, DEP_COMPLETED, DEP_RUNNING, "deployment.completed",
                         f"deployment {dep.deployment_id}: {dep.model} v{dep.version} rolled out to every wave",
                         now=now)

    def _dispatch(self, dep: Deployment, device_ids: Sequence[str], views: list[DeviceView], now: float) -> None:
        sent = self.dispatcher.dispatch_deploy(dep, device_ids, now=now)
        online = {v.device_id for v in views if v.online}
        by_artifact: dict[str, list[str]] = {}
        for device_id, artifact_id in sent.items():
            if device_id in online:
                by_artifact.setdefault(artifact_id, []).append(device_id)
        if self._expect is not None:
            for artifact_id, ids in by_artifact.items():
                self._expect(artifact_id, ids)
        log.info("deployment %s: dispatched %d device(s)", dep.deployment_id, len(sent))

    def _add_late_joiners(self, dep: Deployment, now: float) -> None:
        last = self._membership_checked.get(dep.deployment_id, 0.0)
        if now - last < max(1.0, 4 * self.config.rollout.tick_s):
            return
        self._membership_checked[dep.deployment_id] = now
        kind, value = parse_target(dep.target)
        try:
            members = self.registry.target_devices(kind, value)
        except ServerError:
            return  # the group emptied or the device was revoked: nobody new to add
        known = {r.device_id for r in self.registry.deployment_devices(dep.deployment_id)}
        new = [d for d in members if d.device_id not in known and d.public_key]
        if not new:
            return
        builds = self.registry.deployment_builds(dep.deployment_id)
        joiners = []
        for d in new:
            if d.profile not in builds and not self._add_build(dep, d.profile):
                continue
            previous = d.active_version if d.active_model == dep.model and d.active_state == "committed" else None
            if previous is not None and previous > dep.version:
                self._warn_once(dep, d.device_id, f"device {d.device_id} runs {dep.model} v{previous}, newer than "
                                f"v{dep.version}: not joined to this deployment")
                continue
            joiners.append((d.device_id, d.profile, dep.wave_count - 1, previous))
        if joiners:
            added = self.registry.add_late_joiners(dep.deployment_id, joiners, now=now)
            if added:
                self.registry.server_event(
                    "deployment.joined",
                    f"deployment {dep.deployment_id}: {len(joiners)} device(s) joined its target late: "
                    + ", ".join(j[0] for j in joiners[:10]),
                    deployment_id=dep.deployment_id, data={"devices": [j[0] for j in joiners]}, now=now,
                )

    def _add_build(self, dep: Deployment, profile: str) -> bool:
        build = self.builds.get_build(dep.model, dep.version, profile)
        if build is None:
            self._warn_once(dep, profile, f"no {dep.model} v{dep.version} variant is built for profile {profile!r}; "
                            f"its devices are not joined (run `edgefleet build`)")
            return False
        artifact = self.dispatcher.artifacts.seal_build(build)
        self.registry.add_deployment_build(DeploymentBuild(
            deployment_id=dep.deployment_id, profile=profile, artifact_id=artifact.artifact_id,
            variant=build.variant, runtime=build.runtime.to_dict(), health=build.health.to_dict(),
        ))
        return True

    def _warn_once(self, dep: Deployment, key: str, message: str) -> None:
        if (dep.deployment_id, key) in self._warned:
            return
        self._warned.add((dep.deployment_id, key))
        self.registry.server_event("deployment.warning", message, deployment_id=dep.deployment_id,
                                   severity="warning")

    # -- halting and rolling back -----------------------------------------------------------------------

    def halt(self, dep: Deployment, reason: str, *, actor: str, now: float, rollback: bool = True) -> bool:
        return halt_deployment(self.registry, self.dispatcher, dep, reason, actor=actor, now=now, rollback=rollback)


def halt_deployment(
    registry: FleetRegistry,
    dispatcher: Dispatcher,
    dep: Deployment,
    reason: str,
    *,
    actor: str,
    now: float,
    rollback: bool = True,
) -> bool:
    """Stop ``dep``; with ``rollback`` send every released device back to its previous version.

    Returns False when the deployment was no longer running or completed (someone else halted it).
    """
    rows = registry.deployment_devices(dep.deployment_id)
    with registry.tx() as tx:
        new_status = DEP_ROLLING_BACK if rollback else DEP_HALTED
        if not registry.set_deployment_status(dep.deployment_id, new_status, reason=reason,
                                              expect=[DEP_RUNNING, DEP_COMPLETED], tx=tx, now=now):
            return False
        registry.deactivate_deployment(dep.deployment_id, tx=tx)
        updates: list[tuple[str, str, str | None, str | None]] = []
        items: list[RollbackItem] = []
        clear: list[str] = []
        for r in rows:
            phase = Phase(r.state)
            if phase is Phase.PENDING:
                updates.append((r.device_id, Phase.SKIPPED.value, "rollout halted before this wave", None))
                continue
            if not rollback or phase not in (*IN_FLIGHT, Phase.COMMITTED, Phase.FAILED):
                continue
            if r.previous_version is None:
                clear.append(r.device_id)
                if phase is Phase.COMMITTED:
                    updates.append((r.device_id, phase.value, "no earlier version to roll back to", None))
                elif phase is not Phase.FAILED:
                    updates.append((r.device_id, Phase.CANCELLED.value,
                                    "rollout halted; no earlier version, desired state withdrawn", None))
                continue
            running_new = phase in (Phase.COMMITTED, Phase.PROBATION)
            items.append(RollbackItem(r.device_id, dep.model, r.previous_version, command=running_new))
            if phase is not Phase.FAILED:
                updates.append((r.device_id, Phase.ROLLING_BACK.value, f"rolling back to v{r.previous_version}",
                                None))
        if items or clear:
            dispatcher.store_rollback(items, deployment_id=dep.deployment_id, actor=actor, now=now, tx=tx,
                                      clear=clear)
        registry.update_deployment_devices(dep.deployment_id, updates, tx=tx, now=now)
        registry.server_event(
            "deployment.halted",
            f"deployment {dep.deployment_id} halted by {actor}: {reason}"
            + (f"; rolling {len(items)} device(s) back" if rollback else ""),
            deployment_id=dep.deployment_id, severity="error", code="halted",
            data={"reason": reason, "actor": actor, "rollback": rollback}, tx=tx, now=now,
        )
    log.warning("deployment %s halted: %s", dep.deployment_id, reason)
    return True

