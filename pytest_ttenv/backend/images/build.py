"""Build Debian guest images with mmdebstrap, tuned to reach SSH fast under emulation.

Result: ``<image_dir>/<name>/`` with ``disk.qcow2`` (ext4 root, no partition table),
``vmlinuz`` and ``initrd.img`` for direct kernel boot, and ``image.json`` written last.
The ``cloud`` variant is a stand-in for a vendor cloud image instead: a partitioned disk with
its own boot loader (GRUB for BIOS), Debian's initramfs, cloud-init and no ttenv unit.
The work happens in ``<image_dir>/.build-<name>-<pid>/`` and is renamed into place only
when complete, so a build that fails or is interrupted never shows up in the store.
"""

from __future__ import annotations

import lzma
import os
import platform
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.naming import DEBIAN_ARCH, image_name
from pytest_ttenv.errors import TTError, UsageError, from_os_error

DEBIAN_SUITES = {"11": "bullseye", "12": "bookworm", "13": "trixie"}
KERNEL_PACKAGE = {
    "x86_64": "linux-image-cloud-amd64",
    "aarch64": "linux-image-cloud-arm64",
    "riscv64": "linux-image-riscv64",
}
BASE_PACKAGES = (
    "systemd-sysv", "udev", "kmod", "openssh-server", "iproute2", "ca-certificates",
    "python3-minimal", "sudo", "procps", "busybox-static", "e2fsprogs",
)  # fmt: skip
# Modules the initramfs loads (with their dependencies) when the kernel does not have them built in.
# crc32c_generic: ext4 asks the crypto API for crc32c at mount time (a module in the riscv64 kernel).
INITRAMFS_MODULES = (
    "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "crc32c_generic", "ext4", "isofs",
)  # fmt: skip
MASKED_UNITS = (
    "systemd-networkd-wait-online.service", "getty.target", "serial-getty@.service", "console-getty.service",
    "getty@.service", "systemd-journal-flush.service", "modprobe@.service", "systemd-logind.service",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "dev-hugepages.mount", "dev-mqueue.mount",
    "sys-fs-fuse-connections.mount", "sys-kernel-config.mount", "apt-daily.timer", "apt-daily-upgrade.timer",
    "man-db.timer", "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer", "ssh.socket", "systemd-pstore.service", "systemd-binfmt.service",
)  # fmt: skip
MASKED_GENERATORS = ("systemd-gpt-auto-generator", "systemd-getty-generator", "systemd-hibernate-resume-generator")
# The cloud variant (a stand-in for a vendor cloud image): cloud-init reads the NoCloud seed, GRUB
# boots the disk under SeaBIOS or UEFI, ifupdown applies the network cloud-init renders (its eni
# renderer); dbus for hostnamectl, locales for cloud-init's locale module; dosfstools and mtools
# write the EFI system partition (run in the root, like grub-mkimage).
CLOUD_OS = "debiancloud"
CLOUD_USER = "debian"
CLOUD_PACKAGES = (
    "cloud-init", "cloud-guest-utils", "ifupdown", "dbus", "locales", "grub-pc-bin", "grub-efi-amd64-bin",
    "grub2-common", "dosfstools", "mtools",
)  # fmt: skip
MIB = 1024 * 1024
CLOUD_ESP = (1 * MIB, 32 * MIB)  # (start, size) of the EFI system partition; GRUB's BIOS core image goes before it
CLOUD_ROOT_START = 33 * MIB  # the root partition: from here to the end of the disk (growpart can grow it)
VARIANTS = ("tuned", "plain", "cloud")
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*", "/usr/share/doc/*")

Progress = Callable[[str], None]


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
    return BuildRequest("debian", version, arch, variant=variant)


def host_mirror() -> str:
    """The Debian mirror this host's apt uses (first non-security ``deb`` source), or deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in re.findall(r"^\s*(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.MULTILINE):
            if uri.startswith("http") and "security" not in uri and "/debian" in uri:
                return str(uri)
    return "http://deb.debian.org/debian"


def _guest_file(name: str) -> str:
    text: str = resources.files("pytest_ttenv.backend.images").joinpath("guest").joinpath(name).read_text()
    return text


def _run(argv: list[str], progress: Progress, what: str, cwd: Path | None = None) -> None:
    """Run a build step, streaming its output lines to ``progress``; raise TTError on failure."""
    tail: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", cwd=cwd
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = ([*tail, line])[-15:]
                progress("  " + line)
    if proc.returncode != 0:
        detail = "\n".join(tail)
        raise TTError(f"{what} failed (exit {proc.returncode}):\n{detail}")


class ImageBuilder:
    """Builds one image into an ImageStore; ``progress`` receives human-readable lines."""

    def __init__(self, store: ImageStore, progress: Progress = print) -> None:
        self.store = store
        self.progress = progress

    def build(self, req: BuildRequest) -> ImageInfo:
        """Build ``req`` and return its ImageInfo; an existing image of that name is replaced."""
        try:
            return self._build(req)
        except OSError as exc:
            raise from_os_error(exc, f"build image {req.name} in {self.store.root}") from None

    def _build(self, req: BuildRequest) -> ImageInfo:
        missing = [t for t in ("mmdebstrap", "mkfs.ext4", "qemu-img", "cpio") if not shutil.which(t)]
        if missing:
            raise TTError(
                f"cannot build images: {', '.join(missing)} not found",
                "apt-get install -y mmdebstrap e2fsprogs qemu-utils cpio",
            )
        if os.geteuid() != 0:
            raise TTError("building an image needs root (mmdebstrap --mode=root, mkfs -d with root-owned files)")
        self._check_foreign(req.arch)
        self.store.root.mkdir(parents=True, exist_ok=True)
        self.store.remove_stale_builds()
        work = self.store.root / f".build-{req.name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        started = time.monotonic()
        try:
            info = self._build_in(work, req)
            self.store.install(work / "image", info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.progress(f"built {req.name} in {time.monotonic() - started:.0f} s -> {self.store.root / req.name}")
        return self.store.get(req.name)

    def _check_foreign(self, arch: str) -> None:
        """A foreign arch's second stage runs under qemu-user: make sure binfmt_misc serves it
        (mounting binfmt_misc and enabling the qemu-user-static entry if we can)."""
        host = platform.machine()
        if arch == host:
            return
        if not shutil.which("arch-test"):
            raise TTError(f"building a {arch} image needs arch-test (mmdebstrap checks the foreign arch with it)",
                          "apt-get install -y arch-test qemu-user-static binfmt-support")  # fmt: skip
        binfmt = Path("/proc/sys/fs/binfmt_misc")
        interp = binfmt / f"qemu-{arch}"
        if not interp.exists() and shutil.which("update-binfmts"):
            if not (binfmt / "register").exists():
                subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True)
            subprocess.run(["update-binfmts", "--enable", f"qemu-{arch}"], capture_output=True)
            if interp.exists():
                self.progress(f"enabled qemu-user for {arch} in binfmt_misc")
        if not interp.exists():
            raise TTError(
                f"building a {arch} image on a {host} host needs qemu-user binfmt support",
                "apt-get install -y qemu-user-static binfmt-support && "
                "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                f"update-binfmts --enable qemu-{arch}",
            )

    def _build_in(self, work: Path, req: BuildRequest) -> ImageInfo:
        suite = DEBIAN_SUITES[req.version]
        mirror = req.mirror or host_mirror()
        rootfs = work / "rootfs"
        out = work / "image"
        out.mkdir()
        p = self.progress
        p(f"[1/4] bootstrapping Debian {req.version} ({suite}, {req.arch}, {req.variant}) from {mirror}")
        initramfs_conf = "MODULES=list\\n"
        # A small initramfs-tools config before the kernel's postinst runs (minutes saved under emulation).
        hook = (
            '--essential-hook=mkdir -p "$1/etc/initramfs-tools/conf.d" && '
            f"printf '{initramfs_conf}' > \"$1/etc/initramfs-tools/conf.d/ttenv.conf\""
        )
        packages = [*BASE_PACKAGES, KERNEL_PACKAGE[req.arch]]
        if req.variant == "cloud":  # our initramfs is not used: no busybox; Debian's own initramfs
            packages = [*(x for x in packages if x != "busybox-static"), *CLOUD_PACKAGES]
        argv = [
            "mmdebstrap", "--mode=root", "--variant=minbase", f"--architectures={DEBIAN_ARCH[req.arch]}",
            f"--include={','.join(packages)}",
            "--skip=cleanup/apt/lists",
            *(f"--dpkgopt=path-exclude={x}" for x in DPKG_EXCLUDES),
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            *([hook] if req.tuned else []),
            suite, str(rootfs), mirror,
        ]  # fmt: skip
        _run(argv, p, "mmdebstrap")
        if req.variant == "cloud":
            return self._finish_cloud(work, req, rootfs, out, {"suite": suite, "mirror": mirror})
        p("[2/4] tuning the guest for a fast boot to SSH" if req.tuned else "[2/4] adding seed access (untuned)")
        self._customize(rootfs, req.tuned)
        p("[3/4] extracting the kernel and building a minimal initramfs")
        kver = self._install_kernel(rootfs, out, req.tuned)
        p(f"[4/4] writing the {req.disk_mib} MiB root file system and converting it to qcow2")
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(req.disk_mib * 1024 * 1024)
        _run(["mkfs.ext4", "-q", "-F", "-L", "ttenv-root", "-d", str(rootfs), str(raw)], p, "mkfs.ext4")
        shutil.rmtree(rootfs)
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], p, "qemu-img convert")
        raw.unlink()
        console = "ttyAMA0" if req.arch == "aarch64" else "ttyS0"  # riscv64 virt: a 16550 UART
        return ImageInfo(
            name=req.name, os=req.os, version=req.version, arch=req.arch, disk_mib=req.disk_mib,
            cmdline=f"root=/dev/vda rw console={console} quiet loglevel=3 net.ifnames=0",
            source="build", created=time.time(),
            details={"suite": suite, "mirror": mirror, "kernel": kver, "builder": "mmdebstrap",
                     "variant": req.variant},
        )  # fmt: skip

    def _finish_cloud(self, work: Path, req: BuildRequest, root: Path, out: Path, details: dict[str, str]) -> ImageInfo:
        """The cloud variant after bootstrap: cloud-init access, GRUB on an MBR-partitioned disk."""
        p = self.progress
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels or not (root / "boot" / f"initrd.img-{kernels[-1].name[8:]}").exists():
            raise TTError("the bootstrapped root has no kernel and initramfs in /boot")
        kver = kernels[-1].name.removeprefix("vmlinuz-")
        fs_uuid = str(uuid.uuid4())
        p("[2/4] preparing cloud-init access (no ttenv unit, Debian's own initramfs and services)")
        self._customize_cloud(root, kver, fs_uuid)
        p("[3/4] installing GRUB for BIOS (core image in the MBR gap) and UEFI (EFI/BOOT/BOOTX64.EFI)")
        core = self._grub_bios(root)
        esp = self._grub_efi_esp(root, fs_uuid)
        p(f"[4/4] writing the {req.disk_mib} MiB partitioned disk and converting it to qcow2")
        raw = work / "disk.raw"
        size = req.disk_mib * MIB
        boot_img = (root / "usr" / "lib" / "grub" / "i386-pc" / "boot.img").read_bytes()
        # Partition 1 is the root wherever it lies (GRUB's prefix says msdos1), partition 2 the ESP.
        parts = [(True, 0x83, CLOUD_ROOT_START, size - CLOUD_ROOT_START), (False, 0xEF, *CLOUD_ESP)]
        with open(raw, "wb") as f:
            f.truncate(size)
            f.write(mbr(boot_img, parts))
            f.write(core)
            f.seek(CLOUD_ESP[0])
            f.write(esp)
        fs_mib = (size - CLOUD_ROOT_START) // MIB
        _run(["mkfs.ext4", "-q", "-F", "-L", "cloudimg-rootfs", "-U", fs_uuid, "-d", str(root),
              "-E", f"offset={CLOUD_ROOT_START}", str(raw), f"{fs_mib}M"], p, "mkfs.ext4")  # fmt: skip
        shutil.rmtree(root)
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], p, "qemu-img convert")
        raw.unlink()
        return ImageInfo(
            name=req.name, os=req.image_os, version=req.version, arch=req.arch, disk_mib=req.disk_mib,
            user=CLOUD_USER, boot="bios", access="cloud-init", kernel=None, initrd=None, cmdline="",
            source="build", created=time.time(),
            details={**details, "kernel": kver, "builder": "mmdebstrap", "variant": "cloud",
                     "cmdline": _cloud_cmdline(fs_uuid), "firmware": "bios or uefi (hybrid MBR disk)"},
        )  # fmt: skip

    def _grub_bios(self, root: Path) -> bytes:
        """GRUB's BIOS core image (it reads /boot/grub of partition 1; the rest loads from there)."""
        argv = ["chroot", str(root), "grub-mkimage", "-O", "i386-pc", "-o", "/core.img",
                "-p", "(hd0,msdos1)/boot/grub", "biosdisk", "part_msdos", "ext2"]  # fmt: skip
        _run(argv, self.progress, "grub-mkimage")
        core = (root / "core.img").read_bytes()
        (root / "core.img").unlink()
        if len(core) > CLOUD_ESP[0] - 512:
            raise TTError(f"GRUB core image of {len(core)} bytes does not fit before the first partition")
        shutil.copytree(root / "usr" / "lib" / "grub" / "i386-pc", root / "boot" / "grub" / "i386-pc")
        return core

    def _grub_efi_esp(self, root: Path, fs_uuid: str) -> bytes:
        """A FAT EFI system partition holding GRUB as the removable-media loader, which finds the
        root by UUID and reads the same /boot/grub/grub.cfg as the BIOS boot."""
        (root / "embed.cfg").write_text(
            f"search --no-floppy --fs-uuid --set=root {fs_uuid}\nset prefix=($root)/boot/grub\n"
        )
        steps = [
            ["grub-mkimage", "-O", "x86_64-efi", "-o", "/BOOTX64.EFI", "-c", "/embed.cfg", "-p", "/boot/grub",
             "part_msdos", "ext2", "fat", "search"],
            ["mkfs.vfat", "-C", "-n", "ESP", "/esp.img", str(CLOUD_ESP[1] // 1024)],
            ["mmd", "-i", "/esp.img", "::/EFI", "::/EFI/BOOT"],
            ["mcopy", "-i", "/esp.img", "/BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"],
        ]  # fmt: skip
        for argv in steps:
            _run(["chroot", str(root), *argv], self.progress, argv[0])
        esp = (root / "esp.img").read_bytes()
        for name in ("embed.cfg", "BOOTX64.EFI", "esp.img"):
            (root / name).unlink()
        shutil.copytree(root / "usr" / "lib" / "grub" / "x86_64-efi", root / "boot" / "grub" / "x86_64-efi")
        return esp

    def _customize_cloud(self, root: Path, kver: str, fs_uuid: str) -> None:
        """What a vendor image ships: no host keys, an uninitialized machine id, root locked, an
        fstab by UUID and a GRUB config; access comes from cloud-init alone."""
        etc = root / "etc"
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        (etc / "machine-id").write_text("")  # systemd makes one per VM at first boot
        (root / "var" / "lib" / "dbus" / "machine-id").unlink(missing_ok=True)
        shadow = etc / "shadow"
        shadow.write_text(re.sub(r"^root:[^:]*:", "root:*:", shadow.read_text(), flags=re.MULTILINE))
        (etc / "hostname").write_text("debian\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "fstab").write_text(f"UUID={fs_uuid} / ext4 rw,discard,errors=remount-ro 0 1\n")
        # The image's locale is C.UTF-8 and cloud-init keeps it (its default, en_US.UTF-8, would run
        # Debian's locale-gen, which ignores the locale it is given: update-locale then fails).
        (etc / "default" / "locale").write_text("LANG=C.UTF-8\n")
        # GRUB is installed by the builder, not through grub-pc's debconf: nothing for grub_dpkg to do.
        (etc / "cloud" / "cloud.cfg.d" / "90_ttenv_image.cfg").write_text(
            "# ttenv cloud variant\nlocale: C.UTF-8\ngrub_dpkg:\n  enabled: false\n"
        )
        grub = root / "boot" / "grub"
        grub.mkdir(parents=True, exist_ok=True)
        (grub / "grub.cfg").write_text(
            "set timeout=0\nserial --unit=0 --speed=115200\nterminal_input serial console\n"
            "terminal_output serial console\n"
            f"echo 'GRUB: loading Linux {kver}'\n"
            f"linux /boot/vmlinuz-{kver} {_cloud_cmdline(fs_uuid)}\n"
            f"initrd /boot/initrd.img-{kver}\nboot\n"
        )
        for cache in (root / "var" / "cache" / "apt").glob("*.bin"):
            cache.unlink()

    def _customize(self, root: Path, tuned: bool) -> None:
        etc = root / "etc"
        units = etc / "systemd" / "system"
        sbin = root / "usr" / "local" / "sbin"
        sbin.mkdir(parents=True, exist_ok=True)
        (sbin / "ttenv-seed").write_text(_guest_file("ttenv-seed"))
        (sbin / "ttenv-seed").chmod(0o755)
        (etc / "ssh" / "sshd_config.d").mkdir(exist_ok=True)
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        # A fixed id avoids systemd's first-boot work; each VM gets its own via systemd.machine_id=.
        (etc / "machine-id").write_text("7474656e76000000000000000000abcd\n")
        shadow = etc / "shadow"
        shadow.write_text(re.sub(r"^root:[^:]*:", "root:*:", shadow.read_text(), flags=re.MULTILINE))
        if not tuned:  # Debian's defaults; only the seed unit, ordered like any ordinary service
            unit = _guest_file("ttenv-seed.service").replace("DefaultDependencies=no\n", "")
            (units / "ttenv-seed.service").write_text(unit.replace(" sysinit.target", "").replace(
                "WantedBy=sysinit.target", "WantedBy=multi-user.target"))  # fmt: skip
            (units / "multi-user.target.wants").mkdir(exist_ok=True)
            _symlink(units / "multi-user.target.wants" / "ttenv-seed.service", "/etc/systemd/system/ttenv-seed.service")
            (etc / "ssh" / "sshd_config.d" / "ttenv.conf").write_text("HostKey /etc/ssh/ssh_host_ed25519_key\n")
            (etc / "fstab").write_text("/dev/vda / ext4 rw 0 1\n")
            return
        for unit in ("ttenv-seed.service", "ssh.service"):
            (units / unit).write_text(_guest_file(unit))
        wants = units / "sysinit.target.wants"
        wants.mkdir(exist_ok=True)
        for unit in ("ttenv-seed.service", "ssh.service"):
            _symlink(wants / unit, f"/etc/systemd/system/{unit}")
        _symlink(units / "sshd.service", "/etc/systemd/system/ssh.service")
        (units / "multi-user.target.wants" / "ssh.service").unlink(missing_ok=True)
        for unit in MASKED_UNITS:
            _symlink(units / unit, "/dev/null")
        generators = etc / "systemd" / "system-generators"
        generators.mkdir(exist_ok=True)
        for gen in MASKED_GENERATORS:
            _symlink(generators / gen, "/dev/null")
        journald = etc / "systemd" / "journald.conf.d"
        journald.mkdir(exist_ok=True)
        (journald / "ttenv.conf").write_text("[Journal]\nStorage=volatile\n")
        network = etc / "systemd" / "network"
        network.mkdir(exist_ok=True)
        (network / "80-ttenv-dhcp.network").write_text("[Match]\nName=e*\n\n[Network]\nDHCP=yes\n")
        (etc / "ssh" / "sshd_config.d" / "ttenv.conf").write_text(_guest_file("sshd-ttenv.conf"))
        (etc / "modprobe.d" / "ttenv.conf").write_text(
            "# ttenv: nothing in a test VM needs these; probing them costs boot time\n"
            + "".join(f"blacklist {m}\n" for m in ("kvm", "kvm_intel", "kvm_amd", "pcspkr", "floppy", "psmouse"))
        )
        (etc / "hostname").write_text("debian\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 debian\n")
        (etc / "fstab").write_text("# ttenv: the root file system is mounted read-write by the initramfs\n")
        for cache in (root / "var" / "cache" / "apt").glob("*.bin"):
            cache.unlink()

    def _install_kernel(self, root: Path, out: Path, tuned: bool) -> str:
        # vmlinuz-* (x86_64, arm64); riscv64 kernels are installed as an uncompressed vmlinux-*
        kernels = sorted((root / "boot").glob("vmlinu[xz]-*"))
        if not kernels:
            raise TTError("the bootstrapped root has no kernel in /boot")
        kver = kernels[-1].name[len("vmlinuz-") :]
        shutil.copyfile(kernels[-1], out / "vmlinuz")
        if tuned:
            build_initramfs(root, kver, out / "initrd.img")
        else:
            shutil.copyfile(root / "boot" / f"initrd.img-{kver}", out / "initrd.img")
        return kver


def _cloud_cmdline(fs_uuid: str) -> str:
    # systemd.firstboot=off: an uninitialized machine id must not make systemd-firstboot prompt
    return f"root=UUID={fs_uuid} ro console=tty0 console=ttyS0,115200 systemd.firstboot=off"


def mbr(boot_img: bytes, partitions: list[tuple[bool, int, int, int]]) -> bytes:
    """A master boot record: GRUB's boot.img code (it loads the core image from sector 1) and up to
    four primary partitions given as (bootable, type, start, size) in bytes."""
    if len(boot_img) != 512:
        raise TTError(f"GRUB boot.img is {len(boot_img)} bytes, expected 512")
    record = bytearray(boot_img[:440])
    record[0x66:0x68] = b"\x90\x90"  # as grub-bios-setup does: trust the BIOS's boot drive number
    record += os.urandom(4) + b"\0\0"  # disk signature
    for bootable, ptype, start, size in partitions:
        # status, CHS first (unused: LBA), type, CHS last (unused), LBA first, sector count
        chs = b"\xfe\xff\xff"
        record += struct.pack("<B3sB3sII", 0x80 if bootable else 0, chs, ptype, chs, start // 512, size // 512)
    record += bytes(16 * (4 - len(partitions))) + b"\x55\xaa"
    return bytes(record)


def _symlink(link: Path, target: str) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def _module_closure(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module files (relative to ``moddir``) for ``wanted`` and their dependencies, deps first.

    Built-in modules and modules this kernel does not have are skipped.
    """
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {re.sub(r"\.ko(\.\w+)?$", "", Path(p).name).replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
    return order


def build_initramfs(root: Path, kver: str, dest: Path) -> None:
    """Write an uncompressed cpio initramfs: busybox, the virtio/ext4/isofs modules, our /init.

    Compressed modules are stored decompressed so busybox ``insmod`` can load them.
    """
    moddir = root / "lib" / "modules" / kver
    busybox = root / "bin" / "busybox"
    if not busybox.exists():
        busybox = root / "usr" / "bin" / "busybox"
    tree = dest.parent / "initramfs-tree"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "dev", "proc", "root", "etc", "lib/modules"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    os.mknod(tree / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    loaded: list[str] = []
    for rel in _module_closure(moddir, INITRAMFS_MODULES):
        src = moddir / rel
        name = re.sub(r"\.ko(\.\w+)?$", ".ko", src.name)
        data = src.read_bytes()
        if src.suffix == ".xz":
            data = lzma.decompress(data)
        elif src.suffix == ".zst":
            data = subprocess.run(["zstd", "-dc", str(src)], check=True, capture_output=True).stdout
        (tree / "lib" / "modules" / name).write_bytes(data)
        loaded.append(name)
    (tree / "etc" / "ttenv-modules").write_text("\n".join(loaded) + "\n")
    (tree / "init").write_text(_guest_file("initramfs-init"))
    (tree / "init").chmod(0o755)
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    with open(dest, "wb") as f:
        subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join(files).encode(), stdout=f, cwd=tree, check=True,
        )  # fmt: skip
    shutil.rmtree(tree)


def ensure_images(store: ImageStore, names: list[str], progress: Progress = print) -> list[ImageInfo]:
    """The named images, building the Debian ones that are missing (first use)."""
    have = set(store.names())
    for name in names:
        if name not in have:
            os_name, version, arch = name.split("-")[0], name.split("-")[1], name.rsplit("-", 1)[1]
            progress(f"image {name} not in {store.root}: building it (first use)")
            ImageBuilder(store, progress).build(parse_target(f"{os_name}-{version}", arch))
    return [store.get(n) for n in names]
