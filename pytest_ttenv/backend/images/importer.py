"""Bring-your-own images: a qcow2 or raw disk (or any format qemu-img reads) into the image store.

The disk is checked with ``qemu-img info``, copied (qcow2 without a backing file) or converted
to a standalone qcow2 in ``<store>/.import-<name>-<pid>/`` and moved into place with its
``image.json`` by ``ImageStore.install``: an interrupted import never shows in the store.
Also holds the small ``qemu-img`` helpers that ``pull`` shares.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.naming import split_image_name
from pytest_ttenv.errors import NotFound, TTError, UsageError, from_os_error

Progress = Callable[[str], None]

IMPORT_FORMATS = ("qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc")
BOOTS = ("bios", "uefi", "direct")
MIB = 1 << 20
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


def require_qemu_img() -> None:
    if not shutil.which("qemu-img"):
        raise TTError("qemu-img not found", "apt-get install -y qemu-utils")


def disk_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path`` (format probed unless ``fmt`` is given)."""
    argv = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TTError(f"qemu-img info {path} did not answer within 120 s") from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("qemu-img: ")
        raise TTError(f"qemu-img cannot read {path}: {why}")
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def convert_to_qcow2(src: Path, fmt: str, dest: Path) -> None:
    """Write ``src`` (in format ``fmt``, never probed) as a standalone qcow2 ``dest``."""
    argv = ["qemu-img", "convert", "-f", fmt, "-O", "qcow2", str(src), str(dest)]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("qemu-img: ")
        raise TTError(f"qemu-img could not convert {src} ({fmt}) to qcow2: {why}")


def check_qcow2(path: Path, what: str) -> int:
    """Check ``path`` is a standalone qcow2; return its virtual size in MiB (rounded up)."""
    info = disk_info(path)
    if info.get("format") != "qcow2":
        raise TTError(f"{what} is not a qcow2 image (qemu-img sees {info.get('format')})")
    if info.get("backing-filename"):
        raise TTError(f"{what} refers to a backing file ({info['backing-filename']}); a template must stand alone")
    size = int(info.get("virtual-size", 0))
    return max(1, -(-size // MIB))


def import_image(
    store: ImageStore,
    file: str | os.PathLike[str],
    name: str,
    user: str = "root",
    boot: str = "bios",
    force: bool = False,
    *,
    kernel: str | os.PathLike[str] | None = None,
    initrd: str | os.PathLike[str] | None = None,
    cmdline: str = "",
    progress: Progress | None = None,
) -> ImageInfo:
    """Import the disk ``file`` as image ``name`` (canonical ``<os>-<version>-<arch>``).

    Reached through cloud-init (the NoCloud seed) as ``user``; ``boot`` is bios, uefi or direct
    (direct needs ``kernel``, usually ``initrd`` and a ``cmdline``). An existing image of that
    name is replaced only with ``force``.
    """
    say = progress or (lambda line: None)
    os_name, version, arch = split_image_name(name)
    if boot not in BOOTS:
        raise UsageError(f"unknown boot method {boot!r}", f"use one of {', '.join(BOOTS)}")
    if boot == "direct" and not kernel:
        raise UsageError("--boot direct needs --kernel (and usually --initrd and --cmdline)")
    if boot != "direct" and (kernel or initrd):
        raise UsageError("--kernel and --initrd are only used with --boot direct")
    if not _USER_RE.match(user):
        raise UsageError(f"bad user name {user!r}", "use a login name such as root, ubuntu or cloud-user")
    src = Path(file)
    extra = {"vmlinuz": kernel, "initrd.img": initrd}
    for what in (src, *(Path(p) for p in extra.values() if p)):
        if not what.exists():
            raise NotFound(f"no such file: {what}")
        if not what.is_file():
            raise UsageError(f"{what} is not a regular file")
    if name in store.names() and not force:
        raise UsageError(f"image {name} already exists in {store.root}", "pass --force to replace it")
    require_qemu_img()
    info = disk_info(src)
    fmt = str(info.get("format"))
    if fmt not in IMPORT_FORMATS:
        raise UsageError(f"{src} is a {fmt} image", f"import one of: {', '.join(IMPORT_FORMATS)}")
    if fmt == "raw" and src.stat().st_size % 512:
        raise UsageError(f"{src} is not a disk image (no known format, and not a whole number of 512-byte sectors)")
    try:
        store.root.mkdir(parents=True, exist_ok=True)
        store.remove_stale_builds()
        work = store.root / f".import-{name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        out = work / "image"
        out.mkdir(parents=True)
        try:
            disk = out / "disk.qcow2"
            if fmt == "qcow2" and not info.get("backing-filename"):
                say(f"copying {src} (qcow2) into the store")
                shutil.copyfile(src, disk)
            else:
                say(f"converting {src} ({fmt}) to qcow2")
                convert_to_qcow2(src, fmt, disk)
            disk_mib = check_qcow2(disk, f"the imported disk of {name}")
            files: dict[str, str | None] = {"kernel": None, "initrd": None}
            for target, path in extra.items():
                if path:
                    shutil.copyfile(path, out / target)
                    files["kernel" if target == "vmlinuz" else "initrd"] = target
            image = ImageInfo(
                name=name,
                os=os_name,
                version=version,
                arch=arch,
                disk="disk.qcow2",
                disk_mib=disk_mib,
                user=user,
                boot=boot,
                access="cloud-init",
                kernel=files["kernel"],
                initrd=files["initrd"],
                cmdline=cmdline,
                source="import",
                created=time.time(),
                details={"file": str(src.resolve()), "format": fmt},
            )
            store.install(out, image)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:
        raise from_os_error(exc, f"import {src} into {store.root}") from None
    say(f"imported {src} as {name} ({disk_mib} MiB virtual) -> {store.root / name}")
    return store.get(name)
