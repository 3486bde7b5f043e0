"""The plugin's per-session state, kept in ``config.stash[STATE]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_ttenv.config import TTConfig
from pytest_ttenv.matrix import MatrixVm
from pytest_ttenv.session import EnvSession

NO_OS_REASON = "no VMs in this session: give --tt-os (e.g. --tt-os=debian12) to run the tests that need one"


@dataclass
class PluginState:
    """Settings, the matrix, this process's view of the ENV, and test outcomes per VM."""

    cfg: TTConfig
    vms: list[MatrixVm] = field(default_factory=list)
    session: EnvSession | None = None
    skip_reason: str = NO_OS_REASON
    # (test id without the VM, VM name) -> passed | failed | error | skipped
    outcomes: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    restore_signals: dict[int, Any] = field(default_factory=dict)  # handlers to put back after teardown


STATE = pytest.StashKey[PluginState]()
