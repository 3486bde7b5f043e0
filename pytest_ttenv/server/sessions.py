"""Dashboard sessions: in memory, one per login, bound to the token that made it.

A session id is ``secrets.token_urlsafe(32)`` in the ``ttenv_session`` cookie (HttpOnly,
SameSite=Strict, Path=/, Secure under TLS). Each session holds its owner, a CSRF token for its
forms (compared in constant time) and the SHA-256 of its token: every use checks that token
against the token store as the API's bearer check does (``TokenCheck``), so ``ttenv token rm``
ends the sessions it made, and an admin flag follows the store. A session ends after ``idle``
seconds without a page or form (default 12 h); at most ``limit`` live at once, the oldest dropped.
Nothing is persisted: a restarted server asks everyone to log in again.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from pytest_ttenv.server.auth import Grant, TokenStore, digest
from pytest_ttenv.server.errors import AuthError, Busy, as_busy

COOKIE = "ttenv_session"
IDLE = 12 * 3600.0
LIMIT = 10_000
STREAMS_PER_SESSION = 8


class TokenCheck:
    """The bearer token check of the API (``Guard``) and the dashboard's login: grants from the
    token store's in-memory cache on the event loop, the file re-read in a thread of its own only
    after it changed (a failure to read it is Busy)."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens
        self._reload: anyio.CapacityLimiter | None = None

    async def fresh(self) -> None:
        if self.tokens.fresh():
            return
        if self._reload is None:
            self._reload = anyio.CapacityLimiter(1)
        try:
            await anyio.to_thread.run_sync(self.tokens.reload, limiter=self._reload)
        except Exception as exc:  # noqa: BLE001 - any failure to read it: busy for now, not a 500
            raise as_busy(exc) or Busy("the token store cannot be read", "retry in a moment") from None

    async def grant(self, token: str) -> Grant:
        """The grant of ``token``; AuthError if the store does not know it."""
        await self.fresh()
        grant = self.tokens.cached(token.strip())
        if grant is None:
            raise AuthError("token rejected by the server", "check TTENV_TOKEN / --tt-token-file")
        return grant

    async def by_digest(self, key: str) -> Grant | None:
        """The grant of the token whose SHA-256 is ``key``, or None once it is removed."""
        await self.fresh()
        return self.tokens.cached_digest(key)


@dataclass
class Session:
    """One login: ``key`` is the SHA-256 of its token, ``seen`` the monotonic time of its last use."""

    id: str
    owner: str
    admin: bool
    csrf: str
    key: str
    seen: float
    streams: int = 0

    def csrf_ok(self, value: str | None) -> bool:
        """Whether ``value`` is this session's CSRF token (constant-time compare)."""
        return value is not None and hmac.compare_digest(value.encode(), self.csrf.encode())


class Sessions:
    """The live sessions (thread-safe); ``clock`` is monotonic seconds."""

    def __init__(
        self, check: TokenCheck, idle: float = IDLE, limit: int = LIMIT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.check, self.idle, self.limit, self.clock = check, idle, limit, clock
        self._lock = threading.Lock()
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._live)

    async def login(self, token: str) -> Session:
        """A new session for ``token`` (AuthError if the token store does not know it)."""
        grant = await self.check.grant(token)
        session = Session(
            secrets.token_urlsafe(32), grant.name, grant.admin, secrets.token_urlsafe(32), digest(token.strip()), 0.0
        )
        with self._lock:
            session.seen = self.clock()
            self._live[session.id] = session
            while len(self._live) > self.limit:
                self._live.popitem(last=False)
        return session

    async def get(self, sid: str | None, touch: bool = True) -> Session | None:
        """The live session ``sid`` (its token still in the store; its admin flag refreshed), or
        None. ``touch`` counts this as a use (pages and forms; streams do not keep a session alive)."""
        if not sid:
            return None
        with self._lock:
            session = self._live.get(sid)
            if session is None:
                return None
            if self.clock() - session.seen > self.idle:
                del self._live[sid]
                return None
        grant = await self.check.by_digest(session.key)
        with self._lock:
            if grant is None or grant.name != session.owner:
                self._live.pop(sid, None)
                return None
            if sid not in self._live:  # logged out meanwhile
                return None
            session.admin = grant.admin
            if touch:
                session.seen = self.clock()
                self._live.move_to_end(sid)
        return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._live.pop(sid or "", None)
