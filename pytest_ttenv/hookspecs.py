"""pluggy hook specifications of pytest-ttenv (implement them in a conftest.py or a plugin).

Named ``pytest_*`` because pytest only collects hook implementations by that prefix. The types
are imported for type checkers only (as pytest-xdist's ``newhooks.py`` does), so loading the
plugin does not import the VM handles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_ttenv.backend import BackendFactory
    from pytest_ttenv.fixtures import Vm
    from pytest_ttenv.matrix import MatrixVm


@pytest.hookspec
def pytest_ttenv_vm_ready(vm: Vm) -> None:
    """Called once per VM and session, after the VM answered SSH and before any test uses it.

    Provision here (install the package under test, start services): ``vm`` is the same handle
    tests get as ``tt_vm``. What this hook leaves in the VM is part of the post-boot snapshot
    that ``tt_vm_fresh`` reverts to. An exception fails every test of that VM with its message.
    """


@pytest.hookspec(firstresult=True)
def pytest_ttenv_modify_matrix(config: pytest.Config, vms: list[MatrixVm]) -> list[MatrixVm] | None:
    """Return a changed list of the session's ``MatrixVm`` (or None to keep it): the VMs the
    VM tests are parametrized with. Called at configure time, before any image is obtained; the
    ENV then boots those of them that the selected tests use."""


@pytest.hookspec
def pytest_ttenv_register_backends(register: Callable[[str, BackendFactory], None]) -> None:
    """Register backends: call ``register(scheme, factory)`` (``backend.register_backend``);
    ``--tt-backend=<scheme>`` or ``<scheme>://...`` then uses ``factory`` (``backend.BackendFactory``:
    ``factory(spec, image_dir=, state_dir=, progress=, ...)``), over an entry point of that name."""
