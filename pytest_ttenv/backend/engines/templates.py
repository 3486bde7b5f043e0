"""The warm templates of an image: ``<image dir>/warm/`` (see ``warm`` for what a template is).

    <image dir>/warm/<key>/disk.qcow2   the template's frozen disk (backing file: the image's disk)
                          /state        the migration stream: devices, and RAM unless it has a RAM file
                          /ram          the guest RAM at the save (VM templating): VMs map it copy-on-write
                          /uefi-vars.qcow2  a UEFI template's firmware variable store (each VM starts from a copy)
                          /meta.json    the key's inputs, sha256 of disk, state and RAM (written last)
                          /console.log  the template's boot log
                          /used         touched whenever a VM starts from it
    <image dir>/warm/.lock-<key>        flock: one process makes a template, the others wait
    <image dir>/warm/.tmp-<key>-<pid>   work in progress, renamed into place only when complete

A template appears by one rename when complete and sealed (read-only, fsynced, checksummed), is
verified before use, and is deleted by renaming it out of view first, so no process ever starts
from half a template.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_ttenv.backend.engines import qemu, statecat
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import TTError

META = "meta.json"
UEFI_VARS = "uefi-vars.qcow2"
RAM = "ram"
UNUSED_DAYS = 7.0  # a template no VM started from for this long is deleted
_verified: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256 seen this process


def image_identity(image: ImageInfo) -> str:
    """sha256 over the image's metadata and the size and modification time of each of its files:
    a rebuilt, replaced or touched image gets a new identity (and so new templates)."""
    if image.path is None:
        raise TTError(f"image {image.name} has no directory")
    h = hashlib.sha256()
    meta = image.path / "image.json"
    h.update(meta.read_bytes())
    for name in ("image.json", image.disk, image.kernel, image.initrd):
        if name:
            st = (image.path / name).stat()
            h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Template:
    """A complete template: its directory and metadata (checked with ``TemplateStore.verify``)."""

    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def uefi_vars(self) -> Path | None:
        """The firmware variable store of a template that booted through UEFI, else None."""
        return self.path / UEFI_VARS if "uefi_vars_sha256" in self.meta else None

    @property
    def ram(self) -> Path | None:
        """The guest RAM file its VMs map copy-on-write (a template saved with its RAM shared), else None."""
        return self.path / RAM if "ram_sha256" in self.meta else None

    def incoming(self) -> str:
        """qemu's ``-incoming`` source: the state streamed through statecat, which verifies its
        sha256 before the end of the stream reaches qemu (so a corrupt state never runs)."""
        argv = [sys.executable, "-I", "-S", statecat.__file__, str(self.state), str(self.meta.get("state_sha256"))]
        return "exec:" + " ".join(shlex.quote(a) for a in argv)


def sha256_file(path: Path, *, sparse: bool = False) -> str:
    """The file's sha256, remembered for this process while its inode, size and mtime stay.
    ``sparse``: the digest of its size and of each data extent's offset, length and bytes (holes
    are not read): the same for the same bytes in the same places, cheap for a RAM file that is
    mostly holes. A copy that moves holes (``cp --sparse=always``) fails it; nothing else does."""
    st = path.stat()
    memo = (f"{path}{'#sparse' if sparse else ''}", st.st_ino, st.st_size, st.st_mtime_ns)
    if memo not in _verified:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if sparse:
                h.update(st.st_size.to_bytes(8, "big"))
                for start, end in _data_extents(f.fileno(), st.st_size):
                    h.update(start.to_bytes(8, "big") + (end - start).to_bytes(8, "big"))
                    f.seek(start)
                    left = end - start
                    while left and (chunk := f.read(min(1 << 20, left))):
                        h.update(chunk)
                        left -= len(chunk)
            else:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        _verified[memo] = h.hexdigest()
    return _verified[memo]


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data extent of the open file (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos


class TemplateStore:
    """The templates of one image: ``<image dir>/warm/``."""

    def __init__(self, image: ImageInfo) -> None:
        if image.path is None:
            raise TTError(f"image {image.name} has no directory")
        self.image = image
        self.root = image.path / "warm"

    def find(self, key: str) -> Template | None:
        """The complete template ``key``, or None (absent, or its metadata unreadable)."""
        path = self.root / key
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        return Template(key, path, meta)

    def verify(self, template: Template) -> None:
        """TTError unless the template's disk (and UEFI variable store and RAM file, if it has
        them) have the checksums they were saved with, the image disk it was made from is still
        there, and its state has the size saved; the state's checksum is verified on every use,
        as it streams (``incoming``)."""
        what = f"warm template {template.key} of {self.image.name}"
        checked = [(template.disk, "disk_sha256", "disk", False)]
        if template.uefi_vars is not None:
            checked.append((template.uefi_vars, "uefi_vars_sha256", "UEFI variable store", False))
        if template.ram is not None:
            checked.append((template.ram, "ram_sha256", "RAM file", True))
        try:
            for path, field, name, sparse in checked:
                if sha256_file(path, sparse=sparse) != template.meta.get(field):
                    raise TTError(f"{what}: its {name} fails its checksum")
            size = template.state.stat().st_size
        except OSError as exc:
            raise TTError(f"{what} is unreadable: {exc}") from None
        gone = _gone_backing(template)
        if gone:
            raise TTError(f"{what}: the image disk it was made from ({gone}) is gone")
        if size != template.meta.get("state_bytes"):
            raise TTError(f"{what}: its state is {size} bytes, not the {template.meta.get('state_bytes')} saved")

    def remove(self, key: str) -> None:
        """Delete template ``key`` (VMs started from it keep their open files)."""
        remove_dir(self.root / key)

    def lock(self, key: str, timeout: float) -> AbstractContextManager[None]:
        """The template's lock, held while making it: TTError after ``timeout`` s of waiting."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        what = f"the lock of warm template {key} of {self.image.name} (another process is making it)"
        return flock(self.root / f".lock-{key}", timeout, what)

    def mark_used(self, template: Template) -> None:
        """Note that a VM starts from ``template`` now (``reap`` keeps templates in use)."""
        (template.path / "used").touch()

    def usable(
        self, key: str, progress: Callable[[str], None], check: Callable[[Template], object] = lambda t: None
    ) -> Template | None:
        """The complete template ``key``, verified (``verify``, then ``check``, which raises
        TTError, OSError or ValueError if it fails) and marked used; or None: there is none yet,
        or it failed a check and is removed, saying so through ``progress`` (a new one is made)."""
        template = self.find(key)
        if template is None:
            return None
        try:
            self.verify(template)
            check(template)
        except (TTError, OSError, ValueError) as exc:
            progress(f"{exc}: removing it, a new one is made")
            self.remove(key)
            return None
        self.mark_used(template)
        return template

    def workdir(self, key: str) -> Path:
        """A new, empty work dir (0700) for making template ``key`` in this process
        (``.tmp-<key>-<pid>``; those of processes that are gone reaped first), for ``install``."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.reap()
        work = self.root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        return work

    def reap(self, unused_days: float = UNUSED_DAYS) -> list[Path]:
        """Delete work dirs whose process is gone, templates of another image identity (the image
        changed since) or whose disk's backing file is gone, and templates unused for
        ``unused_days`` (made by an older ttenv or qemu, or for resources nobody asks for any
        more); returns what was deleted."""
        if not self.root.is_dir():
            return []
        current = image_identity(self.image)
        stale = time.time() - unused_days * 86400
        removed = []
        for d in self.root.iterdir():
            m = re.match(r"^\.(?:tmp|old)-\w+-(\d+)(?:-\w+)?$", d.name)
            try:
                if m and d.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
                    shutil.rmtree(d)
                    removed.append(d)
                elif not d.name.startswith(".") and d.is_dir():
                    template = self.find(d.name)
                    used = max((f.stat().st_mtime for f in (d / "used", d / META) if f.exists()), default=0.0)
                    if (
                        template is None
                        or template.meta.get("inputs", {}).get("image_id") != current
                        or used < stale
                        or _orphaned(template)
                    ):
                        self.remove(d.name)
                        removed.append(d)
                        (self.root / f".lock-{d.name}").unlink(missing_ok=True)
            except OSError:  # not ours to delete, or deleted meanwhile
                continue
        return removed

    def install(self, work: Path, key: str, inputs: dict[str, Any], started: float) -> Template:
        """Checksum, seal (read-only, fsynced) and rename a finished work dir into place."""
        meta = {
            "key": key,
            "inputs": inputs,
            "created": time.time(),
            "seconds": round(time.time() - started, 1),
            "disk_sha256": sha256_file(work / "disk.qcow2"),
            "state_sha256": sha256_file(work / "state"),
            "state_bytes": (work / "state").stat().st_size,
        }
        sealed = ["disk.qcow2", "state", META]
        if (work / UEFI_VARS).exists():
            meta["uefi_vars_sha256"] = sha256_file(work / UEFI_VARS)
            sealed.append(UEFI_VARS)
        if (work / RAM).exists():
            # The RAM file stays 0600: qemu opens a memory-backend-file read-write even to map
            # it private (share=off), so a non-root user's VMs could not map a read-only one.
            # Its checksum is verified before use all the same.
            (work / RAM).chmod(0o600)
            meta["ram_sha256"] = sha256_file(work / RAM, sparse=True)
        (work / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in sealed:
            (work / name).chmod(0o400)
        for name in [*sealed, *([RAM] if "ram_sha256" in meta else [])]:
            with open(work / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(work)
        self.remove(key)
        os.replace(work, self.root / key)
        _fsync_dir(self.root)
        found = self.find(key)
        assert found is not None
        return found


def _gone_backing(template: Template) -> str:
    """The backing file the template's disk names if it no longer exists, else ''. TTError if
    the disk is not a readable qcow2 image."""
    backing = qemu.backing_file(template.disk)
    return backing if backing is not None and not Path(backing).exists() else ""


def _orphaned(template: Template) -> bool:
    """Whether the template can no longer be started: its image disk is gone, or its own disk
    is not a readable qcow2 image."""
    try:
        return bool(_gone_backing(template))
    except TTError:
        return True


def remove_dir(template: Path) -> None:
    """Delete a template directory: renamed out of view at once (atomic), then deleted."""
    doomed = template.with_name(f".old-{template.name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.replace(template, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def flock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing); TTError naming ``what`` if it
    is not ours within ``timeout`` s."""
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TTError(f"waited {timeout:.0f} s for {what}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
