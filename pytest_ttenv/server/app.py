"""The REST API (FastAPI): routes under ``/v1``, bearer auth, body limit, JSON errors, fairness.

``create_app(service)`` builds the app; ``serve.py`` runs it under uvicorn. Routes are plain
functions run in the worker thread pool (the local backend blocks), except the long poll, which
has its own pool (``Gate``); the token check runs on the event loop against the token store's
in-memory cache (``auth.py``). Every failure leaves as the error body of ``errors.py`` - a 4xx for
anything the client got wrong, a 429/503 with ``Retry-After`` for load (one owner over its share,
a locked database, no descriptor free), never a traceback; unexpected errors are logged with a
rate limit (``quiet_log``), so a flood of them cannot flood the log.

Everything outside ``/v1`` is the web dashboard (``dashboard.py``): it checks its own session
cookie; ``/v1`` takes only the bearer token, never the cookie, so no page can make a browser
act on the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pytest_ttenv import __version__
from pytest_ttenv.core.model import Resources
from pytest_ttenv.core.paths import runtime_dir
from pytest_ttenv.errors import NotFound, TTError
from pytest_ttenv.server import dashboard
from pytest_ttenv.server import models as m
from pytest_ttenv.server.auth import Grant, TokenStore
from pytest_ttenv.server.errors import (
    AuthError,
    Busy,
    TooLarge,
    TooMany,
    as_busy,
    error_response,
    one_line,
    retry_after,
)
from pytest_ttenv.server.service import Service, spec_of
from pytest_ttenv.server.sessions import TokenCheck

MAX_BODY = 64 * 1024
BODY_TIMEOUT = 30.0  # seconds to send a request body once its head is in
WORKER_THREADS = 128  # routes but the long poll run in these worker threads
log = logging.getLogger("ttenv.server")

PathName = Annotated[str, Path(min_length=1, max_length=m.NAME_MAX, pattern=m.NAME_PATTERN)]
_bearer = HTTPBearer(auto_error=False, description="a token from `ttenv token add NAME`")


async def _owner(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The token's owner, checked by Guard (``creds`` puts the scheme into the OpenAPI document).
    Async, so it takes no worker thread."""
    return str(request.state.owner)


async def _grant(request: Request) -> Grant:
    grant: Grant = request.state.grant
    return grant


Owner = Annotated[str, Depends(_owner)]
Caller = Annotated[Grant, Depends(_grant)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "bad request",
        401: "missing or wrong token",
        404: "no such ENV, VM or image (or another owner's)",
        409: "quota exceeded (with what is free) or name taken",
        413: "request body over 64 KiB",
        422: "request does not match the schema, or malformed JSON",
        424: "the VM failed to boot or died",
        429: "too many requests or long polls of this owner at once (see Retry-After)",
        503: "the server is busy for a moment (see Retry-After)",
    }
    return {code: {"model": m.Error, "description": text[code]} for code in (*codes, 429, 503)}


