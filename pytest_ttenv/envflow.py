"""The client side of an ENV's life, one flow for ``ttenv env add`` and the pytest session:
create (a new login key pair; the ENV, given the public half; the private half stored in the
caller's ``KeyHome``) -> wait for the VMs -> clean up (delete the ENV, forget its key).

Contract: inside ``with created(...) as new`` the ENV exists and its key is stored; when the
block fails, an interrupt (KeyboardInterrupt, SIGTERM's SystemExit) included, nothing of the
ENV stays behind. ``discard`` is the one way an ENV and its key go.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

from pytest_ttenv.access import target
from pytest_ttenv.backend import Backend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec
from pytest_ttenv.errors import BootError
from pytest_ttenv.ssh import Connection

T = TypeVar("T")
R = TypeVar("R")


class KeyHome(Protocol):
    """Where this client keeps the private login keys of the ENVs it creates."""

    def store(self, env: EnvInfo, key: KeyPair) -> Path:
        """Write ``env``'s private key (0600); returns its path."""
        ...

    def forget(self, env: EnvInfo) -> None:
        """Remove what ``store`` wrote for ``env`` (a missing key is no error)."""
        ...


@dataclass(frozen=True)
class NewEnv:
    """An ENV this client has just created: its info, its stored key, when creation began."""

    backend: Backend
    env: EnvInfo
    home: KeyHome
    key_file: Path
    started: float  # time.monotonic() as the create call began

    def discard(self) -> None:
        discard(self.backend, self.env.id, self.home)

    def wait_all(self, timeout: float | None, on_ready: Callable[[str, float, float], None]) -> list[str]:
        """Wait for every VM at once (each up to ``timeout`` s; None: the backend's boot timeout),
        then run a first command in it over SSH. ``on_ready(vm, ssh_up, first_command)`` (seconds
        since ``started``) is called once per ready VM, never concurrently. Returns one error text
        per VM that failed (with the console tail when it did not boot); discards nothing."""
        lock = threading.Lock()

        def boot(vm_name: str) -> str | None:
            try:
                vm = self.backend.wait_vm(self.env.id, vm_name, timeout)
                up = time.monotonic() - self.started
                conn = Connection(target(vm, self.key_file), connect_timeout=30, use_agent=False)
                try:
                    conn.run("true", timeout=60, check=True)
                finally:
                    conn.close()
                with lock:
                    on_ready(vm_name, up, time.monotonic() - self.started)
                return None
            except BootError as exc:
                return f"{exc}\n--- console tail ---\n{exc.console_tail}"
            except Exception as exc:  # noqa: BLE001 - reported per VM; the caller decides what to remove
                return f"{vm_name}: {exc}"

        futures = at_once(boot, [vm.name for vm in self.env.vms])
        return [failure for failure in (fut.result() for fut in futures) if failure]


@contextmanager
def created(backend: Backend, spec: EnvSpec, key_comment: str, home: KeyHome) -> Iterator[NewEnv]:
    """Create ENV ``spec`` (its ``client_pubkey`` replaced by a new key's) and store the new
    private key in ``home``; the VMs boot meanwhile. If storing the key or the ``with`` block
    raises anything (an interrupt too), the ENV is deleted and its key forgotten before the
    exception propagates; after a normal exit the ENV stays."""
    key = KeyPair.generate(key_comment)
    started = time.monotonic()
    env = backend.create_env(replace(spec, client_pubkey=key.public))
    try:
        yield NewEnv(backend, env, home, home.store(env, key), started)
    except BaseException:
        discard(backend, env.id, home)
        raise


def discard(backend: Backend, ref: str, home: KeyHome) -> EnvInfo:
    """Delete ENV ``ref`` (name or id), then forget its key; returns the deleted ENV. When the
    delete fails its error propagates and the key stays (the ENV is still reachable with it)."""
    env = backend.delete_env(ref)
    home.forget(env)
    return env


def at_once(fn: Callable[[T], R], items: Iterable[T]) -> list[Future[R]]:
    """Run ``fn`` on every item in its own thread; returns the finished futures in item order.
    Waits in short steps so that Ctrl-C stays responsive; on an interrupt the threads not yet
    started are cancelled and the others are left to end with the caller's clean-up."""
    todo = list(items)
    pool = ThreadPoolExecutor(max_workers=max(1, len(todo)))
    try:
        futures = [pool.submit(fn, item) for item in todo]
        while wait(futures, timeout=0.2).not_done:
            pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return futures
