"""The plugin's per-session state, kept in ``config.stash[STATE]``, and the files an xdist
controller and its workers meet through after collection (``Handoff``).

Nothing here imports the command channel or a backend implementation: the plugin loads this
module in every pytest run, VMs or not.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_ttenv.config import TTConfig
from pytest_ttenv.core.paths import state_dir, write_json_atomic
from pytest_ttenv.errors import TTError
from pytest_ttenv.matrix import MatrixVm

if TYPE_CHECKING:
    from pytest_ttenv.backend import Backend
    from pytest_ttenv.session import EnvSession

NO_OS_REASON = "no VMs in this session: give --tt-os (e.g. --tt-os=debian12) to run the tests that need one"
HANDOFF_PREFIX = "xdist-"  # <state>/sessions/xdist-<controller pid>-<hex>
NO_ENV = "no ENV was created for this session: no collected test asked for a VM"
NO_ENV_HINT = "ask for tt_vm, tt_vm_fresh or tt_env as a test argument, not with request.getfixturevalue"


@dataclass
class PluginState:
    """Settings, the matrix, this process's view of the ENV, and test outcomes per VM."""

    cfg: TTConfig
    vms: list[MatrixVm] = field(default_factory=list)  # the matrix: VM tests get one instance per VM
    planned: bool = False  # the matrix is known (--tt-os given); else VM tests skip
    backend: Backend | None = None  # a server's (or registered) backend, made to read its images
    session: EnvSession | None = None  # the ENV, once a selected test needs a VM (see plugin.py)
    snapshots: bool = False  # some selected test uses tt_vm_fresh
    handoff: Handoff | None = None  # under xdist: where the controller hands the ENV to the workers
    handed_off: bool = False  # xdist controller: a worker's needs were read (the ENV created, if any)
    skip_reason: str = NO_OS_REASON
    # (test id without the VM, VM name) -> passed | failed | error | skipped
    outcomes: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    restore_signals: dict[int, Any] = field(default_factory=dict)  # handlers to put back after teardown


@dataclass(frozen=True)
class Handoff:
    """An xdist session's meeting point: a directory the controller names (and removes at the end)
    and that exists only once a worker's selected tests need a VM.

    - ``needs-<worker>.json``: the VMs a worker's selected tests need, written before the worker
      reports its collection to the controller;
    - ``env.json``: the ENV the controller then created (``EnvSession.to_workerinput()``), or
      ``failed``: why there is none. Both are written before the controller schedules any test.
    """

    path: Path

    @classmethod
    def new(cls) -> Handoff:
        return cls(state_dir() / "sessions" / f"{HANDOFF_PREFIX}{os.getpid()}-{secrets.token_hex(3)}")

    def _dir(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.mkdir(exist_ok=True, mode=0o700)
        return self.path

    def write_needs(self, worker: str, names: list[str]) -> None:
        write_json_atomic(self._dir() / f"needs-{worker}.json", names)

    def needs(self, worker: str) -> list[str]:
        try:
            return [str(n) for n in json.loads((self.path / f"needs-{worker}.json").read_text())]
        except FileNotFoundError:
            return []

    def publish(self, data: dict[str, Any]) -> None:
        write_json_atomic(self._dir() / "env.json", data)

    def fail(self, message: str) -> None:
        (self._dir() / "failed").write_text(message)

    def take(self) -> dict[str, Any]:
        """The ENV the controller created; TTError saying why there is none."""
        failed = self.path / "failed"
        if failed.exists():
            raise TTError(failed.read_text())
        try:
            data: dict[str, Any] = json.loads((self.path / "env.json").read_text())
        except FileNotFoundError:
            raise TTError(NO_ENV, NO_ENV_HINT) from None
        return data

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


STATE = pytest.StashKey[PluginState]()