class QuietLog:
    """Rate limit for unexpected errors: at most ``burst`` logged per ``window`` seconds (the
    first ``tracebacks`` of them with their traceback), then one line saying how many were dropped."""

    def __init__(self, burst: int = 10, window: float = 10.0, tracebacks: int = 3) -> None:
        self.burst, self.window, self.tracebacks = burst, window, tracebacks
        self._lock = threading.Lock()
        self._start, self._count, self._dropped = 0.0, 0, 0

    def error(self, message: str, *args: object, exc: BaseException | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= self.window:
                if self._dropped:
                    log.error("... %d more error(s) not logged in the last %.0f s", self._dropped, self.window)
                self._start, self._count, self._dropped = now, 0, 0
            self._count += 1
            if self._count > self.burst:
                self._dropped += 1
                return
            trace = exc is not None and self._count <= self.tracebacks
        log.error(message, *args, exc_info=exc if trace else None)


quiet_log = QuietLog()


class Scrub:
    """Takes the server's own paths (state, image and socket dirs) out of what a client is told."""

    def __init__(self, *roots: FsPath) -> None:
        texts = {str(r) for root in roots for r in (root, root.resolve())}
        self.roots = sorted((t for t in texts if len(t) > 1), key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        for root in self.roots:
            text = text.replace(root, "<server dir>")
        return text


def _json_error(exc: BaseException, scrub: Callable[[str | None], str | None] = lambda t: t) -> JSONResponse:
    status, body = error_response(exc)
    body = {k: scrub(v) if k in ("message", "hint", "console") else v for k, v in body.items()}
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    wait = retry_after(exc)
    if wait is not None:
        headers = {"Retry-After": str(wait)}
    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """Fair shares: requests in flight per owner (``per_owner``), long polls per owner
    (``polls_per_owner``) and the long polls' own thread pool (``poll_threads``), so one owner's
    polls can take neither the other requests' threads nor the other owners' share."""

    def __init__(self, per_owner: int, polls_per_owner: int, poll_threads: int) -> None:
        self.per_owner, self.polls_per_owner, self.poll_threads = per_owner, polls_per_owner, poll_threads
        self.requests: dict[str, int] = {}
        self.polls: dict[str, int] = {}
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # made on the event loop, at the first long poll
            self._limiter = anyio.CapacityLimiter(self.poll_threads)
        return self._limiter

    @contextmanager
    def request(self, owner: str) -> Iterator[None]:
        """One request of ``owner`` in flight (event loop only: no lock needed); TooMany beyond the share."""
        if self.requests.get(owner, 0) >= self.per_owner:
            raise TooMany(
                f"owner {owner} has {self.per_owner} requests in flight already",
                "retry after the Retry-After seconds",
                1,
            )
        self.requests[owner] = self.requests.get(owner, 0) + 1
        try:
            yield
        finally:
            self.requests[owner] -= 1
            if not self.requests[owner]:
                del self.requests[owner]

    @contextmanager
    def poll(self, owner: str) -> Iterator[None]:
        """One long poll of ``owner``: TooMany beyond its share, Busy when the poll pool is full."""
        if self.polls.get(owner, 0) >= self.polls_per_owner:
            raise TooMany(
                f"owner {owner} has {self.polls_per_owner} long polls (wait) in flight already",
                "wait for fewer VMs at once, or retry after the Retry-After seconds",
                2,
            )
        if self.limiter.available_tokens < 1:
            raise Busy("every long-poll thread of the server is taken", "retry after the Retry-After seconds", 2)
        self.polls[owner] = self.polls.get(owner, 0) + 1
        try:
            yield
        finally:
            self.polls[owner] -= 1
            if not self.polls[owner]:
                del self.polls[owner]


class Guard:
    """ASGI middleware in front of every route: the bearer token first (401, before any body is
    read; the owner goes to ``scope["state"]["owner"]``, its grant to ``["grant"]``), the owner's
    share of requests in flight (429), then the body limit (413 for a body over ``limit`` bytes,
    announced by Content-Length or streamed in chunks; a body not sent within BODY_TIMEOUT is 408).
    Any exception a route lets through becomes a JSON answer here (503 for load, else 500), logged
    with a rate limit. ``OPEN`` paths need no token; paths outside ``/v1`` (the dashboard, which
    checks its own session) get only the body limit.
    """

    OPEN = ("/v1/openapi.json",)

    def __init__(self, app: ASGIApp, tokens: TokenStore, gate: Gate, scrub: Scrub, limit: int = MAX_BODY) -> None:
        self.app, self.tokens, self.gate, self.scrub, self.limit = app, tokens, gate, scrub, limit
        self.check = TokenCheck(tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._guarded(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - a route's failure no handler answered: JSON, never a traceback
            busy = as_busy(exc)
            if busy is None:
                quiet_log.error("%s %s failed: %r", scope.get("method"), scope.get("path"), exc, exc=exc)
            if not started:
                await _json_error(busy or exc)(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        if not dashboard.is_api(scope["path"]):
            await self._with_body(scope, receive, send, dict(scope["headers"]))
            return
        headers = dict(scope["headers"])
        try:
            grant = await self._auth(headers.get(b"authorization"))
        except (AuthError, Busy) as exc:
            await _json_error(exc)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["owner"], state["grant"] = grant.name, grant
        try:
            with self.gate.request(grant.name):
                await self._with_body(scope, receive, send, headers)
        except TooMany as exc:
            await _json_error(exc)(scope, receive, send)

    async def _with_body(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        with anyio.move_on_after(BODY_TIMEOUT) as slow:
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await self._reject(scope, receive, send)
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
        if slow.cancelled_caught:
            error = {
                "error": "usage",
                "message": f"request body not received within {BODY_TIMEOUT:.0f} s",
                "hint": "send the whole body at once",
                "console": None,
                "free": None,
            }
            await JSONResponse(error, status_code=408, headers={"Connection": "close"})(scope, receive, send)
            return
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _auth(self, header: bytes | None) -> Grant:
        """The grant of the bearer token in ``header``: on the event loop from the token cache
        (a ``stat`` per request); the file is re-read, in a thread of its own, only after it changed."""
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        if not header or scheme.lower() != "bearer":
            raise AuthError("no bearer token", "send Authorization: Bearer <token>")
        return await self.check.grant(token)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = TooLarge(f"request body over {self.limit // 1024} KiB", "send less")
        await _json_error(exc)(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    yield


def create_app(
    service: Service, stopping: Callable[[], bool] = lambda: False, templates: FsPath | None = None
) -> FastAPI:
    """The API and the dashboard for ``service``. ``stopping()`` tells long polls and streams the
    server is shutting down; ``templates`` replaces the dashboard's template dir (tests)."""
    app = FastAPI(
        lifespan=_lifespan,
        title="ttenv host server",
        version=__version__,
        openapi_url="/v1/openapi.json",
        docs_url=None,  # Swagger's page loads from a CDN: blank on an air-gapped host
        redoc_url=None,
        redirect_slashes=False,
        description="ENVs of real VMs on a shared host; see docs/server.md of pytest-ttenv.",
    )
    cfg = service.cfg
    gate = Gate(cfg.max_requests_per_owner, cfg.max_polls_per_owner, cfg.poll_threads)
    scrub = Scrub(cfg.state_dir, cfg.image_dir, runtime_dir())
    app.add_middleware(Guard, tokens=service.tokens, gate=gate, scrub=scrub)
    dashboard.install(app, service, stopping, templates)  # its headers middleware goes outside Guard

    @app.exception_handler(TTError)
    async def _tt(request: Request, exc: TTError) -> JSONResponse:
        if error_response(exc)[0] == 500:
            quiet_log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _json_error(exc, scrub)

    @app.exception_handler(Exception)  # Guard answers first; this is for a failure of Guard itself
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and all(e.get("loc", ("",))[0] == "path" for e in errors):  # a name that cannot exist
            _, body = error_response(_not_found(request))
            return JSONResponse(body, status_code=404)
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        body = {
            "error": "usage",
            "message": one_line(f"bad request: {where}: {first.get('msg', 'invalid')}"),
            "hint": "see /v1/openapi.json",
            "console": None,
            "free": None,
        }
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            _, body = error_response(_not_found(request))
            return JSONResponse(body, status_code=404)
        if exc.status_code == 400:  # FastAPI could not even parse the body (not UTF-8, ...): as malformed JSON
            body = {
                "error": "usage",
                "message": one_line(f"bad request: {exc.detail}"),
                "hint": "send a JSON body, see /v1/openapi.json",
                "console": None,
                "free": None,
            }
            return JSONResponse(body, status_code=422)
        kind = "usage" if exc.status_code < 500 else "server"
        body = {"error": kind, "message": one_line(str(exc.detail)), "hint": None, "console": None, "free": None}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/v1/status", response_model=m.Status, responses=_errors(401), tags=["server"])
    def status(who: Caller) -> dict[str, object]:
        """Version, engine, public address, resource totals/used/free, ENV and VM counts: of the
        whole server for an admin token, else the caller's own (``free``: what it may still take)."""
        return service.status(who)

    @app.get("/v1/images", response_model=list[m.Image], responses=_errors(401), tags=["server"])
    def images(who: Owner) -> list[m.Image]:
        return [m.Image.of(image) for image in service.images()]

    @app.post(
        "/v1/envs",
        status_code=201,
        response_model=m.Env,
        responses=_errors(400, 401, 404, 409, 413, 422),
        tags=["envs"],
    )
    def create_env(body: m.EnvCreate, who: Owner) -> m.Env:
        """Create an ENV; answers at once with its VMs ``booting``."""
        vms = [(vm.name, vm.image, Resources(**vm.resources.model_dump())) for vm in body.vms]
        spec = spec_of(body.name, vms, body.client_pubkey, body.ttl, body.accel, body.boot)
        return m.Env.of(service.create(who, spec))

    @app.get("/v1/envs", response_model=list[m.Env], responses=_errors(401), tags=["envs"])
    def list_envs(who: Owner) -> list[m.Env]:
        """The caller's ENVs."""
        return [m.Env.of(env) for env in service.list(who)]

    @app.get("/v1/envs/{env}", response_model=m.Env, responses=_errors(401, 404, 422), tags=["envs"])
    def show_env(env: PathName, who: Owner) -> m.Env:
        """One of the caller's ENVs, by name or id."""
        return m.Env.of(service.find(who, env))

    @app.delete("/v1/envs/{env}", response_model=m.Env, responses=_errors(401, 404, 422), tags=["envs"])
    def delete_env(env: PathName, who: Owner) -> m.Env:
        """Stop the ENV's VMs and release everything; answers with what was deleted."""
        return m.Env.of(service.delete(who, env))

    @app.post("/v1/envs/{env}/renew", response_model=m.Env, responses=_errors(401, 404, 413, 422), tags=["envs"])
    def renew(env: PathName, body: m.Lease, who: Owner) -> m.Env:
        """Set the lease to ``ttl`` seconds from now (capped at the server's --max-lease)."""
        return m.Env.of(service.renew(who, env, body.ttl))

    @app.post("/v1/envs/{env}/keep", response_model=m.Env, responses=_errors(401, 404, 413, 422), tags=["envs"])
    def keep(env: PathName, body: m.Lease, who: Owner) -> m.Env:
        """Keep the ENV for ``ttl`` seconds (capped at the server's --max-lease)."""
        return m.Env.of(service.keep(who, env, body.ttl))

    @app.post("/v1/envs/{env}/vms/{vm}/wait", response_model=m.Vm, responses=_errors(401, 404, 422, 424), tags=["vms"])
    async def wait_vm(
        env: PathName,
        vm: PathName,
        who: Owner,
        timeout: Annotated[float | None, Query(gt=0, le=m.MAX_LEASE_ANY)] = None,
    ) -> m.Vm:
        """Long poll: the VM once ``running``, or still ``booting`` after min(timeout, 30) s; ask
        again until your own deadline. The wait in which ``timeout`` ends stops a VM that is not
        up and answers 424 with its console tail. An owner has a share of long polls at once
        (429 beyond it, with Retry-After); they run in threads of their own."""
        with gate.poll(who):
            info = await anyio.to_thread.run_sync(
                lambda: service.wait(who, env, vm, timeout, stopping), limiter=gate.limiter
            )
        return m.Vm.of(info)

    @app.post(
        "/v1/envs/{env}/vms/{vm}/snapshots",
        status_code=204,
        response_class=Response,
        responses=_errors(400, 401, 404, 413, 422, 424),
        tags=["vms"],
    )
    def snapshot(env: PathName, vm: PathName, body: m.SnapshotIn, who: Owner) -> Response:
        """Save the running VM's memory and disk as snapshot ``name``."""
        service.snapshot(who, env, vm, body.name)
        return Response(status_code=204)

    @app.post(
        "/v1/envs/{env}/vms/{vm}/snapshots/{name}/revert",
        status_code=204,
        response_class=Response,
        responses=_errors(400, 401, 404, 422, 424),
        tags=["vms"],
    )
    def revert(env: PathName, vm: PathName, name: PathName, who: Owner) -> Response:
        """Restore snapshot ``name``; connections to the VM are dead afterwards."""
        service.revert(who, env, vm, name)
        return Response(status_code=204)

    @app.get(
        "/v1/envs/{env}/vms/{vm}/console", response_model=m.Console, responses=_errors(401, 404, 422), tags=["vms"]
    )
    def console(env: PathName, vm: PathName, who: Owner, tail: Annotated[int, Query(ge=1, le=2000)] = 50) -> m.Console:
        """The last ``tail`` lines of the VM's serial console."""
        return m.Console(text=service.console(who, env, vm, tail))

    return app


def _not_found(request: Request) -> Exception:
    return NotFound(f"no such resource: {request.url.path[:200]}", "see /v1/openapi.json")
