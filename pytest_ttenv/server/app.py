"""The REST API (FastAPI): routes under ``/v1``, bearer auth, body limit, JSON errors.

``create_app(service)`` builds the app; ``serve.py`` runs it under uvicorn. Routes are plain
functions run in the worker thread pool (the local backend blocks); every failure leaves as the
error body of ``errors.py`` - a 4xx for anything the client got wrong, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pytest_ttenv import __version__
from pytest_ttenv.backend.model import Resources
from pytest_ttenv.errors import NotFound, TTError
from pytest_ttenv.server import models as m
from pytest_ttenv.server.auth import TokenStore
from pytest_ttenv.server.errors import AuthError, TooLarge, error_response, one_line
from pytest_ttenv.server.service import Service, spec_of

MAX_BODY = 64 * 1024
WORKER_THREADS = 128  # routes run in worker threads; a long poll holds one for up to 30 s
log = logging.getLogger("ttenv.server")

PathName = Annotated[str, Path(min_length=1, max_length=m.NAME_MAX, pattern=m.NAME_PATTERN)]
_bearer = HTTPBearer(auto_error=False, description="a token from `ttenv token add NAME`")


def _owner(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The token's owner, checked by Guard (``creds`` puts the scheme into the OpenAPI document)."""
    return str(request.state.owner)


Owner = Annotated[str, Depends(_owner)]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "bad request", 401: "missing or wrong token", 404: "no such ENV, VM or image (or another owner's)",
        409: "quota exceeded (with what is free) or name taken", 413: "request body over 64 KiB",
        422: "request does not match the schema, or malformed JSON", 424: "the VM failed to boot or died",
    }  # fmt: skip
    return {code: {"model": m.Error, "description": text[code]} for code in codes}


