"""The wait behind ``wait_vm`` (``backend.readiness``), with a real sqlite store and an engine
double (the loop's logic only: no VM)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pytest_ttenv.backend.readiness import Wait
from pytest_ttenv.backend.store import Store
from pytest_ttenv.core.model import EnvInfo, VmInfo
from pytest_ttenv.errors import BootError


class StartedButNeverReady:
    """A VM whose process runs but which never gets ready (e.g. qemu waiting for a state it
    was never sent)."""

    def __init__(self) -> None:
        self.halted: list[str] = []

    def dead(self, env: EnvInfo, vm: VmInfo) -> str | None:
        return None

    def ready(self, env: EnvInfo, vm: VmInfo, timeout: float) -> bool:
        return False

    def halt(self, env: EnvInfo, vm: VmInfo) -> None:
        self.halted.append(vm.name)


def test_a_start_that_failed_after_its_process_ran_ends_the_wait_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    env = EnvInfo("e1", "E", "me", time.time(), None, "booting", rundir=str(tmp_path))
    store.add_env(env, None, None)
    vm = VmInfo(
        "vm1",
        "debian-12-x86_64",
        "debian",
        "12",
        "x86_64",
        state="booting",
        boot="warm",
        pid=os.getpid(),
        console=str(tmp_path / "console.log"),
    )
    vm.port = store.reserve_port(env.id, vm, iter([22222]))
    engine = StartedButNeverReady()

    def fail_it() -> None:  # as the starter thread records a failed start (LocalBackend._fail_start)
        time.sleep(0.5)
        failed = store.get_env(env.id).vm("vm1")
        failed.state, failed.error = "failed", "VM vm1 could not be started: qemu refused its saved state"
        store.update_vm(env.id, failed)

    threading.Thread(target=fail_it).start()
    started = time.monotonic()
    with pytest.raises(BootError, match="VM vm1 is failed: VM vm1 could not be started: qemu refused its saved state"):
        Wait(store, engine, env, vm, lambda env_id, name: "").run(600, final=True)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5 and engine.halted == ["vm1"]
