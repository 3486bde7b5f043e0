"""The ``cloud`` build variant after bootstrap: what a vendor cloud image ships (cloud-init
access, no host keys, an uninitialized machine id) on a partitioned disk that boots through GRUB
under SeaBIOS (core image in the MBR gap) or UEFI (``EFI/BOOT/BOOTX64.EFI`` on a FAT ESP).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import time
import uuid
from pathlib import Path

from pytest_ttenv.backend.images.recipe import CLOUD_USER, BuildRequest
from pytest_ttenv.backend.images.steps import Progress, run_step
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import TTError

MIB = 1024 * 1024
CLOUD_ESP = (1 * MIB, 32 * MIB)  # (start, size) of the EFI system partition; GRUB's BIOS core image goes before it
CLOUD_ROOT_START = 33 * MIB  # the root partition: from here to the end of the disk (growpart can grow it)


def finish_cloud(
    work: Path, req: BuildRequest, root: Path, out: Path, details: dict[str, str], progress: Progress
) -> ImageInfo:
    """Steps 2-4 of a cloud build: cloud-init access, GRUB, the MBR-partitioned disk as
    ``out/disk.qcow2``; ``root`` (the bootstrapped tree) is consumed."""
    p = progress
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels or not (root / "boot" / f"initrd.img-{kernels[-1].name[8:]}").exists():
        raise TTError("the bootstrapped root has no kernel and initramfs in /boot")
    kver = kernels[-1].name.removeprefix("vmlinuz-")
    fs_uuid = str(uuid.uuid4())
    p("[2/4] preparing cloud-init access (no ttenv unit, Debian's own initramfs and services)")
    _customize_cloud(root, kver, fs_uuid)
    p("[3/4] installing GRUB for BIOS (core image in the MBR gap) and UEFI (EFI/BOOT/BOOTX64.EFI)")
    core = _grub_bios(root, p)
    esp = _grub_efi_esp(root, fs_uuid, p)
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
    run_step(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "cloudimg-rootfs",
            "-U",
            fs_uuid,
            "-d",
            str(root),
            "-E",
            f"offset={CLOUD_ROOT_START}",
            str(raw),
            f"{fs_mib}M",
        ],
        p,
        "mkfs.ext4",
    )
    shutil.rmtree(root)
    run_step(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out / "disk.qcow2")], p, "qemu-img convert")
    raw.unlink()
    return ImageInfo(
        name=req.name,
        os=req.image_os,
        version=req.version,
        arch=req.arch,
        disk_mib=req.disk_mib,
        user=CLOUD_USER,
        boot="bios",
        access="cloud-init",
        kernel=None,
        initrd=None,
        cmdline="",
        source="build",
        created=time.time(),
        details={
            **details,
            "kernel": kver,
            "builder": "mmdebstrap",
            "variant": "cloud",
            "cmdline": _cloud_cmdline(fs_uuid),
            "firmware": "bios or uefi (hybrid MBR disk)",
        },
    )


def _grub_bios(root: Path, progress: Progress) -> bytes:
    """GRUB's BIOS core image (it reads /boot/grub of partition 1; the rest loads from there)."""
    argv = [
        "chroot",
        str(root),
        "grub-mkimage",
        "-O",
        "i386-pc",
        "-o",
        "/core.img",
        "-p",
        "(hd0,msdos1)/boot/grub",
        "biosdisk",
        "part_msdos",
        "ext2",
    ]
    run_step(argv, progress, "grub-mkimage")
    core = (root / "core.img").read_bytes()
    (root / "core.img").unlink()
    if len(core) > CLOUD_ESP[0] - 512:
        raise TTError(f"GRUB core image of {len(core)} bytes does not fit before the first partition")
    shutil.copytree(root / "usr" / "lib" / "grub" / "i386-pc", root / "boot" / "grub" / "i386-pc")
    return core


def _grub_efi_esp(root: Path, fs_uuid: str, progress: Progress) -> bytes:
    """A FAT EFI system partition holding GRUB as the removable-media loader, which finds the
    root by UUID and reads the same /boot/grub/grub.cfg as the BIOS boot."""
    (root / "embed.cfg").write_text(
        f"search --no-floppy --fs-uuid --set=root {fs_uuid}\nset prefix=($root)/boot/grub\n"
    )
    steps = [
        [
            "grub-mkimage",
            "-O",
            "x86_64-efi",
            "-o",
            "/BOOTX64.EFI",
            "-c",
            "/embed.cfg",
            "-p",
            "/boot/grub",
            "part_msdos",
            "ext2",
            "fat",
            "search",
        ],
        ["mkfs.vfat", "-C", "-n", "ESP", "/esp.img", str(CLOUD_ESP[1] // 1024)],
        ["mmd", "-i", "/esp.img", "::/EFI", "::/EFI/BOOT"],
        ["mcopy", "-i", "/esp.img", "/BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"],
    ]
    for argv in steps:
        run_step(["chroot", str(root), *argv], progress, argv[0])
    esp = (root / "esp.img").read_bytes()
    for name in ("embed.cfg", "BOOTX64.EFI", "esp.img"):
        (root / name).unlink()
    shutil.copytree(root / "usr" / "lib" / "grub" / "x86_64-efi", root / "boot" / "grub" / "x86_64-efi")
    return esp


def _customize_cloud(root: Path, kver: str, fs_uuid: str) -> None:
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
