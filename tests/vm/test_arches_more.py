"""The four arches that joined x86_64, aarch64 and riscv64, really booted: Debian 12 on ppc64le
(pseries), s390x (s390-ccw-virtio), i386 (q35) and armhf (virt), one pytest session per arch.

Each session asks for its arch by the name users type (``ppc64el``, ``i686``, ``armv7l``: the
aliases), makes the arch's warm template and starts its VM warm from it; the inner test checks
the guest's own ``uname -m``, its byte order (big-endian on s390x), a file round trip over SFTP
and ``tt_vm_fresh``'s reset. The image is built on first use and kept in the image store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.core.model import ImageInfo

from conftest import IMAGE_ROOT
from helpers.leftovers import leftovers

pytestmark = [pytest.mark.vm, pytest.mark.slow]
pytest_plugins = ["pytester"]

SUITE = """
import os
import re

UNAME = {{"ppc64le": "ppc64le", "s390x": "s390x", "i386": "i686", "armhf": "armv7l"}}
BYTEORDER = {{"s390x": "big"}}


def test_arch_byteorder_and_files(tt_vm_fresh, tmp_path):
    vm = tt_vm_fresh
    assert vm.info.boot == "warm", "the VM starts from its arch's warm template"
    assert vm.arch == {arch!r}
    assert vm.run("uname -m", check=True).stdout.strip() == UNAME[vm.arch]
    order = vm.run("python3 -c 'import sys; print(sys.byteorder)'", check=True).stdout.strip()
    assert order == BYTEORDER.get(vm.arch, "little")
    payload = os.urandom(300_000)
    (tmp_path / "up.bin").write_bytes(payload)
    vm.put(tmp_path / "up.bin", "/root/up.bin")
    assert re.match("[0-9a-f]{{64}} ", vm.run("sha256sum /root/up.bin", check=True).stdout)
    vm.get("/root/up.bin", tmp_path / "down.bin")
    assert (tmp_path / "down.bin").read_bytes() == payload
    vm.write_text("/root/mark", "left by the first test")


def test_reset_forgets_the_first_tests_files(tt_vm_fresh):
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1
    assert tt_vm_fresh.run("test -e /root/up.bin").exit_status == 1
"""

# The arch as the user types it (an alias where one exists), and the canonical form it becomes.
ARCHES = [("ppc64el", "ppc64le"), ("s390x", "s390x"), ("i686", "i386"), ("armv7l", "armhf")]


@pytest.mark.parametrize(
    ("typed", "arch"),
    [pytest.param(t, a, id=a, marks=pytest.mark.needs_images(f"debian-12-{a}")) for t, a in ARCHES],
)
def test_debian12_boots_warm_and_resets(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    images: Callable[..., list[ImageInfo]],
    typed: str,
    arch: str,
) -> None:
    images("debian-12", arch=arch)
    state = tmp_path / "state"
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(IMAGE_ROOT))
    monkeypatch.setenv("TTENV_STATE_DIR", str(state))
    pytester.makepyfile(SUITE.format(arch=arch))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--tt-os=debian12", f"--tt-arch={typed}", "--tt-mem=512", "-v", timeout=1800
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*test_arch_byteorder_and_files?debian-12-{arch}? PASSED*"])
    assert leftovers(state) == []
