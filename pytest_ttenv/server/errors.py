"""Exceptions -> HTTP status and the JSON error body of docs/server.md (standard library only).

Body: ``{"error": KIND, "message": one line, "hint": str | None, "console": str | None}``, plus
``free`` for quota errors. The client (backend/http.py) maps it back to the same exception.
"""

from __future__ import annotations

from typing import Any

from pytest_ttenv.errors import BootError, NotFound, QuotaError, TTError, UsageError, VmDied


class AuthError(TTError):
    """A missing, malformed or unknown bearer token (401)."""


class Conflict(UsageError):
    """The request collides with existing state: an ENV name the owner uses already (409)."""


class TooLarge(UsageError):
    """A request body over the server's limit (413)."""


def one_line(text: str) -> str:
    """``text`` folded onto one line (error messages are printed as one line by clients)."""
    return " ".join(text.split())


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for ``exc``; anything that is not a TTError is a 500 that says nothing
    about its cause (the server logs it)."""
    console: str | None = None
    free: dict[str, int] | None = None
    if isinstance(exc, AuthError):
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
