"""``ttenv doctor``'s qemu lines without running qemu: one per guest arch, the apt package for a
missing binary, and only the host arch's binary required."""

from __future__ import annotations

import shutil

import pytest

from pytest_ttenv import doctor
from pytest_ttenv.backend.engines.qemu_arch import QEMU_BINARY, QEMU_PACKAGE
from pytest_ttenv.core.naming import ARCHES

VERSION = "QEMU emulator version 7.2.22"


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Binaries ``shutil.which`` does not find (fill the set in the test); the others answer VERSION."""
    gone: set[str] = set()
    monkeypatch.setattr(shutil, "which", lambda name: None if name in gone else f"/usr/bin/{name}")
    monkeypatch.setattr(doctor, "version", lambda arch: VERSION)
    return gone


def test_every_arch_has_a_line_in_arches_order(missing: set[str]) -> None:
    checks = doctor.qemu_checks("x86_64")
    assert [c.name for c in checks] == [QEMU_BINARY[a] for a in ARCHES]
    assert all(c.ok for c in checks)
    assert [c.required for c in checks] == [a == "x86_64" for a in ARCHES]
    lines = {a: c.line() for a, c in zip(ARCHES, checks, strict=True)}
    assert lines["x86_64"] == f"[ok  ] qemu-system-x86_64  {VERSION} (x86_64, the host arch)"
    assert lines["s390x"] == f"[ok  ] qemu-system-s390x   {VERSION} (s390x guests, emulated)"
    assert lines["i386"].endswith("(i386 guests, KVM-capable)")  # an x86_64 host's KVM runs i386


def test_a_missing_binary_names_its_apt_package(missing: set[str]) -> None:
    missing.update({"qemu-system-ppc64", "qemu-system-s390x", "qemu-system-arm"})
    checks = {c.name: c for c in doctor.qemu_checks("armv7l")}  # an alias of armhf
    power, z, arm = checks["qemu-system-ppc64"], checks["qemu-system-s390x"], checks["qemu-system-arm"]
    assert (
        power.line()
        == "[warn] qemu-system-ppc64   not found (ppc64le guests, emulated)  -> apt-get install -y "
        + (QEMU_PACKAGE["ppc64le"])
    )
    assert (z.ok, z.required, z.fix) == (False, False, f"apt-get install -y {QEMU_PACKAGE['s390x']}")
    # the host arch's own binary is required: without it the local backend is not usable
    assert (arm.ok, arm.required, arm.detail) == (False, True, "not found (armhf, the host arch)")
    assert arm.line().startswith("[MISS] qemu-system-arm ") and arm.line().endswith(
        f"-> apt-get install -y {QEMU_PACKAGE['armhf']}"
    )
    assert not doctor.usable(list(checks.values()))
    assert checks["qemu-system-x86_64"].ok and not checks["qemu-system-x86_64"].required


def test_an_unknown_host_arch_needs_none(missing: set[str]) -> None:
    missing.update(QEMU_BINARY.values())
    checks = doctor.qemu_checks("mips64")
    assert len(checks) == len(ARCHES) and not any(c.ok or c.required for c in checks)
    assert all(c.detail.endswith("guests, emulated)") for c in checks)
    assert doctor.usable(checks)
