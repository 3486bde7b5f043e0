"""The agent path, host side: `ttagent.py` is started over one exec channel per connection and runs
every command of that connection, multiplexed by request id (see ttagent.py for the protocol).

The agent runs in the guest, next to the code under test, and is not trusted: `AgentSession`
checks every frame before buffering its payload, and a violation fails every pending command at
once (Broken). `AgentChannel` keeps one Connection's agent: started on first use on each SSH
connection, restarted when it ends, and turned off (exec channels from then on, until `reset()`)
when python3 is missing, it does not say hello, it broke the protocol or it ended three times.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import logging
import re
import shlex
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh.command import Request
from pytest_ttenv.ssh.errors import Broken, Lost, SshError, TimedOut
from pytest_ttenv.ssh.exec_channel import ExecChannels
from pytest_ttenv.ssh.output import Capture, MiB
from pytest_ttenv.ssh.ttagent import ERR, EXIT, HDR, HELLO, KILL, OUT, RUN, pack

log = logging.getLogger(__name__)

AGENT_GRACE = 5.0  # how long past a command's timeout to wait for the agent's own verdict
MAX_FRAME = 1 * MiB  # the largest agent -> client frame payload accepted (the agent sends <= 64 KiB)
_EXIT_STATUS = re.compile(rb"[0-9]{1,3}")
_EXIT_FLAGS = re.compile(rb"[t!]{0,2}")


@functools.cache
def agent_source() -> bytes:
    """The agent program as sent to the guest: the file ttagent.py (of this package), as is."""
    return (importlib.resources.files("pytest_ttenv") / "ssh" / "ttagent.py").read_bytes()


def agent_command(size: int) -> str:
    """The exec-channel command that reads *size* bytes of agent source from stdin and runs them."""
    boot = (
        f"import os\nn={size}\nb=b''\nwhile len(b)<n:\n c=os.read(0,n-len(b))\n"
        " if not c:raise SystemExit(1)\n b+=c\nexec(compile(b,'ttagent','exec'))"
    )
    # the two words tell the agent whether LC_CTYPE was set: Python's C-locale coercion (PEP 538)
    # sets it in the agent's own environment, and children must not inherit that
    return "exec python3 -I -S -c " + shlex.quote(boot) + ' "${LC_CTYPE+set}" "${LC_CTYPE-}"'


def parse_exit(payload: bytes) -> tuple[int, bytes]:
    """An EXIT frame's (status, flags); ValueError if it is not exactly what the agent sends."""
    items: list[bytes] = []
    pos = 4
    if len(payload) < 4 or int.from_bytes(payload[:4], "big") != 2:
        raise ValueError("not 2 items")
    for _ in range(2):
        if len(payload) < pos + 4:
            raise ValueError("short")
        n = int.from_bytes(payload[pos : pos + 4], "big")
        pos += 4
        if len(payload) < pos + n:
            raise ValueError("short")
        items.append(payload[pos : pos + n])
        pos += n
    status, flags = items
    if pos != len(payload) or not _EXIT_STATUS.fullmatch(status) or not _EXIT_FLAGS.fullmatch(flags):
        raise ValueError("bad status or flags")
    return int(status), flags


@dataclass
class _Pending:
    fut: asyncio.Future[tuple[int, bytes]]
    out: Capture
    err: Capture


