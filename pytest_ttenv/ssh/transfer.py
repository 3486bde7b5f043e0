"""File transfers over SFTP by our own tree walks: the guest's SFTP server is not trusted.

`get` walks the remote tree with lstat/readdir (never following a remote symlink below the path
asked for) into a private staging directory next to the destination, then moves it into place;
nothing is created, followed or written through a link that leaves the destination, set-id and
sticky bits are dropped, special files are skipped, and bytes and entries are capped
(GET_MAX_BYTES, GET_MAX_ENTRIES; READ_TEXT_MAX for read_text). `put` walks the local tree the
same way. A refusal is `Refused` (limit=True for a cap), which Connection reports as its errors.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh.errors import Refused
from pytest_ttenv.ssh.output import MiB

GET_MAX_BYTES = 1 << 30  # get(): total bytes of file data
GET_MAX_ENTRIES = 100_000  # get(): directory entries listed
READ_TEXT_MAX = 16 * MiB  # read_text(): file size
_XFER_CHUNK = 1 * MiB  # one SFTP read/write call (asyncssh splits it into parallel requests)
_DROP_MODE = 0o777  # file modes kept by get/put: permission bits only (no setuid/setgid/sticky)


def _kind(mode: int | None) -> str:
    """ "file", "dir", "link" or "special" from an lstat mode (None: the server did not say)."""
    if mode is None:
        return "special"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "special"


def _good_name(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def _link_stays_inside(link_dir: Sequence[bytes], target: bytes) -> bool:
    """True if the relative link *target*, read from the directory *link_dir* (its path under the
    copied tree's top, as components), never climbs above the top, component by component."""
    if not target or target.startswith(b"/") or b"\0" in target:
        return False
    parts = list(link_dir)
    for part in target.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if not parts:
                return False
            parts.pop()
        else:
            parts.append(part)
    return True


def _inside(path: bytes, root: bytes) -> bool:
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def copy_name(path: str, op: str, shown: str) -> str:
    """The name a copy of *path* gets inside an existing destination directory."""
    name = posixpath.basename(posixpath.normpath(path))
    if name in ("", ".", "..", "/"):
        raise ValueError(f"{op}: cannot name a copy of {shown!r} inside a directory; give the full destination")
    return name


def _force_rmtree(path: str | bytes) -> None:
    """Remove a tree we created, whatever modes it ended up with."""

    def fix(func: Callable[..., Any], p: str | bytes, exc: Any) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        while view:
            n = os.write(fd, view)
            view = view[n:]


class Download:
    """One get(): walk the remote tree with lstat/readdir (never following a remote symlink),
    download into a private staging directory next to the destination, then move it into place.

    - files: created with O_CREAT|O_EXCL|O_NOFOLLOW, modes masked to 0o777 (no set-id, no sticky);
    - special files (devices, fifos, sockets, unknown): skipped, with a note;
    - symlinks: reproduced only if relative and, read from their directory, never climbing above
      the copied tree's top; created after every file and directory (nothing is ever written
      through one), then each is resolved on the host (realpath) and removed while any resolves
      outside the tree (repeated until none does); others are skipped with a note;
    - bytes of file data and directory entries are counted as they arrive and capped.
    """

    def __init__(self, sftp: asyncssh.SFTPClient, max_bytes: int, max_entries: int) -> None:
        self.sftp = sftp
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self.entries = 0
        self.notes: list[str] = []
        self.dirs: list[tuple[bytes, asyncssh.SFTPAttrs]] = []  # created, in creation order
        self.links: list[tuple[bytes, bytes, bytes, tuple[bytes, ...]]] = []  # local, target, remote, dir parts

    def note(self, remote: bytes, why: str) -> None:
        self.notes.append(f"{os.fsdecode(remote)}: {why}")

    async def run(self, remote: str, target: Path) -> None:
        rtop = remote.encode()
        attrs = await self.sftp.stat(rtop)  # the path asked for is resolved by the guest
        kind = _kind(attrs.permissions)
        if kind not in ("file", "dir"):
            raise Refused(f"{remote} is not a regular file or a directory (refusing to copy it)")
        staging = os.fsencode(tempfile.mkdtemp(prefix=".ttenv-get-", dir=target.parent))  # mode 0700
        try:
            top = os.path.join(staging, os.fsencode(target.name))
            if kind == "file":
                await self.fetch(rtop, top, attrs)
            else:
                await self.tree(rtop, top, attrs)
            self.make_links(top)
            for path, a in reversed(self.dirs[1:]):  # deepest first; the top's after the move
                self.set_meta(path, a)
            self.place(top, os.fsencode(target))
            if kind == "dir":
                self.set_meta(os.fsencode(target), self.dirs[0][1])
        finally:
            _force_rmtree(staging)

    async def tree(self, rtop: bytes, top: bytes, top_attrs: asyncssh.SFTPAttrs) -> None:
        todo: list[tuple[bytes, bytes, tuple[bytes, ...], asyncssh.SFTPAttrs]] = [(rtop, top, (), top_attrs)]
        while todo:
            rdir, ldir, parts, attrs = todo.pop()
            os.mkdir(ldir, 0o700)
            self.dirs.append((ldir, attrs))
            seen: set[bytes] = set()
            children: list[asyncssh.SFTPName] = []
            async for entry in self.sftp.scandir(rdir):
                name = entry.filename
                assert isinstance(name, bytes)
                if name in (b".", b".."):
                    continue
                self.entries += 1
                if self.entries > self.max_entries:
                    raise Refused(f"more than {self.max_entries} directory entries (max_entries=)", limit=True)
                rpath = rdir.rstrip(b"/") + b"/" + name
                if not _good_name(name):
                    self.note(rpath, f"skipped: bad file name {name!r}")
                elif name in seen:
                    self.note(rpath, "skipped: listed twice")
                else:
                    seen.add(name)
                    children.append(entry)
            for entry in children:
                name = entry.filename
                assert isinstance(name, bytes)
                rpath = rdir.rstrip(b"/") + b"/" + name
                lpath = os.path.join(ldir, name)
                attrs = entry.attrs
                if attrs.permissions is None:
                    attrs = await self.sftp.lstat(rpath)
                mode = attrs.permissions
                kind = _kind(mode)
                if kind == "dir":
                    todo.append((rpath, lpath, (*parts, name), attrs))
                elif kind == "file":
                    await self.fetch(rpath, lpath, attrs)
                elif kind == "link":
                    self.links.append((lpath, await self.sftp.readlink(rpath), rpath, parts))
                else:
                    self.note(rpath, f"skipped: special file (mode {mode if mode is None else oct(mode)})")

    async def fetch(self, rpath: bytes, lpath: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(lpath, flags, 0o600)
        try:
            async with self.sftp.open(rpath, "rb") as f:
                offset = 0
                while True:
                    data: bytes = await f.read(_XFER_CHUNK, offset)
                    if not data:
                        break
                    self.bytes += len(data)
                    if self.bytes > self.max_bytes:
                        raise Refused(f"more than {self.max_bytes} bytes of file data (max_bytes=)", limit=True)
                    _write_all(fd, data)
                    offset += len(data)
            if attrs.permissions is not None:
                os.fchmod(fd, attrs.permissions & _DROP_MODE)
            if attrs.atime is not None and attrs.mtime is not None:
                os.utime(fd, (attrs.atime, attrs.mtime))
        finally:
            os.close(fd)

    def make_links(self, top: bytes) -> None:
        root = os.path.realpath(top)
        made: list[tuple[bytes, bytes]] = []
        for lpath, target, rpath, parts in self.links:
            if not _link_stays_inside(parts, target):
                self.note(rpath, f"skipped: symlink to {os.fsdecode(target)!r} leaves the copied tree")
                continue
            try:
                os.symlink(target, lpath)
            except FileExistsError:
                self.note(rpath, "skipped: symlink whose name is taken")
                continue
            made.append((lpath, rpath))
        # links resolve through each other (x -> ., y -> x/..): check them all as they now are
        changed = True
        while changed:
            changed = False
            for lpath, rpath in list(made):
                if not _inside(os.path.realpath(lpath), root):
                    os.unlink(lpath)
                    made.remove((lpath, rpath))
                    self.note(rpath, "skipped: symlink that resolves outside the copied tree")
                    changed = True

    @staticmethod
    def set_meta(path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):  # only our own directories, never through a link
            return
        if attrs.permissions is not None:
            os.chmod(path, attrs.permissions & _DROP_MODE)
        if attrs.atime is not None and attrs.mtime is not None:
            os.utime(path, (attrs.atime, attrs.mtime), follow_symlinks=False)

    def place(self, src: bytes, dst: bytes) -> None:
        """Move the staged *src* to *dst*; into an existing directory, merged entry by entry."""
        try:
            dst_st = os.lstat(dst)
        except FileNotFoundError:
            os.rename(src, dst)
            return
        src_dir = stat.S_ISDIR(os.lstat(src).st_mode)
        if src_dir != stat.S_ISDIR(dst_st.st_mode):
            what = "a directory" if src_dir else "a file"
            raise Refused(f"cannot copy {what} onto {os.fsdecode(dst)}, which is not")
        if not src_dir:
            os.replace(src, dst)  # replaces a symlink itself, never its target
            return
        for name in os.listdir(src):
            self.place(os.path.join(src, name), os.path.join(dst, name))


class Upload:
    """One put(): walk the local tree with lstat (never following a symlink below the top), upload
    regular files (read with O_NOFOLLOW, modes masked to 0o777), make directories, reproduce
    symlinks only if relative and never climbing above the copied tree's top, skip special files
    (with a note), and never write through a remote symlink."""

    def __init__(self, sftp: asyncssh.SFTPClient) -> None:
        self.sftp = sftp
        self.notes: list[str] = []

    async def rkind(self, rpath: bytes) -> str | None:
        try:
            return _kind((await self.sftp.lstat(rpath)).permissions)
        except asyncssh.SFTPNoSuchFile:
            return None

    async def run(self, src: Path, remote: str) -> None:
        st = os.stat(src)  # the path asked for is resolved on the host
        rtop = remote.encode()
        if stat.S_ISDIR(st.st_mode):
            await self.tree(os.fsencode(src), rtop, st)
        elif stat.S_ISREG(st.st_mode):
            await self.send(os.fsencode(src), rtop, st)
        else:
            raise Refused(f"{src} is not a regular file or a directory (refusing to copy it)")

    async def tree(self, ltop: bytes, rtop: bytes, top_st: os.stat_result) -> None:
        dirs: list[tuple[bytes, os.stat_result]] = []
        todo: list[tuple[bytes, bytes, tuple[bytes, ...], os.stat_result]] = [(ltop, rtop, (), top_st)]
        while todo:
            ldir, rdir, parts, st = todo.pop()
            kind = await self.rkind(rdir)
            if kind is None:
                await self.sftp.mkdir(rdir)
            elif kind != "dir":
                raise Refused(f"{os.fsdecode(rdir)} exists on the VM and is not a directory")
            dirs.append((rdir, st))
            with os.scandir(ldir) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                lpath, rpath = e.path, rdir.rstrip(b"/") + b"/" + e.name
                est = e.stat(follow_symlinks=False)
                if e.is_symlink():
                    target = os.readlink(lpath)
                    if not _link_stays_inside(parts, target):
                        self.notes.append(f"{os.fsdecode(lpath)}: skipped: symlink leaves the copied tree")
                    elif await self.rkind(rpath) is not None:
                        self.notes.append(f"{os.fsdecode(lpath)}: skipped: {os.fsdecode(rpath)} exists on the VM")
                    else:
                        await self.sftp.symlink(target, rpath)
                elif stat.S_ISDIR(est.st_mode):
                    todo.append((lpath, rpath, (*parts, e.name), est))
                elif stat.S_ISREG(est.st_mode):
                    await self.send(lpath, rpath, est)
                else:
                    self.notes.append(f"{os.fsdecode(lpath)}: skipped: special file")
        for rdir, st in reversed(dirs):
            await self.sftp.setstat(rdir, self.attrs(st))

    @staticmethod
    def attrs(st: os.stat_result) -> asyncssh.SFTPAttrs:
        return asyncssh.SFTPAttrs(permissions=st.st_mode & _DROP_MODE, atime=int(st.st_atime), mtime=int(st.st_mtime))

    async def send(self, lpath: bytes, rpath: bytes, st: os.stat_result) -> None:
        if await self.rkind(rpath) == "link":
            raise Refused(f"{os.fsdecode(rpath)} is a symlink on the VM (refusing to write through it)")
        fd = os.open(lpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise Refused(f"{os.fsdecode(lpath)} changed while copying")
            async with self.sftp.open(rpath, "wb") as f:
                offset = 0
                while True:
                    data = os.read(fd, _XFER_CHUNK)
                    if not data:
                        break
                    await f.write(data, offset)
                    offset += len(data)
        finally:
            os.close(fd)
        await self.sftp.setstat(rpath, self.attrs(fst))


async def put_tree(sftp: asyncssh.SFTPClient, src: Path, remote: str) -> list[str]:
    """Copy the local file or tree *src* to *remote* (inside it if it is a directory; missing
    parents created); the notes on what was skipped."""
    dest = remote
    try:
        if (await sftp.stat(dest)).type == asyncssh.FILEXFER_TYPE_DIRECTORY:
            dest = posixpath.join(dest, copy_name(src.resolve().name, "put", str(src)))
    except asyncssh.SFTPNoSuchFile:
        parent = posixpath.dirname(remote.rstrip("/"))
        if parent:
            await sftp.makedirs(parent, exist_ok=True)
    up = Upload(sftp)
    await up.run(src, dest)
    return up.notes


async def get_tree(sftp: asyncssh.SFTPClient, remote: str, target: Path, max_bytes: int, max_entries: int) -> list[str]:
    """Copy the remote file or tree *remote* to the local path *target*; the notes on what was skipped."""
    down = Download(sftp, max_bytes, max_entries)
    await down.run(remote, target)
    return down.notes


async def write_file(sftp: asyncssh.SFTPClient, remote: str, data: bytes) -> None:
    """Replace the remote file's content with *data*; missing parent directories are created."""
    parent = posixpath.dirname(remote.rstrip("/"))
    if parent:
        await sftp.makedirs(parent, exist_ok=True)
    async with sftp.open(remote, "wb") as f:
        await f.write(data)


async def read_file(sftp: asyncssh.SFTPClient, remote: str, max_size: int) -> bytes:
    """The remote file's content; Refused (a limit) once more than *max_size* bytes arrived."""
    data = bytearray()
    async with sftp.open(remote, "rb") as f:
        while True:
            chunk: bytes = await f.read(min(_XFER_CHUNK, max_size + 1 - len(data)), len(data))
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > max_size:
                raise Refused(f"larger than {max_size} bytes (max_size=)", limit=True)
