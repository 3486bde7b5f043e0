"""The capture file (``<test-id>--<vm>.ttcap``): a failing VM's state, disk delta, console and
report in one file that another machine can verify and replay.

Layout: one zstd frame (with its content checksum) holding a tar archive (GNU headers, regular
files only, so ``tar --zstd -tvf`` lists it) whose first member is ``manifest.json``
(``capture_manifest``: format version, test, VM spec, and every other member's name, role, size
and sha256), then the members in the manifest's order, then the end-of-archive blocks.

``write`` is given trusted files and makes the capture atomically. ``read`` treats its file as
hostile: it never writes outside the empty directory it is given and leaves it empty on any
refusal, and every refusal is one ``CaptureError`` line. It reads through its own tar parser, not
``tarfile``, whose extended headers (pax, GNU long names) are read into memory whole at a size the
file chooses. Bounded: the manifest (``MAX_MANIFEST``), the members' total (``max_bytes``), the
decompressed stream (manifest + members + headers), zstd's window and memory per step.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn

import zstandard

import pytest_ttenv
from pytest_ttenv.core.capture_manifest import (
    CaptureError,
    ImageRef,
    Manifest,
    Member,
    TestRecord,
    VmRecord,
    parse,
)

__all__ = [
    "HOSTILE",
    "MAX_BYTES",
    "SUFFIX",
    "CaptureError",
    "ImageRef",
    "Manifest",
    "Member",
    "Source",
    "TestRecord",
    "VmRecord",
    "read",
    "read_manifest",
    "write",
]
SUFFIX = ".ttcap"
MANIFEST = "manifest.json"
MAX_MANIFEST = 1 << 20  # bytes: a manifest of 64 members is a few KiB
MAX_BYTES = 64 << 30  # default cap on the members' total size when reading
BLOCK = 512
CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WINDOW = 1 << 27  # zstd's own default limit; our writer's level uses far less
_FEED = 1024  # compressed bytes per decompression step: at most ~32 MiB out of one step
_TAIL = 20 * BLOCK  # zero padding allowed after the end-of-archive blocks (tar's record size)
_KINDS = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
    b"S": "a sparse file",
}
_DAMAGED = "the file is damaged or was changed: copy it again from where it was made"
HOSTILE = "a capture made by ttenv holds regular files only: do not use this file"


@dataclass(frozen=True)
class Source:
    """A member to write: from the file ``path`` or the bytes ``data``. ``sha256``, when the caller
    knows it already (an image's recorded digest), saves reading the file twice; it is checked."""

    name: str
    role: str
    path: Path | None = None
    data: bytes | None = None
    sha256: str | None = None


# -- writing ------------------------------------------------------------------------------------
def write(
    dest: Path,
    test: TestRecord,
    vm: VmRecord,
    sources: Sequence[Source],
    *,
    level: int = 3,
    threads: int = -1,
) -> Manifest:
    """Write the capture ``dest`` (mode 0600, made under a temporary name, fsynced, then renamed:
    readers see a whole file or none) and return its manifest. Each file must keep its size and content while
    this runs (copy a file that grows, such as a console log, first): a member that differs from
    what was measured is a TTError and no file is left. ``threads``: zstd workers (-1: one per CPU)."""
    members = tuple(_measure(s) for s in sources)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = Manifest(test, vm, members, created, f"pytest-ttenv {pytest_ttenv.__version__}")
    raw = manifest.to_json()
    try:  # never write what ``read`` would refuse
        parse(raw, str(dest), max_total=1 << 62)
    except CaptureError as exc:
        raise ValueError(f"not a valid capture: {exc}") from None
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # a VM's disk: its secrets
        with open(fd, "wb") as f:
            with compressor.stream_writer(f, closefd=False) as out:
                _write_header(out, MANIFEST, len(raw))
                out.write(raw)
                out.write(_padding(len(raw)))
                for source, member in zip(sources, members, strict=True):
                    _write_member(out, source, member, dest)
                out.write(b"\0" * (2 * BLOCK))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _measure(source: Source) -> Member:
    if (source.path is None) == (source.data is None):
        raise ValueError(f"member {source.name}: give a path or data, not both or neither")
    if source.data is not None:
        return Member(source.name, source.role, len(source.data), hashlib.sha256(source.data).hexdigest())
    assert source.path is not None
    size = source.path.stat().st_size
    if source.sha256 is not None:
        return Member(source.name, source.role, size, source.sha256)
    h = hashlib.sha256()
    with open(source.path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return Member(source.name, source.role, size, h.hexdigest())


def _write_member(out: BinaryIO, source: Source, member: Member, dest: Path) -> None:
    _write_header(out, member.name, member.size)
    h = hashlib.sha256()
    if source.data is not None:
        h.update(source.data)
        out.write(source.data)
        written = len(source.data)
    else:
        assert source.path is not None
        written = 0
        with open(source.path, "rb") as f:
            while written < member.size and (chunk := f.read(min(CHUNK, member.size - written))):
                h.update(chunk)
                out.write(chunk)
                written += len(chunk)
    if written != member.size or h.hexdigest() != member.sha256:
        raise CaptureError(
            f"capture {dest}: member {member.name} ({source.path}) changed while it was written",
            "capture files that do not change (copy a growing log first), or give their true sha256",
        )
    out.write(_padding(member.size))


def _write_header(out: BinaryIO, name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(time.time())
    out.write(info.tobuf(format=tarfile.GNU_FORMAT))  # one block: names are <= 100 bytes


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


# -- reading ------------------------------------------------------------------------------------
def read_manifest(path: Path, *, max_bytes: int = MAX_BYTES) -> Manifest:
    """The checked manifest of the capture ``path``, reading nothing past it (for a replay to say
    which image it needs, or a report to list the capture). The members are not verified."""
    with _open(path) as f:
        stream = _Stream(f, str(path), 0)  # reads are bounded: a header, then MAX_MANIFEST at most
        return _first(stream, str(path), max_bytes)


def read(path: Path, dest: Path, *, max_bytes: int = MAX_BYTES) -> Manifest:
    """Verify the capture ``path`` and extract its members into ``dest``, an existing empty
    directory (files 0600, directories 0700, never a link followed). Returns the manifest once
    every member has its size and sha256, the archive ended where the manifest says and the zstd
    frame was whole. On any refusal (CaptureError, one line) ``dest`` is left empty."""
    where = str(path)
    try:
        if any(dest.iterdir()):
            raise CaptureError(f"cannot extract capture {where} into {dest}: the directory is not empty")
    except OSError as exc:
        raise CaptureError(f"cannot extract capture {where} into {dest}: {exc.strerror or exc}") from None
    created: list[str] = []
    try:
        with _open(path) as f:
            stream = _Stream(f, where, 0)
            manifest = _first(stream, where, max_bytes)
            padded = sum(BLOCK + m.size + (-m.size % BLOCK) for m in manifest.members)
            stream.limit = stream.count + padded + 2 * BLOCK + _TAIL
            root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for expected in manifest.members:
                    _extract(stream, where, manifest, expected, root, created)
            finally:
                os.close(root)
            _end(stream, where, manifest)
        return manifest
    except BaseException:
        _remove(dest, created)
        raise


def _open(path: Path) -> BinaryIO:
    try:
        f = open(path, "rb")  # the caller closes it (with)
    except OSError as exc:
        raise CaptureError(f"cannot read capture {path}: {exc.strerror or exc}") from None
    if f.read(4) != _ZSTD_MAGIC:
        f.close()
        raise CaptureError(f"capture {path} is not a ttenv capture (not zstd-compressed)", _DAMAGED)
    f.seek(0)
    return f


def _first(stream: _Stream, where: str, max_bytes: int) -> Manifest:
    header = _header(stream, where)
    if header is None or header[0] != MANIFEST:
        first = "nothing" if header is None else header[0]
        raise CaptureError(f"capture {where} is not a ttenv capture (it starts with {first}, not {MANIFEST})", _DAMAGED)
    size = header[1]
    if size > MAX_MANIFEST:
        raise CaptureError(f"capture {where}: {MANIFEST} is {size} bytes, over the cap of {MAX_MANIFEST}", HOSTILE)
    raw = stream.read(size + (-size % BLOCK))[:size]
    return parse(raw, where, max_bytes)


def _extract(stream: _Stream, where: str, manifest: Manifest, expected: Member, root: int, created: list[str]) -> None:
    header = _header(stream, where)
    if header is None:
        raise CaptureError(f"capture {where} ends before member {expected.name} (the archive is cut short)", _DAMAGED)
    name, size = header
    if name != expected.name:
        _unexpected(where, name, manifest, created, f"is out of the manifest's order (expected {expected.name})")
    if size != expected.size:
        raise CaptureError(
            f"capture {where}: member {name} is {size} bytes, the manifest says {expected.size}", _DAMAGED
        )
    fd = _create(root, name, created)
    h = hashlib.sha256()
    with open(fd, "wb") as out:
        left = size
        while left:
            chunk = stream.read_some(min(left, CHUNK))
            h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    stream.read(-size % BLOCK)
    if h.hexdigest() != expected.sha256:
        raise CaptureError(
            f"capture {where}: member {name} has sha256 {h.hexdigest()[:16]}..., "
            f"not the manifest's {expected.sha256[:16]}... (damaged, or swapped for another file)",
            _DAMAGED,
        )


def _unexpected(where: str, name: str, manifest: Manifest, seen: list[str], out_of_order: str) -> NoReturn:
    """Refuse the member ``name`` found where another (or the end) was due."""
    if name in seen or name == MANIFEST:
        why = "appears twice"
    elif out_of_order and name in [m.name for m in manifest.members]:
        why = out_of_order
    else:
        why = "is not in the manifest"
    raise CaptureError(f"capture {where}: member {_safe(name)} {why}", _DAMAGED)


def _end(stream: _Stream, where: str, manifest: Manifest) -> None:
    """After the last member: two zero blocks, at most ``_TAIL`` zero bytes, the frame's end."""
    header = _header(stream, where)
    if header is not None:
        _unexpected(where, header[0], manifest, [m.name for m in manifest.members], "")
    if stream.read(BLOCK) != b"\0" * BLOCK:
        raise CaptureError(f"capture {where}: the end-of-archive marker is damaged", _DAMAGED)
    stream.finish()


def _header(stream: _Stream, where: str) -> tuple[str, int] | None:
    """(name, size) of the next regular file, or None at the end-of-archive block."""
    block = stream.read(BLOCK)
    if block == b"\0" * BLOCK:
        return None
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        stored = -1
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise CaptureError(f"capture {where}: a tar header is damaged (its checksum does not match)", _DAMAGED)
    magic = block[257:265]
    if magic not in (b"ustar  \0", b"ustar\x0000"):
        raise CaptureError(f"capture {where}: a tar header is of an unknown kind", _DAMAGED)
    name_bytes = block[:100].split(b"\0")[0]
    if magic == b"ustar\x0000" and block[345:500].strip(b"\0"):
        name_bytes = block[345:500].split(b"\0")[0] + b"/" + name_bytes
    try:
        name = name_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise CaptureError(f"capture {where}: a member's name is not UTF-8 ({name_bytes[:60]!r})", HOSTILE) from None
    kind = block[156:157]
    if kind not in (b"0", b"\0"):
        what = _KINDS.get(kind, f"of tar type {kind!r}")
        raise CaptureError(f"capture {where}: member {_safe(name)} is {what}", HOSTILE)
    if name.startswith("/") or ".." in name.split("/"):
        raise CaptureError(f"capture {where}: member {_safe(name)} points outside the capture", HOSTILE)
    return name, _size(block[124:136], where)


def _size(field: bytes, where: str) -> int:
    if field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    try:
        return int(field.split(b"\0")[0].strip() or b"0", 8)
    except ValueError:
        raise CaptureError(f"capture {where}: a tar header is damaged (size {field!r})", _DAMAGED) from None


def _create(root: int, name: str, created: list[str]) -> int:
    """A new file ``name`` under the directory ``root`` (its parents made as needed), never
    following a link; recorded in ``created`` (parents first) for ``_remove``."""
    *parents, leaf = name.split("/")
    fd = os.dup(root)
    try:
        for i, part in enumerate(parents):
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
                created.append("/".join(parents[: i + 1]) + "/")
            except FileExistsError:
                pass
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(leaf, flags, 0o600, dir_fd=fd)
        created.append(name)
        return out
    finally:
        os.close(fd)


def _remove(dest: Path, created: list[str]) -> None:
    for name in reversed(created):  # files before the directories holding them
        try:
            if name.endswith("/"):
                os.rmdir(dest / name)
            else:
                os.unlink(dest / name)
        except OSError:
            pass


def _safe(name: str) -> str:
    flat = "".join(c if c.isprintable() else "?" for c in name)
    return flat if len(flat) <= 120 else flat[:117] + "..."


class _Stream:
    """The decompressed bytes of the capture's one zstd frame, read exactly. ``limit`` (0: none
    yet) bounds what may be decompressed in all; one step may go past it by at most ~32 MiB."""

    def __init__(self, f: BinaryIO, where: str, limit: int) -> None:
        self._f = f
        self._where = where
        self._zstd = zstandard.ZstdDecompressor(max_window_size=_WINDOW).decompressobj()
        self._buf = bytearray()
        self.count = 0  # bytes read by the caller
        self.produced = 0  # bytes decompressed
        self.limit = limit

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.count += n
        return out

    def read_some(self, n: int) -> bytes:
        """Between 1 and ``n`` bytes (``n`` > 0)."""
        if not self._buf:
            self._fill()
        return self.read(min(n, len(self._buf)))

    def finish(self) -> None:
        """What is left must be at most ``_TAIL`` zero bytes, then the frame's end, then the file's."""
        while not self._zstd.eof:
            self._fill()
        if len(self._buf) > _TAIL or self._buf.count(0) != len(self._buf):
            raise CaptureError(f"capture {self._where} holds data after the end of its archive", HOSTILE)
        if self._zstd.unused_data or self._f.read(1):
            raise CaptureError(f"capture {self._where} holds data after its zstd frame", HOSTILE)

    def _fill(self) -> None:
        if self.limit and self.produced > self.limit:
            raise CaptureError(
                f"capture {self._where} decompresses to more than its manifest allows ({self.limit} bytes)", HOSTILE
            )
        if self._zstd.eof:
            raise CaptureError(f"capture {self._where} is truncated (its archive ends too early)", _DAMAGED)
        compressed = self._f.read(_FEED)
        if not compressed:
            raise CaptureError(f"capture {self._where} is truncated (the file ends too early)", _DAMAGED)
        try:
            out = self._zstd.decompress(compressed)
        except zstandard.ZstdError as exc:
            raise CaptureError(f"capture {self._where} is corrupt ({exc})", _DAMAGED) from None
        self._buf += out
        self.produced += len(out)
