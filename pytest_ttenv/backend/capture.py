"""Making a capture of a running VM (``LocalBackend.capture``): its engine saves it into a private
work dir in the state dir (the VM paused meanwhile, then running on), and the files go into one
``.ttcap`` (``core.capture_format``) with the test, the VM's spec and, when it cannot be had by
name elsewhere, its image. The work dir goes in every case; a capture over its cap is not kept.
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
from pathlib import Path

from pytest_ttenv.backend.engines.base import Engine, Saved
from pytest_ttenv.backend.images.digest import disk_sha256
from pytest_ttenv.core import capture_format
from pytest_ttenv.core.capture_manifest import CaptureInfo, CaptureSkipped, ImageRef, TestRecord, VmRecord
from pytest_ttenv.core.model import EnvInfo, ImageInfo, VmInfo
from pytest_ttenv.core.paths import private_dir
from pytest_ttenv.errors import TTError

IMAGE_POLICIES = ("auto", "always", "never")
LOCAL_SOURCES = ("build", "import")  # images no other machine can have by name: bundled by ``auto``
REPORT_MAX = 1 << 20  # bytes of the test's report kept


def bundles(image: ImageInfo, policy: str) -> bool:
    """Whether a capture of a VM of ``image`` holds the image, by ``policy`` (``IMAGE_POLICIES``)."""
    if policy not in IMAGE_POLICIES:
        raise TTError(f"unknown image policy {policy!r}", f"use one of {', '.join(IMAGE_POLICIES)}")
    return policy == "always" or (policy == "auto" and image.source in LOCAL_SOURCES)


def make(
    engine: Engine,
    env: EnvInfo,
    vm: VmInfo,
    image: ImageInfo,
    state: Path,
    dest: Path,
    test: TestRecord,
    *,
    policy: str = "auto",
    report: str = "",
    max_bytes: int | None = None,
) -> CaptureInfo:
    """Capture ``vm`` of ``env`` into ``dest`` (see the module doc). CaptureSkipped (no file left)
    if it would pass ``max_bytes`` or its engine cannot capture it; TTError if saving fails."""
    started = time.monotonic()
    bundled = bundles(image, policy)
    try:
        digest = disk_sha256(image)
    except OSError as exc:
        raise CaptureSkipped(f"the disk of image {image.name} cannot be read: {exc}") from None
    work = private_dir(state / "captures") / secrets.token_hex(6)
    work.mkdir(mode=0o700)
    try:
        saved = engine.capture(env, vm, image, work)
        record = _record(vm, image, saved, ImageRef(image.name, digest, bundled))
        sources = _sources(saved, image, digest, bundled, report)
        dest.parent.mkdir(parents=True, exist_ok=True)
        capture_format.write(dest, test, record, sources)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = dest.stat().st_size
    if max_bytes is not None and size > max_bytes:
        dest.unlink(missing_ok=True)
        raise CaptureSkipped(
            f"the capture of VM {vm.name} would take {size / 2**20:.0f} MiB, over the "
            f"{max(max_bytes, 0) / 2**20:.0f} MiB left of the cap: not kept",
            "raise --tt-capture-max, or capture without the image (--tt-capture-image=never)",
        )
    return CaptureInfo(str(dest), vm.name, size, time.monotonic() - started, saved.paused, bundled)


def _record(vm: VmInfo, image: ImageInfo, saved: Saved, ref: ImageRef) -> VmRecord:
    m = saved.machine
    version = re.search(r"\d+\.\d+(\.\d+)?.*", m.qemu_version)
    return VmRecord(
        name=vm.name,
        arch=image.arch,
        machine=m.machine,
        qemu_version=(version.group(0) if version else "0.0")[:100],
        accelerator=vm.accel or "tcg",
        cpu_model=m.cpu_model,
        cpus=m.cpus,
        mem_mib=m.mem_mib,
        boot=vm.boot if vm.boot in ("warm", "cold") else "cold",
        machine_id=m.machine_id,
        ram_named=m.ram_named,
        vmgenid=m.vmgenid,
        image=ref,
    )


def _sources(saved: Saved, image: ImageInfo, digest: str, bundled: bool, report: str) -> list[capture_format.Source]:
    Source = capture_format.Source
    sources = [Source("state", "state", path=saved.state), Source("overlay.qcow2", "overlay", path=saved.overlay)]
    if saved.uefi_vars is not None:
        sources.append(Source("uefi-vars.qcow2", "uefi-vars", path=saved.uefi_vars))
    sources.append(Source("console.log", "console", path=saved.console))
    if report:
        sources.append(Source("report.txt", "report", data=report.encode(errors="replace")[-REPORT_MAX:]))
    if bundled:
        sources.append(Source("image/image.json", "image", path=image.file("image.json")))
        sources.append(Source(f"image/{image.disk}", "image", path=image.file(image.disk), sha256=digest))
        for name in (image.kernel, image.initrd):
            if name:
                sources.append(Source(f"image/{name}", "image", path=image.file(name)))
    return sources
