"""The web dashboard of ``ttenv serve``: pages, forms and SSE streams outside ``/v1``.

``install(app, service, stopping)`` adds the routes, ``/static`` (the package's own assets: no
CDN) and the security headers (``DashboardHeaders``: a CSP without inline scripts or styles,
nosniff, no referrer) to every response outside ``/v1``. Pages and streams use the session
cookie of ``sessions.py``, never a bearer token (and ``/v1`` never the cookie); without a live
session a page is a 303 to ``/login``, a stream a 401. Every POST but ``/login`` needs the
session's CSRF token (403 otherwise), and ``/login`` a same-origin ``Origin`` when one is sent.
ENVs are looked up as the API does, through the Service: an owner reaches their own, an admin
every owner's, anyone else's is 404. Pages are Jinja2 templates (autoescaped) rendered with the
context of the contract (``me``, ``csrf``, ``page`` and the page's own).
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pytest_ttenv.backend.engines.base import host_label
from pytest_ttenv.core.model import EnvInfo, ImageInfo, VmInfo
from pytest_ttenv.core.naming import parse_seconds
from pytest_ttenv.errors import NotFound, TTError
from pytest_ttenv.server import dashboard_streams as streams
from pytest_ttenv.server.auth import Grant
from pytest_ttenv.server.errors import AuthError, TooMany, error_response, one_line, retry_after
from pytest_ttenv.server.models import NAME_MAX, NAME_PATTERN
from pytest_ttenv.server.service import Service
from pytest_ttenv.server.sessions import COOKIE, STREAMS_PER_SESSION, Session, Sessions, TokenCheck

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
CAPTURES_MAX = 100  # captures listed per ENV
_NAME = re.compile(NAME_PATTERN)
T = TypeVar("T")


def is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class DashboardHeaders:
    """ASGI middleware: the security headers (CSP, nosniff, no referrer) on every response
    outside ``/v1``, replacing any of the same name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_api(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in HEADERS}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + HEADERS}
            await send(message)

        await self.app(scope, receive, sending)


# -- what pages and streams show ---------------------------------------------------------------------
def vm_json(vm: VmInfo) -> dict[str, Any]:
    keys = ("name", "os", "version", "arch", "state", "boot", "engine", "address", "port", "accel", "error")
    return {k: getattr(vm, k) for k in keys} | {
        "host": host_label(vm.host),
        "cpu": vm.resources.cpu,
        "mem_mib": vm.resources.mem_mib,
    }


def captures_of(state_dir: Path, env_id: str) -> list[dict[str, Any]]:
    """The failure captures of ENV ``env_id``: ``<state>/captures/<id>/*.ttcap`` (regular files),
    by name, with their size in bytes; at most CAPTURES_MAX."""
    found: list[dict[str, Any]] = []
    try:
        paths = sorted((state_dir / "captures" / env_id).glob("*.ttcap"))
    except OSError:
        return found
    for path in paths:
        try:
            if path.is_symlink() or not path.is_file():
                continue
            found.append({"name": path.name, "size": path.stat().st_size})
        except OSError:
            continue
        if len(found) >= CAPTURES_MAX:
            break
    return found


def env_json(env: EnvInfo, state_dir: Path) -> dict[str, Any]:
    """An ENV as pages and streams show it (the contract's shape)."""
    return {
        "id": env.id,
        "name": env.name,
        "owner": env.owner,
        "state": env.state,
        "created": env.created,
        "expires": env.expires,
        "vms": [vm_json(vm) for vm in env.vms],
        "captures": captures_of(state_dir, env.id),
    }


def templates_of(image: ImageInfo) -> int:
    """Complete warm templates of a qemu image (``<image dir>/warm/<key>/meta.json``); 0 if none."""
    if image.path is None:
        return 0
    try:
        return sum(
            1 for d in (image.path / "warm").iterdir() if not d.name.startswith(".") and (d / "meta.json").is_file()
        )
    except OSError:
        return 0


