"""Bearer tokens of the host server: ``<state>/tokens.sqlite``, only SHA-256 hashes stored.

A token is ``secrets.token_urlsafe(32)`` (43 characters), shown once by ``add``. Its name is the
owner of every ENV created with it. Lookups read the file each time, so ``remove`` takes effect
at the next request, also in a running server: the server keeps every token's hash in memory
and re-reads the file whenever its size, mtime or inode changed (one ``stat`` per request, no
query and no worker thread for a known or an unknown token).

A token may carry an admin flag (``/v1/status`` shows it the whole server) and caps on what its
owner's ENVs may hold at once (``Limits``: vCPUs, memory, VMs; None is no cap).
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
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.backend.schema import Schema, migrate
from pytest_ttenv.errors import NotFound, TTError, UsageError

_OWNER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,200}$")
# Version 1 is the schema before versions existed; append steps, never edit one (backend/schema.py).
SCHEMA = Schema(
    steps=[
        (
            "CREATE TABLE IF NOT EXISTS tokens"
            " (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, created REAL NOT NULL)",
        ),
        (  # 1 -> 2: an admin flag and per-owner caps (NULL: no cap)
            "ALTER TABLE tokens ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE tokens ADD COLUMN max_cpu INTEGER",
            "ALTER TABLE tokens ADD COLUMN max_mem_mib INTEGER",
            "ALTER TABLE tokens ADD COLUMN max_vms INTEGER",
        ),
    ]
)


@dataclass(frozen=True)
class Limits:
    """What one owner's ENVs may hold at once (None: no cap but the server's totals)."""

    cpu: int | None = None
    mem_mib: int | None = None
    vms: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {"cpu": self.cpu, "mem_mib": self.mem_mib, "vms": self.vms}

    def text(self) -> str:
        parts = [
            f"{self.cpu} CPU" if self.cpu is not None else "",
            f"{self.mem_mib} MiB memory" if self.mem_mib is not None else "",
            f"{self.vms} VM(s)" if self.vms is not None else "",
        ]
        return ", ".join(p for p in parts if p) or "none"


@dataclass(frozen=True)
class Grant:
    """What a token is: its owner name, whether it is an admin's, its owner's caps."""

    name: str
    admin: bool = False
    limits: Limits = Limits()


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
        self._stamp: tuple[int, int, int] | None = None
        self._grants: dict[str, Grant] = {}

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def add(self, name: str, admin: bool = False, limits: Limits = Limits()) -> str:
        """Create a token for owner ``name`` and return it (it is not stored; a taken name is UsageError)."""
        check_owner_name(name)
        for what, value in (("--max-cpu", limits.cpu), ("--max-mem", limits.mem_mib), ("--max-vms", limits.vms)):
            if value is not None and value < 0:
                raise UsageError(f"{what} must not be negative, got {value}")
        token = secrets.token_urlsafe(32)
        try:
            with self._db() as db:
                db.execute(
                    "INSERT INTO tokens (name, hash, created, admin, max_cpu, max_mem_mib, max_vms) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (name, digest(token), time.time(), int(admin), limits.cpu, limits.mem_mib, limits.vms),
                )
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

    # -- the server's cached view -----------------------------------------------------------------
    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def fresh(self) -> bool:
        """Whether the cached grants are those of the file as it is now (one ``stat``)."""
        return self._stamp is not None and self._stamp == self._file_stamp()

    def reload(self) -> None:
        """Read every token's hash and grant into memory (a blocking sqlite read: not on the event loop)."""
        if self.fresh():
            return
        stamp = self._file_stamp()  # before the read: a write meanwhile makes the next check reload again
        with self._db() as db:
            rows = db.execute("SELECT hash, name, admin, max_cpu, max_mem_mib, max_vms FROM tokens").fetchall()
        self._grants = {h: Grant(n, bool(a), Limits(c, m, v)) for h, n, a, c, m, v in rows}
        self._stamp = stamp

    def cached(self, token: str) -> Grant | None:
        """The grant of ``token`` from the cache (``reload`` first when not ``fresh``); None if unknown."""
        if not _TOKEN_RE.match(token):
            return None
        return self._grants.get(digest(token))

    def cached_digest(self, key: str) -> Grant | None:
        """The cached grant of the token whose SHA-256 is ``key`` (a dashboard session's), or None."""
        return self._grants.get(key)

    def grant_of(self, name: str) -> Grant:
        """The cached grant of owner ``name`` (no caps if the token was removed meanwhile)."""
        for grant in self._grants.values():
            if grant.name == name:
                return grant
        return Grant(name)
