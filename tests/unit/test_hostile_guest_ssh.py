"""pytest_ttenv.ssh against a hostile guest (issue 16, the trust boundary).

The code under test runs as root in the guest, so whatever answers our SSH channels may lie. Each
attack here is served for real: an asyncssh SFTP server with a made-up tree (a chain of symlinks
that climbs out of the destination, set-id files, device and fifo entries, an endless file, a
directory with ten million entries), a fake agent that breaks the frame protocol, and 1 GiB of
output from a real command over a real OpenSSH sshd (both the agent and the exec channel path).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pytest_ttenv.ssh as ssh
from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh import Connection, LimitExceeded, ProtocolError, SshTarget
from pytest_ttenv.ssh.ttagent import EXIT, HDR, HELLO, OUT, pack

from helpers.sshd import Sshd, have_sshd, start_sshd

MiB = 1 << 20
T0 = 1_600_000_000  # mtime of every served entry

# ---------------------------------------------------------------------------------------------
# a hostile SFTP server: a made-up tree, served as listed (duplicates and lies included)


def _attrs(mode: int, size: int = 0) -> asyncssh.SFTPAttrs:
    return asyncssh.SFTPAttrs(permissions=mode, size=size, uid=0, gid=0, atime=T0, mtime=T0)


DIR, FILE, LINK = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFLNK | 0o777
ENDLESS = b"/endless"
MANY = b"/many"
# directory -> its listing, in order: (name, mode, symlink target or file content)
TREE: dict[bytes, list[tuple[bytes, int, bytes]]] = {
    b"/evil": [
        (b"x", LINK, b"."),
        (b"y", LINK, b"x/.."),
        (b"z", LINK, b"y/.."),
        (b"z", DIR, b""),  # z again, now as a directory: asyncssh follows the link z to write into it
        (b"suid", FILE | 0o4755, b"#!/bin/sh\nid\n"),
        (b"sgid-dir", DIR | 0o2775, b""),
        (b"fifo", stat.S_IFIFO | 0o644, b""),
        (b"disk", stat.S_IFBLK | 0o660, b""),
        (b"sock", stat.S_IFSOCK | 0o777, b""),
        (b"abs", LINK, b"/etc/passwd"),
        (b"up", LINK, b"../../outside"),
        (b"lib.so", LINK, b"z/payload"),  # an honest relative link: kept
        (b"../escape", FILE | 0o644, b"bad name"),
    ],
    b"/evil/z": [(b"payload", FILE | 0o6755, b"PAYLOAD\n")],
    b"/evil/sgid-dir": [(b"inner", FILE | 0o2644, b"inner\n")],
}


def _entry(path: bytes) -> tuple[int, bytes] | None:
    """(mode, link target or content) of *path*; for a name listed twice, its last listing."""
    if path in TREE:
        return DIR, b""
    parent, _, name = path.rpartition(b"/")
    found = None
    for n, mode, extra in TREE.get(parent, []):
        if n == name:
            found = (mode, extra)
    return found


@dataclass
class VFile:
    """An open served file; seek() answers asyncssh's sparse-range probe (SEEK_DATA/SEEK_HOLE)."""

    path: bytes
    data: bytes
    size: int

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_DATA and pos >= self.size:
            raise OSError(errno.ENXIO, "no more data")
        return self.size if whence == os.SEEK_HOLE else pos


class HostileSFTP(asyncssh.SFTPServer):
    def _lookup(self, path: bytes) -> tuple[int, bytes]:
        if path == ENDLESS:
            return FILE | 0o644, b""
        if path == MANY:
            return DIR, b""
        got = _entry(path.rstrip(b"/") or b"/")
        if got is None:
            raise asyncssh.SFTPNoSuchFile(path.decode(errors="replace"))
        return got

    def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        mode, extra = self._lookup(path)
        return _attrs(mode, 1 << 40 if path == ENDLESS else len(extra))

    lstat = stat

    def realpath(self, path: bytes) -> bytes:
        return path

    def readlink(self, path: bytes) -> bytes:
        parent, _, name = path.rpartition(b"/")
        for n, mode, extra in TREE.get(parent, []):
            if n == name and stat.S_ISLNK(mode):
                return extra
        raise asyncssh.SFTPNoSuchFile(path.decode(errors="replace"))

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        for dot in (b".", b".."):
            yield asyncssh.SFTPName(dot, attrs=_attrs(DIR))
        if path == MANY:
            for i in range(10_000_000):
                yield asyncssh.SFTPName(b"f%07d" % i, attrs=_attrs(FILE | 0o644, 1))
            return
        for name, mode, extra in TREE[path]:
            yield asyncssh.SFTPName(name, attrs=_attrs(mode, len(extra)))

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        mode, data = self._lookup(path)
        if not stat.S_ISREG(mode):
            raise asyncssh.SFTPFailure("not a file")
        return VFile(path, data, 1 << 40 if path == ENDLESS else len(data))

    def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        assert isinstance(file_obj, VFile)
        return self.stat(file_obj.path)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, VFile)
        if file_obj.path == ENDLESS:
            return b"A" * size  # never EOF, whatever the offset
        return file_obj.data[offset : offset + size]

    def close(self, file_obj: object) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# a fake agent: says hello, then answers the first RUN with a protocol violation


