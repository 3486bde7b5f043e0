"""Client-side access to an ENV: its private client key and the SSH targets of its VMs.

The key pair is generated on the client; only the public half goes to the backend. Private
keys live in ``<state>/keys/<env id>`` with mode 0600 inside a 0700 directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_ttenv.backend.model import EnvInfo, VmInfo
from pytest_ttenv.backend.paths import state_dir
from pytest_ttenv.backend.seed import KeyPair
from pytest_ttenv.ssh import SshTarget


def keys_dir(state: str | os.PathLike[str] | None = None) -> Path:
    path = state_dir(state) / "keys"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def save_key(env_id: str, key: KeyPair, state: str | os.PathLike[str] | None = None) -> Path:
    """Store the ENV's private client key (0600) and return its path."""
    path = keys_dir(state) / env_id
    key.write_private(path)
    return path


def key_path(env: EnvInfo, state: str | os.PathLike[str] | None = None) -> Path:
    return keys_dir(state) / env.id


def forget_key(env: EnvInfo, state: str | os.PathLike[str] | None = None) -> None:
    key_path(env, state).unlink(missing_ok=True)


def target(vm: VmInfo, key: Path) -> SshTarget:
    """How to reach ``vm`` over SSH with the client key at ``key``."""
    return SshTarget(name=vm.name, host=vm.address, port=vm.port, user=vm.user, client_key=key, host_key=vm.host_key)
