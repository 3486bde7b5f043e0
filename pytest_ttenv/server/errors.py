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
        return Busy(
            f"the server is out of resources for a moment ({errno.errorcode.get(exc.errno or 0, '?')})",
            "retry in a moment",
        )
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, TTError) and cause is not None and cause is not exc:
        return as_busy(cause)
    return None


def one_line(text: str) -> str:
    """``text`` folded onto one line (error messages are printed as one line by clients)."""
    return " ".join(text.split())


# First match wins, so a subclass stands before its base (Conflict, TooLarge before UsageError).
_STATUS: tuple[tuple[type[TTError], int, str], ...] = (
    (Busy, 503, "busy"),
    (TooMany, 429, "too_many"),
    (AuthError, 401, "auth"),
    (Conflict, 409, "conflict"),
    (TooLarge, 413, "too_large"),
    (UsageError, 400, "usage"),
    (NotFound, 404, "not_found"),
    (QuotaError, 409, "quota"),
    (VmDied, 424, "died"),
    (BootError, 424, "boot"),
    (TTError, 500, "server"),
)


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for ``exc``; load (``as_busy``) is a 503, anything else that is not a
    TTError a 500 that says nothing about its cause (the server logs it)."""
    busy = as_busy(exc)
    if busy is not None:
        exc = busy
    if not isinstance(exc, TTError):
        body = {"error": "server", "message": "internal server error (see the server's log)"}
        return 500, body | {"hint": None, "console": None, "free": None}
    status, kind = next((status, kind) for cls, status, kind in _STATUS if isinstance(exc, cls))
    return status, {
        "error": kind,
        "message": one_line(exc.message),
        "hint": one_line(exc.hint) if exc.hint else None,
        "console": exc.console_tail if isinstance(exc, BootError) else None,
        "free": exc.free if isinstance(exc, QuotaError) else None,
    }


def retry_after(exc: BaseException) -> int | None:
    """Seconds for the ``Retry-After`` header of ``exc``'s answer (429 and 503), else None."""
    busy = as_busy(exc)
    if busy is not None:
        return busy.retry_after
    return exc.retry_after if isinstance(exc, TooMany) else None