def image_json(image: ImageInfo) -> dict[str, Any]:
    return {"name": image.name, "arch": image.arch, "source": image.source, "templates": templates_of(image)}


def error_page(status: int, message: str) -> HTMLResponse:
    """A self-contained error page (no template: it must work when everything else does not)."""
    title = f"{status} {HTTPStatus(status).phrase}"
    body = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>ttenv: {html.escape(title)}</title><link rel="stylesheet" href="/static/dashboard.css"></head>'
        f'<body><main><h1>{html.escape(title)}</h1><p class="error">{html.escape(one_line(message))}</p>'
        '<p><a href="/">Back to the dashboard</a></p></main></body></html>\n'
    )
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store"})


def _json_error(exc: TTError) -> JSONResponse:
    """The API's JSON error body for ``exc``, with ``Retry-After`` for a 429 or 503."""
    status, body = error_response(exc)
    wait = retry_after(exc)
    return JSONResponse(body, status, {"Retry-After": str(wait)} if wait is not None else None)


class Refused(Exception):
    """Raised by a route's session check with the answer to send instead (a 303 to /login, a
    403 for CSRF, a stream's 401 or 429); ``install`` registers the handler that sends it."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST (its first value per field; Guard bounds the body)."""
    body = await request.body()
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=20)
    return {k: v[0] for k, v in fields.items()}


