"""Replaying a capture (a ``VmSpec`` with ``restore``): before anything of the ENV exists, the
capture is read and verified into a private work dir (``core.capture_format.read``), its image
found here by the digest of its disk (or taken from the capture, checked the same way) and the
machine it was saved from checked against this host's qemu; then ``install`` moves its files into
the VM's run dir and points its disk at the image, and the engine restores it (``Engine.restore``).

The capture is hostile input: its manifest and members were checked by the reader; a bundled
image's ``image.json`` may only name files of the capture's image dir, and its disk must have the
digest the manifest names.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_ttenv.backend.engines.base import DIFF_FILE, Engine, Machine, Start
from pytest_ttenv.backend.engines.console import clean_text
from pytest_ttenv.backend.engines.qemu import backing_file
from pytest_ttenv.backend.engines.qemu_capture import differences, plain_qcow2, qemu_has_machine, rebase
from pytest_ttenv.backend.images.digest import same_disk
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core import capture_format
from pytest_ttenv.core.capture_manifest import CaptureError, Manifest
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.paths import private_dir, write_private
from pytest_ttenv.errors import NotFound, UsageError

_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
IMAGE_DIR = "image"  # a bundled image's files, in the capture and in the VM's run dir
SAVED = {"state": "state", "overlay": "overlay.qcow2", "uefi-vars": "uefi-vars.qcow2"}  # role -> name in the run dir


@dataclass(frozen=True)
class Restore:
    """A verified capture, unpacked in ``work``, ready to be installed into a VM's run dir."""

    source: Path
    manifest: Manifest
    machine: Machine
    image: ImageInfo  # this host's image, or the bundled one (``path``: in ``work`` until installed)
    work: Path

    def install(self, vmdir: Path) -> ImageInfo:
        """Move the saved files into ``vmdir`` (and a bundled image into ``vmdir/image``), point
        the disk at the image; returns the image as the VM uses it. The console log starts with
        the captured one."""
        image = self.image
        if image.path is not None and image.path.parent == self.work:
            shutil.move(str(image.path), vmdir / IMAGE_DIR)
            image = replace(image, path=vmdir / IMAGE_DIR)
        for member in self.manifest.members:
            if member.role in SAVED:
                shutil.move(str(self.work / member.name), vmdir / SAVED[member.role])
        rebase(vmdir / SAVED["overlay"], image.file(image.disk))
        uefi_vars = vmdir / SAVED["uefi-vars"]
        if uefi_vars.exists():
            plain_qcow2(uefi_vars)
            if backing_file(uefi_vars) is not None:
                raise CaptureError("the UEFI variable store in the capture names another file", capture_format.HOSTILE)
        console = self.work / "console.log"
        captured = console.read_bytes() if console.exists() else b""
        test = self.manifest.test.nodeid
        write_private(
            vmdir / "console.log",
            captured + f"\nttenv: replayed from {self.source.name} (test {test}, {self.manifest.created})\n".encode(),
        )
        write_private(vmdir / "machine-id", self.machine.machine_id)
        return image

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def prepare(capture: Path, images: ImageStore, state: Path, *, max_bytes: int = capture_format.MAX_BYTES) -> Restore:
    """Read and verify ``capture``, find or unpack its image, check this host can run its machine.
    One-line CaptureError/NotFound/UsageError otherwise, with nothing left behind."""
    manifest = capture_format.read_manifest(capture, max_bytes=max_bytes)
    vm = manifest.vm
    if not qemu_has_machine(vm.arch, vm.machine):
        raise UsageError(
            f"{capture.name} was saved by qemu {vm.qemu_version} as machine {vm.machine}, "
            f"which this host's qemu for {vm.arch} does not have",
            "replay it where that qemu version (or a newer one) is installed",
        )
    local = None if vm.image.bundled else _local_image(images, vm.image.name, vm.image.sha256, vm.arch)
    if local is None and not vm.image.bundled:
        raise _missing(images, vm.image.name, vm.image.sha256)
    work = private_dir(state / "replays") / secrets.token_hex(6)
    try:
        work.mkdir(mode=0o700)
        capture_format.read(capture, work, max_bytes=max_bytes)
        image = local or _bundled(work, manifest)
        machine = Machine(
            arch=vm.arch,
            machine=vm.machine,
            cpu_model=vm.cpu_model,
            cpus=vm.cpus,
            mem_mib=vm.mem_mib,
            ram_named=vm.ram_named,
            vmgenid=vm.vmgenid,
            machine_id=vm.machine_id,
            qemu_version=vm.qemu_version,
        )
        return Restore(capture, manifest, machine, image, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _local_image(images: ImageStore, name: str, sha256: str, arch: str) -> ImageInfo | None:
    """This host's image whose disk has digest ``sha256``: the one called ``name`` first."""
    candidates = sorted((i for i in images.all() if i.arch == arch), key=lambda i: i.name != name)
    return next((i for i in candidates if same_disk(i, sha256)), None)


def _missing(images: ImageStore, name: str, sha256: str) -> NotFound:
    here = " (the one here is another build of it)" if name in images.names() else ""
    return NotFound(
        f"the capture needs image {name} with disk sha256 {sha256[:16]}..., which is not here{here}",
        f"pull or import that exact image (ttenv image pull {name}), "
        "or capture with --tt-capture-image=always to carry the image in the file",
    )


def _bundled(work: Path, manifest: Manifest) -> ImageInfo:
    """The capture's own image, checked: its metadata names only its own files, of the right arch,
    and its disk has the manifest's digest."""
    root = work / IMAGE_DIR

    def refuse(why: str) -> CaptureError:
        return CaptureError(
            f"the image inside the capture is unusable: {clean_text(why)[:160]}", capture_format.HOSTILE
        )

    try:
        data = json.loads((root / "image.json").read_text())
        if not isinstance(data, dict):
            raise refuse("image.json is not an object")
        info = ImageInfo.from_dict(data, path=root)
    except (OSError, ValueError, TypeError) as exc:
        raise refuse(str(exc)) from None
    for field in (info.disk, info.kernel, info.initrd):
        if field is not None and (
            not isinstance(field, str) or not _FILE.fullmatch(field) or not (root / field).is_file()
        ):
            raise refuse(f"it names a file that is not in it: {field!r}")
    if info.name != manifest.vm.image.name or info.arch != manifest.vm.arch:
        raise refuse(f"it is {info.name} ({info.arch}), the manifest says {manifest.vm.image.name}")
    if info.boot not in ("direct", "bios", "uefi") or not isinstance(info.cmdline, str):
        raise refuse(f"unknown boot {info.boot!r}")
    disk = next((m for m in manifest.members if m.name == f"{IMAGE_DIR}/{info.disk}"), None)
    if disk is None or disk.sha256 != manifest.vm.image.sha256:  # the reader checked the file against its member
        raise refuse("its disk does not have the digest the manifest names")
    return info


def restore(engine: Engine, job: Start, restore: Restore, progress: Callable[[str], None]) -> None:
    """Install the capture into ``job``'s run dir and have ``engine`` start the VM from it. A host
    that differs from the capture's (qemu version, accelerator) is said first; qemu decides
    whether it can load the state (if not, the VM fails with that said: ``DIFF_FILE``)."""
    job.image = restore.install(job.vmdir)
    vm = restore.manifest.vm
    diff = differences(restore.machine, vm.accelerator, job.accel)
    if diff:
        progress(f"{job.vm.name}: the capture was made on another host ({diff}); trying to load it here")
        write_private(job.vmdir / DIFF_FILE, diff)
    engine.restore(job, restore.machine)
