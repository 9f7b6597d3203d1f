"""Operator operations on the fleet: what the HTTP API exposes and the local CLI calls directly.

Every method validates its input against the registry, writes in one transaction and returns
plain JSON-ready data; messages to devices are written to the outbox (signed) and published by
the server process that holds the outbox lease (``kick`` wakes it when it is this process).
Errors are ``server.errors`` types with messages an operator can act on.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.errors import TopicError
from agent.protocol.topics import validate_device_id
from server.access import ROLES
from server.artifacts import ArtifactStore
from server.builds import BuildSource
from server.config import ServerConfig
from server.delta import transfer_summary
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.identity import check_device_id, server_logins
from server.keys import load_signing_key, mosquitto_hash, new_broker_password, new_token, token_digest
from server.measured import by_build, profile_budgets
from server.outbox import OUTBOX_LEASE
from server.refs import parse_model_ref
from server.registry.console import ConsoleQueries
from server.registry.fleet import (
    DEP_COMPLETED,
    DEP_HALTED,
    DEP_RUNNING,
    DEVICE_ACTIVE,
    DEVICE_REVOKED,
    DeploymentBuild,
    DesiredRecord,
    Device,
    FleetRegistry,
    NewDeployment,
)
from server.rollout.driver import Dispatcher, RollbackItem, halt_deployment, parse_target
from server.rollout.planner import DeviceView, Phase, plan_waves, wave_stats
from server.signing import Signer, fingerprint, parse_public_key

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ProfileSource(Protocol):
    def profile_names(self) -> set[str]: ...


def _name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise InvalidRequestError(f"invalid {kind} {value!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def _device_id(value: str) -> str:
    try:
        return validate_device_id(value)
    except TopicError as exc:
        raise InvalidRequestError(exc.message) from exc


def _percent(name: str, value: float, *, allow_zero: bool = True) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a number")
    v = float(value)
    if not (0.0 <= v <= 100.0) or (not allow_zero and v == 0.0):
        raise InvalidRequestError(f"{name} must be within {'0' if allow_zero else '(0'}..100, got {value}")
    return v


@dataclass(frozen=True)
class Actor:
    name: str


class FleetService:
    def __init__(
        self,
        config: ServerConfig,
        registry: FleetRegistry,
        *,
        builds: BuildSource,
        artifacts: ArtifactStore,
        profiles: ProfileSource | None = None,
        signer: Signer | None = None,
        kick: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.registry = registry
        self.builds = builds
        self.artifacts = artifacts
        self.profiles = profiles
        self._signer = signer
        self.kick = kick
        self.clock = clock

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = Signer(load_signing_key(self.config.paths))
        return self._signer

    @property
    def dispatcher(self) -> Dispatcher:
        return Dispatcher(self.registry, self.signer, self.artifacts, self.config)

    def _check_profile(self, profile: str) -> str:
        _name("profile", profile)
        if self.profiles is not None:
            known = self.profiles.profile_names()
            if known and profile not in known:
                raise InvalidRequestError(f"unknown profile {profile!r}; known: {', '.join(sorted(known))}")
        return profile

    # -- devices and enrollment -----------------------------------------------------------------------

    def _new_device_id(self, device_id: str) -> str:
        """A device id that may be registered: valid, and no server broker login (``server.identity``)."""
        return check_device_id(device_id, server_logins(self.config.broker.username))

    def register_device(
        self,
        device_id: str,
        *,
        profile: str,
        public_key: str | None = None,
        groups: Sequence[str] = (),
        broker_password: bool = True,
    ) -> dict[str, Any]:
        device_id = self._new_device_id(device_id)
        self._check_profile(profile)
        key = parse_public_key(public_key) if public_key else None
        for g in groups:
            _name("group", g)
        password = new_broker_password() if broker_password else None
        now = self.clock()
        with self.registry.tx() as tx:
            dev = self.registry.add_device(
                device_id, profile=profile, public_key=key, broker_hash=mosquitto_hash(password) if password else None,
                groups=groups, now=now, tx=tx,
            )
            if key:
                self._settle_enrollment(tx, device_id, key)
            adopted = self.registry.adopt_presence(device_id, tx=tx)  # it was connected before it was registered
            self.registry.server_event(
                "device.registered", f"device {device_id} ({profile}) registered"
                + ("" if key else "; waiting for its enrollment request"), device_id=device_id, tx=tx, now=now,
            )
        if adopted:
            dev = self.registry.get_device(device_id)
        out: dict[str, Any] = {"device": dev.to_dict(), "fingerprint": fingerprint(key) if key else None}
        if password:
            out["broker_username"] = device_id
            out["broker_password"] = password
        return out

    def _settle_enrollment(self, tx: Any, device_id: str, key: str) -> None:
        try:
            req = self.registry.get_enroll_request(device_id, conn=tx)
        except NotFoundError:
            return
        if req.status == "pending" and req.public_key == key:
            self.registry.set_enroll_status(device_id, "approved", tx=tx)

    def approve_device(
        self,
        device_id: str,
        *,
        fingerprint_check: str | None = None,
        profile: str | None = None,
        groups: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Accept the key of a pending enrollment request. The operator must give the fingerprint the
        device printed (out of band): without it a token holder could approve any key, e.g. an attacker's
        request for a known device id, and take over its future model keys."""
        device_id = self._new_device_id(device_id)
        if not fingerprint_check or not fingerprint_check.strip():
            raise InvalidRequestError(f"approving {device_id} needs the key fingerprint the device printed "
                                      "(--fingerprint)")
        req = self.registry.get_enroll_request(device_id)
        if req.status != "pending":
            raise ConflictError(f"the enrollment request of {device_id} is already {req.status}")
        if fingerprint_check.replace(":", "").strip().lower() != req.fingerprint.replace(":", ""):
            raise InvalidRequestError(
                f"fingerprint mismatch for {device_id}: the request's key is {req.fingerprint}, not {fingerprint_check}"
            )
        for g in groups:
            _name("group", g)
        now = self.clock()
        out: dict[str, Any] = {}
        with self.registry.tx() as tx:
            existing = self.registry.find_device(device_id)
            if existing is None:
                prof = self._check_profile(profile or req.profile)
                self.registry.add_device(device_id, profile=prof, public_key=req.public_key, broker_hash=None,
                                         groups=groups, now=now, tx=tx)
            else:
                if existing.status == DEVICE_REVOKED:
                    raise ConflictError(f"device {device_id} is revoked; register it again under a new id")
                self.registry.set_device_key(device_id, req.public_key, tx=tx, now=now)
                if groups:
                    self.registry.add_to_group(groups[0], [device_id], tx=tx, now=now)
                    for g in groups[1:]:
                        self.registry.add_to_group(g, [device_id], tx=tx, now=now)
            self.registry.set_enroll_status(device_id, "approved", tx=tx)
            self.registry.adopt_presence(device_id, tx=tx)  # connected already: online now, not at its next report
            self.registry.server_event("device.enrolled", f"device {device_id} enrolled (key {req.fingerprint})",
                                       device_id=device_id, tx=tx, now=now)
        out["device"] = self.registry.get_device(device_id).to_dict()
        out["fingerprint"] = req.fingerprint
        return out

    def reject_enrollment(self, device_id: str) -> dict[str, Any]:
        req = self.registry.get_enroll_request(_device_id(device_id))
        with self.registry.tx() as tx:
            self.registry.set_enroll_status(req.device_id, "rejected", tx=tx)
        return {"device_id": req.device_id, "fingerprint": req.fingerprint, "status": "rejected"}

    def pending_enrollments(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.registry.enroll_requests("pending")]

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """Refuse the device from now on; its broker login goes with the next `edgefleet broker config`."""
        device_id = _device_id(device_id)
        now = self.clock()
        with self.registry.tx() as tx:
            self.registry.revoke_device(device_id, tx=tx, now=now)
            self.registry.cancel_device_rows([device_id], "device revoked", tx=tx, now=now)
            self.registry.delete_desired(device_id, tx=tx)
            self.registry.server_event("device.revoked", f"device {device_id} revoked", device_id=device_id,
                                       severity="warning", tx=tx, now=now)
        return {"device_id": device_id, "status": DEVICE_REVOKED,
                "next": "regenerate the broker config (`edgefleet broker config`) and reload mosquitto (SIGHUP)"}

    def reset_broker_password(self, device_id: str) -> dict[str, Any]:
        device_id = _device_id(device_id)
        dev = self.registry.get_device(device_id)
        if dev.status == DEVICE_REVOKED:
            raise ConflictError(f"device {device_id} is revoked")
        password = new_broker_password()
        self.registry.set_broker_hash(device_id, mosquitto_hash(password))
        return {"broker_username": device_id, "broker_password": password}

    def list_devices(self) -> list[dict[str, Any]]:
        now = self.clock()
        desired = self.registry.all_desired()
        return [self._device_row(d, desired.get(d.device_id), now) for d in self.registry.list_devices()]

    @staticmethod
    def _device_row(d: Device, want: DesiredRecord | None, now: float) -> dict[str, Any]:
        row = d.to_dict()
        row["desired"] = None if want is None else {
            "action": want.action, "model": want.model, "version": want.version,
            "deployment_id": want.deployment_id, "seq": want.seq, "expires_at": want.expires_at,
            "published": want.published_seq >= want.seq,
        }
        row["stale"] = bool(
            (d.desired_expires_at is not None and d.desired_expires_at < now)
            or (want is not None and want.action != "clear" and want.expires_at < now)
        )
        row["fingerprint"] = fingerprint(d.public_key) if d.public_key else None
        return row

    def device_detail(self, device_id: str) -> dict[str, Any]:
        device_id = _device_id(device_id)
        row = self._device_row(self.registry.get_device(device_id), self.registry.get_desired(device_id),
                               self.clock())
        row["events"] = [e.to_dict() for e in self.registry.list_events(device_id=device_id, limit=20, newest=True)]
        row["telemetry"] = self.registry.telemetry_series(device_id, since=self.clock() - 3600)
        return row

    # -- groups ---------------------------------------------------------------------------------------

    def group_add(self, group: str, device_ids: Sequence[str]) -> dict[str, Any]:
        _name("group", group)
        ids = [_device_id(d) for d in device_ids]
        with self.registry.tx() as tx:
            for d in ids:
                if self.registry.get_device(d).status == DEVICE_REVOKED:
                    raise ConflictError(f"device {d} is revoked")
            self.registry.add_to_group(group, ids, tx=tx, now=self.clock())
        return {"group": group, "members": self.registry.list_groups().get(group, [])}

    def group_remove(self, group: str, device_ids: Sequence[str]) -> dict[str, Any]:
        _name("group", group)
        with self.registry.tx() as tx:
            removed = self.registry.remove_from_group(group, [_device_id(d) for d in device_ids], tx=tx)
        return {"group": group, "removed": removed, "members": self.registry.list_groups().get(group, [])}

    def list_groups(self) -> dict[str, list[str]]:
        return self.registry.list_groups()

    # -- deployments ----------------------------------------------------------------------------------

    def deploy(
        self,
        ref: str,
        *,
        target: str,
        canary_percent: float | None = None,
        wave_percent: float | None = None,
        max_failures_percent: float | None = None,
        probation_s: float | None = None,
        actor: str,
    ) -> dict[str, Any]:
        model, version = parse_model_ref(ref)
        try:
            kind, value = parse_target(target)
        except Exception as exc:
            raise InvalidRequestError(str(exc)) from exc
        defaults = self.config.rollout
        canary = _percent("canary", defaults.canary_percent if canary_percent is None else canary_percent)
        wave = _percent("wave", defaults.wave_percent if wave_percent is None else wave_percent, allow_zero=False)
        max_fail = _percent("max-failures",
                            defaults.max_failures_percent if max_failures_percent is None else max_failures_percent)
        probation = defaults.probation_s if probation_s is None else probation_s
        if probation is not None and not 0.0 <= float(probation) <= 7 * 86400.0:
            raise InvalidRequestError("probation must be within 0 s..7 days")
        if not self.builds.has_version(model, version):
            raise NotFoundError(f"unknown model version {model}:{version} (register it with `edgefleet model add`)")
        devices = self.registry.target_devices(kind, value)
        enrolled = [d for d in devices if d.status == DEVICE_ACTIVE and d.public_key]
        if kind == "device" and not enrolled:
            raise InvalidRequestError(f"device {value} has not enrolled a key yet (`edgefleet devices approve`)")
        if not enrolled:
            raise InvalidRequestError(f"target {target} has no enrolled devices")
        newer = [d for d in enrolled if d.active_model == model and (d.active_version or 0) > version]
        if newer:
            listed = ", ".join(f"{d.device_id} (v{d.active_version})" for d in newer[:5])
            raise InvalidRequestError(
                f"{len(newer)} device(s) already run a newer {model}: {listed}. Devices refuse downgrades; "
                f"use `edgefleet rollback --to {target} --version {version}` for a version they keep"
            )
        by_profile: dict[str, list[str]] = {}
        for d in enrolled:
            by_profile.setdefault(d.profile, []).append(d.device_id)
        builds = {p: self.builds.get_build(model, version, p) for p in by_profile}
        missing = sorted(p for p, b in builds.items() if b is None)
        if missing:
            detail = "; ".join(f"{p} ({len(by_profile[p])} device(s), e.g. {by_profile[p][0]})" for p in missing)
            raise InvalidRequestError(
                f"no variant of {model}:{version} is built for profile(s) {detail}. "
                f"Build them first: edgefleet build {model}:{version} --profile {missing[0]}"
            )
        held = self.registry.holding_deployments([d.device_id for d in enrolled])
        if held:
            dep_id, devs = next(iter(sorted(held.items())))
            raise ConflictError(
                f"deployment {dep_id} is still running on {len(devs)} of these devices (e.g. {devs[0]}); wait for "
                f"it to finish or halt it: edgefleet deployments halt {dep_id}"
            )
        records = []
        for profile, build in sorted(builds.items()):
            assert build is not None
            art = self.artifacts.seal_build(build)
            records.append(DeploymentBuild("", profile, art.artifact_id, build.variant, build.runtime.to_dict(),
                                           build.health.to_dict()))
        already = [d.device_id for d in enrolled
                   if d.active_model == model and d.active_version == version and d.active_state == "committed"]
        waves = plan_waves([d.device_id for d in enrolled], canary_percent=canary, wave_percent=wave,
                           online={d.device_id: d.online for d in enrolled})
        by_id = {d.device_id: d for d in enrolled}
        rows = []
        for w, ids in enumerate(waves):
            for device_id in ids:
                d = by_id[device_id]
                previous = d.active_version if d.active_model == model and d.active_state == "committed" else None
                if previous == version:
                    previous = None if not d.kept else max((k for k in d.kept if k < version), default=None)
                rows.append((device_id, d.profile, w, previous))
        dep_id = "d-" + uuid.uuid4().hex[:12]
        new = NewDeployment(
            deployment_id=dep_id, model=model, version=version, target=target, canary_percent=canary,
            wave_percent=wave, max_failures_percent=max_fail, probation_s=probation, created_by=actor,
            builds=[DeploymentBuild(dep_id, b.profile, b.artifact_id, b.variant, b.runtime, b.health)
                    for b in records],
            devices=rows, wave_count=len(waves), already_committed=already,
        )
        dep = self.registry.create_deployment(new, now=self.clock())
        self.registry.server_event(
            "deployment.created",
            f"deployment {dep_id}: {model} v{version} to {target} ({len(rows)} device(s) in {len(waves)} wave(s)) by "
            f"{actor}",
            deployment_id=dep_id, data={"waves": [len(w) for w in waves]},
        )
        self.kick()
        out = dep.to_dict()
        out["waves"] = [len(w) for w in waves]
        out["artifacts"] = {b.profile: b.artifact_id for b in records}
        out["driver_running"] = self.registry.lease_holder(OUTBOX_LEASE) is not None
        return out

    def list_deployments(self, limit: int = 50) -> list[dict[str, Any]]:
        out = []
        for dep in self.registry.list_deployments(limit=limit):
            d = dep.to_dict()
            counts: dict[str, int] = {}
            for r in self.registry.deployment_devices(dep.deployment_id):
                counts[r.state] = counts.get(r.state, 0) + 1
            d["counts"] = counts
            out.append(d)
        return out

    def deployment_detail(self, deployment_id: str) -> dict[str, Any]:
        dep = self.registry.get_deployment(deployment_id)
        rows = self.registry.deployment_devices(deployment_id)
        online = ConsoleQueries(self.registry).online_of([r.device_id for r in rows])
        views = [DeviceView(r.device_id, r.wave, Phase(r.state), online.get(r.device_id, False), r.updated_at, r.code)
                 for r in rows]
        out = dep.to_dict()
        out["waves"] = [w.to_dict() for w in wave_stats(views, dep.wave_count)]
        out["devices"] = [dict(r.to_dict(), online=online.get(r.device_id, False)) for r in rows]
        out["failures"] = [
            {"device_id": r.device_id, "wave": r.wave, "code": r.code, "reason": r.reason}
            for r in rows if r.state == Phase.FAILED.value
        ]
        out["builds"] = {p: {"artifact_id": b.artifact_id, "variant": b.variant}
                         for p, b in self.registry.deployment_builds(deployment_id).items()}
        out["transfer"] = transfer_summary(self.registry, deployment_id)
        out["events"] = [e.to_dict() for e in self.registry.list_events(deployment_id=deployment_id, limit=50,
                                                                          newest=True)]
        return out

    def halt(
        self, deployment_id: str, *, rollback: bool = True, actor: str, reason: str | None = None
    ) -> dict[str, Any]:
        dep = self.registry.get_deployment(deployment_id)
        if dep.status not in (DEP_RUNNING, DEP_COMPLETED):
            raise ConflictError(f"deployment {deployment_id} is {dep.status}; only a running or completed one can be "
                                "halted")
        ok = halt_deployment(self.registry, self.dispatcher, dep, reason or f"halted by {actor}", actor=actor,
                             now=self.clock(), rollback=rollback)
        if not ok:
            raise ConflictError(f"deployment {deployment_id} changed state meanwhile; look again")
        self.kick()
        return self.deployment_detail(deployment_id)

    # -- rollback and commands ------------------------------------------------------------------------

    def rollback(
        self, *, target: str, model: str | None = None, version: int | None = None, actor: str
    ) -> dict[str, Any]:
        """Send devices back to a version they keep: signed command + retained pin (offline devices converge)."""
        try:
            kind, value = parse_target(target)
        except Exception as exc:
            raise InvalidRequestError(str(exc)) from exc
        if model is not None:
            _name("model", model)
        if version is not None and (not isinstance(version, int) or version < 0):
            raise InvalidRequestError("version must be a non-negative integer")
        devices = [d for d in self.registry.target_devices(kind, value) if d.status == DEVICE_ACTIVE]
        items: list[RollbackItem] = []
        skipped: list[dict[str, Any]] = []
        plan: list[dict[str, Any]] = []
        for d in devices:
            m = model or d.active_model
            if not m:
                skipped.append({"device_id": d.device_id, "reason": "runs no model"})
                continue
            if version is not None:
                v = version
                if d.kept and v not in d.kept and v != d.active_version:
                    skipped.append({"device_id": d.device_id,
                                    "reason": f"v{v} is not kept on it (kept: {list(d.kept)})"})
                    continue
            else:
                if d.active_model != m or d.active_version is None:
                    skipped.append({"device_id": d.device_id, "reason": f"does not run {m}"})
                    continue
                earlier = [k for k in d.kept if k < d.active_version]
                if not earlier:
                    skipped.append({"device_id": d.device_id,
                                    "reason": f"keeps no version of {m} older than v{d.active_version}"})
                    continue
                v = max(earlier)
            running = d.active_model == m and d.active_version == v
            items.append(RollbackItem(d.device_id, m, v, command=not running))
            plan.append({"device_id": d.device_id, "model": m, "from": d.active_version, "to": v,
                         "online": d.online, "command": not running})
        if not items:
            raise InvalidRequestError(
                "nothing to roll back: " + "; ".join(f"{s['device_id']}: {s['reason']}" for s in skipped[:10])
                if skipped else f"target {target} has no enrolled devices"
            )
        now = self.clock()
        ids = [i.device_id for i in items]
        with self.registry.tx() as tx:
            # the devices leave any rollout that still holds them, and a finished rollout to this same
            # target no longer re-deploys late joiners
            self.registry.cancel_device_rows(ids, f"operator rollback by {actor}", tx=tx, now=now, live_only=True)
            self.registry.deactivate_target(target, (DEP_COMPLETED, DEP_HALTED, DEP_RUNNING), tx=tx)
            batch_id = self.dispatcher.store_rollback(items, deployment_id=None, actor=actor, now=now, tx=tx)
            self.registry.server_event(
                "rollback.requested",
                f"{actor} rolls {len(items)} device(s) of {target} back"
                + (f" to v{version}" if version is not None else " to their previous version"),
                severity="warning", data={"batch_id": batch_id, "devices": ids[:100]}, tx=tx, now=now,
            )
        self.kick()
        return {"batch_id": batch_id, "target": target, "devices": plan, "skipped": skipped}

    def measured_over_budget(self) -> list[dict[str, Any]]:
        """Builds whose devices measured a p95 over their profile's ``latency_budget_ms`` (``server.measured``)."""
        return [{"model": m, "version": v, **f.to_dict()}
                for m, v, f in by_build(self.registry.all_measurements(), profile_budgets()) if f.over_budget]

    def command_batch(self, batch_id: str) -> dict[str, Any]:
        if not re.fullmatch(r"[0-9a-f]{16}", batch_id):
            raise InvalidRequestError("batch id is 16 hex digits")
        return {"batch_id": batch_id, "commands": [c.to_dict() for c in self.registry.commands_in_batch(batch_id)]}

    # -- observation ----------------------------------------------------------------------------------

    def events(
        self,
        *,
        after: int = 0,
        device_id: str | None = None,
        deployment_id: str | None = None,
        kind: str | None = None,
        limit: int = 200,
        wait_s: float = 0.0,
    ) -> dict[str, Any]:
        """Events after the cursor ``after``; with ``wait_s`` a long poll (``events --follow``)."""
        limit = max(1, min(int(limit), 1000))
        wait_s = max(0.0, min(float(wait_s), self.config.api.max_wait_s))
        deadline = time.monotonic() + wait_s
        newest = after <= 0 and wait_s == 0.0
        # PostgreSQL: woken by the registry's NOTIFY; SQLite: re-read every db.POLL_S
        generation = self.registry.db.change_generation() if wait_s > 0 else 0
        while True:
            events = self.registry.list_events(after=max(after, 0), device_id=device_id, deployment_id=deployment_id,
                                               kind_prefix=kind, limit=limit, newest=newest)
            if events or time.monotonic() >= deadline:
                cursor = events[-1].id if events else max(after, 0) or self.registry.last_event_id()
                return {"events": [e.to_dict() for e in events], "cursor": cursor}
            generation = self.registry.db.wait_change(generation, deadline - time.monotonic())

    def audit(self, *, limit: int = 100, actor: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self.registry.list_audit(limit=max(1, min(limit, 10000)), actor=actor,
                                                              action=action)]

    # -- API tokens --------------------------------------------------------------------------------

    def create_token(self, name: str, role: str) -> dict[str, Any]:
        """A new token for ``name`` (shown once here; the registry keeps only its SHA-256)."""
        if not name or len(name) > 64 or not name.isprintable():
            raise InvalidRequestError("a token name is 1..64 printable characters")
        if role not in ROLES:
            raise InvalidRequestError(f"role must be one of {', '.join(ROLES)}")
        token = new_token()
        self.registry.add_token(name, token_digest(token), role=role)
        return {"name": name, "role": role, "token": token}

    def list_tokens(self) -> list[dict[str, Any]]:
        return self.registry.list_tokens()

    def revoke_token(self, name: str) -> dict[str, Any]:
        self.registry.revoke_token(name)
        return {"name": name, "revoked": True}

    def record_audit(self, *, actor: str, action: str, target: str | None, params: Mapping[str, Any], outcome: str,
                     detail: str | None = None) -> None:
        self.registry.record_audit(actor=actor, action=action, target=target, params=_redact(params),
                                   outcome=outcome, detail=detail)


_SECRET_KEYS = ("password", "token", "secret")


_AUDIT_VALUE_CHARS = 512


def _redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Secrets become ``***``; long values (uploaded files, base64) are recorded by size only."""
    def clean(k: str, v: Any) -> Any:
        if any(s in k.lower() for s in _SECRET_KEYS):
            return "***"
        if isinstance(v, str) and len(v) > _AUDIT_VALUE_CHARS:
            return f"<{len(v)} characters>"
        return v

    return {k: clean(k, v) for k, v in params.items()}

