"""The Backend contract and how a backend is chosen from its spec (``local`` or a URL).

The local backend and the HTTP client of the host server implement ``Backend``; one contract
test suite (tests/vm/test_backend_contract.py) runs against each.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Protocol

from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo
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


BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}
ENTRY_POINT_GROUP = "ttenv.backends"


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Make ``--tt-backend=<scheme>`` / ``<scheme>://...`` create backends with ``factory``.

    ``factory(spec, image_dir=, state_dir=, progress=)`` returns a Backend. Plugins register
    through the ``pytest_ttenv_register_backends`` hook or the ``ttenv.backends`` entry point
    group (name: the scheme, value: the factory).
    """
    _REGISTRY[scheme] = factory


def _factory(scheme: str) -> BackendFactory | None:
    if scheme not in _REGISTRY:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == scheme:
                register_backend(scheme, ep.load())
    return _REGISTRY.get(scheme)


def get_backend(
    spec: str = "local",
    *,
    image_dir: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
    token: str | None = None,
    engine: str = "qemu",
    libvirt_uris: Sequence[str] = (),
    ca_cert: str | None = None,
) -> Backend:
    """The backend named by ``spec``: ``local`` (this host; ``engine`` qemu, or libvirt on the hosts
    ``libvirt_uris``), ``http(s)://host:port`` (a ``ttenv serve`` host server, which chooses its own
    engine; ``token`` or ``$TTENV_TOKEN`` is its bearer token, ``ca_cert`` or ``$TTENV_CA_CERT`` the CAs its
    https certificate is verified with), or a registered scheme."""
    scheme = spec.split("://", 1)[0] if "://" in spec else spec
    factory = _factory(scheme)
    if factory is not None:
        return factory(spec, image_dir=image_dir, state_dir=state_dir, progress=progress)
    if spec in ("", "local"):
        from pytest_ttenv.backend.local import LocalBackend

        return LocalBackend(image_dir, state_dir, progress=progress, engine=engine, libvirt_uris=libvirt_uris)
    if spec.startswith(("http://", "https://")):
        from pytest_ttenv.backend.http import HttpBackend

        return HttpBackend(spec, token or os.environ.get("TTENV_TOKEN"), progress=progress, ca_cert=ca_cert)
    known = ", ".join(["local", *sorted(_REGISTRY)])
    raise UsageError(f"unknown backend {spec!r}", f"use one of {known}, or an http(s)://host:port URL")
