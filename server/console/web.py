"""The web console at ``/ui``: Starlette routes on the API's own server (``server.asgi``).

Pages are rendered on the server (Jinja2, autoescaped) and readable without JavaScript; the one
script (``static/console.js``) subscribes to ``/ui/live`` (server-sent events) and swaps the
page's live regions when the fleet changes. Every action is a plain form POST carrying the
session's CSRF token, and runs through the API's own route table (``Api.call``): the same
validation, the same role check and the same audit row as the HTTP API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from server.access import ADMIN, DEPLOY, allows
from server.api import Api
from server.api import Route as ApiRoute
from server.console.fleetview import ago
from server.console.pages import PageData
from server.console.sessions import COOKIE, LOGIN_COOKIE, Session, Sessions, same
from server.errors import AuthError, ForbiddenError, InvalidRequestError, NotFoundError, ServerError
from server.keys import token_digest
from server.registry.console import STATES

log = logging.getLogger("edgefleet.console")

FORM_CAP = 16 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store", "X-Frame-Options": "DENY"}
NAV = (("overview", "/ui/", "Overview"), ("devices", "/ui/devices", "Devices"),
       ("deployments", "/ui/deployments", "Deployments"), ("models", "/ui/models", "Models"),
       ("enrollment", "/ui/enrollment", "Enrollment"), ("audit", "/ui/audit", "Audit"))

Worker = Callable[..., Awaitable[Any]]
Refused = Callable[[ApiRoute, AuthError], None]


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ts_html(value: float | None) -> Markup:
    """The date part in a span that narrow screens hide."""
    text = _ts(value)
    if " " not in text:
        return escape(text)
    day, clock = text.split(" ", 1)
    return Markup('<span class="date">{} </span>{}').format(day, clock)


def _params(params: Mapping[str, Any], width: int = 28) -> str:
    """An audit row's parameters on one line, long values (keys, hashes) shortened."""
    def short(v: Any) -> str:
        text = json.dumps(v, default=str)
        return text if len(text) <= width else text[:width - 1] + "…"

    return ", ".join(f"{k}={short(v)}" for k, v in sorted(params.items()))


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    v = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if v < 1000 or unit == "GB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} GB"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def environment() -> Environment:
    env = Environment(loader=PackageLoader("server.console", "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(params=_params, ts_html=_ts_html, ts=_ts, size=_size, num=_num, ago=lambda s: ago(float(s)),
                       qs=urlencode)
    return env


class Console:
    def __init__(self, api: Api, *, in_worker: Worker, secure: bool = False, on_refused: Refused | None = None,
                 stale_after_s: float = 3600.0, poll_s: float = 1.0, max_streams: int = 16) -> None:
        self.api = api
        self.data = PageData(api.service, stale_after_s=stale_after_s)
        self.sessions = Sessions()
        self.in_worker = in_worker
        self.secure = secure
        self.on_refused = on_refused
        self.poll_s = poll_s
        self.env = environment()
        self.closing = threading.Event()
        #: live-update streams at once: each holds one of the server's connections, and API calls need them too
        self.max_streams = max_streams
        self._streams = 0
        self._streams_lock = threading.Lock()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/ui", lambda r: RedirectResponse("/ui/", 308), methods=["GET"]),
            Route("/ui/", self.overview, methods=["GET"]),
            Route("/ui/login", self.login_form, methods=["GET"]),
            Route("/ui/login", self.login, methods=["POST"]),
            Route("/ui/logout", self.logout, methods=["POST"]),
            Route("/ui/live", self.live, methods=["GET"]),
            Route("/ui/devices", self.devices, methods=["GET"]),
            Route("/ui/devices/{device_id}", self.device, methods=["GET"]),
            Route("/ui/devices/{device_id}/rollback", self.device_rollback, methods=["POST"]),
            Route("/ui/devices/{device_id}/revoke", self.device_revoke, methods=["POST"]),
            Route("/ui/deployments", self.deployments, methods=["GET"]),
            Route("/ui/deployments/{deployment_id}", self.deployment, methods=["GET"]),
            Route("/ui/deployments/{deployment_id}/{action}", self.deployment_action, methods=["POST"]),
            Route("/ui/models", self.models, methods=["GET"]),
            Route("/ui/models/{model}/{version}", self.model, methods=["GET"]),
            Route("/ui/enrollment", self.enrollment, methods=["GET"]),
            Route("/ui/enrollment/{device_id}/{action}", self.enrollment_action, methods=["POST"]),
            Route("/ui/audit", self.audit, methods=["GET"]),
            Mount("/ui/static", StaticFiles(packages=[("server.console", "static")]), name="static"),
        ]

    # -- rendering ----------------------------------------------------------------------------------------

    def render(self, request: Request, name: str, ctx: Mapping[str, Any], *, session: Session | None,
               nav: str = "", status: int = 200) -> HTMLResponse:
        flash, flash_error = "", False
        # a live-update fetch never takes the flash: it belongs to the page the action redirects to
        if session is not None and session.flash and request.headers.get("x-requested-with") != "fetch":
            flash, flash_error, session.flash = session.flash, session.flash_error, ""
        html = self.env.get_template(name).render(
            **ctx, request=request, session=session, nav=NAV, active=nav, flash=flash, flash_error=flash_error,
            can_deploy=session is not None and allows(session.role, DEPLOY),
            can_admin=session is not None and allows(session.role, ADMIN), states=STATES,
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def error(self, request: Request, session: Session | None, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", {"status": status, "message": message}, session=session,
                           status=status)

    # -- sessions -----------------------------------------------------------------------------------------

    async def session(self, request: Request) -> Session | None:
        s = self.sessions.get(request.cookies.get(COOKIE))
        if s is None:
            return None
        ident = await self.in_worker(self.api.service.registry.token_identity, s.digest)
        if ident is None:  # the token was revoked: so is every session made with it
            self.sessions.drop(s.sid)
            return None
        s.actor, s.role = ident
        return s

    def _to_login(self, request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/ui/login?" + urlencode({"next": target}), 303, headers=HEADERS)

    async def _page(self, request: Request, template: str, nav: str, fn: Callable[..., Any], *args: Any) -> Response:
        s = await self.session(request)
        if s is None:
            return self._to_login(request)
        try:
            data = await self.in_worker(fn, *args)
        except NotFoundError as exc:
            return self.error(request, s, 404, exc.message)
        except ServerError as exc:
            return self.error(request, s, 400, exc.message)
        return self.render(request, template, data, session=s, nav=nav)

    async def login_form(self, request: Request, *, message: str = "", status: int = 200) -> Response:
        if await self.session(request) is not None:
            return RedirectResponse(_safe_next(request.query_params.get("next")), 303, headers=HEADERS)
        nonce = secrets.token_urlsafe(24)
        resp = self.render(request, "login.html", {"nonce": nonce, "message": message,
                                                   "next": _safe_next(request.query_params.get("next"))},
                           session=None, status=status)
        resp.set_cookie(LOGIN_COOKIE, nonce, max_age=3600, path="/ui/login", httponly=True, samesite="strict",
                        secure=self.secure)
        return resp

    async def login(self, request: Request) -> Response:
        try:
            form = await _form(request)
        except InvalidRequestError as exc:
            return await self.login_form(request, message=exc.message, status=400)
        if not same(form.get("nonce"), request.cookies.get(LOGIN_COOKIE)):
            return await self.login_form(request, message="The login form expired; try again.", status=403)
        token = form.get("token", "").strip()
        ident = None
        if token and len(token) <= 200:
            ident = await self.in_worker(self.api.service.registry.token_identity, token_digest(token))
        if ident is None:
            if self.on_refused is not None:
                self.on_refused(self.api.route("status"), AuthError("console login with an unknown token"))
            return await self.login_form(request, message="Unknown or revoked API token.", status=401)
        s = self.sessions.create(token_digest(token))
        s.actor, s.role = ident
        await self.in_worker(partial(self.api.service.record_audit, actor=s.actor, action="console_login",
                                     target=None, params={"role": s.role}, outcome="ok"))
        resp = RedirectResponse(_safe_next(form.get("next")), 303, headers=HEADERS)
        resp.set_cookie(COOKIE, s.sid, path="/ui", httponly=True, samesite="strict", secure=self.secure)
        resp.delete_cookie(LOGIN_COOKIE, path="/ui/login")
        return resp

    async def logout(self, request: Request) -> Response:
        s = await self.session(request)
        try:
            form = await _form(request)
        except InvalidRequestError:
            form = {}
        if s is not None and same(form.get("csrf"), s.csrf):
            self.sessions.drop(s.sid)
        resp = RedirectResponse("/ui/login", 303, headers=HEADERS)
        resp.delete_cookie(COOKIE, path="/ui")
        return resp

    # -- pages --------------------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        return await self._page(request, "overview.html", "overview", self.data.overview)

    async def devices(self, request: Request) -> Response:
        return await self._page(request, "devices.html", "devices", self.data.devices, dict(request.query_params))

    async def device(self, request: Request) -> Response:
        return await self._page(request, "device.html", "devices", self.data.device, request.path_params["device_id"])

    async def deployments(self, request: Request) -> Response:
        return await self._page(request, "deployments.html", "deployments", self.data.deployments)

    async def deployment(self, request: Request) -> Response:
        return await self._page(request, "deployment.html", "deployments", self.data.deployment,
                                request.path_params["deployment_id"], request.query_params.get("all") == "1")

    async def models(self, request: Request) -> Response:
        return await self._page(request, "models.html", "models", self.data.models)

    async def model(self, request: Request) -> Response:
        p = request.path_params
        if not str(p["version"]).isdigit():
            s = await self.session(request)
            return self.error(request, s, 404, "a model version is a number") if s else self._to_login(request)
        return await self._page(request, "model.html", "models", self.data.model, f"{p['model']}:{p['version']}")

    async def enrollment(self, request: Request) -> Response:
        return await self._page(request, "enrollment.html", "enrollment", self.data.enrollment)

    async def audit(self, request: Request) -> Response:
        return await self._page(request, "audit.html", "audit", self.data.audit, dict(request.query_params))

    # -- live updates ---------------------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        s = await self.session(request)
        if s is None:
            return Response("no session", status_code=401, headers=HEADERS)
        if self._streams >= self.max_streams:  # a soft cap: streams count themselves once they run
            # 204 tells EventSource not to reconnect: the page stays readable, it is just not live
            log.warning("live-update stream refused: %d open already", self._streams)
            return Response(status_code=204, headers=HEADERS)
        return StreamingResponse(self._changes(request, s), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    async def _changes(self, request: Request, s: Session, max_s: float = 300.0) -> AsyncIterator[str]:
        """One ``change`` event whenever the fleet's change stamp moves; the stream ends after
        ``max_s`` (the browser reconnects) so a revoked token stops it soon."""
        with self._streams_lock:
            self._streams += 1
        try:
            yield "retry: 2000\n\n"
            last, started, quiet = None, time.monotonic(), time.monotonic()
            db = self.data.database
            seen, generation = -1, db.change_generation()
            while not self.closing.is_set() and time.monotonic() - started < max_s:
                if self.sessions.get(s.sid) is None:
                    return
                if generation != seen:  # PostgreSQL: only after a NOTIFY; SQLite: every poll_s
                    seen = generation
                    stamp = await self.in_worker(self.data.change_stamp)
                    if stamp != last:
                        yield f"event: change\ndata: {stamp}\n\n"
                        last, quiet = stamp, time.monotonic()
                if time.monotonic() - quiet > 15:
                    yield ": keep-alive\n\n"
                    quiet = time.monotonic()
                if db.dialect == "sqlite":
                    await asyncio.sleep(self.poll_s)
                    generation += 1
                else:  # wake on NOTIFY; at most poll_s apart to notice a closed session or shutdown
                    generation = await asyncio.to_thread(db.wait_change, generation, self.poll_s)
        finally:
            with self._streams_lock:
                self._streams -= 1

    # -- actions ------------------------------------------------------------------------------------------

    async def _act(self, request: Request, route_name: str, back: str, done: str, *,
                   path: Mapping[str, str] | None = None, body: Callable[[Mapping[str, str]], Any] | None = None,
                   confirm: bool = True) -> Response:
        s = await self.session(request)
        if s is None:
            return self._to_login(request)
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return self.error(request, s, 403, "cross-origin form posts are refused")
        try:
            form = await _form(request)
        except InvalidRequestError as exc:
            return self.error(request, s, 400, exc.message)
        if not same(form.get("csrf"), s.csrf):
            return self.error(request, s, 403, "the form's CSRF token is missing or stale: reload the page and retry")
        route = self.api.route(route_name)
        needed = self.api.role_needed(route)
        if not allows(s.role, needed):
            refusal = ForbiddenError(f"token {s.actor!r} has role {s.role}; this action ({route.name}) needs "
                                     f"{needed}", actor=s.actor)
            if self.on_refused is not None:
                await self.in_worker(self.on_refused, route, refusal)
            return self.error(request, s, 403, refusal.message)
        if confirm and form.get("confirm") != "yes":
            s.flash, s.flash_error = "Nothing done: tick the confirmation box first.", True
            return RedirectResponse(back, 303, headers=HEADERS)
        try:
            payload = body(form) if body is not None else None
            await self.in_worker(partial(self.api.call, route_name, actor=s.actor, path=path, body=payload))
        except ServerError as exc:
            s.flash, s.flash_error = f"{route.summary.split(':')[0]} failed: {exc.message}", True
            return RedirectResponse(back, 303, headers=HEADERS)
        s.flash, s.flash_error = done, False
        return RedirectResponse(back, 303, headers=HEADERS)

    async def device_rollback(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]

        def body(form: Mapping[str, str]) -> dict[str, Any]:
            version = form.get("version", "")
            if not version.isdigit():
                raise InvalidRequestError("choose a kept version")
            out: dict[str, Any] = {"target": f"device:{device_id}", "version": int(version)}
            if form.get("model"):
                out["model"] = form["model"]
            return out

        return await self._act(request, "rollback", f"/ui/devices/{device_id}",
                               f"Rollback of {device_id} requested (signed command sent; the page updates when the "
                               "device reports).", body=body)

    async def device_revoke(self, request: Request) -> Response:
        device_id = request.path_params["device_id"]
        return await self._act(request, "revoke_device", f"/ui/devices/{device_id}", f"{device_id} is revoked.",
                               path={"device_id": device_id})

    async def deployment_action(self, request: Request) -> Response:
        dep_id, action = request.path_params["deployment_id"], request.path_params["action"]
        back = f"/ui/deployments/{dep_id}"
        if action in ("halt", "rollback"):
            rollback = action == "rollback"
            return await self._act(
                request, "halt_deployment", back,
                f"{dep_id} {'halted; its devices go back to their previous version' if rollback else 'halted'}.",
                path={"deployment_id": dep_id},
                body=lambda f: {"rollback": rollback, "reason": (f.get("reason") or "")[:200] or None})
        if action == "resume":
            detail = await self.in_worker(self._resume_body, dep_id)
            if detail is None:
                s = await self.session(request)
                return self.error(request, s, 404, f"unknown deployment {dep_id}") if s else self._to_login(request)
            return await self._act(request, "deploy", "/ui/deployments",
                                   f"Resumed: a new rollout of {detail['model']} to {detail['target']} started "
                                   "(devices that run it already count as committed).", body=lambda f: detail)
        s = await self.session(request)
        return self.error(request, s, 404, f"no action {action!r}") if s else self._to_login(request)

    def _resume_body(self, dep_id: str) -> dict[str, Any] | None:
        try:
            d = self.api.service.registry.get_deployment(dep_id)
        except NotFoundError:
            return None
        return {"model": f"{d.model}:{d.version}", "target": d.target, "canary_percent": d.canary_percent,
                "wave_percent": d.wave_percent, "max_failures_percent": d.max_failures_percent,
                "probation_s": d.probation_s}

    async def enrollment_action(self, request: Request) -> Response:
        device_id, action = request.path_params["device_id"], request.path_params["action"]
        if action == "approve":
            return await self._act(
                request, "approve_device", "/ui/enrollment", f"{device_id} approved: its key is enrolled.",
                path={"device_id": device_id},
                body=lambda f: {"fingerprint": (f.get("fingerprint") or "").strip()[:256]}, confirm=False)
        if action == "reject":
            return await self._act(request, "reject_enrollment", "/ui/enrollment",
                                   f"{device_id}'s request is rejected.", path={"device_id": device_id})
        s = await self.session(request)
        return self.error(request, s, 404, f"no action {action!r}") if s else self._to_login(request)


def _safe_next(value: str | None) -> str:
    """Only a path of this console (no scheme, no host, no '//'): never an open redirect."""
    if value and value.startswith("/ui") and "//" not in value and "\\" not in value and len(value) < 2000:
        return value
    return "/ui/"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body, capped; the first value of each field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype != "application/x-www-form-urlencoded":
        raise InvalidRequestError("a console action is a form post (application/x-www-form-urlencoded)")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > FORM_CAP:
            raise InvalidRequestError(f"form over {FORM_CAP} bytes")
    try:
        fields = parse_qs(buf.decode(), keep_blank_values=True, max_num_fields=50, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"unreadable form: {exc}") from exc
    return {k: v[0] for k, v in fields.items()}