def frame(typ: int, rid: int, payload: bytes, length: int | None = None) -> bytes:
    return HDR.pack(typ, rid, len(payload) if length is None else length) + payload


VIOLATIONS: dict[str, Callable[[int], bytes]] = {
    "oversized": lambda rid: frame(OUT, rid, b"x" * 100, length=0xFFFFFFF0),  # claims 4 GiB
    "malformed-exit": lambda rid: frame(OUT, rid, b"partial") + frame(EXIT, rid, b"bad"),
    "exit-bad-status": lambda rid: frame(EXIT, rid, pack([b"-1; rm -rf /", b""])),
    "unknown-type": lambda rid: frame(ord("Q"), rid, b""),
    "stray-reply": lambda rid: frame(EXIT, rid + 1000, pack([b"0", b""])),
    "second-hello": lambda rid: frame(HELLO, 0, b"ttagent 1 pid=1"),
}


@dataclass
class Guest:
    """One hostile asyncssh server on 127.0.0.1, run on the SSH loop; `violation` picks the agent's."""

    port: int
    host_key: str
    client_key: Path
    server: Any
    violation: str = "oversized"

    def target(self) -> SshTarget:
        return SshTarget("hostile", "127.0.0.1", self.port, "root", self.client_key, self.host_key)


async def _process(guest: list[Guest], process: asyncssh.SSHServerProcess[bytes]) -> None:
    cmd = process.command or ""
    if "python3" not in cmd:  # an exec channel: the pid marker, then an honest answer
        process.stderr.write(b"\x1e4242\x1e")
        process.stdout.write(b"exec channel\n")
        process.exit(0)
        return
    m = re.search(r"n=(\d+)", cmd)
    assert m is not None
    try:
        await process.stdin.readexactly(int(m.group(1)))  # the agent's source
        process.stdout.write(frame(HELLO, 0, b"ttagent 1 pid=4242 python=3.11"))
        _, rid, n = HDR.unpack(await process.stdin.readexactly(HDR.size))
        await process.stdin.readexactly(n)
        process.stdout.write(VIOLATIONS[guest[0].violation](rid))
        await process.stdin.read()  # until the client closes the channel
    except (asyncio.IncompleteReadError, asyncssh.Error, OSError):
        pass
    process.exit(0)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    d = tmp_path_factory.mktemp("hostile")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(str(d / "client"))
    holder: list[Guest] = []

    async def start() -> Any:
        options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
            gss_host=None,
            allow_pty=False,
            x11_forwarding=False,
            agent_forwarding=False,
        )
        return await asyncssh.listen(
            "127.0.0.1",
            0,
            options=options,
            sftp_factory=HostileSFTP,
            process_factory=lambda p: _process(holder, p),
            encoding=None,
        )

    lp = ssh.loop()
    server = asyncio.run_coroutine_threadsafe(start(), lp).result(10)
    g = Guest(server.get_port(), host_key.export_public_key().decode().strip(), d / "client", server)
    holder.append(g)
    yield g

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), lp).result(10)


@pytest.fixture
def hostile(guest: Guest) -> Iterator[Connection]:
    c = Connection(guest.target(), default_timeout=20, connect_timeout=10)
    yield c
    c.close()


