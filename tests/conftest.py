"""Shared fixtures: real Debian images (built once, cached in the user cache like CI does), real
libvirt hosts (tests/helpers/libvirt_hosts.py); and the folder rule (tests/helpers/layout.py): a
VM test in tests/unit or a test without VMs in tests/vm fails the collection."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_ttenv.backend.images.build import ensure_images
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.paths import image_dir

from helpers.layout import misplaced
from helpers.prebuild import Prebuilds, declared

if TYPE_CHECKING:
    from helpers.libvirt_hosts import LibvirtHost

HOST_ARCH = platform.machine()
IMAGE_ROOT = image_dir()  # read before any test moves HOME (pytester does)
_prebuilds: list[Prebuilds] = []  # the session's background builds (helpers/prebuild.py), if any


def _why_no_vms() -> str | None:
    if os.geteuid() != 0:
        return "building guest images needs root (mmdebstrap --mode=root)"
    for tool in ("mmdebstrap", "qemu-img", f"qemu-system-{HOST_ARCH}"):
        if not shutil.which(tool):
            return f"{tool} not installed (run scripts/setup.sh)"
    return None


@pytest.fixture(scope="session")
def images() -> Callable[..., list[ImageInfo]]:
    """``images("debian-12", "debian-11", arch=...)`` -> those images (default: host arch), built
    on first use."""
    reason = _why_no_vms()
    if reason:
        pytest.skip(f"cannot boot VMs here: {reason}")
    store = ImageStore(IMAGE_ROOT)

    def get(*targets: str, arch: str = HOST_ARCH) -> list[ImageInfo]:
        names = [f"{t}-{arch}" for t in targets]
        for pre in _prebuilds:
            pre.wait_all(names)
        return ensure_images(store, names, progress=lambda line: print(line, flush=True))

    return get


@pytest.fixture
def libvirt_hosts() -> Iterator[Callable[..., LibvirtHost]]:
    """``libvirt_hosts(remote=False)`` -> a started LibvirtHost; every one is killed and removed
    after the test (skipped where libvirt hosts cannot be started)."""
    from helpers.libvirt_hosts import LibvirtHost, missing  # here: test_test_folders runs this file without it

    reason = missing()
    if reason:
        pytest.skip(f"no libvirt hosts here: {reason}")
    made: list[LibvirtHost] = []
    roots: list[Path] = []

    def make(remote: bool = False) -> LibvirtHost:
        root = Path(tempfile.mkdtemp(prefix="ttlv-", dir="/tmp"))  # short: libvirt's socket lives there
        roots.append(root)
        host = LibvirtHost(root, remote=remote)
        made.append(host)
        return host.start()

    yield make
    for host in made:
        host.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before -m/-k deselect: a misplaced test is reported however the run selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = misplaced(items, Path(__file__).parent)
    if wrong:
        raise pytest.UsageError(*wrong)  # pytest prints each as one "ERROR: ..." line and exits 4


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the images the selected tests declare (``needs_images``) in the background."""
    names = declared(session.items)
    if names and _why_no_vms() is None and not session.config.option.collectonly:
        log = Path(tempfile.gettempdir()) / f"ttenv-prebuild-{os.getpid()}.log"
        pre = Prebuilds(ImageStore(IMAGE_ROOT), names, log)
        if pre.names:
            _prebuilds.append(pre)
            print(f"\nbuilding {', '.join(pre.names)} in the background (log: {log})", flush=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _prebuilds:
        _prebuilds.pop().close()
