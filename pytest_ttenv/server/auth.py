"""Bearer tokens of the host server: ``<state>/tokens.sqlite``, only SHA-256 hashes stored.

A token is ``secrets.token_urlsafe(32)`` (43 characters), shown once by ``add``. Its name is the
owner of every ENV created with it. Lookups read the file each time, so ``remove`` takes effect
at the next request, also in a running server.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pytest_ttenv.backend.schema import Schema, migrate
from pytest_ttenv.errors import NotFound, TTError, UsageError

_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,200}$")
# Version 1 is the schema before versions existed; append steps, never edit one (backend/schema.py).
SCHEMA = Schema(steps=[
    ("CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, created REAL NOT NULL)",),
])  # fmt: skip


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_owner_name(name: str) -> str:
    """``name`` if it can name a token owner (1-32 letters, digits, '_' or '-'), else UsageError."""
    if not _OWNER_RE.match(name):
        raise UsageError(
            f"bad token name {name!r}", "use 1-32 letters, digits, '_' or '-', starting with one of the first two"
        )
    return name


class TokenStore:
    """The tokens of the server whose state dir is ``state`` (file created 0600 on first use, or
    migrated to the current ``SCHEMA``; a file of a newer schema is a TTError)."""

    def __init__(self, state: Path) -> None:
        self.path = state / "tokens.sqlite"
        try:
            state.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            with self._db() as db:
                migrate(db, SCHEMA, self.path)
        except (OSError, sqlite3.Error) as exc:
            raise TTError(f"cannot open the token store {self.path}: {exc}", "check the --state-dir") from None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def add(self, name: str) -> str:
        """Create a token for owner ``name`` and return it (it is not stored; a taken name is UsageError)."""
        check_owner_name(name)
        token = secrets.token_urlsafe(32)
        try:
            with self._db() as db:
                db.execute("INSERT INTO tokens VALUES (?,?,?)", (name, digest(token), time.time()))
        except sqlite3.IntegrityError:
            raise UsageError(
                f"a token named {name!r} exists already", f"remove it first: ttenv token rm {name}"
            ) from None
        return token

    def list(self) -> list[tuple[str, float]]:
        """(name, created) of every token, by name."""
        with self._db() as db:
            return [(n, c) for n, c in db.execute("SELECT name, created FROM tokens ORDER BY name")]

    def remove(self, name: str) -> None:
        """Revoke the token of ``name`` (NotFound if there is none)."""
        with self._db() as db:
            if db.execute("DELETE FROM tokens WHERE name=?", (name,)).rowcount == 0:
                raise NotFound(f"no token named {name!r}", "see: ttenv token list")

    def owner(self, token: str) -> str | None:
        """The owner whose token this is, or None."""
        if not _TOKEN_RE.match(token):
            return None
        with self._db() as db:
            row = db.execute("SELECT name FROM tokens WHERE hash=?", (digest(token),)).fetchone()
        return str(row[0]) if row else None