def _json_error(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, body = error_response(exc)
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: the bearer token first (401, before any body is
    read; the owner goes to ``scope["state"]["owner"]``), then the body limit (413 for a body over
    ``limit`` bytes, announced by Content-Length or streamed in chunks). ``OPEN`` paths need no token.
    """

    OPEN = ("/v1/openapi.json", "/v1/docs")

    def __init__(self, app: ASGIApp, tokens: TokenStore, limit: int = MAX_BODY) -> None:
        self.app, self.tokens, self.limit = app, tokens, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            scope.setdefault("state", {})["owner"] = await run_in_threadpool(self._owner, headers.get(b"authorization"))
        except AuthError as exc:
            await _json_error(exc)(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
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
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _owner(self, header: bytes | None) -> str:
        scheme, _, token = (header or b"").decode("latin-1").partition(" ")
        if not header or scheme.lower() != "bearer":
            raise AuthError("no bearer token", "send Authorization: Bearer <token>")
        name = self.tokens.owner(token.strip())
        if name is None:
            raise AuthError("token rejected by the server", "check --tt-token / TTENV_TOKEN")
        return name

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = TooLarge(f"request body over {self.limit // 1024} KiB", "send less")
        await _json_error(exc)(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    yield


def create_app(service: Service, stopping: Callable[[], bool] = lambda: False) -> FastAPI:
    """The API for ``service``. ``stopping()`` tells long polls the server is shutting down."""
    app = FastAPI(
        lifespan=_lifespan,
        title="ttenv host server", version=__version__, openapi_url="/v1/openapi.json", docs_url="/v1/docs",
        redoc_url=None, redirect_slashes=False,
        description="ENVs of real VMs on a shared host; see docs/server.md of pytest-ttenv.",
    )  # fmt: skip
    app.add_middleware(Guard, tokens=service.tokens)

    @app.exception_handler(TTError)
    async def _tt(request: Request, exc: TTError) -> JSONResponse:
        if error_response(exc)[0] >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _json_error(exc)

    @app.exception_handler(Exception)  # a bug: Starlette logs the traceback after this answer
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
        body = {"error": "usage", "message": one_line(f"bad request: {where}: {first.get('msg', 'invalid')}"),
                "hint": "see /v1/openapi.json", "console": None, "free": None}  # fmt: skip
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            _, body = error_response(_not_found(request))
            return JSONResponse(body, status_code=404)
        if exc.status_code == 400:  # FastAPI could not even parse the body (not UTF-8, ...): as malformed JSON
            body = {"error": "usage", "message": one_line(f"bad request: {exc.detail}"),
                    "hint": "send a JSON body, see /v1/openapi.json", "console": None, "free": None}  # fmt: skip
            return JSONResponse(body, status_code=422)
        kind = "usage" if exc.status_code < 500 else "server"
        body = {"error": kind, "message": one_line(str(exc.detail)), "hint": None, "console": None, "free": None}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.get("/v1/status", response_model=m.Status, responses=_errors(401), tags=["server"])
    def status(who: Owner) -> dict[str, object]:
        """Version, engine, public address, resource totals/used/free, ENV and VM counts."""
        return service.status()

    @app.get("/v1/images", response_model=list[m.Image], responses=_errors(401), tags=["server"])
    def images(who: Owner) -> list[m.Image]:
        return [m.Image.of(image) for image in service.images()]

    @app.post("/v1/envs", status_code=201, response_model=m.Env, responses=_errors(400, 401, 404, 409, 413, 422),
              tags=["envs"])  # fmt: skip
    def create_env(body: m.EnvCreate, who: Owner) -> m.Env:
        """Create an ENV; answers at once with its VMs ``booting``."""
        vms = [(vm.name, vm.image, Resources(**vm.resources.model_dump())) for vm in body.vms]
        spec = spec_of(body.name, vms, body.client_pubkey, body.ttl, body.accel)
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

    @app.post("/v1/envs/{env}/vms/{vm}/wait", response_model=m.Vm, responses=_errors(401, 404, 422, 424),
              tags=["vms"])  # fmt: skip
    def wait_vm(
        env: PathName, vm: PathName, who: Owner,
        timeout: Annotated[float | None, Query(gt=0, le=m.MAX_LEASE_ANY)] = None,
    ) -> m.Vm:  # fmt: skip
        """Long poll: the VM once ``running``, or still ``booting`` after min(timeout, 30) s; ask
        again until your own deadline. The wait in which ``timeout`` ends stops a VM that is not
        up and answers 424 with its console tail."""
        return m.Vm.of(service.wait(who, env, vm, timeout, stopping))

    @app.post("/v1/envs/{env}/vms/{vm}/snapshots", status_code=204, response_class=Response,
              responses=_errors(400, 401, 404, 413, 422, 424), tags=["vms"])  # fmt: skip
    def snapshot(env: PathName, vm: PathName, body: m.SnapshotIn, who: Owner) -> Response:
        """Save the running VM's memory and disk as snapshot ``name``."""
        service.snapshot(who, env, vm, body.name)
        return Response(status_code=204)

    @app.post("/v1/envs/{env}/vms/{vm}/snapshots/{name}/revert", status_code=204, response_class=Response,
              responses=_errors(400, 401, 404, 422, 424), tags=["vms"])  # fmt: skip
    def revert(env: PathName, vm: PathName, name: PathName, who: Owner) -> Response:
        """Restore snapshot ``name``; connections to the VM are dead afterwards."""
        service.revert(who, env, vm, name)
        return Response(status_code=204)

    @app.get("/v1/envs/{env}/vms/{vm}/console", response_model=m.Console, responses=_errors(401, 404, 422),
             tags=["vms"])  # fmt: skip
    def console(env: PathName, vm: PathName, who: Owner, tail: Annotated[int, Query(ge=1, le=2000)] = 50) -> m.Console:
        """The last ``tail`` lines of the VM's serial console."""
        return m.Console(text=service.console(who, env, vm, tail))

    return app


def _not_found(request: Request) -> Exception:
    return NotFound(f"no such resource: {request.url.path[:200]}", "see /v1/openapi.json")
