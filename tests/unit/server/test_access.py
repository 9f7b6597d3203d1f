"""Roles over the whole route table, the audit hash chain, the refusal aggregation, the local actor."""

from __future__ import annotations

import os
import pwd
import sqlite3
from pathlib import Path

import pytest

from server.access import ADMIN, DEPLOY, PUBLIC, READ, ROLES, allows, canonical, local_actor, row_hash
from server.api import Api
from server.artifacts import ArtifactStore
from server.asgi import RefusalAudit
from server.builds import StaticBuilds
from server.config import ServerConfig
from server.errors import AuthError, ForbiddenError
from server.keys import token_digest
from server.registry import fleet as fleet_schema
from server.registry.db import Database
from server.registry.fleet import FleetRegistry
from server.service import FleetService


@pytest.fixture
def registry(tmp_path: Path) -> FleetRegistry:
    r = FleetRegistry(Database(tmp_path / "registry.db"))
    r.migrate()
    return r


@pytest.fixture
def api(tmp_path: Path, registry: FleetRegistry) -> Api:
    config = ServerConfig(home=tmp_path)
    service = FleetService(config, registry, builds=StaticBuilds(),
                           artifacts=ArtifactStore(config.paths.artifacts_dir, registry))
    return Api(service)


def test_every_route_declares_a_role_and_each_role_is_refused_what_it_lacks(api: Api, registry: FleetRegistry) -> None:
    for role in ROLES:
        registry.add_token(f"t-{role}", token_digest(f"secret-{role}"), role=role)
    for route in api.routes:
        assert route.role in (PUBLIC, *ROLES), route.name
        if route.mutating:
            assert route.role in (DEPLOY, ADMIN), f"{route.name} changes things but needs only {route.role}"
        if route.role == PUBLIC:
            assert api.authenticate(route, None) == "anonymous"
            continue
        with pytest.raises(AuthError) as missing:
            api.authenticate(route, None)
        assert not isinstance(missing.value, ForbiddenError)
        for role in ROLES:
            if allows(role, route.role):
                assert api.authenticate(route, f"secret-{role}") == f"t-{role}"
            else:
                with pytest.raises(ForbiddenError, match=f"needs {route.role}") as refused:
                    api.authenticate(route, f"secret-{role}")
                assert refused.value.actor == f"t-{role}"


def test_the_roles_the_issue_names(api: Api) -> None:
    role = {r.name: r.role for r in api.routes}
    assert {role[n] for n in ("status", "events", "audit", "verify_audit", "list_devices")} == {READ}
    assert {role[n] for n in ("deploy", "rollback", "halt_deployment", "register_model", "build_model")} == {DEPLOY}
    assert {role[n] for n in ("register_device", "approve_device", "revoke_device", "reset_broker_password",
                              "reject_enrollment", "group_add", "group_remove")} == {ADMIN}
    assert {role[n] for n in ("health", "openapi", "metrics")} == {PUBLIC}
    doc = api.openapi()
    assert doc["paths"]["/v1/rollbacks"]["post"]["x-role"] == DEPLOY


def test_metrics_need_a_token_when_not_public(api: Api, registry: FleetRegistry) -> None:
    api.public_metrics = False
    with pytest.raises(AuthError):
        api.authenticate(api.route("metrics"), None)
    registry.add_token("prom", token_digest("p"), role=READ)
    assert api.authenticate(api.route("metrics"), "p") == "prom"


def test_audit_chain_finds_the_first_broken_row(registry: FleetRegistry) -> None:
    ids = [registry.record_audit(actor="ci", action="deploy", target=f"group:{i}", params={"n": i}, outcome="ok")
           for i in range(5)]
    report = registry.verify_audit()
    assert report.ok and report.rows == 5 and report.head_id == ids[-1]
    conn = registry.db.connection()
    conn.execute("UPDATE audit SET outcome = 'error:nothing' WHERE id = ?", (ids[2],))
    report = registry.verify_audit()
    assert not report.ok and report.broken_id == ids[2] and "edited" in (report.reason or "")
    assert report.head_id == ids[1]
    conn.execute("UPDATE audit SET outcome = 'ok' WHERE id = ?", (ids[2],))
    assert registry.verify_audit(anchor=(ids[3], report_hash(registry, ids[3]))).ok
    conn.execute("DELETE FROM audit WHERE id = ?", (ids[3],))
    report = registry.verify_audit()
    assert not report.ok and report.broken_id == ids[4] and "missing" in (report.reason or "")


def report_hash(registry: FleetRegistry, rid: int) -> str:
    return str(registry.db.connection().execute("SELECT hash FROM audit WHERE id = ?", (rid,)).fetchone()[0])


def test_canonical_encoding_is_the_documented_one() -> None:
    row = {"id": 7, "ts": 1700000000.25, "actor": "ci", "action": "deploy", "target": "all",
           "params": '{"model":"m:1"}', "outcome": "ok", "detail": None}
    assert canonical(row, "ab") == b'[7,1700000000250000,"ci","deploy","all","{\\"model\\":\\"m:1\\"}","ok",null,"ab"]'
    # sha256 of the bytes above (the vector docs/control-plane.md quotes)
    assert row_hash(row, "ab") == "51538d260e40f57415da9dba8ecf94d12358e6aaba08fa00051e7e566c4ae44b"


def test_an_old_registry_migrates_tokens_to_admin_and_chains_its_audit(tmp_path: Path) -> None:
    db = Database(tmp_path / "old.db")
    db.migrate(fleet_schema.MIGRATIONS)  # the schema before roles and the chain
    conn = db.connection()
    conn.execute("INSERT INTO api_tokens (name, token_sha256, created_at) VALUES ('ci', ?, 1.0)", (token_digest("t"),))
    for i in range(3):
        conn.execute("INSERT INTO audit (ts, actor, action, target, params, outcome, detail)"
                     " VALUES (?, 'local:ops', 'token_create', NULL, '{}', 'ok', NULL)", (float(i),))
    registry = FleetRegistry(db)
    registry.migrate()
    assert registry.token_identity(token_digest("t")) == ("ci", ADMIN)
    assert registry.verify_audit().ok and registry.verify_audit().rows == 3
    registry.record_audit(actor="x", action="y", target=None, params={}, outcome="ok")
    assert registry.verify_audit().ok
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO api_tokens (name, token_sha256, created_at, role) VALUES ('z', 'h', 1, NULL)")


def test_refused_calls_are_aggregated_per_actor_and_window(api: Api, registry: FleetRegistry) -> None:
    now = [1000.0]
    refusals = RefusalAudit(api, window_s=60.0, clock=lambda: now[0])
    route = api.route("register_device")
    for _ in range(500):
        refusals.refused(route, AuthError("missing API token"))
    refusals.refused(api.route("status"), AuthError("missing API token"))  # reads are counted, never audited
    rows = registry.list_audit()
    assert [(r.actor, r.action, r.outcome) for r in rows] == [("anonymous", "register_device", "error:unauthorized")]
    now[0] += 61.0
    refusals.flush()
    rows = registry.list_audit()
    assert len(rows) == 2 and rows[1].action == "refused_calls" and rows[1].params["count"] == 499
    now[0] += 61.0
    refusals.flush()  # a quiet window closes without a row
    refusals.refused(route, ForbiddenError("role", actor="ci"))
    assert [r.actor for r in registry.list_audit()][-1] == "ci"
    assert registry.verify_audit().ok


def test_the_local_actor_comes_from_the_uid_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LOGNAME", "mallory")
    assert local_actor() == f"local:{pwd.getpwuid(os.getuid()).pw_name}"