def files_under(root: Path) -> list[Path]:
    """Every non-directory entry under *root* (links not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [Path(dirpath) / n for n in filenames]
        out += [Path(dirpath) / n for n in dirnames if (Path(dirpath) / n).is_symlink()]
    return out


# ---------------------------------------------------------------------------------------------
# get / put / read_text


def test_get_link_chain_cannot_write_outside_the_destination(hostile: Connection, tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "dest"
    notes = hostile.get("/evil", dest)
    real_dest = dest.resolve()
    # nothing was written anywhere but inside the destination: not two levels up, not anywhere
    for p in files_under(tmp_path):
        assert p.parent.resolve().is_relative_to(real_dest), p
        if p.is_symlink():
            assert p.resolve().is_relative_to(real_dest), f"{p} -> {os.readlink(p)}"
    assert [p for p in files_under(tmp_path) if p.name == "payload"] == []  # z, listed twice: first wins
    # x -> . and lib.so -> z/payload stay inside: kept; y climbs out through x: removed; then z
    # (y/..) no longer resolves outside (y is gone): kept, dangling
    assert os.readlink(dest / "x") == "." and os.readlink(dest / "lib.so") == "z/payload"
    assert os.readlink(dest / "z") == "y/.." and not (dest / "z").exists()
    for gone in ("y", "abs", "up", "fifo", "disk", "sock", "../escape"):
        assert not os.path.lexists(dest / gone), gone
    assert not (tmp_path / "a" / "escape").exists()
    # no set-id or sticky bit survives, on files or directories; the rest of the mode does
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sgid-dir").stat().st_mode) == 0o775
    assert stat.S_IMODE((dest / "sgid-dir" / "inner").stat().st_mode) == 0o644
    assert (dest / "suid").stat().st_mtime == T0
    # each refusal is on record
    text = "\n".join(notes)
    for what in (
        "/evil/y: skipped: symlink that resolves outside",
        "/evil/z: skipped: listed twice",
        "/evil/abs:",
        "/evil/up:",
        "/evil/fifo: skipped: special",
        "/evil/disk: skipped: special",
        "/evil/sock: skipped: special",
        "bad file name",
    ):
        assert what in text, (what, notes)
    assert not list(dest.parent.glob(".ttenv-get-*"))  # the staging directory is gone


def test_get_into_an_existing_directory_and_onto_a_local_symlink(hostile: Connection, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "payload").symlink_to(secret)  # a local link where the file lands
    hostile.get("/evil/z/payload", tmp_path / "dl")
    assert secret.read_text() == "host secret\n"  # replaced the link, never wrote through it
    assert not (tmp_path / "dl" / "payload").is_symlink()
    assert (tmp_path / "dl" / "payload").read_bytes() == b"PAYLOAD\n"


def test_get_refuses_a_special_file(hostile: Connection, tmp_path: Path) -> None:
    with pytest.raises(ssh.SshError, match=r"^hostile: get /evil/fifo .*not a regular file"):
        hostile.get("/evil/fifo", tmp_path / "fifo")
    assert not os.path.lexists(tmp_path / "fifo")


def test_get_endless_file_is_capped(hostile: Connection, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match=r"more than 8388608 bytes of file data \(max_bytes=\)"):
        hostile.get("/endless", tmp_path / "endless", max_bytes=8 * MiB)
    assert time.monotonic() - started < 10
    assert os.listdir(tmp_path) == []  # nothing left behind: no partial file, no staging dir
    assert ssh.GET_MAX_BYTES == 1 << 30


def test_get_millions_of_entries_is_capped(hostile: Connection, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded, match=r"more than 1000 directory entries"):
        hostile.get("/many", tmp_path / "many", max_entries=1000)
    assert time.monotonic() - started < 10
    assert os.listdir(tmp_path) == []


def test_read_text_is_capped(hostile: Connection) -> None:
    with pytest.raises(LimitExceeded, match=r"^hostile: read /endless: larger than 1048576 bytes"):
        hostile.read_text("/endless", max_size=MiB)
    with pytest.raises(LimitExceeded, match=r"larger than 16777216 bytes"):
        hostile.read_text("/endless")  # the default cap, 16 MiB
    assert hostile.read_text("/evil/z/payload") == "PAYLOAD\n"


# ---------------------------------------------------------------------------------------------
# the agent protocol


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_agent_protocol_violation_fails_the_command_at_once(guest: Guest, violation: str) -> None:
    guest.violation = violation
    c = Connection(guest.target(), default_timeout=20, connect_timeout=10)
    try:
        started = time.monotonic()
        with pytest.raises(ProtocolError, match=r"^hostile: agent protocol violation while running 'echo hi'"):
            c.run("echo hi", timeout=10)
        assert time.monotonic() - started < 3  # not after the command's timeout
        assert c.agent_pid is None
        r = c.run("echo hi")  # the agent is dropped: exec channels from now on
        assert r.stdout == "exec channel\n" and r.stderr == ""
    finally:
        c.close()


def test_agent_frame_errors_are_specific(guest: Guest) -> None:
    for violation, message in (
        ("oversized", "frame of 4294967280 bytes (type 79, id 1) exceeds the 1048576-byte limit"),
        ("malformed-exit", "malformed EXIT frame for request 1: b'bad'"),
        ("unknown-type", "unknown frame type 81 (id 1)"),
        ("stray-reply", "frame type 88 for request 1001, which is not running"),
    ):
        guest.violation = violation
        c = Connection(guest.target(), default_timeout=20, connect_timeout=10)
        try:
            with pytest.raises(ProtocolError) as ei:
                c.run("echo hi", timeout=10)
            assert message in str(ei.value)
        finally:
            c.close()


# ---------------------------------------------------------------------------------------------
# 1 GiB of output from a real command over a real sshd, both paths

needs_sshd = pytest.mark.skipif(not have_sshd(), reason="needs root, openssh-server and ssh-keygen")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    s = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


@pytest.fixture(params=["agent", "exec"])
def conn(request: pytest.FixtureRequest, sshd: Sshd) -> Iterator[Connection]:
    c = Connection(sshd.target(), use_agent=request.param == "agent", default_timeout=120)
    c.run("true")
    assert (c.agent_pid is not None) == (request.param == "agent")
    yield c
    c.close()


def _kib(field: str) -> int:
    m = re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert m is not None
    return int(m.group(1))


def _reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns that, in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    return _kib("VmRSS")


GIB_CMD = "printf HEAD; head -c 1073741824 /dev/zero; printf TAIL"


@needs_sshd
def test_1_gib_of_stdout_keeps_head_and_tail_in_bounded_memory(conn: Connection) -> None:
    cap = ssh.DEFAULT_MAX_OUTPUT
    before = _reset_peak()
    r = conn.run(GIB_CMD, timeout=120)
    growth_mib = (_kib("VmHWM") - before) / 1024
    print(f"1 GiB of stdout, {'agent' if conn.agent_pid else 'exec'}: host peak RSS +{growth_mib:.0f} MiB")
    assert r.truncated and r.ok
    assert len(r.stdout_bytes) == cap
    assert r.stdout_bytes[:4] == b"HEAD" and r.stdout_bytes[-4:] == b"TAIL"
    assert r.stdout_bytes.count(0) == cap - 8
    assert growth_mib < 3 * cap / MiB + 64, f"host peak RSS grew by {growth_mib:.0f} MiB"  # was ~2 GiB
    assert "truncated=True" in repr(r)


@needs_sshd
def test_stderr_is_capped_too_and_small_output_is_whole(conn: Connection) -> None:
    r = conn.run("printf head >&2; head -c 3000000 /dev/zero >&2; printf tail >&2; echo out", max_output=MiB)
    assert r.truncated and r.stdout == "out\n"
    assert len(r.stderr_bytes) == MiB and r.stderr_bytes.startswith(b"head\0") and r.stderr_bytes.endswith(b"\0tail")
    r = conn.run("printf 12345678", max_output=8)
    assert r.stdout == "12345678" and not r.truncated
    r = conn.run("printf 123456789", max_output=8)
    assert r.stdout == "12346789" and r.truncated  # 4 first + 4 last
    with pytest.raises(ValueError, match="max_output"):
        conn.run("true", max_output=-1)


@needs_sshd
def test_output_streams_to_a_file(conn: Connection, tmp_path: Path) -> None:
    out, err = tmp_path / "out.bin", tmp_path / "err.txt"
    before = _reset_peak()
    r = conn.run(
        "printf HEAD; head -c 268435456 /dev/zero; printf TAIL; echo oops >&2",
        stdout_file=out,
        stderr_file=err,
        timeout=120,
    )
    growth_mib = (_kib("VmHWM") - before) / 1024
    assert r.ok and not r.truncated and r.stdout_bytes == b"" and r.stderr_bytes == b""
    assert out.stat().st_size == (1 << 28) + 8 and err.read_text() == "oops\n"
    with out.open("rb") as f:
        assert f.read(4) == b"HEAD"
        f.seek(-4, os.SEEK_END)
        assert f.read() == b"TAIL"
    assert growth_mib < 64, f"host peak RSS grew by {growth_mib:.0f} MiB"
    r = conn.run("echo only-stdout-kept; echo e >&2", stderr_file=err)
    assert r.stdout == "only-stdout-kept\n" and err.read_text() == "e\n"


@needs_sshd
def test_put_drops_set_id_bits_skips_special_files_and_outward_links(sshd: Sshd, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    (src / "tool").chmod(0o4755)
    (src / "sub").chmod(0o2775)
    (src / "sub" / "lib.so.1").write_bytes(b"lib")
    (src / "sub" / "lib.so").symlink_to("lib.so.1")  # inside the tree: reproduced
    (src / "passwd").symlink_to("/etc/passwd")  # outside: skipped, its target's content never read
    (src / "up").symlink_to("../outside")
    os.mkfifo(src / "fifo")
    remote = tmp_path / "remote"
    c = Connection(sshd.target(), default_timeout=30)
    try:
        notes = c.put(src, str(remote))
    finally:
        c.close()
    assert stat.S_IMODE((remote / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((remote / "sub").stat().st_mode) == 0o775
    assert os.readlink(remote / "sub" / "lib.so") == "lib.so.1"
    for gone in ("passwd", "up", "fifo"):
        assert not os.path.lexists(remote / gone), gone
    assert len(notes) == 3 and all("skipped" in n for n in notes)
