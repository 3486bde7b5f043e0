"""The factories of the built-in backends, which pyproject.toml declares as ``ttenv.backends``
entry points (``local``, ``http``, ``https``). Each imports its backend when called, so loading an
entry point costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_ttenv.backend.http import HttpBackend
    from pytest_ttenv.backend.local import LocalBackend


class Local:
    """``local``: VMs on this host (``engine`` qemu, or libvirt on the hosts ``libvirt_uris``),
    booted from the image store at ``image_dir``."""

    usage = "local"
    local_images = True

    def __call__(
        self,
        spec: str,
        *,
        image_dir: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] | None = None,
        engine: str = "qemu",
        libvirt_uris: Sequence[str] = (),
        **_: Any,
    ) -> LocalBackend:
        from pytest_ttenv.backend.local import LocalBackend

        return LocalBackend(image_dir, state_dir, progress=progress, engine=engine, libvirt_uris=libvirt_uris)


class Http:
    """``http(s)://host:port``: a ``ttenv serve`` host server (``token`` or ``$TTENV_TOKEN`` is its
    bearer token, ``ca_cert`` or ``$TTENV_CA_CERT`` the CAs its https certificate is verified with)."""

    local_images = False

    def __init__(self, scheme: str) -> None:
        self.usage = f"{scheme}://host:port"

    def __call__(
        self,
        spec: str,
        *,
        progress: Callable[[str], None] | None = None,
        token: str | None = None,
        ca_cert: str | None = None,
        **_: Any,
    ) -> HttpBackend:
        from pytest_ttenv.backend.http import HttpBackend

        return HttpBackend(spec, token, progress=progress, ca_cert=ca_cert)


LOCAL = Local()
HTTP = Http("http")
HTTPS = Http("https")
