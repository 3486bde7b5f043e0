"""Pull vendor cloud images from the catalog: download, resume, verify, convert, install.

- The download streams into ``<store>/.partial/<name>.part`` (a dot-dir: never listed) with a
  small ``<name>.json`` beside it (URL, ETag/Last-Modified, size). A cut connection or a stall
  leaves both; the next pull of that name resumes with an HTTP ``Range`` request (``If-Range``
  guards against the file having changed on the server).
- The vendor's checksum file is fetched first; the downloaded file must match it, else it is
  deleted and the pull refused (a mismatch after a *resumed* download restarts once from zero).
- Compressed images are decompressed (sparse) and non-qcow2 disks converted with ``qemu-img``
  in ``<store>/.pull-<name>-<pid>/``; ``ImageStore.install`` writes ``image.json`` and renames
  the directory into place, so a failed or interrupted pull never shows in the store.

Every network call has a timeout (connect, and each read); every failure is one TTError line
saying which URL, what happened and what to do (``download``; checksum files: ``checksums``).
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import io
import lzma
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import requests

from pytest_ttenv.backend.images.catalog import Catalog, load_catalog
from pytest_ttenv.backend.images.catalog_entry import CatalogImage
from pytest_ttenv.backend.images.checksums import CHUNK, hash_file
from pytest_ttenv.backend.images.download import (
    DEFAULT_TIMEOUT,
    ByteProgress,
    Progress,
    discard,
    download,
    fetch_checksum,
    network_error,
    new_session,
)
from pytest_ttenv.backend.images.importer import check_qcow2, convert_to_qcow2, require_qemu_img
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.errors import NotFound, TTError, from_os_error


def pullable_names(arches: Sequence[str] = (), catalog: Catalog | None = None) -> list[str]:
    """Canonical names of the images the catalog can pull for ``arches`` (all arches if empty)."""
    return (catalog or load_catalog()).available(arches)


def ensure_available(
    store: ImageStore,
    names: Sequence[str],
    progress: Progress = print,
    *,
    catalog: Catalog | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_bytes: ByteProgress | None = None,
) -> list[ImageInfo]:
    """The named images, pulling those missing from the store that the catalog has (first use).

    A missing name the catalog does not have raises NotFound; callers that prefer building
    (Debian with ``--tt-image-source=build``) handle those names before calling this.
    """
    cat = catalog or load_catalog()
    have = set(store.names())
    missing = [n for n in dict.fromkeys(names) if n not in have]
    unknown = [n for n in missing if n not in cat]
    if unknown:
        raise NotFound(
            f"image(s) {', '.join(unknown)} not in {store.root} and not in the {cat.where}",
            "ttenv image list --available shows what can be pulled",
        )
    for name in missing:
        img = cat.image(name)
        with _guard(store, img, progress):
            if name in store.names():  # another process pulled it while we waited for the lock
                continue
            progress(f"image {name} not in {store.root}: pulling it (first use)")
            _pull_locked(store, img, cat, progress, timeout, on_bytes)
    return [store.get(n) for n in names]


def pull(
    store: ImageStore,
    name: str,
    progress: Progress = print,
    *,
    catalog: Catalog | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    arch: str | None = None,
    on_bytes: ByteProgress | None = None,
) -> ImageInfo:
    """Pull ``name`` (entry ``ubuntu-24.04`` + ``arch``, or ``ubuntu-24.04-aarch64``) into ``store``.

    Replaces an image of that name. ``progress`` gets human-readable lines; ``on_bytes`` (if
    given) gets ``(done, total)`` after every chunk instead of periodic progress lines.
    """
    cat = catalog or load_catalog()
    img = cat.image(name, arch)
    with _guard(store, img, progress):
        return _pull_locked(store, img, cat, progress, timeout, on_bytes)


@contextmanager
def _guard(store: ImageStore, img: CatalogImage, progress: Progress) -> Iterator[None]:
    """File errors as one line, and one pull per image name at a time (flock in .partial/)."""
    try:
        partial = store.root / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        with open(partial / f"{img.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"waiting for another pull of {img.name} to finish")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    except OSError as exc:
        if isinstance(exc, requests.RequestException):  # requests' errors are OSErrors too
            raise network_error(img.url, "download", exc, DEFAULT_TIMEOUT) from None
        raise from_os_error(exc, f"pull image {img.name} into {store.root}") from None


def _pull_locked(
    store: ImageStore,
    img: CatalogImage,
    cat: Catalog,
    progress: Progress,
    timeout: float,
    on_bytes: ByteProgress | None,
) -> ImageInfo:
    require_qemu_img()
    store.remove_stale_builds()
    part = store.root / ".partial" / f"{img.name}.part"
    meta = part.with_suffix(".json")
    started = time.monotonic()
    session = new_session()
    with session:
        progress(f"pulling {img.name} from {img.url}")
        expected = fetch_checksum(session, img, timeout)
        for attempt in (1, 2):
            resumed_from = download(session, img.url, part, meta, timeout, progress, on_bytes)
            progress(f"verifying the {img.hash} checksum from {img.checksum_url}")
            digests = hash_file(part, {img.hash, "sha256"})
            if digests[img.hash] == expected:
                break
            discard(part, meta)
            if resumed_from and attempt == 1:
                progress("checksum mismatch after resuming: the server's file changed; downloading it again")
                continue
            raise TTError(
                f"checksum mismatch for {img.url}: expected {img.hash} {expected}, got {digests[img.hash]}",
                "the download was deleted; rerun to fetch it again - if it persists, the mirror or the catalog "
                "entry is stale",
            )
    work = store.root / f".pull-{img.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    out = work / "image"
    out.mkdir(parents=True)
    try:
        try:
            disk_mib = _to_qcow2(part, img, work, out / "disk.qcow2", progress)
        except TTError:
            discard(part, meta)  # verified but unusable: downloading it again will not help
            raise
        info = ImageInfo(
            name=img.name,
            os=img.os,
            version=img.version,
            arch=img.arch,
            disk="disk.qcow2",
            disk_mib=disk_mib,
            user=img.user,
            boot=img.boot,
            access=img.access,
            kernel=None,
            initrd=None,
            cmdline="",
            source="pull",
            created=time.time(),
            details={
                "url": img.url,
                "checksum_url": img.checksum_url,
                "sha256": digests["sha256"],
                img.hash: digests[img.hash],
                "format": img.format,
                "catalog": cat.version,
            },
        )
        store.install(out, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    discard(part, meta)
    progress(
        f"pulled {img.name} in {time.monotonic() - started:.0f} s ({disk_mib} MiB virtual) -> {store.root / img.name}"
    )
    return store.get(img.name)


# -- to a qcow2 ---------------------------------------------------------------------------------
def _open_compressed(path: Path, compression: str) -> io.BufferedIOBase:
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "gz":
        return gzip.open(path, "rb")
    return bz2.open(path, "rb")


def _decompress(src: Path, compression: str, dest: Path, progress: Progress) -> None:
    """Decompress ``src`` into ``dest``, leaving holes where the data is all zeros."""
    progress(f"decompressing ({compression})")
    size = 0
    try:
        with _open_compressed(src, compression) as fin, open(dest, "wb") as fout:
            while chunk := fin.read(CHUNK):
                if chunk.count(0) == len(chunk):
                    fout.seek(len(chunk), os.SEEK_CUR)
                else:
                    fout.write(chunk)
                size += len(chunk)
            fout.truncate(size)
    except (lzma.LZMAError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise TTError(
            f"the downloaded file is not valid {compression} data: {exc}",
            "the catalog's format for this image is wrong",
        ) from None
    except OSError as exc:
        if exc.errno is None:  # bz2/zlib stream errors carry no errno; disk errors do
            raise TTError(
                f"the downloaded file is not valid {compression} data: {exc}",
                "the catalog's format for this image is wrong",
            ) from None
        raise


def _to_qcow2(part: Path, img: CatalogImage, work: Path, dest: Path, progress: Progress) -> int:
    """Turn the verified download into the standalone qcow2 ``dest``; returns its virtual MiB."""
    src = part
    if img.compression:
        src = work / f"disk.{img.disk_format}"
        _decompress(part, img.compression, src, progress)
    if img.disk_format == "qcow2":
        os.replace(src, dest)  # same file system: the store
    else:
        progress(f"converting {img.disk_format} to qcow2")
        convert_to_qcow2(src, img.disk_format, dest)
        if src != part:
            src.unlink()
    return check_qcow2(dest, f"the image pulled from {img.url}")
