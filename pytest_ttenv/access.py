"""Client-side access to an ENV: its private client key and the SSH targets of its VMs.

The key pair is generated on the client (``envflow.create``); only the public half goes to the
backend. ``ClientKeys`` keeps private keys in ``<state>/keys/<env id>`` with mode 0600 inside a
0700 directory (a pytest session keeps its own in its session dir: ``session.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, VmInfo
from pytest_ttenv.core.paths import state_dir
from pytest_ttenv.ssh import SshTarget


@dataclass(frozen=True)
class ClientKeys:
    """The private login keys of the ENVs this client made outside a pytest session (``ttenv env
    add``, ENVs kept by ``--tt-keep``): ``<state>/keys/<env id>``, with the ``.known_hosts`` file
    ``write_known_hosts`` puts beside each. An ``envflow.KeyHome``."""

    state: str | os.PathLike[str] | None = None

    @property
    def dir(self) -> Path:
        path = state_dir(self.state) / "keys"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def path(self, env: EnvInfo) -> Path:
        return self.dir / env.id

    def store(self, env: EnvInfo, key: KeyPair) -> Path:
        """Store the ENV's private client key (0600) and return its path."""
        path = self.path(env)
        key.write_private(path)
        return path

    def forget(self, env: EnvInfo) -> None:
        key = self.path(env)
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
    return (
        f"ssh -i {key} -o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes -p {vm.port} "
        f"{vm.user}@{vm.address}"
    )


def target(vm: VmInfo, key: Path) -> SshTarget:
    """How to reach ``vm`` over SSH with the client key at ``key``."""
    return SshTarget(name=vm.name, host=vm.address, port=vm.port, user=vm.user, client_key=key, host_key=vm.host_key)
