"""The exec-channel path: one SSH session per command (used when the VM has no python3 for the agent).

The command line first prints the session leader's pid between \\036 bytes on stderr (sshd made it a
process group leader); `ExecSession` strips that marker, and on timeout the group is killed with
`kill -9 -PGID` on a second channel (OpenSSH refuses `signal` requests for root sessions).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import signal
from typing import IO

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh.command import Request
from pytest_ttenv.ssh.errors import Lost, SshError, TimedOut
from pytest_ttenv.ssh.loop import spawn
from pytest_ttenv.ssh.output import DEFAULT_MAX_OUTPUT, Capture

log = logging.getLogger(__name__)

EXEC_CHANNELS = 8  # sshd's MaxSessions defaults to 10 per connection: agent + sftp + 8
_PID_MARK = re.compile(rb"\x1e([0-9]{1,10})\x1e")


def exec_command(req: Request) -> str:
    """The exec-channel command: report the session's pid (for kill) on stderr, then run sh."""
    return f"printf '\\036%d\\036' $$ >&2; exec /bin/sh -c {shlex.quote(req.script)}"


def signal_status(name: str) -> int:
    """The status a shell reports for death by signal *name* ("KILL": 137); 255 if unknown."""
    try:
        return 128 + signal.Signals["SIG" + name].value
    except KeyError:
        return 255


class ExecSession(asyncssh.SSHClientSession[bytes]):
    """Collects one exec channel's output (bounded, see Capture) and exit status."""

    def __init__(
        self,
        max_output: int = DEFAULT_MAX_OUTPUT,
        out_file: IO[bytes] | None = None,
        err_file: IO[bytes] | None = None,
    ) -> None:
        self.out = Capture(max_output, out_file)
        self.err = Capture(max_output, err_file)
        self.pre: bytearray | None = bytearray()  # stderr's start, until the pid marker is found
        self.status: int | None = None
        self.pid: int | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            pre = self.pre
            if pre is None:
                self.err.feed(data)
                return
            pre += data  # the login shell's printf comes first; look at the start only
            m = _PID_MARK.search(pre, 0, 4096)
            if m:
                self.pid = int(m.group(1))
                del pre[m.start() : m.end()]
            if m or len(pre) >= 4096:
                self.pre = None
                self.err.feed(pre)
        else:
            self.out.feed(data)

    def exit_status_received(self, status: int) -> None:
        self.status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.status = signal_status(signal)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def stdout(self) -> bytes:
        return self.out.value()

    def flush(self) -> None:
        """Hand stderr's start, still held while looking for the pid marker, to its capture."""
        if self.pre is not None:
            self.err.feed(self.pre)
            self.pre = None

    def stderr(self) -> bytes:
        self.flush()
        return self.err.value()


class ExecChannels:
    """The exec channels of one connection to VM *vm*: at most EXEC_CHANNELS run commands at once."""

    def __init__(self, vm: str) -> None:
        self.vm = vm
        self.slots = asyncio.Semaphore(EXEC_CHANNELS)

    async def open(
        self, conn: asyncssh.SSHClientConnection, sess: asyncssh.SSHClientSession[bytes], command: str
    ) -> asyncssh.SSHClientChannel[bytes]:
        """Open an exec channel for *sess*, retrying briefly while sshd refuses it.

        sshd frees a closed session only after its main loop has processed the close, so a
        channel opened right after another closed can meet "no more sessions" (MaxSessions) even
        when fewer than EXEC_CHANNELS are open; the command has not started then, so retrying is safe.
        """
        delay = 0.005
        for attempt in range(12):
            try:
                chan, _ = await conn.create_session(lambda: sess, command, encoding=None)
                return chan
            except asyncssh.ChannelOpenError as e:
                if conn.is_closed():
                    raise Lost(f"channel open failed: {e.reason}", sent=False) from None
                if attempt == 11:
                    raise SshError(f"{self.vm}: cannot open an SSH channel: {e.reason}", vm=self.vm) from None
            except (OSError, asyncssh.Error) as e:
                raise Lost(f"channel open failed: {e}", sent=False) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise AssertionError("unreachable")

    async def run(self, conn: asyncssh.SSHClientConnection, req: Request, timeout: float, sess: ExecSession) -> int:
        """Run *req* on a channel of its own, its output going to *sess*; its exit status."""
        async with self.slots:
            chan = await self.open(conn, sess, exec_command(req))
            if req.stdin:
                chan.write(req.stdin)
            chan.write_eof()
            try:
                await asyncio.wait_for(asyncio.shield(sess.done), timeout)
            except asyncio.TimeoutError:
                await self.kill(conn, chan, sess, req.sudo)
                raise TimedOut(sess.stdout(), sess.stderr()) from None
            except asyncio.CancelledError:
                spawn(self.kill(conn, chan, sess, req.sudo))
                raise
        if sess.status is None:
            raise Lost("connection lost while the command ran", sent=True)
        return sess.status

    async def kill(
        self,
        conn: asyncssh.SSHClientConnection,
        chan: asyncssh.SSHClientChannel[bytes],
        sess: ExecSession,
        sudo: bool,
    ) -> None:
        """Kill an exec channel's process group (sshd won't signal root sessions): `kill -9 -PGID`.

        Runs on a new channel while the old one still counts against MaxSessions: fine, as exec
        channels are only used without the agent, whose channel slot is then free.
        """

        async def kill() -> None:
            if sess.pid is None or conn.is_closed():
                return
            killer = f"kill -9 -{sess.pid}"
            if sudo:
                killer = "sudo -n /bin/sh -c " + shlex.quote(killer)
            done = ExecSession()
            (await self.open(conn, done, killer + " 2>/dev/null")).write_eof()
            await done.done

        try:
            await asyncio.wait_for(kill(), 10)
        except (asyncio.TimeoutError, SshError, Lost) as e:
            log.info("%s: could not kill process group %s: %r", self.vm, sess.pid, e)
        chan.close()
