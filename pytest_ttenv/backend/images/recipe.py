"""What the Debian image builder makes, as data: the releases, the packages, the units it masks,
the variants, and which image names it can build. Pure: importing this runs no tool and loads
no builder, so the plugin plans a session's images with it at configure time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_ttenv.core.naming import ARCHES, canonical_arch, image_name
from pytest_ttenv.errors import UsageError

DEBIAN_SUITES = {"11": "bullseye", "12": "bookworm", "13": "trixie"}
KERNEL_PACKAGE = {
    "x86_64": "linux-image-cloud-amd64",
    "aarch64": "linux-image-cloud-arm64",
    "riscv64": "linux-image-riscv64",
    "ppc64le": "linux-image-powerpc64le",
    "s390x": "linux-image-s390x",
    "i386": "linux-image-686",
    "armhf": "linux-image-armmp-lpae",
}
# The arches each release ships a kernel for (Debian's official release architectures):
# riscv64 is official from 13 (trixie); trixie dropped i386 as a release arch (no kernel, no
# installer: its i386 packages are only for running 32-bit programs on amd64).
RELEASE_ARCHES = {
    "11": ("x86_64", "aarch64", "ppc64le", "s390x", "i386", "armhf"),
    "12": ("x86_64", "aarch64", "ppc64le", "s390x", "i386", "armhf"),
    "13": ("x86_64", "aarch64", "riscv64", "ppc64le", "s390x", "armhf"),
}
# The kernel console of each arch's qemu machine: arm's PL011, Power's hypervisor console (spapr-vty),
# s390x's SCLP line console, else a 16550 UART (x86, riscv virt).
CONSOLE = {"aarch64": "ttyAMA0", "armhf": "ttyAMA0", "ppc64le": "hvc0", "s390x": "ttysclp0"}
DEFAULT_CONSOLE = "ttyS0"
# The label of the tuned images' root file system: the kernel command line and fstab name the
# root by it (on s390x channel I/O the disks' order is not the command line's).
ROOT_LABEL = "ttenv-root"
# qemu-user-static's binfmt_misc entry for each foreign arch (``qemu-<entry>``), where not the arch's name.
BINFMT_ENTRY = {"armhf": "arm"}
# Host arches that run an arch's binaries natively (no qemu-user for its second stage).
RUNS_NATIVELY_ON = {"i386": ("x86_64",)}
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "openssh-server",
    "iproute2",
    "ca-certificates",
    "python3-minimal",
    "sudo",
    "procps",
    "busybox-static",
    "e2fsprogs",
)
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "getty.target",
    "serial-getty@.service",
    "console-getty.service",
    "getty@.service",
    "systemd-journal-flush.service",
    "modprobe@.service",
    "systemd-logind.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
    "ssh.socket",
    "systemd-pstore.service",
    "systemd-binfmt.service",
)
MASKED_GENERATORS = ("systemd-gpt-auto-generator", "systemd-getty-generator", "systemd-hibernate-resume-generator")
# The cloud variant (a stand-in for a vendor cloud image): cloud-init reads the NoCloud seed, GRUB
# boots the disk under SeaBIOS or UEFI, ifupdown applies the network cloud-init renders (its eni
# renderer); dbus for hostnamectl, locales for cloud-init's locale module; dosfstools and mtools
# write the EFI system partition (run in the root, like grub-mkimage).
CLOUD_OS = "debiancloud"
CLOUD_USER = "debian"
CLOUD_PACKAGES = (
    "cloud-init",
    "cloud-guest-utils",
    "ifupdown",
    "dbus",
    "locales",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",
    "dosfstools",
    "mtools",
)
VARIANTS = ("tuned", "plain", "cloud")
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*", "/usr/share/doc/*")


@dataclass(frozen=True)
class BuildRequest:
    """What to build: ``os``/``version``/``arch``, which variant, from which mirror, how large the disk.

    Variants: ``tuned`` (the default: direct kernel boot, our initramfs and seed unit), ``plain``
    (Debian's defaults plus the seed unit: the benchmark anchor) and ``cloud`` (a vendor-style
    cloud image: boot loader, cloud-init; named ``debiancloud-<version>-<arch>``).
    """

    os: str
    version: str
    arch: str
    mirror: str | None = None
    disk_mib: int = 3072
    variant: str = "tuned"

    @property
    def tuned(self) -> bool:
        return self.variant == "tuned"

    @property
    def image_os(self) -> str:
        """The OS part of the image name: the cloud variant must not shadow ``debian-<version>``."""
        return CLOUD_OS if self.variant == "cloud" else self.os

    @property
    def name(self) -> str:
        return image_name(self.image_os, self.version, self.arch)


def parse_target(target: str, arch: str, variant: str = "") -> BuildRequest:
    """``debian-12`` (or ``debian12``, ``debian-bookworm``; ``debiancloud-12`` for the cloud variant)
    + arch (+ variant) -> BuildRequest, else UsageError."""
    m = re.match(rf"^(debian|{CLOUD_OS})-?(\d+|[a-z]+)$", target.strip().lower())
    version = m.group(2) if m else None
    if version in DEBIAN_SUITES.values():
        version = next(v for v, s in DEBIAN_SUITES.items() if s == version)
    if m is None or version not in DEBIAN_SUITES:
        buildable = ", ".join(f"debian-{v}" for v in DEBIAN_SUITES)
        raise UsageError(f"cannot build {target!r}", f"buildable here: {buildable} (and {CLOUD_OS}-<version>)")
    named = "cloud" if m.group(1) == CLOUD_OS else ""
    if variant and named and variant != named:
        raise UsageError(f"{target!r} is the cloud variant; --variant {variant} contradicts it")
    variant = variant or named or "tuned"
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}", f"use one of {', '.join(VARIANTS)}")
    if variant == "cloud" and arch != "x86_64":
        raise UsageError(f"the cloud variant boots through x86 GRUB (BIOS or UEFI): x86_64 only, not {arch}")
    if arch not in RELEASE_ARCHES[version]:
        ships = [v for v, arches in RELEASE_ARCHES.items() if arch in arches]
        raise UsageError(
            f"Debian {version} ({DEBIAN_SUITES[version]}) ships no {arch} kernel",
            f"build {', '.join(f'debian-{v}' for v in ships)} for {arch}",
        )
    return BuildRequest("debian", version, arch, variant=variant)


def buildable(arches: Sequence[str] = ARCHES) -> list[str]:
    """The image names the builder makes (its default variant) for ``arches``: ``debian-12-x86_64``..."""
    wanted = [canonical_arch(a) for a in arches]
    return [image_name("debian", v, a) for a in wanted for v in DEBIAN_SUITES if a in RELEASE_ARCHES[v]]
