"""Client-side access to an ENV: its private client key and the SSH targets of its VMs.

The key pair is generated on the client; only the public half goes to the backend. Private
keys live in ``<state>/keys/<env id>`` with mode 0600 inside a 0700 directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, VmInfo
from pytest_ttenv.core.paths import state_dir
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
    key = key_path(env, state)
    key.unlink(missing_ok=True)
    _known_hosts_path(key).unlink(missing_ok=True)


def _known_hosts_path(key: Path) -> Path:
    return key.with_suffix(".known_hosts")


def write_known_hosts(env: EnvInfo, key: Path) -> Path:
    """Write the host keys of ``env``'s VMs to ``<key>.known_hosts`` (0600) and return its path:
    what ``login_command`` checks the VM's host key against."""
    known = _known_hosts_path(key)
    lines = [f"[{v.address}]:{v.port} {v.host_key}" for v in env.vms if v.host_key and v.port]
    fd = os.open(known, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return known


def login_command(vm: VmInfo, key: Path, known_hosts: Path) -> str:
    """An OpenSSH command line that logs into ``vm`` with the client key ``key`` and checks the
    VM's host key strictly against ``known_hosts`` (from ``write_known_hosts``)."""
    return (f"ssh -i {key} -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes -p {vm.port} "
            f"{vm.user}@{vm.address}")  # fmt: skip


def target(vm: VmInfo, key: Path) -> SshTarget:
    """How to reach ``vm`` over SSH with the client key at ``key``."""
    return SshTarget(name=vm.name, host=vm.address, port=vm.port, user=vm.user, client_key=key, host_key=vm.host_key)
