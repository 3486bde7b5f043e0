"""The Backend contract and how a backend is chosen from its spec (``local`` or a URL).

Both the local backend and (later) the HTTP client implement ``Backend``; one contract
test suite runs against each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

from pytest_ttenv.backend.model import EnvInfo, EnvSpec, ImageInfo, VmInfo
from pytest_ttenv.errors import UsageError


class Backend(Protocol):
    """Where ENVs live. Every method raises TTError subclasses with one clear line."""

    name: str

    def images(self) -> list[ImageInfo]: ...

    def resolve(self, prefixes: Sequence[str], arches: Sequence[str] = ()) -> list[str]: ...

    def create_env(self, spec: EnvSpec) -> EnvInfo:
        """Create the ENV and start its VMs; returns at once while they boot."""
        ...

    def wait_vm(self, env_ref: str, vm_name: str, timeout: float | None = None) -> VmInfo:
        """Block until the VM answers SSH (BootError with the console tail otherwise)."""
        ...

    def show_env(self, ref: str) -> EnvInfo: ...

    def list_envs(self) -> list[EnvInfo]: ...

    def delete_env(self, ref: str) -> EnvInfo: ...

    def renew(self, ref: str, ttl: float) -> EnvInfo: ...

    def keep(self, ref: str, ttl: float) -> EnvInfo:
        """Let the ENV outlive its owner process, with a lease of ``ttl`` seconds."""
        ...

    def snapshot(self, env_ref: str, vm_name: str, name: str) -> None: ...

    def revert(self, env_ref: str, vm_name: str, name: str) -> None: ...

    def console(self, env_ref: str, vm_name: str, tail: int = 50) -> str: ...


def get_backend(
    spec: str = "local",
    *,
    image_dir: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Backend:
    """The backend named by ``spec``: ``local`` (this host) or ``http(s)://host:port``."""
    if spec in ("", "local"):
        from pytest_ttenv.backend.local import LocalBackend

        return LocalBackend(image_dir, state_dir, progress=progress)
    if spec.startswith(("http://", "https://")):
        raise UsageError(f"backend {spec}: remote host servers are not supported yet", "use --backend local")
    raise UsageError(f"unknown backend {spec!r}", "use 'local' or an http(s)://host:port URL")
