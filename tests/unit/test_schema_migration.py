"""State survives an upgrade: the sqlite stores carry ``PRAGMA user_version`` and migrate forward
(real sqlite, real processes; no VMs)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_ttenv import cli
from pytest_ttenv.backend import store
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.backend.schema import Schema, migrate, user_version
from pytest_ttenv.backend.store import Store
from pytest_ttenv.errors import TTError
from pytest_ttenv.server import auth
from pytest_ttenv.server.auth import TokenStore, digest

# Frozen copies of what the code wrote before the stores were versioned (user_version 0): do not
# update them when the schema changes, they are the past the current code has to read.
V1_STATE_DDL = """
CREATE TABLE IF NOT EXISTS envs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    state TEXT NOT NULL,
    rundir TEXT NOT NULL,
    owner_pid INTEGER,
    owner_start INTEGER
);
CREATE TABLE IF NOT EXISTS vms (
    env_id TEXT NOT NULL REFERENCES envs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    port INTEGER UNIQUE,
    data TEXT NOT NULL,
    PRIMARY KEY (env_id, name)
);
"""
V1_TOKENS_DDL = (
    "CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, created REAL NOT NULL)"
)
# A VM row's data as VmInfo.to_dict() wrote it then.
V1_VM_DATA = {
    "name": "debian-12-x86_64",
    "image": "debian-12-x86_64",
    "os": "debian",
    "version": "12",
    "arch": "x86_64",
    "state": "running",
    "address": "127.0.0.1",
    "port": 0,
    "user": "root",
    "host_key": "ssh-ed25519 AAAA",
    "resources": {"cpu": 1, "mem_mib": 256, "disk_mib": 0},
    "accel": "kvm",
    "console": "/r/e1/console.log",
    "pid": 4242,
    "error": "",
    "boot_seconds": 3.5,
    "boot": "warm",
    "engine": "qemu",
    "host": "",
}
OLD_TOKEN = "t" * 43


def write_v1_state_dir(state: Path) -> None:
    """A state dir as the unversioned code left it: two ENVs, three VMs with ports, one token."""
    state.mkdir(parents=True)
    db = sqlite3.connect(state / "state.sqlite")
    db.executescript(V1_STATE_DDL)
    db.executemany(
        "INSERT INTO envs VALUES (?,?,?,?,?,?,?,?,?)",
        [
            ("e1", "alice:TEST", "alice", 100.0, 200.0, "running", "/r/e1", 11, 111),
            ("e2", "bob:OTHER", "bob", 50.0, None, "booting", "/r/e2", None, None),
        ],
    )
    db.executemany(
        "INSERT INTO vms VALUES (?,?,?,?)",
        [
            ("e1", "debian-12-x86_64", 20001, json.dumps(V1_VM_DATA)),
            ("e1", "debian-11-x86_64", 20002, json.dumps(V1_VM_DATA | {"name": "debian-11-x86_64", "version": "11"})),
            ("e2", "debian-12-x86_64", 20003, json.dumps(V1_VM_DATA | {"state": "booting"})),
        ],
    )
    db.commit()
    db.close()
    db = sqlite3.connect(state / "tokens.sqlite")
    db.execute(V1_TOKENS_DDL)
    db.execute("INSERT INTO tokens VALUES (?,?,?)", ("alice", digest(OLD_TOKEN), 123.0))
    db.commit()
    db.close()


def version_of(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return user_version(db)
    finally:
        db.close()


def indexes_of(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
    finally:
        db.close()


def test_current_versions_are_what_this_test_expects() -> None:
    # a new step changes these; extend the tests below to cover it
    assert store.SCHEMA.version == 3
    assert auth.SCHEMA.version == 2


def test_state_dir_of_the_previous_schema_is_read_and_migrated(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_v1_state_dir(state)
    assert version_of(state / "state.sqlite") == 0

    s = Store(state / "state.sqlite")
    envs = s.list_envs()
    assert [e.id for e in envs] == ["e2", "e1"]  # oldest first
    e1 = s.get_env("alice:TEST")
    assert (e1.owner, e1.created, e1.expires, e1.state, e1.rundir) == ("alice", 100.0, 200.0, "running", "/r/e1")
    assert [(v.name, v.port, v.version) for v in e1.vms] == [
        ("debian-12-x86_64", 20001, "12"),
        ("debian-11-x86_64", 20002, "11"),
    ]
    assert e1.vms[0].resources.mem_mib == 256 and e1.vms[0].boot == "warm" and e1.vms[0].pid == 4242
    assert s.owner_of("e1") == (11, 111)
    assert s.get_env("e2").expires is None and s.get_env("e2").vms[0].state == "booting"
    assert version_of(state / "state.sqlite") == store.SCHEMA.version
    assert "envs_by_created" in indexes_of(state / "state.sqlite")

    # the migrated file still works: ports stay unique, deletes cascade to the VMs
    assert s.reserve_port("e2", e1.vms[1], iter([20001, 20004])) == 20004
    s.delete_env("e1")
    assert [e.id for e in s.list_envs()] == ["e2"]
    assert s.reserve_port("e2", e1.vms[0], iter([20001])) == 20001  # released with e1

    tokens = TokenStore(state)
    assert tokens.owner(OLD_TOKEN) == "alice"
    assert tokens.list() == [("alice", 123.0)]
    assert version_of(state / "tokens.sqlite") == auth.SCHEMA.version


def test_fresh_state_dir_gets_the_current_versions(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    Store(state / "state.sqlite")
    TokenStore(state)
    assert version_of(state / "state.sqlite") == store.SCHEMA.version
    assert "envs_by_created" in indexes_of(state / "state.sqlite")
    assert version_of(state / "tokens.sqlite") == auth.SCHEMA.version
    assert (state / "tokens.sqlite").stat().st_mode & 0o777 == 0o600
    Store(state / "state.sqlite")  # reopening a current file changes nothing
    TokenStore(state)
    assert version_of(state / "state.sqlite") == store.SCHEMA.version


def _set_version(path: Path, version: int) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()


def test_newer_schema_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    Store(state / "state.sqlite")
    TokenStore(state)
    _set_version(state / "state.sqlite", 99)
    _set_version(state / "tokens.sqlite", 7)

    with pytest.raises(TTError) as exc:
        Store(state / "state.sqlite")
    line = str(exc.value)
    assert "\n" not in line
    assert line == (
        f"state dir {state} was written by a newer pytest-ttenv (state.sqlite: schema 99, this one "
        f"knows {store.SCHEMA.version}) (upgrade pytest-ttenv, or use another --state-dir / "
        "TTENV_STATE_DIR)"
    )
    with pytest.raises(TTError, match=r"newer pytest-ttenv \(tokens.sqlite: schema 7, this one knows 2\)"):
        TokenStore(state)
    with pytest.raises(TTError, match="schema 99"):  # not rewrapped as "cannot open the state store"
        LocalBackend(tmp_path / "images", state)
    assert version_of(state / "state.sqlite") == 99  # untouched

    rc = cli.main(
        ["env", "list", "--backend", "local", "--state-dir", str(state), "--image-dir", str(tmp_path / "images")]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "ttenv: error: state dir" in err and "schema 99" in err


def test_failed_step_leaves_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    v1 = Schema(steps=[("CREATE TABLE t (a INTEGER)",)])
    db = sqlite3.connect(path, isolation_level=None)
    migrate(db, v1, path)

    def boom(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t VALUES (1)")
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError):
        migrate(db, Schema(steps=[*v1.steps, ("CREATE INDEX t_a ON t(a)",), boom]), path)
    assert user_version(db) == 1 and not db.in_transaction
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='t_a'").fetchone()[0] == 0
    db.close()


# Opens a state dir with every migration step logged (one line per step applied, by any
# process) and slowed down, so the other process tries to migrate while this one holds the lock.
CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    import pytest_ttenv.backend.schema as schema

    state, log, go = (Path(a) for a in sys.argv[1:4])
    real_apply = schema._apply

    def logged_apply(db, step):
        with open(log, "a") as f:
            f.write(repr(step)[:60] + "\\n")
        time.sleep(0.2)
        real_apply(db, step)

    schema._apply = logged_apply
    Path(f"{log}.ready.{os.getpid()}").touch()
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.002)

    from pytest_ttenv.backend.store import Store
    from pytest_ttenv.server.auth import TokenStore

    envs = Store(state / "state.sqlite").list_envs()
    print(len(envs), TokenStore(state).owner("t" * 43))
""")


def test_two_processes_opening_an_old_state_dir_migrate_it_once(tmp_path: Path) -> None:
    state, log, go = tmp_path / "state", tmp_path / "steps.log", tmp_path / "go"
    write_v1_state_dir(state)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(log), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("steps.log.ready.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [c.communicate(timeout=60) for c in children]

    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert out.split() == ["2", "alice"]
    applied = log.read_text().splitlines()
    # every step of both files exactly once (version 0 of an unversioned file runs the idempotent
    # step 0, which creates nothing that exists, then the rest)
    expected = [repr(step)[:60] for step in [*store.SCHEMA.steps, *auth.SCHEMA.steps]]
    assert sorted(applied) == sorted(expected)
    assert version_of(state / "state.sqlite") == store.SCHEMA.version
    assert version_of(state / "tokens.sqlite") == auth.SCHEMA.version
    assert "envs_by_created" in indexes_of(state / "state.sqlite")
