"""Files of this machine copied once to a libvirt host's ``ttenv`` pool, through libvirt alone:
uploaded as a volume, read back and compared by SHA-256 with what was sent, then marked complete
by the volume ``<volume>.sha256``. Image files (``ttenv-img-...``) and warm templates
(``ttenv-tpl-...``) reach remote hosts this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_ttenv.backend.engines.libvirt_xml import volume_xml
from pytest_ttenv.backend.engines.virt import VOLUME_EXISTS, Pool, VirtError
from pytest_ttenv.errors import TTError


def upload_once(
    pool: Pool,
    label: str,
    src: Path,
    vol: str,
    what: str,
    progress: Callable[[str], None],
    backing: str | None = None,
) -> str:
    """The path on the host of volume ``vol``, a verified copy of ``src`` (``what``: how progress
    lines name it), uploaded now if no complete copy is there. ``backing``: ``src`` is a qcow2
    overlay and the copy is to be backed by this path on the host instead. Call it with a lock per
    (host, volume) held. A copy another process is uploading is waited for (as long as an upload at
    2 MiB/s would take, at least 2 minutes); one left incomplete by a dead upload is replaced."""
    mark = f"{vol}.sha256"
    path = f"{pool.path}/{vol}"
    if pool.exists(mark):
        return path
    with _rebased(src, backing) as src:
        size = src.stat().st_size
        try:
            pool.create(volume_xml(vol, size), vol)
        except VirtError as exc:
            if exc.code != VOLUME_EXISTS:
                raise
            deadline = time.monotonic() + max(120.0, size / (2 * 2**20))
            progress(f"{what}: waiting for another upload to {label}")
            while time.monotonic() < deadline:
                if pool.exists(mark):
                    return path
                time.sleep(1.0)
            progress(f"{what}: the copy on {label} is incomplete; uploading it again")
            pool.delete(vol)
            pool.create(volume_xml(vol, size), vol)
        started = time.monotonic()
        progress(f"{what}: copying {src.name if backing is None else vol} ({size / 2**20:.0f} MiB) to {label} (once)")
        digest = hashlib.sha256()
        try:
            with open(src, "rb") as f:
                for chunk in pool.upload(vol, f, size):
                    digest.update(chunk)
            copy = hashlib.sha256()
            for chunk in pool.download(vol):
                copy.update(chunk)
        except BaseException:
            with contextlib.suppress(TTError):
                pool.delete(vol)
            raise
    if copy.hexdigest() != digest.hexdigest():
        pool.delete(vol)
        got, want = copy.hexdigest()[:16], digest.hexdigest()[:16]
        raise TTError(
            f"the copy of {what} on {label} does not match (sha256 {got} != {want}); nothing was kept", "retry"
        )
    text = f"{digest.hexdigest()}  {vol}\n".encode()
    pool.create(volume_xml(mark, len(text)), mark)
    for _ in pool.upload(mark, io.BytesIO(text), len(text)):
        pass
    progress(f"{what}: copied to {label} in {time.monotonic() - started:.1f} s, sha256 verified")
    return path


@contextlib.contextmanager
def _rebased(src: Path, backing: str | None) -> Iterator[Path]:
    """``src`` itself, or a temporary copy of the qcow2 overlay ``src`` backed by ``backing``."""
    if backing is None:
        yield src
        return
    with tempfile.TemporaryDirectory(prefix="ttenv-upload-") as tmp:
        copy = Path(tmp) / src.name
        shutil.copyfile(src, copy)
        argv = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(copy)]
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            raise TTError(f"cannot point {src} at {backing}: {res.stderr.strip()}")
        yield copy
