"""How qemu runs each guest arch, as data: binary and apt package, machine and CPU under TCG and
KVM, the virtio transport, the panic device, which hosts' KVM runs it, and how much longer it
takes to boot under emulation. Pure: no tool is run here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QemuArch:
    """One guest arch under qemu.

    ``machine``/``cpu`` are used under TCG, ``kvm_machine``/``kvm_cpu`` under KVM (default: the
    same machine, ``host``). ``bus`` is the virtio transport: ``pci``, or ``ccw`` (s390x channel
    I/O). ``panic`` is the device that turns a guest kernel panic into qemu's exit (None: the arch
    has none). ``kvm_hosts``: host arches whose KVM runs this guest arch. ``tcg_boot_factor``: the
    boot-to-SSH time of an emulated guest of this arch over an x86_64 guest's under TCG on the
    same host (measured, rounded up), applied to the boot timeout when the guest is not native.
    Measured with bench/matrix_boot.py (TCG, x86_64 host; cold boot over debian-12-x86_64's 7.8 s):
    aarch64 1.2, riscv64 (Debian 13) 1.6, ppc64le 1.8, s390x 1.1, i386 1.4, armhf 2.1 (Debian 13:
    3.5); aarch64 and riscv64 keep 2.5 from earlier hosts where they measured up to 2x.
    ``libvirt``: the arch's name in libvirt's domain XML, None where the libvirt engine does not
    run it.
    """

    binary: str
    package: str
    machine: str
    cpu: str
    tcg_boot_factor: float
    kvm_machine: str = ""
    kvm_cpu: str = "host"
    bus: str = "pci"
    panic: str | None = "pvpanic-pci"
    vmgenid: bool = False
    kvm_hosts: tuple[str, ...] = ()
    libvirt: str | None = None

    def machine_for(self, accel: str) -> str:
        return (self.kvm_machine or self.machine) if accel == "kvm" else self.machine

    def cpu_for(self, accel: str) -> str:
        return self.kvm_cpu if accel == "kvm" else self.cpu


QEMU_ARCH = {
    "x86_64": QemuArch(
        "qemu-system-x86_64",
        "qemu-system-x86",
        machine="q35",
        cpu="max",
        tcg_boot_factor=2.5,  # emulated on another host arch: not measured, the factor foreign arches had
        panic="pvpanic",
        vmgenid=True,
        kvm_hosts=("x86_64",),
        libvirt="x86_64",
    ),
    "aarch64": QemuArch(
        "qemu-system-aarch64",
        "qemu-system-arm",
        machine="virt",
        cpu="max,pauth-impdef=on",  # pointer authentication's cheap algorithm: faster under TCG
        kvm_machine="virt,gic-version=max",
        kvm_hosts=("aarch64",),
        tcg_boot_factor=2.5,
        libvirt="aarch64",
    ),
    "riscv64": QemuArch(
        "qemu-system-riscv64",
        "qemu-system-misc",
        machine="virt",
        cpu="rv64",
        kvm_hosts=("riscv64",),
        tcg_boot_factor=2.5,
        libvirt="riscv64",
    ),
    "ppc64le": QemuArch(
        "qemu-system-ppc64",
        "qemu-system-ppc",
        # TCG lacks the Spectre-mitigation capabilities pseries asks for by default: turned off,
        # else every loadvm (a reset) answers with warnings about them
        machine="pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
        cpu="power9",
        kvm_machine="pseries",
        kvm_hosts=("ppc64le",),
        tcg_boot_factor=2.0,
    ),
    "s390x": QemuArch(
        "qemu-system-s390x",
        "qemu-system-s390x",  # a package of its own on Ubuntu; Debian 12's qemu-system-misc provides it
        machine="s390-ccw-virtio",
        cpu="max",
        bus="ccw",
        panic=None,  # a panic is an SCLP event there, not a device
        kvm_hosts=("s390x",),
        tcg_boot_factor=1.5,
    ),
    "i386": QemuArch(
        "qemu-system-i386",
        "qemu-system-x86",
        machine="q35",
        cpu="max",
        panic="pvpanic",
        vmgenid=True,
        kvm_hosts=("x86_64", "i386"),
        tcg_boot_factor=1.5,
    ),
    "armhf": QemuArch(
        "qemu-system-arm",
        "qemu-system-arm",
        machine="virt,highmem=off",  # 32-bit ARM: no RAM or PCI windows above 4 GiB
        cpu="max",
        kvm_hosts=("armhf",),
        tcg_boot_factor=3.5,
    ),
}
QEMU_BINARY = {arch: spec.binary for arch, spec in QEMU_ARCH.items()}
QEMU_PACKAGE = {arch: spec.package for arch, spec in QEMU_ARCH.items()}


def kvm_runs(arch: str, host: str) -> bool:
    """Whether a ``host`` machine's KVM can run ``arch`` guests (its own arch, or i386 on x86_64)."""
    return host in QEMU_ARCH[arch].kvm_hosts
