"""``ttenv doctor``: what this host has and lacks for the local backend, one line per check."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from pytest_ttenv.backend.engines import accel
from pytest_ttenv.backend.engines.qemu import version
from pytest_ttenv.backend.engines.qemu_arch import QEMU_BINARY, QEMU_PACKAGE, kvm_runs
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.naming import ARCHES, host_arch
from pytest_ttenv.errors import TTError

MIN_FREE_GIB = 5.0


@dataclass(frozen=True)
class Check:
    """One doctor line: ``ok`` False with ``required`` True makes the local backend unusable."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        mark = "ok  " if self.ok else ("MISS" if self.required else "warn")
        fix = f"  -> {self.fix}" if self.fix and not self.ok else ""
        return f"[{mark}] {self.name:<19} {self.detail}{fix}"  # 19: qemu-system-aarch64


def _tool(name: str, package: str, what: str, required: bool = True) -> Check:
    path = shutil.which(name)
    if path:
        return Check(name, True, f"{path} ({what})", required=required)
    return Check(name, False, f"not found ({what})", f"apt-get install -y {package}", required)


def run_checks(store: ImageStore, probe: bool = True) -> list[Check]:
    """All checks; ``probe`` allows booting a probe guest to decide the accelerator."""
    checks = qemu_checks(host_arch())
    checks.append(_tool("qemu-img", "qemu-utils", "overlays, image conversion"))
    checks.append(_tool("mmdebstrap", "mmdebstrap", "building Debian images", required=not store.all()))
    checks.append(_tool("mkfs.ext4", "e2fsprogs", "building images", required=not store.all()))
    checks.append(_tool("cpio", "cpio", "building the initramfs", required=not store.all()))
    checks.append(_tool("ssh", "openssh-client", "logging in by hand to kept VMs", required=False))
    checks.append(_accel_check(store, probe))
    checks.append(_libvirt_check())
    checks.append(_disk_check(store))
    images = store.all()
    detail = ", ".join(i.name for i in images) if images else "none yet"
    checks.append(Check("images", bool(images), detail, "ttenv image build debian-12", required=False))
    return checks


def qemu_checks(host: str) -> list[Check]:
    """One line per guest arch (``ARCHES`` order): its qemu binary and version, or the apt package
    that provides it; only the ``host`` arch's (``uname -m``, aliases allowed) is required."""
    host = host_arch(host)
    checks = []
    for arch in ARCHES:
        binary = QEMU_BINARY[arch]
        ver = version(arch) if shutil.which(binary) else ""
        if arch == host:
            role = f"{arch}, the host arch"
        else:
            role = f"{arch} guests, {'KVM-capable' if kvm_runs(arch, host) else 'emulated'}"
        if ver:
            checks.append(Check(binary, True, f"{ver} ({role})", required=arch == host))
        else:
            fix = f"apt-get install -y {QEMU_PACKAGE[arch]}"
            checks.append(Check(binary, False, f"not found ({role})", fix, required=arch == host))
    return checks


def _accel_check(store: ImageStore, probe: bool) -> Check:
    host = host_arch()
    problem = accel.kvm_usable()
    if problem:
        return Check(
            "accelerator",
            True,
            f"tcg (KVM unusable: {problem}); VMs are emulated, several times slower",
            required=False,
        )
    verdict = accel.cached_verdict(host)
    if verdict is None and probe:
        image = next((i for i in store.all() if i.arch == host and i.kernel), None)
        if image is not None:
            verdict = accel.choose("auto", image)
    if verdict is None:
        return Check(
            "accelerator", True, "/dev/kvm opens; not probed yet (needs an image: probed at first boot)", required=False
        )
    return Check("accelerator", True, f"{verdict.name} ({verdict.reason})", required=False)


def _libvirt_check(uri: str = "qemu:///system") -> Check:
    """The libvirt engine (optional): libvirt-python, and a libvirtd answering at ``uri``."""
    from pytest_ttenv.backend.engines import virt

    why = virt.available()
    if why:
        return Check(
            "libvirt", False, "libvirt-python missing (only for --engine libvirt)", virt.INSTALL_HINT, required=False
        )
    try:
        conn = virt.open_conn(uri, timeout=5.0)
    except virt.HostDown as exc:
        return Check("libvirt", False, f"{exc.message} (only for --engine libvirt)", virt.START_HINT, required=False)
    try:
        cpus, mem = conn.node()
    except TTError as exc:
        return Check("libvirt", False, str(exc), required=False)
    finally:
        conn.close()
    return Check("libvirt", True, f"libvirtd at {uri}: {cpus} CPUs, {mem} MiB (--engine libvirt)", required=False)


def _disk_check(store: ImageStore) -> Check:
    where = store.root
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / 2**30
    ok = free >= MIN_FREE_GIB
    return Check(
        "disk",
        ok,
        f"{free:.1f} GiB free for the image store {store.root}",
        f"free space or set TTENV_IMAGE_DIR (want >= {MIN_FREE_GIB:.0f} GiB)",
        required=False,
    )


def usable(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.required) and os.access("/dev/null", os.W_OK)
