"""The Backend contract and the registry that makes a backend from its spec (``local`` or a URL).

The local backend and the HTTP client of the host server implement ``Backend``; one contract
test suite (tests/vm/test_backend_contract.py) runs against each. Backends are found by the
scheme of their spec in one registry: the ``ttenv.backends`` entry points (the built-in ``local``,
``http`` and ``https`` are declared in pyproject.toml, with their factories in ``builtin``) and
the schemes registered with ``register_backend`` (the ``pytest_ttenv_register_backends`` hook).

The rule of this folder: at its top level the contract and what implements it - ``local`` (ENVs
of engines on this host, with ``store``: sqlite state, ``schema``: its migrations, ``owner``: owner
records, ``readiness``: the wait loop, ``sweep``: gc of its state dir), ``http`` (the server's
client) and ``builtin`` (their factories); in ``engines/`` how a VM runs, in ``images/`` where an
image comes from. Modules here import ``core``, ``errors``, ``engines`` and ``images``, never the
SSH channel, the session, the plugin, the CLI or the server; ``engines`` and ``images`` never
import each other or this top level.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from pytest_ttenv.core.capture_manifest import CaptureInfo, TestRecord
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo
from pytest_ttenv.errors import UsageError


class Backend(Protocol):
    """Where ENVs live. Every method raises TTError subclasses with one clear line."""

    name: str

    def images(self) -> list[ImageInfo]: ...

    def resolve(self, prefixes: Sequence[str], arches: Sequence[str] = ()) -> list[str]:
        """The names of this backend's images that the OS prefixes (and arches) match, by the one
        rule (``core.naming.match_prefixes``); UsageError listing what exists if a prefix matches none."""
        ...

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

    def capture(
        self,
        env_ref: str,
        vm_name: str,
        dest: Path,
        test: TestRecord,
        *,
        image: str = "auto",
        max_bytes: int | None = None,
        report: str = "",
    ) -> CaptureInfo:
        """Save the running VM (memory, devices, disk delta, console) with ``test`` into the capture
        file ``dest`` (``core.capture_format``); the VM runs on afterwards. ``image``: ``auto``
        bundles the image when it cannot be had by name elsewhere (built or imported here),
        ``always`` / ``never``. ``report``: the test's report text, kept in it. CaptureSkipped
        (no file left) if it would pass ``max_bytes`` or the VM cannot be captured. The guest's
        identity agent must run in it (``identity.agent_start_command``)."""
        ...


class BackendFactory(Protocol):
    """Makes a backend: ``factory(spec, image_dir=, state_dir=, progress=, token=, engine=,
    libvirt_uris=, ca_cert=)``; it is given only the keywords it names, or all with ``**options``.

    Optional attributes: ``usage`` (how to name it in a spec, for messages; default
    ``<scheme>://...``) and ``local_images`` (True: its VMs boot from this host's image store at
    ``image_dir``, so the client plans the matrix from that store and the catalog and obtains
    missing images into it before ``create_env``; default False: the backend has its own images).
    """

    def __call__(self, spec: str, **options: Any) -> Backend: ...


ENTRY_POINT_GROUP = "ttenv.backends"
DEFAULT_SCHEME = "local"
_REGISTERED: dict[str, BackendFactory] = {}  # by register_backend, and entry points once loaded


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Make ``--tt-backend=<scheme>`` / ``<scheme>://...`` create backends with ``factory`` (see
    ``BackendFactory``), over an entry point of the same name."""
    _REGISTERED[scheme] = factory


def scheme_of(spec: str) -> str:
    """The registry key of a backend spec: ``local`` for ``""``, ``http`` for ``http://host:port``."""
    return spec.split("://", 1)[0] if "://" in spec else spec or DEFAULT_SCHEME


def backend_factory(spec: str) -> BackendFactory | None:
    """The factory registered for ``spec``'s scheme, loading its entry point on first use; None
    if no one offers that scheme."""
    scheme = scheme_of(spec)
    if scheme not in _REGISTERED:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=scheme):
            _REGISTERED[scheme] = ep.load()
            break
    return _REGISTERED.get(scheme)


def uses_local_images(spec: str) -> bool:
    """True if the backend ``spec`` names boots from this host's image store (the built-in
    ``local``): see ``BackendFactory.local_images``."""
    return bool(getattr(backend_factory(spec), "local_images", False))


def get_backend(
    spec: str = DEFAULT_SCHEME,
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
    factory = backend_factory(spec)
    if factory is None:
        raise _unknown(spec)
    options: dict[str, Any] = {
        "image_dir": image_dir,
        "state_dir": state_dir,
        "progress": progress,
        "token": token,
        "engine": engine,
        "libvirt_uris": libvirt_uris,
        "ca_cert": ca_cert,
    }
    return factory(spec, **_accepted(factory, options))


def _accepted(factory: BackendFactory, options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that ``factory`` takes: all of them if it has ``**options``, else those it
    names (a factory written for ``image_dir=, state_dir=, progress=`` keeps working)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): give it everything
        return options
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return options
    names = {p.name for p in params}
    return {k: v for k, v in options.items() if k in names}


def _unknown(spec: str) -> UsageError:
    """UsageError for a spec no one offers, listing what the registry has."""
    schemes = {*_REGISTERED, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))}
    if DEFAULT_SCHEME not in schemes:
        return UsageError(
            f"unknown backend {spec!r}: pytest-ttenv's {ENTRY_POINT_GROUP} entry points are missing",
            "reinstall pytest-ttenv (from a clone: pip install -e .)",
        )
    usages = {getattr(backend_factory(s), "usage", f"{s}://...") for s in schemes}
    known = sorted(usages, key=lambda u: (u != DEFAULT_SCHEME, u))
    return UsageError(f"unknown backend {spec!r}", f"use one of {', '.join(known)}")
