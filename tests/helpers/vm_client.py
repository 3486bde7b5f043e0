"""A test's client of its VMs: a client key pair on disk, and SSH connections to the VMs."""

from __future__ import annotations

from pathlib import Path

from pytest_ttenv.access import target
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import VmInfo
from pytest_ttenv.ssh import Connection


def client_key(where: Path) -> tuple[KeyPair, Path]:
    """A new client key pair, and the file ``where/id`` that holds its private half."""
    key = KeyPair.generate("client")
    key_file = where / "id"
    key.write_private(key_file)
    return key, key_file


def ssh(vm: VmInfo, key_file: Path) -> Connection:
    """A connection to ``vm`` with ``key_file`` (strict: only ``vm.host_key``; no agent)."""
    return Connection(target(vm, key_file), use_agent=False, connect_timeout=60)
