"""Waiting for a VM of the local backend to be ready: the loop behind ``wait_vm`` and ``poll_vm``.

The engine says when a VM is ready (``Engine.ready``) and why it died (``Engine.boot_failure``);
this loop owns the timing, the store and the messages. A VM that waits to be started
(``engines.base.waiting``: its warm template is being made, by whichever process created it) is
looked up in the store until it is started; a started one is probed until it is ready, dies, or the
time is up. A warm VM is looked at more often: it is ready within about a second of its start.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pytest_ttenv.backend.engines.base import Engine, waiting
from pytest_ttenv.backend.store import Store
from pytest_ttenv.core.model import EnvInfo, VmInfo
from pytest_ttenv.errors import BootError, TTError


class Wait:
    """One wait for VM ``vm`` of ``env``, run by its ``engine``; ``console(env id, vm name)`` gives
    the console tail put into every BootError."""

    def __init__(
        self, store: Store, engine: Engine, env: EnvInfo, vm: VmInfo, console: Callable[[str, str], str]
    ) -> None:
        self.store, self.engine, self.env, self.vm, self.console = store, engine, env, vm, console

    def run(self, timeout: float, final: bool, stop: Callable[[], bool] | None = None) -> VmInfo:
        """The VM once ready (``running``). Not ready within ``timeout`` s (or once ``stop()`` is
        true): ``final``, it is stopped and failed (BootError); else it is returned ``booting``.
        BootError at once if it dies or fails."""
        env, vm, engine = self.env, self.vm, self.engine
        started = vm.boot_seconds
        deadline = time.monotonic() + timeout

        look_again = time.monotonic() + 1.0  # when the store is read again for a failure recorded meanwhile

        def over() -> bool:
            return time.monotonic() >= deadline or (stop is not None and stop())

        while True:
            if waiting(vm):  # started by the process that created it, once what it waits for is made
                if over():
                    if not final:
                        return vm
                    why = "its warm template was not ready" if vm.boot == "warm" else "its engine did not start it"
                    return self._failed(f"VM {vm.name} was not started within {timeout:.0f} s: {why}")
                time.sleep(0.2)
                vm = self.vm = self.store.get_env(env.id).vm(vm.name)
                if vm.state != "booting":
                    raise BootError(f"VM {vm.name} is {vm.state}: {vm.error}", self.console(env.id, vm.name))
                started = vm.boot_seconds
                continue
            died = engine.dead(env, vm)
            if died or time.monotonic() >= look_again:
                look_again = time.monotonic() + 1.0
                stored = self.store.get_env(env.id).vm(vm.name)
                if stored.state == "failed":  # its start failed after its process ran (a VM started later)
                    engine.halt(env, vm)
                    raise BootError(f"VM {vm.name} is failed: {stored.error}", self.console(env.id, vm.name))
            if died:
                return self._failed(engine.boot_failure(env, vm, died))
            try:
                if engine.ready(env, vm, min(2.0, max(0.1, deadline - time.monotonic()))):
                    return self._running(started)
            except TTError as exc:
                engine.halt(env, vm)
                return self._failed(str(exc))
            if over():
                if not final:
                    return vm
                engine.halt(env, vm)
                what = "load its saved state (warm start)" if vm.boot == "warm" else "answer SSH"
                return self._failed(f"VM {vm.name} did not {what} within {timeout:.0f} s ({vm.accel})")
            time.sleep(0.05 if vm.boot == "warm" else 0.1)

    def _running(self, started: float) -> VmInfo:
        env, vm = self.env, self.vm
        vm.state, vm.boot_seconds = "running", time.time() - started
        self.store.update_vm(env.id, vm)
        if all(v.state == "running" for v in self.store.get_env(env.id).vms):
            self.store.set_env_state(env.id, "running")
        return vm

    def _failed(self, message: str) -> VmInfo:
        env, vm = self.env, self.vm
        vm.state, vm.error = "failed", message
        self.store.update_vm(env.id, vm)
        self.store.set_env_state(env.id, "failed")
        raise BootError(message, self.console(env.id, vm.name))
