"""envflow: the client-side create -> wait -> clean-up flow of ``ttenv env add`` and the pytest
session, against a fake backend (no VM): what a failure at each step leaves behind (nothing),
where the keys go, and the session's failure-report record. VM runs: tests/vm/test_faults.py."""

from __future__ import annotations

import stat
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_ttenv import envflow
from pytest_ttenv.access import ClientKeys, write_known_hosts
from pytest_ttenv.core.model import EnvInfo, EnvSpec, VmInfo, VmSpec
from pytest_ttenv.errors import BootError, NotFound, TTError
from pytest_ttenv.session import KEY_FILE, EnvSession, SessionKeys


class FakeBackend:
    """Creates ENVs in memory; ``boot_errors`` maps a VM to the error its wait raises."""

    name = "fake"

    def __init__(self) -> None:
        self.envs: dict[str, EnvInfo] = {}
        self.specs: list[EnvSpec] = []
        self.deleted: list[str] = []
        self.boot_errors: dict[str, Exception] = {}
        self.fail_delete = False

    def create_env(self, spec: EnvSpec) -> EnvInfo:
        self.specs.append(spec)
        vms = [VmInfo(v.name, v.image, "debian", "12", "x86_64", port=2222, host_key="ssh-ed25519 A") for v in spec.vms]
        env = EnvInfo(f"id{len(self.specs)}", spec.name, "me", 0.0, None, "running", vms)
        self.envs[env.id] = env
        return env

    def delete_env(self, ref: str) -> EnvInfo:
        if self.fail_delete:
            raise TTError("backend unreachable")
        env = next((e for e in self.envs.values() if ref in (e.id, e.name)), None)
        if env is None:
            raise NotFound(f"no ENV named {ref!r}")
        del self.envs[env.id]
        self.deleted.append(env.id)
        return env

    def wait_vm(self, env_ref: str, vm_name: str, timeout: float | None = None) -> VmInfo:
        if vm_name in self.boot_errors:
            raise self.boot_errors[vm_name]
        return self.envs[env_ref].vm(vm_name)

    def console(self, env_ref: str, vm_name: str, lines: int = 50) -> str:
        return f"console of {vm_name}"


def _spec(*images: str) -> EnvSpec:
    return EnvSpec(name="E", vms=tuple(VmSpec(i, i) for i in images), client_pubkey="")


def _created(backend: FakeBackend, home: envflow.KeyHome, *images: str) -> Any:
    return envflow.created(cast(Any, backend), _spec(*images), "ttenv-test", home)


def test_created_gives_the_env_a_new_key_and_keeps_it_after_the_block(tmp_path: Path) -> None:
    backend, keys = FakeBackend(), ClientKeys(tmp_path)
    with _created(backend, keys, "debian-12-x86_64") as new:
        pass
    pubkey = backend.specs[0].client_pubkey
    assert pubkey.startswith("ssh-ed25519 ") and pubkey.endswith(" ttenv-test")
    assert new.key_file == keys.path(new.env) and stat.S_IMODE(new.key_file.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in new.key_file.read_text()
    assert list(backend.envs) == [new.env.id] and not backend.deleted


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, TTError])
def test_a_failing_block_leaves_nothing(tmp_path: Path, error: type[BaseException]) -> None:
    backend, keys = FakeBackend(), ClientKeys(tmp_path)
    with pytest.raises(error), _created(backend, keys, "debian-12-x86_64") as new:
        write_known_hosts(new.env, new.key_file)
        raise error("stop")
    assert not backend.envs and backend.deleted == [new.env.id]
    assert list(keys.dir.iterdir()) == []  # the key and its known_hosts file


def test_a_key_that_cannot_be_stored_deletes_the_env(tmp_path: Path) -> None:
    backend, home = FakeBackend(), SessionKeys(tmp_path, "local")
    (tmp_path / "id1").mkdir()  # the session dir exists already: mkdir fails
    with pytest.raises(FileExistsError), _created(backend, home, "debian-12-x86_64"):
        pytest.fail("the block must not run")
    assert not backend.envs and backend.deleted == ["id1"]


def test_discard_by_name_forgets_the_key_but_keeps_it_when_the_delete_fails(tmp_path: Path) -> None:
    backend, keys = FakeBackend(), ClientKeys(tmp_path)
    with _created(backend, keys, "debian-12-x86_64") as new:
        pass
    backend.fail_delete = True
    with pytest.raises(TTError, match="unreachable"):
        envflow.discard(cast(Any, backend), "E", keys)
    assert new.key_file.exists()
    backend.fail_delete = False
    assert envflow.discard(cast(Any, backend), "E", keys).id == new.env.id
    assert not new.key_file.exists() and not backend.envs


def test_wait_all_reports_each_failed_vm_and_discards_nothing(tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.boot_errors = {"a": BootError("VM a did not boot within 5 s", "login: _"), "b": TTError("gone")}
    ready: list[str] = []
    with _created(backend, ClientKeys(tmp_path), "a", "b") as new:
        failures = new.wait_all(5.0, lambda vm, up, first: ready.append(vm))
    assert failures == ["VM a did not boot within 5 s\n--- console tail ---\nlogin: _", "b: gone"]
    assert ready == [] and list(backend.envs) == [new.env.id]
    new.discard()
    assert not backend.envs and not new.key_file.exists()


def test_at_once_runs_concurrently_and_keeps_the_order() -> None:
    barrier = threading.Barrier(3, timeout=5)

    def work(n: int) -> int:
        barrier.wait()  # only returns once all three run at the same time
        if n == 2:
            raise ValueError("two")
        return n * 10

    futures = envflow.at_once(work, [1, 2, 3])
    assert [f.exception() is None for f in futures] == [True, False, True]
    assert (futures[0].result(), futures[2].result()) == (10, 30)


def test_session_keys_hold_the_key_and_the_backend_spec(tmp_path: Path) -> None:
    backend, home = FakeBackend(), SessionKeys(tmp_path, "http://server:8730")
    with _created(backend, home, "debian-12-x86_64") as new:
        pass
    workdir = tmp_path / new.env.id
    assert new.key_file == workdir / KEY_FILE and stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert (workdir / "backend").read_text() == "http://server:8730"
    home.forget(new.env)
    assert not workdir.exists()


def test_the_session_keeps_what_a_failure_report_shows(tmp_path: Path) -> None:
    backend = FakeBackend()
    env = backend.create_env(_spec("a", "b"))
    session = EnvSession(cast(Any, None), cast(Any, backend), env, tmp_path, controller=True)
    assert session.failure_sections("a") == [("ttenv console of a (last 50 lines)", "console of a")]
    session.note_command("a", ["uname", "-a"])
    session.vms["a"].console = "saved at boot failure"
    assert session.failure_sections("a") == [
        ("ttenv last command on a", "uname -a"),
        ("ttenv console of a (last 50 lines)", "saved at boot failure"),
    ]
    assert session.failure_sections("nope") == []