class AgentSession(asyncssh.SSHClientSession[bytes]):
    """Client side of the agent protocol over one exec channel.

    Every frame is checked (payload at most MAX_FRAME, a known type, HELLO once with id 0 and
    before anything else, OUT/ERR/EXIT only for a request we sent and have not seen the EXIT of,
    a well-formed EXIT). A violation closes the channel and fails every pending command at once
    with Broken (`failed` says why).
    """

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.buf = bytearray()
        self.pending: dict[int, _Pending] = {}
        self.abandoned: set[int] = set()  # ids given up on (timeout, cancel): late frames are dropped
        self.hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.failed = ""  # the protocol violation that closed the channel
        self.exit = ""
        self.stderr_tail = bytearray()
        self.pid: int | None = None
        self._next = 0

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if datatype is not None:
            self.stderr_tail += data
            del self.stderr_tail[:-2000]
            return
        if self.failed:
            return
        self.buf += data
        try:
            self._frames()
        except Broken as e:
            self._fail(str(e))

    def _frames(self) -> None:
        buf = self.buf
        hsize = HDR.size
        while len(buf) >= hsize:
            typ, rid, n = HDR.unpack_from(buf, 0)
            if n > MAX_FRAME:
                raise Broken(f"frame of {n} bytes (type {typ}, id {rid}) exceeds the {MAX_FRAME}-byte limit")
            if typ not in (HELLO, OUT, ERR, EXIT):
                raise Broken(f"unknown frame type {typ} (id {rid})")
            if len(buf) < hsize + n:
                return
            if typ == HELLO:
                if rid != 0 or self.hello.done():
                    raise Broken(f"unexpected HELLO frame (id {rid})")
                self.hello.set_result(bytes(buf[hsize : hsize + n]) or b"?")
            else:
                if not self.hello.done():
                    raise Broken(f"frame type {typ} (id {rid}) before HELLO")
                p = self.pending.get(rid)
                if p is None and rid not in self.abandoned:
                    raise Broken(f"frame type {typ} for request {rid}, which is not running")
                if typ == EXIT:
                    try:
                        status, flags = parse_exit(bytes(buf[hsize : hsize + n]))
                    except ValueError:
                        head = bytes(buf[hsize : hsize + min(n, 64)])
                        raise Broken(f"malformed EXIT frame for request {rid}: {head!r}") from None
                    if p is not None:
                        del self.pending[rid]
                        if not p.fut.done():
                            p.fut.set_result((status, flags))
                    else:
                        self.abandoned.discard(rid)
                elif p is not None:
                    with memoryview(buf) as view:
                        (p.out if typ == OUT else p.err).feed(view[hsize : hsize + n])
            del buf[: hsize + n]

    def _fail(self, why: str) -> None:
        """A protocol violation: close the channel, fail every pending command now."""
        self.failed = why
        self.closed = True
        self.buf = bytearray()
        if not self.hello.done():
            self.hello.set_result(b"")
        for p in self.pending.values():
            if not p.fut.done():
                p.fut.set_exception(Broken(why))
        self.pending.clear()
        if self.chan is not None:
            self.chan.close()

    def exit_status_received(self, status: int) -> None:
        self.exit = f"exit status {status}"

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit = f"killed by SIG{signal}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.failed:
            return
        why = f"agent channel closed ({self.exit or exc or 'no exit status'})"
        if not self.hello.done():
            self.hello.set_result(b"")  # b"": it never said hello
        for p in self.pending.values():
            if not p.fut.done():
                p.fut.set_exception(Lost(why, sent=True))
        self.pending.clear()

    def _send(self, typ: int, rid: int, payload: bytes) -> None:
        assert self.chan is not None
        self.chan.write(HDR.pack(typ, rid, len(payload)))
        if payload:
            self.chan.write(payload)

    async def run(self, req: Request, timeout: float, out: Capture, err: Capture) -> tuple[int, bool]:
        """Run *req*, its output going to *out* and *err*; returns (status, killed)."""
        if self.closed or self.chan is None:
            raise Lost("agent channel closed", sent=False)
        self._next = self._next % 0xFFFFFFFF + 1
        rid = self._next
        p = _Pending(asyncio.get_running_loop().create_future(), out, err)
        payload = pack(
            [
                repr(float(timeout)).encode(),
                req.script.encode(),
                pack([a.encode() for a in req.argv or ()]),
                pack([f"{k}={v}".encode() for k, v in req.env.items()]),
                req.stdin,
                b"s" if req.sudo else b"",
            ]
        )
        try:
            self._send(RUN, rid, payload)
        except (OSError, asyncssh.Error) as e:
            raise Lost(f"agent channel: {e}", sent=False) from None
        self.pending[rid] = p
        try:
            status, flags = await asyncio.wait_for(p.fut, timeout + AGENT_GRACE)
        except asyncio.TimeoutError:
            self._kill(rid)
            raise TimedOut(out.value(), err.value()) from None
        except asyncio.CancelledError:
            self._kill(rid)
            raise
        return status, b"t" in flags

    def _kill(self, rid: int) -> None:
        if self.pending.pop(rid, None) is not None and not self.closed:
            self.abandoned.add(rid)  # its EXIT (and any output before it) may still come
        if not self.closed:
            try:
                self._send(KILL, rid, b"")
            except (OSError, asyncssh.Error):
                pass


