"""The HTTP API: one route table, served over HTTP by ``server.asgi`` and called in-process by the CLI.

Every route is declared once (method, path, schema, handler, the role it needs, whether it
changes anything). From that table come the request validation, the authorization, the OpenAPI
3.1 document (``/openapi.json``), the audit log entry of every mutating call (who, what, when,
outcome), the HTTP routing and the CLI client's URLs, so they cannot drift apart.
Authentication is a bearer token (``Authorization: Bearer eft_...``); the registry keeps only its
SHA-256, the name of its owner (what the audit log records) and its role (``server.access``).

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with the status implied by the
``server.errors`` type (404 not found, 409 conflict, 400 invalid, 413 too large, 401
unauthorized, 403 forbidden).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import __version__
from server.access import ADMIN, DEPLOY, PUBLIC, READ, ROLES, allows, parse_anchor
from server.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRequestError,
    KeyStoreError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
)
from server.keys import token_digest
from server.metrics import render_metrics
from server.refs import parse_model_ref
from server.service import FleetService

log = logging.getLogger("edgefleet.api")

Json = dict[str, Any]


# -- schemas --------------------------------------------------------------------------------------------


def obj(properties: Mapping[str, Json], required: Sequence[str] = ()) -> Json:
    return {"type": "object", "properties": dict(properties), "required": list(required),
            "additionalProperties": False}


STR = {"type": "string", "maxLength": 256}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
STR_LIST = {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 10000}
ANY_OBJ = {"type": "object"}
ANY_LIST = {"type": "array", "items": {"type": "object"}}
B64 = {"type": "string", "contentEncoding": "base64", "maxLength": 1 << 31}
NAME_LIST = {"type": "array", "items": {"type": "string", "maxLength": 64}, "maxItems": 64}

_PY_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
    "object": (dict,),
}


def validate(value: Any, schema: Mapping[str, Any], where: str = "body") -> None:
    """The subset of JSON Schema the route table uses; raises InvalidRequestError naming the field."""
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _PY_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            raise InvalidRequestError(f"{where} must be {kind}")
    if "enum" in schema and value not in schema["enum"]:
        raise InvalidRequestError(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise InvalidRequestError(f"{where} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise InvalidRequestError(f"{where} must be <= {schema['maximum']}")
    if isinstance(value, str) and len(value) > schema.get("maxLength", 1 << 20):
        raise InvalidRequestError(f"{where} is longer than {schema['maxLength']} characters")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 1 << 20):
            raise InvalidRequestError(f"{where} has more than {schema['maxItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        for key in schema.get("required", ()):
            if key not in value:
                raise InvalidRequestError(f"{where}.{key} is required")
        for key, item in value.items():
            if key not in props:
                if schema.get("additionalProperties", True) is False:
                    raise InvalidRequestError(f"{where}.{key} is not a known field ({', '.join(props)})")
                continue
            if item is not None:
                validate(item, props[key], f"{where}.{key}")


# -- routes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    actor: str
    path: Mapping[str, str]
    query: Mapping[str, str]
    body: Any
    service: FleetService
    metrics: Callable[[], str] | None = None

    def q_int(self, name: str, default: int, lo: int = 0, hi: int = 1 << 62) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError as exc:
            raise InvalidRequestError(f"query parameter {name} must be an integer") from exc
        if not lo <= value <= hi:
            raise InvalidRequestError(f"query parameter {name} must be within {lo}..{hi}")
        return value

    def q_float(self, name: str, default: float) -> float:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            return float(raw)
        except ValueError as exc:
            raise InvalidRequestError(f"query parameter {name} must be a number") from exc


@dataclass(frozen=True)
class QueryParam:
    name: str
    schema: Json
    description: str = ""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str
    summary: str
    handler: Callable[[Call], Any]
    tag: str = "fleet"
    body: Json | None = None
    query: tuple[QueryParam, ...] = ()
    response: Json = field(default_factory=lambda: ANY_OBJ)
    mutating: bool = False
    content_type: str = "application/json"
    #: what the audit log names as the target of the call
    audit_target: Callable[[Call], str | None] | None = None
    #: who may call it: "public" (no token), "read", "deploy" or "admin" (server.access)
    role: str = field(kw_only=True)

    @property
    def public(self) -> bool:
        return self.role == PUBLIC


def _health(c: Call) -> Any:
    return {"ok": True, "version": __version__}


def _metrics(c: Call) -> Any:
    if c.metrics is None:
        return render_metrics(c.service.registry)
    return c.metrics()


def _deploy(c: Call) -> Any:
    b = c.body
    return c.service.deploy(
        b["model"], target=b["target"], canary_percent=b.get("canary_percent"), wave_percent=b.get("wave_percent"),
        max_failures_percent=b.get("max_failures_percent"), probation_s=b.get("probation_s"), actor=c.actor,
    )


def _status(c: Call) -> Any:
    devices = c.service.list_devices()
    deployments = [d for d in c.service.list_deployments(limit=20) if d["status"] in ("running", "rolling_back")]
    return {
        "devices": len(devices),
        "online": sum(d["online"] for d in devices),
        "stale": sum(d["stale"] for d in devices),
        "pending_enrollments": len(c.service.pending_enrollments()),
        "live_deployments": deployments,
        "measured_over_budget": c.service.measured_over_budget(),
    }


def _models(c: Call) -> Any:
    from server import model_ops  # noqa: PLC0415 - the compression pipeline loads on first use

    return model_ops


def _model_ref(c: Call) -> str:
    name, version = parse_model_ref(f"{c.path['model']}:{c.path['version']}")
    return f"{name}:{version}"


def _verify_audit(c: Call) -> Any:
    anchor = None
    if c.query.get("anchor"):
        try:
            anchor = parse_anchor(c.query["anchor"])
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
    return c.service.registry.verify_audit(anchor=anchor).to_dict()


ROUTES: list[Route] = [
    Route("GET", "/healthz", "health", "Liveness of the server process", _health, tag="server", role=PUBLIC),
    Route("GET", "/openapi.json", "openapi", "This API's OpenAPI 3.1 document", lambda c: None, tag="server",
          role=PUBLIC),
    Route("GET", "/metrics", "metrics", "Prometheus metrics (fleet gauges, ingest and publish counters)", _metrics,
          tag="server", content_type="text/plain; version=0.0.4", role=PUBLIC),
    Route("GET", "/v1/status", "status", "Fleet summary: devices, online, stale, live rollouts", _status, role=READ),
    Route("GET", "/v1/devices", "list_devices", "Every device with its state, model, telemetry and desired state",
          lambda c: c.service.list_devices(), response=ANY_LIST, role=READ),
    Route("POST", "/v1/devices", "register_device",
          "Register a device (with its X25519 public key, or wait for its enrollment request); returns its broker "
          "password once",
          lambda c: c.service.register_device(
              c.body["device_id"], profile=c.body["profile"], public_key=c.body.get("public_key"),
              groups=c.body.get("groups") or (), broker_password=c.body.get("broker_password", True)),
          body=obj({"device_id": STR, "profile": STR, "public_key": STR, "groups": STR_LIST,
                    "broker_password": BOOL}, ["device_id", "profile"]),
          mutating=True, audit_target=lambda c: f"device:{c.body.get('device_id')}", role=ADMIN),
    Route("GET", "/v1/devices/{device_id}", "get_device", "One device with recent events and telemetry",
          lambda c: c.service.device_detail(c.path["device_id"]), role=READ),
    Route("POST", "/v1/devices/{device_id}/approve", "approve_device",
          "Approve a device's pending enrollment request: the key's fingerprint, as the device printed it, is "
          "required and must match",
          lambda c: c.service.approve_device(
              c.path["device_id"], fingerprint_check=c.body["fingerprint"],
              profile=c.body.get("profile"), groups=c.body.get("groups") or ()),
          body=obj({"fingerprint": STR, "profile": STR, "groups": STR_LIST}, ["fingerprint"]), mutating=True,
          audit_target=lambda c: f"device:{c.path['device_id']}", role=ADMIN),
    Route("POST", "/v1/devices/{device_id}/reject", "reject_enrollment", "Reject a pending enrollment request",
          lambda c: c.service.reject_enrollment(c.path["device_id"]), mutating=True,
          audit_target=lambda c: f"device:{c.path['device_id']}", role=ADMIN),
    Route("POST", "/v1/devices/{device_id}/revoke", "revoke_device",
          "Revoke a device: its messages are refused and it gets nothing more",
          lambda c: c.service.revoke_device(c.path["device_id"]), mutating=True,
          audit_target=lambda c: f"device:{c.path['device_id']}", role=ADMIN),
    Route("POST", "/v1/devices/{device_id}/broker-password", "reset_broker_password",
          "Issue a new MQTT password for a device (shown once)",
          lambda c: c.service.reset_broker_password(c.path["device_id"]), mutating=True,
          audit_target=lambda c: f"device:{c.path['device_id']}", role=ADMIN),
    Route("GET", "/v1/enrollments", "pending_enrollments", "Enrollment requests waiting for approval",
          lambda c: c.service.pending_enrollments(), response=ANY_LIST, role=READ),
    Route("GET", "/v1/groups", "list_groups", "Groups and their members", lambda c: c.service.list_groups(),
          role=READ),
    Route("POST", "/v1/groups/{group}/members", "group_add", "Add devices to a group (created on first use)",
          lambda c: c.service.group_add(c.path["group"], c.body["devices"]),
          body=obj({"devices": STR_LIST}, ["devices"]), mutating=True,
          audit_target=lambda c: f"group:{c.path['group']}", role=ADMIN),
    Route("POST", "/v1/groups/{group}/remove", "group_remove", "Remove devices from a group",
          lambda c: c.service.group_remove(c.path["group"], c.body["devices"]),
          body=obj({"devices": STR_LIST}, ["devices"]), mutating=True,
          audit_target=lambda c: f"group:{c.path['group']}", role=ADMIN),
    Route("GET", "/v1/deployments", "list_deployments", "Recent deployments with per-phase device counts",
          lambda c: c.service.list_deployments(limit=c.q_int("limit", 50, 1, 1000)), response=ANY_LIST,
          query=(QueryParam("limit", INT, "most recent N (1..1000)"),), role=READ),
    Route("POST", "/v1/deployments", "deploy",
          "Start a staged rollout of MODEL:VERSION to group:NAME, device:ID or all (canary, waves, failure "
          "threshold, probation)", _deploy,
          body=obj({"model": STR, "target": STR, "canary_percent": PERCENT, "wave_percent": PERCENT,
                    "max_failures_percent": PERCENT, "probation_s": {"type": "number", "minimum": 0}},
                   ["model", "target"]),
          mutating=True, audit_target=lambda c: c.body.get("target"), role=DEPLOY),
    Route("GET", "/v1/deployments/{deployment_id}", "get_deployment",
          "One deployment: per-wave progress, every device's phase, failures and why",
          lambda c: c.service.deployment_detail(c.path["deployment_id"]), role=READ),
    Route("POST", "/v1/deployments/{deployment_id}/halt", "halt_deployment",
          "Halt a rollout; by default roll its devices back to their previous version",
          lambda c: c.service.halt(c.path["deployment_id"], rollback=(c.body or {}).get("rollback", True),
                                   actor=c.actor, reason=(c.body or {}).get("reason")),
          body=obj({"rollback": BOOL, "reason": STR}), mutating=True,
          audit_target=lambda c: f"deployment:{c.path['deployment_id']}", role=DEPLOY),
    Route("POST", "/v1/rollbacks", "rollback",
          "Roll devices back to a kept version (signed command + retained pin; offline devices converge)",
          lambda c: c.service.rollback(target=c.body["target"], model=c.body.get("model"),
                                       version=c.body.get("version"), actor=c.actor),
          body=obj({"target": STR, "model": STR, "version": {"type": "integer", "minimum": 0}}, ["target"]),
          mutating=True, audit_target=lambda c: c.body.get("target"), role=DEPLOY),
    Route("GET", "/v1/commands/{batch_id}", "command_batch", "Commands of one batch and each device's answer",
          lambda c: c.service.command_batch(c.path["batch_id"]), role=READ),
    Route("GET", "/v1/events", "events", "Events after a cursor; wait=N long-polls up to N seconds",
          lambda c: c.service.events(after=c.q_int("after", 0), device_id=c.query.get("device") or None,
                                     deployment_id=c.query.get("deployment") or None,
                                     kind=c.query.get("kind") or None, limit=c.q_int("limit", 200, 1, 1000),
                                     wait_s=c.q_float("wait", 0.0)),
          query=(QueryParam("after", INT, "cursor: only events with a larger id"),
                 QueryParam("device", STR), QueryParam("deployment", STR),
                 QueryParam("kind", STR, "kind prefix, e.g. lifecycle."),
                 QueryParam("limit", INT), QueryParam("wait", NUM, "long-poll seconds")), role=READ),
    Route("GET", "/v1/models", "list_models", "Registered model versions and the profiles each is built for",
          lambda c: _models(c).list_models(c.service.config.home, c.query.get("model") or None),
          tag="models", response=ANY_LIST, query=(QueryParam("model", STR, "only this model"),), role=READ),
    Route("POST", "/v1/models", "register_model",
          "Register the next version of a model: the file (.onnx or .tflite) and its calibration/evaluation data "
          "sets (.npz), base64-encoded, and an optional accuracy gate", lambda c: _models(c).add_model(
              c.service.config.home, c.body),
          tag="models",
          body=obj({"name": STR, "filename": STR, "model": B64, "calibration": B64, "evaluation": B64,
                    "gate": {"type": "object", "properties": {
                        "metric": {"type": "string", "enum": ["accuracy", "cosine", "top1", "iou"]},
                        "max_relative_drop": NUM, "min_cosine": NUM, "min_top1": NUM, "min_iou": NUM,
                        "iou_threshold": NUM, "max_abs_error": NUM}, "additionalProperties": False}},
                   ["name", "model"]),
          mutating=True, audit_target=lambda c: f"model:{c.body.get('name')}", role=DEPLOY),
    Route("GET", "/v1/models/{model}/versions/{version}", "get_model",
          "One model version: inputs, outputs, gate, and each build with its provenance",
          lambda c: _models(c).show_model(c.service.config.home, _model_ref(c)), tag="models", role=READ),
    Route("POST", "/v1/models/{model}/versions/{version}/builds", "build_model",
          "Build compressed variants for profiles (ID[,ID...] or all) behind the accuracy gate; answers when done "
          "(seconds to minutes), one result per profile",
          lambda c: _models(c).build_model(c.service.config.home, _model_ref(c), c.body, service=c.service,
                                           actor=c.actor),
          tag="models",
          body=obj({"profile": STR, "recipes": NAME_LIST, "calibration_methods": NAME_LIST, "pruning": BOOL,
                    "fallback": BOOL, "eval_limit": {"type": "integer", "minimum": 1},
                    "latency_runs": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "optimize": {"type": "string", "enum": ["balanced", "latency", "size"]},
                    "probe": STR, "probe_timeout_s": {"type": "number", "minimum": 1, "maximum": 3600}},
              ["profile"]),
          mutating=True, audit_target=lambda c: f"model:{c.path['model']}:{c.path['version']}", role=DEPLOY),
    Route("GET", "/v1/audit", "audit", "Who did what, when, with which outcome",
          lambda c: c.service.audit(limit=c.q_int("limit", 100, 1, 10000), actor=c.query.get("actor") or None,
                                    action=c.query.get("action") or None),
          response=ANY_LIST,
          query=(QueryParam("limit", INT), QueryParam("actor", STR), QueryParam("action", STR)), role=READ),
    Route("GET", "/v1/tokens", "token_list", "API tokens: name, role, created, revoked (never the token)",
          lambda c: c.service.list_tokens(), tag="access", response=ANY_LIST, role=ADMIN),
    Route("POST", "/v1/tokens", "token_create",
          "Create an API token for NAME with a role; the answer shows it once (the server keeps only its SHA-256)",
          lambda c: c.service.create_token(c.body["name"], c.body["role"]), tag="access",
          body=obj({"name": {"type": "string", "maxLength": 64}, "role": {"type": "string", "enum": list(ROLES)}},
                   ["name", "role"]),
          mutating=True, audit_target=lambda c: f"token:{c.body.get('name')}", role=ADMIN),
    Route("POST", "/v1/tokens/{name}/revoke", "token_revoke", "Revoke NAME's API token",
          lambda c: c.service.revoke_token(c.path["name"]), tag="access", mutating=True,
          audit_target=lambda c: f"token:{c.path['name']}", role=ADMIN),
    Route("GET", "/v1/audit/verify", "verify_audit",
          "Recompute the audit log's hash chain; names the first broken row (edited, deleted, inserted)",
          _verify_audit, query=(QueryParam("anchor", STR, "ID:SHA256 of a head saved earlier"),), role=READ),
]

_STATUS: Mapping[type[ServerError], int] = {
    NotFoundError: 404,
    ConflictError: 409,
    ForbiddenError: 403,
    AuthError: 401,
    PayloadTooLargeError: 413,
    InvalidRequestError: 400,
    KeyStoreError: 503,
}


def status_for(exc: ServerError) -> int:
    for cls, status in _STATUS.items():
        if isinstance(exc, cls):
            return status
    return 400 if isinstance(exc, ValueError) else 422


class Api:
    """Dispatch, audit and describe the routes; transport-agnostic (HTTP server and local CLI)."""

    def __init__(
        self,
        service: FleetService,
        *,
        routes: Sequence[Route] | None = None,
        metrics: Callable[[], str] | None = None,
        public_metrics: bool = True,
    ) -> None:
        self.service = service
        self.routes = list(routes if routes is not None else ROUTES) + list(EXTRA_ROUTES)
        self.metrics = metrics
        self.public_metrics = public_metrics
        self._by_name = {r.name: r for r in self.routes}

    def route(self, name: str) -> Route:
        return self._by_name[name]

    def role_needed(self, route: Route) -> str:
        if route.name == "metrics" and not self.public_metrics:
            return READ
        return route.role

    def authenticate(self, route: Route, token: str | None) -> str:
        """The actor of a call with this bearer token: AuthError without a live token, ForbiddenError
        when its role does not cover the route."""
        needed = self.role_needed(route)
        if needed == PUBLIC:
            return "anonymous"
        if not token:
            raise AuthError("missing API token (Authorization: Bearer ...)")
        ident = self.service.registry.token_identity(token_digest(token))
        if ident is None:
            raise AuthError("unknown or revoked API token")
        name, role = ident
        if not allows(role, needed):
            raise ForbiddenError(f"token {name!r} has role {role}; {route.method} {route.path} needs {needed}",
                                 actor=name)
        return name

    def invoke(self, route: Route, *, actor: str, path: Mapping[str, str] | None = None,
               query: Mapping[str, str] | None = None, body: Any = None) -> Any:
        """Run one call (body validated, mutating calls audited); raises ServerError subclasses."""
        call = Call(actor, path or {}, query or {}, body, self.service, self.metrics)
        if route.name == "openapi":
            return self.openapi()
        try:
            if route.body is not None:
                validate(body if body is not None else {}, route.body)
                if body is None:
                    call = Call(actor, path or {}, query or {}, {}, self.service, self.metrics)
            elif body not in (None, {}):
                raise InvalidRequestError(f"{route.method} {route.path} takes no body")
            result = route.handler(call)
        except ServerError as exc:
            if route.mutating:
                self._audit(route, call, f"error:{exc.code}", exc.message)
            raise
        if route.mutating:
            self._audit(route, call, "ok", None)
        return result

    def call(self, name: str, *, actor: str, path: Mapping[str, str] | None = None,
             query: Mapping[str, str] | None = None, body: Any = None) -> Any:
        return self.invoke(self.route(name), actor=actor, path=path, query=query, body=body)

    def _audit(self, route: Route, call: Call, outcome: str, detail: str | None) -> None:
        target = None
        try:
            target = route.audit_target(call) if route.audit_target else None
        except (KeyError, TypeError, AttributeError):
            target = None
        params = dict(call.body) if isinstance(call.body, dict) else {}
        params.update({f"path.{k}": v for k, v in call.path.items()})
        try:
            self.service.record_audit(actor=call.actor, action=route.name, target=target, params=params,
                                      outcome=outcome, detail=detail)
        except ServerError:
            log.exception("could not write the audit record of %s", route.name)

    def audit_refused(self, action: str, actor: str, code: str, detail: str, *,
                      params: Mapping[str, Any] | None = None) -> None:
        """One audit row for refused calls (the HTTP transport aggregates floods before calling this)."""
        try:
            self.service.record_audit(actor=actor, action=action, target=None, params=dict(params or {}),
                                      outcome=f"error:{code}", detail=detail)
        except ServerError:
            log.exception("could not write the audit record of a refused %s", action)

    def openapi(self) -> Json:
        paths: dict[str, Json] = {}
        for r in self.routes:
            op: Json = {
                "operationId": r.name,
                "summary": r.summary,
                "tags": [r.tag],
                "responses": {
                    "200": {"description": "OK", "content": {r.content_type.split(";")[0]: {
                        "schema": {"type": "string"} if r.content_type.startswith("text/") else r.response}}},
                    "400": {"$ref": "#/components/responses/Error"},
                    "401": {"$ref": "#/components/responses/Error"},
                    "403": {"$ref": "#/components/responses/Error"},
                    "404": {"$ref": "#/components/responses/Error"},
                    "409": {"$ref": "#/components/responses/Error"},
                },
            }
            params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                      for n in re.findall(r"\{(\w+)\}", r.path)]
            params += [{"name": q.name, "in": "query", "required": False, "schema": q.schema,
                        "description": q.description} for q in r.query]
            if params:
                op["parameters"] = params
            if r.body is not None:
                op["requestBody"] = {"required": bool(r.body.get("required")),
                                     "content": {"application/json": {"schema": r.body}}}
                op["responses"]["413"] = {"$ref": "#/components/responses/Error"}
            if r.public:
                op["security"] = []
            op["x-role"] = r.role
            if r.mutating:
                op["x-audited"] = True
            paths.setdefault(r.path, {})[r.method.lower()] = op
        return {
            "openapi": "3.1.0",
            "info": {"title": "edgefleet server API", "version": __version__,
                     "description": "Fleet control plane: models and builds, devices, enrollment, staged rollouts, "
                                    "rollback, events, audit. Every mutating call is recorded in the audit log."},
            "components": {
                "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
                "responses": {"Error": {"description": "error", "content": {"application/json": {"schema": obj(
                    {"error": obj({"code": STR, "message": STR}, ["code", "message"])}, ["error"])}}}},
            },
            "security": [{"token": []}],
            "paths": paths,
        }


#: Routes other modules contribute (the compression pipeline's model/build endpoints register here).
EXTRA_ROUTES: list[Route] = []
