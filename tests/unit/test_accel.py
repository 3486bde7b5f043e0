"""Accelerator choice for images booted by their own boot loader (no kernel to probe KVM with).

The KVM probe itself is stubbed here (it needs a working KVM); what is checked is which image
it boots and that no verdict is cached when nothing could be probed.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines import accel
from pytest_ttenv.backend.engines.qemu_arch import QEMU_ARCH
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import UsageError

HOST = platform.machine()
DIRECT = ImageInfo("debian-12-" + HOST, "debian", "12", HOST, path=Path("/img/direct"))
FIRMWARE = ImageInfo(
    "debiancloud-12-" + HOST,
    "debiancloud",
    "12",
    HOST,
    boot="bios",
    kernel=None,
    initrd=None,
    path=Path("/img/firmware"),
)


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """KVM looks usable, nothing is cached; records the images the probe is asked to boot."""
    calls: list[str] = []
    monkeypatch.setattr(accel, "kvm_usable", lambda: None)
    monkeypatch.setattr(accel, "_cache_file", lambda: tmp_path / "accel.json")

    def probe(image: ImageInfo, timeout: float = accel.PROBE_TIMEOUT) -> tuple[bool, str]:
        calls.append(image.name)
        return True, "probe guest booted in 1.0 s"

    monkeypatch.setattr(accel, "probe_kvm", probe)
    return calls


def test_firmware_image_is_probed_with_an_image_that_has_a_kernel(probed: list[str], tmp_path: Path) -> None:
    verdict = accel.choose("auto", FIRMWARE, probe_with=DIRECT)
    assert verdict.name == "kvm" and probed == [DIRECT.name]
    assert (tmp_path / "accel.json").exists()


def test_firmware_image_without_a_probe_image_runs_tcg_and_caches_nothing(probed: list[str], tmp_path: Path) -> None:
    verdict = accel.choose("auto", FIRMWARE)
    assert verdict.name == "tcg" and "not probed" in verdict.reason
    assert probed == [] and not (tmp_path / "accel.json").exists()
    # a later ENV with a kernel-bearing image still gets its real probe
    assert accel.choose("auto", DIRECT).name == "kvm" and probed == [DIRECT.name]


def test_explicit_kvm_is_trusted_when_nothing_can_probe(probed: list[str]) -> None:
    assert accel.choose("kvm", FIRMWARE).name == "kvm" and probed == []


def test_boot_timeout_scales_for_cloud_init_images_and_foreign_arches() -> None:
    base = accel.boot_timeout("tcg", HOST)
    assert accel.boot_timeout("tcg", HOST, access="cloud-init") == 3 * base
    foreign = "riscv64" if HOST != "riscv64" else "x86_64"
    assert accel.boot_timeout("tcg", foreign) == QEMU_ARCH[foreign].tcg_boot_factor * base > base


@pytest.mark.skipif(HOST != "x86_64", reason="i386 guests on an x86_64 host")
def test_i386_guests_run_under_an_x86_64_hosts_kvm(probed: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM runs 32-bit x86 guests on an x86_64 host: i386 is probed like the host's own arch, and
    its boot timeout is a native guest's under KVM (a foreign arch's under TCG)."""
    i386 = replace(DIRECT, name="debian-12-i386", arch="i386")
    assert accel.choose("auto", i386).name == "kvm" and probed == [i386.name]
    assert accel.boot_timeout("kvm", "i386") == accel.boot_timeout("kvm", HOST)
    assert accel.boot_timeout("tcg", "i386") == QEMU_ARCH["i386"].tcg_boot_factor * accel.boot_timeout("tcg", HOST)
    with pytest.raises(UsageError, match="kvm cannot run s390x guests"):
        accel.choose("kvm", replace(DIRECT, name="debian-12-s390x", arch="s390x"))


def test_tcg_fallback_is_said_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_ttenv.backend import local

    monkeypatch.setattr(local, "_WARNED", set())
    lines: list[str] = []
    backend = local.LocalBackend(tmp_path / "images", tmp_path / "state", lines.append)
    failed = accel.Accel("tcg", "KVM probe failed (probe guest exited); VMs run under TCG emulation")
    backend._warn_tcg(failed, DIRECT)
    backend._warn_tcg(failed, DIRECT)  # a second ENV of the same session: nothing new to say
    backend._warn_tcg(accel.Accel("tcg", "requested"), DIRECT)  # --accel tcg: the user knows
    foreign = "riscv64" if HOST != "riscv64" else "x86_64"
    backend._warn_tcg(accel.Accel("tcg", "emulated"), ImageInfo(f"debian-13-{foreign}", "debian", "13", foreign))
    backend._warn_tcg(accel.Accel("kvm", "probe guest booted"), DIRECT)
    assert lines == ["warning: KVM probe failed (probe guest exited); VMs run under TCG emulation"]
