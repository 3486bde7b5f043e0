"""sqlite state of the local backend: ENVs, their VMs and the host ports they hold.

Safe for several processes at once (WAL, busy timeout, short IMMEDIATE transactions to write,
deferred ones to read).
A VM's port is UNIQUE across the store, which is how concurrent creators never hand
out the same forwarded port twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pytest_ttenv.backend.schema import Schema, migrate
from pytest_ttenv.core.model import EnvInfo, VmInfo
from pytest_ttenv.errors import NotFound, TTError, UsageError

# Version 1 is the schema before versions existed; append steps, never edit one (backend/schema.py).
SCHEMA = Schema(
    steps=[
        (  # 0 -> 1
            """CREATE TABLE IF NOT EXISTS envs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL,
            state TEXT NOT NULL,
            rundir TEXT NOT NULL,
            owner_pid INTEGER,
            owner_start INTEGER
        )""",
            """CREATE TABLE IF NOT EXISTS vms (
            env_id TEXT NOT NULL REFERENCES envs(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            port INTEGER UNIQUE,
            data TEXT NOT NULL,
            PRIMARY KEY (env_id, name)
        )""",
        ),
        (  # 1 -> 2: list_envs (every list, show, get_env, gc) reads the ENVs ORDER BY created
            "CREATE INDEX IF NOT EXISTS envs_by_created ON envs(created)",
        ),
        (  # 2 -> 3: the server reads one owner's ENVs (list, find, status)
            "CREATE INDEX IF NOT EXISTS envs_by_owner ON envs(owner, created)",
        ),
    ]
)


class Store:
    """The sqlite file at ``path`` (created, or migrated to the current ``SCHEMA``, on first use;
    a file of a newer schema is a TTError)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            migrate(db, SCHEMA, path)
        finally:
            db.close()

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction: IMMEDIATE (the write lock at once) to write, deferred to read (under
        WAL a reader never waits for a writer and never blocks one)."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
            except sqlite3.OperationalError as exc:
                raise self._unwritable(exc) from None
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise self._unwritable(exc) from None
        finally:
            db.close()

    def _unwritable(self, exc: sqlite3.OperationalError) -> TTError:
        """sqlite's own words for a store it cannot write (a full disk is 'disk I/O error' while
        it makes the WAL file), with the cause when the file system is full."""
        try:
            st = os.statvfs(self.path.parent)
            full = st.f_bavail * st.f_frsize < 256 * 1024
        except OSError:
            full = False
        cause = ": No space left on device" if full else ""
        return TTError(
            f"cannot use the state store {self.path} ({exc}){cause}", "free space there, or use another --state-dir"
        )

    def add_env(self, env: EnvInfo, owner_pid: int | None, owner_start: int | None) -> None:
        """Insert a new ENV (no VMs yet); a taken name is a UsageError."""
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO envs VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        env.id,
                        env.name,
                        env.owner,
                        env.created,
                        env.expires,
                        env.state,
                        env.rundir,
                        owner_pid,
                        owner_start,
                    ),
                )
        except sqlite3.IntegrityError:
            raise UsageError(
                f"an ENV named {env.name!r} exists already", f"pick another name or: ttenv env del {env.name}"
            ) from None

    def reserve_port(self, env_id: str, vm: VmInfo, candidates: Iterator[int]) -> int:
        """Record ``vm`` (new, or moving to another port) with the first candidate port no other
        VM holds; returns the port."""
        for port in candidates:
            try:
                with self._tx() as db:
                    db.execute(
                        "INSERT INTO vms VALUES (?,?,?,?) ON CONFLICT(env_id, name) "
                        "DO UPDATE SET port=excluded.port, data=excluded.data",
                        (env_id, vm.name, port, json.dumps(vm.to_dict())),
                    )
                return port
            except sqlite3.IntegrityError as exc:
                if "vms.port" not in str(exc):
                    raise
        raise UsageError("no free host port left for SSH forwarding", "delete unused ENVs: ttenv env list")

    def update_vm(self, env_id: str, vm: VmInfo) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE vms SET port=?, data=? WHERE env_id=? AND name=?",
                (vm.port, json.dumps(vm.to_dict()), env_id, vm.name),
            )

    def set_env_state(self, env_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE envs SET state=? WHERE id=?", (state, env_id))

    def set_owner(self, env_id: str, pid: int | None, started: int | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE envs SET owner_pid=?, owner_start=? WHERE id=?", (pid, started, env_id))

    def set_expires(self, env_id: str, expires: float | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE envs SET expires=? WHERE id=?", (expires, env_id))

    def delete_env(self, env_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM envs WHERE id=?", (env_id,))

    def get_env(self, ref: str) -> EnvInfo:
        """The ENV whose name or id is ``ref``, or NotFound."""
        envs = self._read("WHERE e.name=? OR e.id=?", (ref, ref))
        if not envs:
            raise NotFound(f"no ENV named {ref!r}", "see: ttenv env list")
        return envs[0]

    def owner_of(self, env_id: str) -> tuple[int | None, int | None]:
        """(owner pid, owner process start time) recorded for the ENV."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT owner_pid, owner_start FROM envs WHERE id=?", (env_id,)).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def list_envs(self, owner: str | None = None) -> list[EnvInfo]:
        """Every ENV with its VMs (only ``owner``'s if given), oldest first."""
        return self._read("WHERE e.owner=?", (owner,)) if owner is not None else self._read("", ())

    def _read(self, where: str, args: tuple[object, ...]) -> list[EnvInfo]:
        """The ENVs matching ``where`` (over ``envs e``) with their VMs, in one read transaction."""
        with self._tx(write=False) as db:
            envs = db.execute(
                f"SELECT id, name, owner, created, expires, state, rundir FROM envs e {where} ORDER BY created", args
            ).fetchall()
            vms = db.execute(
                f"SELECT v.env_id, v.port, v.data FROM vms v JOIN envs e ON e.id = v.env_id {where} ORDER BY v.rowid",
                args,
            ).fetchall()
        by_env: dict[str, list[VmInfo]] = {}
        for env_id, port, data in vms:
            by_env.setdefault(env_id, []).append(VmInfo.from_dict(json.loads(data) | {"port": port}))
        result = []
        for id_, name, owner, created, expires, state, rundir in envs:
            info = EnvInfo(id_, name, owner, created, expires, state, rundir=rundir)
            info.vms = by_env.get(id_, [])
            result.append(info)
        return result


def now() -> float:
    return time.time()
