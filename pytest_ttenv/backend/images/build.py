"""Build Debian guest images with mmdebstrap, tuned to reach SSH fast under emulation.

Result: ``<image_dir>/<name>/`` with ``disk.qcow2`` (ext4 root, no partition table),
``vmlinuz`` and ``initrd.img`` for direct kernel boot, and ``image.json`` written last.
The ``cloud`` variant is a stand-in for a vendor cloud image instead (``build_cloud``).
What is built (releases, packages, variants) is data in ``recipe``. The work happens in
``<image_dir>/.build-<name>-<pid>/`` and is renamed into place only when complete, so a build
that fails or is interrupted never shows up in the store.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from pytest_ttenv.backend.images.build_cloud import finish_cloud
from pytest_ttenv.backend.images.initramfs import build_initramfs
from pytest_ttenv.backend.images.recipe import (
    BASE_PACKAGES,
    BINFMT_ENTRY,
    CLOUD_PACKAGES,
    CONSOLE,
    DEBIAN_SUITES,
    DEFAULT_CONSOLE,
    DPKG_EXCLUDES,
    KERNEL_PACKAGE,
    MASKED_GENERATORS,
    MASKED_UNITS,
    ROOT_LABEL,
    RUNS_NATIVELY_ON,
    BuildRequest,
    parse_target,
)
from pytest_ttenv.backend.images.steps import Progress, guest_file, run_step
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.naming import debian_arch, host_arch
from pytest_ttenv.errors import TTError, from_os_error


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
        host = host_arch()
        if arch == host or host in RUNS_NATIVELY_ON.get(arch, ()):
            return
        if not shutil.which("arch-test"):
            raise TTError(
                f"building a {arch} image needs arch-test (mmdebstrap checks the foreign arch with it)",
                "apt-get install -y arch-test qemu-user-static binfmt-support",
            )
        binfmt = Path("/proc/sys/fs/binfmt_misc")
        entry = BINFMT_ENTRY.get(arch, arch)
        interp = binfmt / f"qemu-{entry}"
        if not interp.exists() and shutil.which("update-binfmts"):
            if not (binfmt / "register").exists():
                subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True)
            subprocess.run(["update-binfmts", "--enable", f"qemu-{entry}"], capture_output=True)
            if interp.exists():
                self.progress(f"enabled qemu-user for {arch} in binfmt_misc")
        if not interp.exists():
            raise TTError(
                f"building a {arch} image on a {host} host needs qemu-user binfmt support",
                "apt-get install -y qemu-user-static binfmt-support && "
                "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                f"update-binfmts --enable qemu-{entry}",
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
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            f"--architectures={debian_arch(req.arch)}",
            f"--include={','.join(packages)}",
            "--skip=cleanup/apt/lists",
            *(f"--dpkgopt=path-exclude={x}" for x in DPKG_EXCLUDES),
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            *([hook] if req.tuned else []),
            suite,
            str(rootfs),
            mirror,
        ]
        run_step(argv, p, "mmdebstrap")
        if req.variant == "cloud":
            return finish_cloud(work, req, rootfs, out, {"suite": suite, "mirror": mirror}, p)
        p("[2/4] tuning the guest for a fast boot to SSH" if req.tuned else "[2/4] adding seed access (untuned)")
        self._customize(rootfs, req.tuned)
        p("[3/4] extracting the kernel and building a minimal initramfs")
        kver = self._install_kernel(rootfs, out, req.tuned)
        p(f"[4/4] writing the {req.disk_mib} MiB root file system and converting it to qcow2")
        raw = work / "disk.raw"
        with open(raw, "wb") as f:
            f.truncate(req.disk_mib * 1024 * 1024)
        run_step(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(rootfs), str(raw)], p, "mkfs.ext4")
        shutil.rmtree(rootfs)
        run_step(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], p, "qemu-img convert")
        raw.unlink()
        console = CONSOLE.get(req.arch, DEFAULT_CONSOLE)
        return ImageInfo(
            name=req.name,
            os=req.os,
            version=req.version,
            arch=req.arch,
            disk_mib=req.disk_mib,
            cmdline=f"root=LABEL={ROOT_LABEL} rw console={console} quiet loglevel=3 net.ifnames=0",
            source="build",
            created=time.time(),
            details={"suite": suite, "mirror": mirror, "kernel": kver, "builder": "mmdebstrap", "variant": req.variant},
        )

    def _customize(self, root: Path, tuned: bool) -> None:
        etc = root / "etc"
        units = etc / "systemd" / "system"
        sbin = root / "usr" / "local" / "sbin"
        sbin.mkdir(parents=True, exist_ok=True)
        (sbin / "ttenv-seed").write_text(guest_file("ttenv-seed"))
        (sbin / "ttenv-seed").chmod(0o755)
        (etc / "ssh" / "sshd_config.d").mkdir(exist_ok=True)
        for key in (etc / "ssh").glob("ssh_host_*"):
            key.unlink()
        # A fixed id avoids systemd's first-boot work; each VM gets its own via systemd.machine_id=.
        (etc / "machine-id").write_text("7474656e76000000000000000000abcd\n")
        shadow = etc / "shadow"
        shadow.write_text(re.sub(r"^root:[^:]*:", "root:*:", shadow.read_text(), flags=re.MULTILINE))
        if not tuned:  # Debian's defaults; only the seed unit, ordered like any ordinary service
            unit = guest_file("ttenv-seed.service").replace("DefaultDependencies=no\n", "")
            (units / "ttenv-seed.service").write_text(
                unit.replace(" sysinit.target", "").replace("WantedBy=sysinit.target", "WantedBy=multi-user.target")
            )
            (units / "multi-user.target.wants").mkdir(exist_ok=True)
            _symlink(units / "multi-user.target.wants" / "ttenv-seed.service", "/etc/systemd/system/ttenv-seed.service")
            (etc / "ssh" / "sshd_config.d" / "ttenv.conf").write_text("HostKey /etc/ssh/ssh_host_ed25519_key\n")
            (etc / "fstab").write_text(f"LABEL={ROOT_LABEL} / ext4 rw 0 1\n")
            return
        for unit in ("ttenv-seed.service", "ssh.service"):
            (units / unit).write_text(guest_file(unit))
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
        (etc / "ssh" / "sshd_config.d" / "ttenv.conf").write_text(guest_file("sshd-ttenv.conf"))
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


def _symlink(link: Path, target: str) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)


def ensure_images(store: ImageStore, names: list[str], progress: Progress = print) -> list[ImageInfo]:
    """The named images, building the Debian ones that are missing (first use)."""
    have = set(store.names())
    for name in names:
        if name not in have:
            os_name, version, arch = name.split("-")[0], name.split("-")[1], name.rsplit("-", 1)[1]
            progress(f"image {name} not in {store.root}: building it (first use)")
            ImageBuilder(store, progress).build(parse_target(f"{os_name}-{version}", arch))
    return [store.get(n) for n in names]
