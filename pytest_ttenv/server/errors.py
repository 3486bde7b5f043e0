"""Exceptions -> HTTP status and the JSON error body of docs/server.md (standard library only).

Body: ``{"error": KIND, "message": one line, "hint": str | None, "console": str | None}``, plus
``free`` for quota errors; 429 and 503 come with ``Retry-After`` (``retry_after``). The client
(backend/http.py) maps it back to the same exception.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

from pytest_ttenv.errors import BootError, NotFound, QuotaError, TTError, UsageError, VmDied


class AuthError(TTError):
    """A missing, malformed or unknown bearer token (401)."""


class Conflict(UsageError):
    """The request collides with existing state: an ENV name the owner uses already (409)."""


class TooLarge(UsageError):
    """A request body over the server's limit (413)."""


class TooMany(TTError):
    """One owner has too many requests (or long polls) in flight: 429, asked again after ``retry_after`` s."""

    def __init__(self, message: str, hint: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


class Busy(TTError):
    """The server is short of something for a moment (its database is locked, no descriptor or
    thread is free): 503, asked again after ``retry_after`` s. Load is never a 500."""

    def __init__(self, message: str, hint: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


_BUSY_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOBUFS)


def as_busy(exc: BaseException) -> Busy | None:
    """``exc`` as a Busy if it is load rather than a fault: sqlite locked or busy (or unable to
    open its file, which is what running out of descriptors looks like), no descriptor or memory."""
    if isinstance(exc, Busy):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "locked" in text or "busy" in text or "unable to open" in text:
            return Busy("the server's database is busy", "retry in a moment")
    if isinstance(exc, OSError) and exc.errno in _BUSY_ERRNOS:
        return Busy(f"the server is out of resources for a moment ({errno.errorcode.get(exc.errno or 0, '?')})",
                    "retry in a moment")  # fmt: skip
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, TTError) and cause is not None and cause is not exc:
        return as_busy(cause)
    return None


def one_line(text: str) -> str:
    """``text`` folded onto one line (error messages are printed as one line by clients)."""
    return " ".join(text.split())


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for ``exc``; load (``as_busy``) is a 503, anything else that is not a
    TTError a 500 that says nothing about its cause (the server logs it)."""
    console: str | None = None
    free: dict[str, int] | None = None
    busy = as_busy(exc)
    if busy is not None:
        exc = busy
    if isinstance(exc, Busy):
        status, kind = 503, "busy"
    elif isinstance(exc, TooMany):
        status, kind = 429, "too_many"
    elif isinstance(exc, AuthError):
        status, kind = 401, "auth"
    elif isinstance(exc, Conflict):
        status, kind = 409, "conflict"
    elif isinstance(exc, TooLarge):
        status, kind = 413, "too_large"
    elif isinstance(exc, UsageError):
        status, kind = 400, "usage"
    elif isinstance(exc, NotFound):
        status, kind = 404, "not_found"
    elif isinstance(exc, QuotaError):
        status, kind, free = 409, "quota", exc.free
    elif isinstance(exc, BootError):
        status, kind, console = 424, "died" if isinstance(exc, VmDied) else "boot", exc.console_tail
    elif isinstance(exc, TTError):
        status, kind = 500, "server"
    else:
        return 500, {"error": "server", "message": "internal server error (see the server's log)", "hint": None,
                     "console": None, "free": None}  # fmt: skip
    message = exc.message if isinstance(exc, TTError) else str(exc)
    hint = exc.hint if isinstance(exc, TTError) else None
    return status, {"error": kind, "message": one_line(message), "hint": one_line(hint) if hint else None,
                    "console": console, "free": free}  # fmt: skip


def retry_after(exc: BaseException) -> int | None:
    """Seconds for the ``Retry-After`` header of ``exc``'s answer (429 and 503), else None."""
    busy = as_busy(exc)
    if busy is not None:
        return busy.retry_after
    return exc.retry_after if isinstance(exc, TooMany) else None