def _same_origin(request: Request) -> bool:
    """Whether a login form was posted from this site. Under ``Referrer-Policy: no-referrer`` a
    browser sends ``Origin: null`` even for a same-origin form: then its ``Sec-Fetch-Site`` decides."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None or request.headers.get("sec-fetch-site") == "same-origin"
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "") and parts.scheme == request.url.scheme


def install(
    app: FastAPI,
    service: Service,
    stopping: Callable[[], bool] = lambda: False,
    templates_dir: Path | None = None,
    static_dir: Path | None = None,
) -> Sessions:
    """Add the dashboard to ``app``; returns its sessions."""
    sessions = Sessions(TokenCheck(service.tokens))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir or TEMPLATES)), autoescape=True)
    templates = Jinja2Templates(env=env)
    state_dir = service.cfg.state_dir
    router = APIRouter(include_in_schema=False)

    async def session_of(request: Request, touch: bool = True) -> Session | None:
        return await sessions.get(request.cookies.get(COOKIE), touch)

    async def signed_in(request: Request) -> Session:
        """The live session of a page (touched); Refused with a 303 to /login without one."""
        session = await session_of(request)
        if session is None:
            raise Refused(_redirect("/login"))
        return session

    def grant_of(session: Session) -> Grant:
        grant = service.tokens.grant_of(session.owner)
        return Grant(grant.name, session.admin, grant.limits)

    async def run(fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn)

    def page(request: Request, name: str, session: Session | None, code: int = 200, **ctx: Any) -> Response:
        me = {"owner": session.owner, "admin": session.admin} if session else None
        ctx |= {"me": me, "csrf": session.csrf if session else "", "page": name.removesuffix(".html")}
        return templates.TemplateResponse(request, name, ctx, status_code=code, headers={"Cache-Control": "no-store"})

    def problem(request: Request, session: Session | None, status: int, message: str) -> Response:
        """The error page (``error.html``; the built-in one if the template is missing)."""
        try:
            return page(request, "error.html", session, code=status, error=one_line(message))
        except jinja2.TemplateNotFound:
            return error_page(status, message)

    def failed(request: Request, session: Session | None, exc: TTError) -> Response:
        status, body = error_response(exc)
        return problem(request, session, status, body["message"])

    # -- login ------------------------------------------------------------------------------------
    @router.get("/login")
    async def login_page(request: Request) -> Response:
        return page(request, "login.html", None, error="")

    @router.post("/login")
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return problem(request, None, 403, "login from another site refused")
        token = (await _form(request)).get("token", "")
        try:
            session = await sessions.login(token)
        except AuthError as exc:
            return page(request, "login.html", None, code=401, error=exc.message)
        except TTError as exc:
            return failed(request, None, exc)
        sessions.drop(request.cookies.get(COOKIE))
        response = _redirect("/")
        secure = request.url.scheme == "https"
        response.set_cookie(
            COOKIE, session.id, path="/", secure=secure, httponly=True, samesite="strict"
        )  # a browser-session cookie: the server ends the session after IDLE s without use
        return response

    async def posted(request: Request) -> tuple[Session, dict[str, str]]:
        """The session and form of a POST; Refused with a 303 to /login, or a 403 for CSRF."""
        session = await signed_in(request)
        form = await _form(request)
        if not session.csrf_ok(form.get("csrf")):
            raise Refused(problem(request, session, 403, "the form's CSRF token is missing or wrong: reload the page"))
        return session, form

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        session, _ = await posted(request)
        sessions.drop(session.id)
        response = _redirect("/login")
        response.delete_cookie(COOKIE, path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict")
        return response

    # -- pages ------------------------------------------------------------------------------------
    @router.get("/")
    async def host(request: Request) -> Response:
        session = await signed_in(request)
        who = grant_of(session)

        def read() -> dict[str, Any]:
            images = [image_json(image) for image in service.images()]
            return {"status": service.status(who), "owners": service.owners(who), "images": images}

        try:
            return page(request, "host.html", session, **await run(read))
        except TTError as exc:
            return failed(request, session, exc)

    @router.get("/envs")
    async def envs(request: Request) -> Response:
        session = await signed_in(request)
        who = grant_of(session)
        try:
            found = await run(lambda: [env_json(env, state_dir) for env in service.list_for(who)])
        except TTError as exc:
            return failed(request, session, exc)
        return page(request, "envs.html", session, envs=found)

    def lookup(who: Grant, ref: str, vm: str | None = None) -> tuple[EnvInfo, VmInfo | None]:
        if not (len(ref) <= NAME_MAX and _NAME.match(ref)) or (vm is not None and not _NAME.match(vm)):
            raise NotFound(f"no ENV named {ref[:80]!r}", "see the ENV list")
        env = service.find_for(who, ref)
        if vm is None:
            return env, None
        for info in env.vms:
            if info.name == vm:
                return env, info
        raise NotFound(f"no VM named {vm!r} in ENV {env.name}", f"VMs: {', '.join(v.name for v in env.vms)}")

    @router.get("/envs/{ref}")
    async def one_env(request: Request, ref: str) -> Response:
        session = await signed_in(request)
        who = grant_of(session)
        try:
            env, _ = await run(lambda: lookup(who, ref))
        except TTError as exc:
            return failed(request, session, exc)
        return page(request, "env.html", session, env=env_json(env, state_dir))

    @router.get("/envs/{ref}/vms/{vm}")
    async def one_vm(request: Request, ref: str, vm: str) -> Response:
        session = await signed_in(request)
        who = grant_of(session)
        try:
            env, info = await run(lambda: lookup(who, ref, vm))
        except TTError as exc:
            return failed(request, session, exc)
        assert info is not None
        shown = env_json(env, state_dir)
        login_line = f"ssh -p {info.port} {info.user}@{info.address}"
        vm_shown = next(v for v in shown["vms"] if v["name"] == info.name)
        return page(request, "vm.html", session, env=shown, vm=vm_shown, login=login_line, host_key=info.host_key)

    @router.get("/events")
    async def events(request: Request) -> Response:
        session = await signed_in(request)
        shown = [e.as_dict() for e in service.events.visible(session.owner, session.admin)]
        return page(request, "events.html", session, events=shown[::-1])

    # -- forms ------------------------------------------------------------------------------------
    @router.post("/envs/{ref}/renew")
    async def renew(request: Request, ref: str) -> Response:
        session, form = await posted(request)
        who = grant_of(session)

        def act() -> None:
            ttl = parse_seconds(form.get("ttl", "").strip(), "ttl")
            env, _ = lookup(who, ref)
            service.renew(env.owner, env.id, ttl, by=who.name)

        try:
            await run(act)
        except TTError as exc:
            return failed(request, session, exc)
        return _redirect("/envs")

    @router.post("/envs/{ref}/delete")
    async def delete(request: Request, ref: str) -> Response:
        session, form = await posted(request)
        if form.get("confirm") != "yes":
            return problem(request, session, 400, "deleting an ENV needs confirm=yes")
        who = grant_of(session)

        def act() -> None:
            env, _ = lookup(who, ref)
            service.delete(env.owner, env.id, by=who.name)

        try:
            await run(act)
        except TTError as exc:
            return failed(request, session, exc)
        return _redirect("/envs")

    # -- streams ----------------------------------------------------------------------------------
    async def stream_session(request: Request) -> Session:
        """The live session of a stream (not touched: streams do not keep it alive); Refused with
        a 401 without one, a 429 when it has STREAMS_PER_SESSION streams open."""
        session = await session_of(request, touch=False)
        if session is None:
            raise Refused(_json_error(AuthError("no live session: log in at /login")))
        if session.streams >= STREAMS_PER_SESSION:
            raise Refused(_json_error(TooMany(f"over {STREAMS_PER_SESSION} streams open in this session", None, 5)))
        return session

    def streaming(
        request: Request, session: Session, body: Callable[[streams.Alive], AsyncIterator[bytes]]
    ) -> Response:
        async def alive() -> bool:
            if stopping() or await request.is_disconnected():
                return False
            return await sessions.get(session.id, touch=False) is not None

        async def counted() -> AsyncIterator[bytes]:
            if session.streams >= STREAMS_PER_SESSION:  # checked again: the count rises only here
                return
            session.streams += 1
            chunks = body(alive)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                session.streams -= 1
                await chunks.aclose()  # type: ignore[attr-defined]

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(counted(), media_type="text/event-stream", headers=headers)

    @router.get("/ui/stream/envs")
    async def env_stream(request: Request) -> Response:
        session = await stream_session(request)

        def snapshot() -> list[dict[str, Any]]:
            return [env_json(env, state_dir) for env in service.list_for(grant_of(session))]

        return streaming(request, session, lambda alive: streams.env_stream(alive, snapshot))

    @router.get("/ui/stream/envs/{ref}/vms/{vm}/console")
    async def console_stream(request: Request, ref: str, vm: str) -> Response:
        session = await stream_session(request)
        who = grant_of(session)
        try:
            env, info = await run(lambda: lookup(who, ref, vm))
        except TTError as exc:
            status, body = error_response(exc)
            return JSONResponse(body, status_code=status)
        assert info is not None
        follower: streams.LogFollower | streams.TailDiff
        if info.engine == "qemu":
            follower, every = streams.LogFollower(Path(env.rundir) / info.name / "console.log"), streams.CONSOLE_POLL
        else:
            env_id, name = env.id, info.name
            follower, every = streams.TailDiff(lambda n: service.backend.console(env_id, name, n)), 1.0
        return streaming(request, session, lambda alive: streams.console_stream(alive, follower, every))

    @router.get("/ui/stream/events")
    async def event_stream(request: Request) -> Response:
        session = await stream_session(request)
        log = service.events

        def visible(after: int, last: int | None) -> list[dict[str, Any]]:
            return [e.as_dict() for e in log.visible(session.owner, session.admin, after, last)]

        def chunks(alive: streams.Alive) -> AsyncIterator[bytes]:
            return streams.event_stream(alive, visible, log.latest, lambda after: log.wait(after, 1.0))

        return streaming(request, session, chunks)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return exc.response

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=static_dir or STATIC, check_dir=False), name="static")
    app.add_middleware(DashboardHeaders)
    return sessions
