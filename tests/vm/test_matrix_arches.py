"""The OS x arch matrix for real: Debian 11/12/13 on x86_64 and Debian 12 on emulated aarch64 in
one pytest session, Debian 13 on emulated riscv64 in another; one test each, and the guest's own
``uname -m`` must match the VM's arch."""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.core.model import ImageInfo

from conftest import IMAGE_ROOT
from helpers.leftovers import leftovers

pytestmark = [pytest.mark.vm, pytest.mark.slow]
pytest_plugins = ["pytester"]

SUITE = """
def test_arch_and_release(tt_vm):
    assert tt_vm.run("uname -m", check=True).stdout.strip() == tt_vm.arch
    assert tt_vm.run("cat /etc/debian_version", check=True).stdout.startswith(tt_vm.version)
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the matrix test is written for an x86_64 host")
@pytest.mark.needs_images("debian-12-aarch64")
def test_debian_matrix_with_aarch64(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, images: Callable[..., list[ImageInfo]]
) -> None:
    images("debian-11", "debian-12", "debian-13")
    images("debian-12", arch="aarch64")
    state = tmp_path / "state"
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(IMAGE_ROOT))
    monkeypatch.setenv("TTENV_STATE_DIR", str(state))
    pytester.makepyfile(SUITE)
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--tt-os=debian11,debian12,debian13",
        "--tt-arch=x86_64,aarch64",
        "--tt-mem=384",
        f"--junitxml={junit}",
        timeout=1800,
    )
    result.assert_outcomes(passed=4)
    names = sorted(c.get("name", "") for c in ET.parse(junit).getroot().iter("testcase"))
    assert names == [
        f"test_arch_and_release[{n}]"
        for n in ("debian-11-x86_64", "debian-12-aarch64", "debian-12-x86_64", "debian-13-x86_64")
    ]
    assert leftovers(state) == []


@pytest.mark.skipif(platform.machine() == "riscv64", reason="tests an emulated riscv64 guest")
@pytest.mark.needs_images("debian-13-riscv64")
def test_debian13_riscv64(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, images: Callable[..., list[ImageInfo]]
) -> None:
    """Debian 13 (the first release with an official riscv64 port) under qemu-system-riscv64
    -machine virt: OpenSBI, then the image's kernel and our initramfs (direct boot)."""
    images("debian-13", arch="riscv64")
    state = tmp_path / "state"
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(IMAGE_ROOT))
    monkeypatch.setenv("TTENV_STATE_DIR", str(state))
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--tt-os=debian13", "--tt-arch=riscv64", "--tt-mem=512", timeout=1800
    )
    result.assert_outcomes(passed=1)
    assert leftovers(state) == []