class AgentChannel:
    """The agent of one Connection (to VM *vm*), whose exec channels start it."""

    def __init__(self, vm: str, exec_channels: ExecChannels) -> None:
        self.vm = vm
        self.exec = exec_channels
        self.session: AgentSession | None = None
        self.lock = asyncio.Lock()
        self.off = ""  # why the agent is not used ("" while it may be)
        self.deaths = 0

    @property
    def pid(self) -> int | None:
        """The pid of the running agent on the VM, or None (not started, or not available)."""
        a = self.session
        return a.pid if a is not None and not a.closed else None

    async def get(
        self,
        conn: asyncssh.SSHClientConnection,
        slots: asyncio.Semaphore | None,
        *,
        enabled: bool,
        hello_timeout: float,
    ) -> AgentSession | None:
        """The agent running on *conn*, started if need be (under *slots*); None: use exec channels."""
        a = self.session
        if a is not None and not a.closed and a.conn is conn:
            return a
        if a is not None and a.failed and not self.off:
            self.disable(f"protocol violation: {a.failed}")
        if not enabled or self.off:
            return None
        async with self.lock:
            a = self.session
            if a is not None and not a.closed and a.conn is conn:
                return a
            if self.off:
                return None
            if a is not None and a.conn is conn:  # it died on a live connection
                self.deaths += 1
                log.info("%s: agent ended (%s)", self.vm, a.exit or "?")
                if self.deaths >= 3:
                    self.disable(f"it ended {self.deaths} times")
                    return None
            gate: AbstractAsyncContextManager[Any] = slots if slots is not None else nullcontext()
            async with gate:
                a = await self._start(conn, hello_timeout)
            self.session = a
            return a

    async def _start(self, conn: asyncssh.SSHClientConnection, hello_timeout: float) -> AgentSession | None:
        src = agent_source()
        sess = AgentSession(conn)
        try:
            chan = await self.exec.open(conn, sess, agent_command(len(src)))
        except SshError as e:
            self.disable(str(e).removeprefix(f"{self.vm}: "))
            return None
        try:
            chan.write(src)
        except (OSError, asyncssh.Error):
            pass  # it ended at once; sess.hello tells
        try:
            hello = await asyncio.wait_for(sess.hello, hello_timeout)
        except asyncio.TimeoutError:
            hello = b""
        if not hello:
            chan.close()
            if conn.is_closed():
                raise Lost("connection closed while starting the agent", sent=False)
            err = sess.stderr_tail.decode(errors="replace").strip().splitlines()
            why = (f"protocol violation: {sess.failed}" if sess.failed else "") or sess.exit or "no answer"
            self.disable(why + (f": {err[-1]}" if err else ""))
            return None
        m = re.search(rb"pid=(\d+)", hello)
        sess.pid = int(m.group(1)) if m else None
        log.debug("%s: agent up: %s", self.vm, hello.decode(errors="replace"))
        return sess

    def disable(self, why: str) -> None:
        """Use exec channels from now on (until reset()), saying *why* once."""
        self.off = why
        log.info("%s: python3 agent unavailable (%s); using exec channels", self.vm, why)

    def drop(self) -> None:
        """Close the agent's channel (its connection is being dropped); the next get() starts one."""
        if self.session is not None and self.session.chan is not None:
            self.session.chan.close()
        self.session = None

    def reset(self) -> None:
        """drop(), and give the agent a new chance (Connection.close())."""
        self.drop()
        self.off = ""
        self.deaths = 0
