"""Keeping the local backend's state dir clean: the store's files private, ENVs whose owner is gone
or whose lease ran out deleted, VMs that nobody will ever start failed. Stray VMs and saved states
are swept by their engines (``Engine.reap_strays``, ``Engine.reap_saved``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from pytest_ttenv.backend.engines.base import waiting
from pytest_ttenv.backend.owner import is_alive, record_alive
from pytest_ttenv.backend.store import Store
from pytest_ttenv.core.model import EnvInfo
from pytest_ttenv.core.paths import private_dir
from pytest_ttenv.errors import NotFound

CREATOR = "creator.json"  # in a run dir: the process that created the ENV (and starts its VMs)


def private_store(state: Path) -> None:
    """The state dir 0700 and its sqlite files 0600 (older versions left them 0755 and 0644): the
    database file is created 0600 before sqlite opens it, and sqlite gives its WAL and shared
    memory files the database file's mode."""
    private_dir(state)
    db = state / "state.sqlite"
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            st = path.lstat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                path.chmod(0o600)
        except FileNotFoundError:
            continue


def reap_envs(store: Store, delete_env: Callable[[str], EnvInfo]) -> list[EnvInfo]:
    """Delete (``delete_env``) the ENVs whose owner process is gone or whose lease expired; returns them."""
    reaped = []
    now = time.time()
    for env in store.list_envs():
        pid, started = store.owner_of(env.id)
        orphaned = pid is not None and not is_alive(pid, started)
        expired = env.expires is not None and env.expires < now
        if orphaned or expired:
            try:
                reaped.append(delete_env(env.id))
            except NotFound:  # deleted meanwhile by another process or thread
                continue
    return reaped


def fail_abandoned(store: Store) -> None:
    """VMs that wait to be started (``waiting``) whose creating process is gone (killed, a server
    restarted while they waited for their warm template) fail, saying why: nobody would start
    them, and failed they are shown, deleted and reaped like any other."""
    for env in store.list_envs():
        for vm in env.vms:
            if not waiting(vm) or record_alive(Path(env.rundir) / CREATOR):
                continue
            vm.state = "failed"
            vm.error = f"VM {vm.name} was never started: the process that created ENV {env.id} is gone"
            store.update_vm(env.id, vm)
            store.set_env_state(env.id, "failed")
