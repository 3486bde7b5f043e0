"""The sha256 of an image's disk file, by which a capture names its image (``disk.sha256`` beside
the disk remembers it with the disk's size and mtime, so it is computed once per image version)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.core.paths import write_private

DIGEST_FILE = "disk.sha256"
CHUNK = 1 << 20


def disk_sha256(image: ImageInfo) -> str:
    """The sha256 (hex) of ``image``'s disk file; OSError if it cannot be read."""
    disk = image.file(image.disk)
    st = disk.stat()
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    memo = disk.with_name(DIGEST_FILE)
    try:
        size, mtime, digest = memo.read_text().split()
        if f"{size} {mtime}" == stamp and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    digest = file_sha256(disk)
    try:
        write_private(memo, f"{stamp} {digest}\n")
    except OSError:  # a read-only image store: computed again next time
        pass
    return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def same_disk(image: ImageInfo, sha256: str) -> bool:
    """Whether ``image``'s disk has the digest ``sha256`` (False if it cannot be read)."""
    try:
        return disk_sha256(image) == sha256
    except OSError:
        return False


__all__ = ["DIGEST_FILE", "disk_sha256", "file_sha256", "same_disk"]
