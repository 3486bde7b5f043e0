"""The guest-side programs of the package, loaded as modules on the host for tests."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from importlib import resources
from types import ModuleType


def identity_agent() -> ModuleType:
    """The identity agent that warm templates run (``engines/guest/ttenv-identity``), as a module."""
    path = str(resources.files("pytest_ttenv.backend.engines").joinpath("guest").joinpath("ttenv-identity"))
    loader = importlib.machinery.SourceFileLoader("ttenv_identity", path)
    spec = importlib.util.spec_from_loader("ttenv_identity", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
