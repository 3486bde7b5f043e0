"""`Connection`: the command channel to one VM (run, files, wait for SSH, reboot) over one asyncssh
connection, opened lazily, kept, and reopened once, transparently, when a call finds it dropped.

A command runs on the agent (agent_channel.py) when the VM has python3, else on an exec channel of
its own (exec_channel.py); both give byte-identical results. File transfers are transfer.py's
tree walks over this connection's one SFTP client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh.agent_channel import AgentChannel, AgentSession
from pytest_ttenv.ssh.command import Request, RunOptions, build, check_options
from pytest_ttenv.ssh.connect import open_connection
from pytest_ttenv.ssh.errors import (
    Broken,
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    LimitExceeded,
    Lost,
    ProtocolError,
    Refused,
    SshError,
    TimedOut,
    Unreachable,
)
from pytest_ttenv.ssh.exec_channel import ExecChannels, ExecSession
from pytest_ttenv.ssh.loop import on_loop, register, started, sync
from pytest_ttenv.ssh.output import DEFAULT_MAX_OUTPUT, Capture, open_output
from pytest_ttenv.ssh.results import RunResult, SshTarget, short
from pytest_ttenv.ssh.transfer import (
    GET_MAX_BYTES,
    GET_MAX_ENTRIES,
    READ_TEXT_MAX,
    copy_name,
    get_tree,
    put_tree,
    read_file,
    write_file,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

BOOT_ID_CMD = "cat /proc/sys/kernel/random/boot_id"
T = TypeVar("T")


class Connection:
    """The command channel to one VM: opened lazily, kept open, reopened once if found dropped.

    Create one per VM per process. All methods are thread-safe; each sync method blocks its
    calling thread while the work runs on the shared loop. `close()` drops the connection; a
    later call opens a new one (use it after reverting a VM snapshot, whose TCP state is stale).
    """

    def __init__(
        self,
        target: SshTarget,
        *,
        default_timeout: float = 600.0,
        connect_timeout: float = 30.0,
        use_agent: bool = True,
    ) -> None:
        self.target = target
        self.default_timeout = default_timeout
        self.connect_timeout = connect_timeout
        self.use_agent = use_agent
        self._conn: asyncssh.SSHClientConnection | None = None
        self._conn_lock = asyncio.Lock()
        self._exec = ExecChannels(target.name)
        self._agent = AgentChannel(target.name, self._exec)
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._sftp_lock = asyncio.Lock()
        self._closes = 0  # close() calls so far: tells "closed by us" from "dropped"
        register(self)

    def __repr__(self) -> str:
        t = self.target
        return f"Connection({t.name!r}, {t.user}@{t.host}:{t.port})"

    @property
    def agent_pid(self) -> int | None:
        """The pid of the running agent on the VM, or None (not started, or not available)."""
        return self._agent.pid

    # -- public sync API ------------------------------------------------------------------

    def run(self, cmd: str | Sequence[str], **options: Unpack[RunOptions]) -> RunResult:
        """Run *cmd* (a string for /bin/sh -c, or an argv) on the VM and wait for its RunResult.

        *options* (`RunOptions`): timeout, check, env, cwd, input, sudo, max_output (bytes of each
        stream kept: head and tail, `RunResult.truncated`), stdout_file, stderr_file (a local file
        that receives that stream whole instead; its bytes in the RunResult are then b"").
        """
        check_options(options)
        return sync(self._arun(cmd, options))

    async def arun(self, cmd: str | Sequence[str], **options: Unpack[RunOptions]) -> RunResult:
        """Async twin of run(); may be awaited from any event loop."""
        check_options(options)
        return await on_loop(self._arun(cmd, options))

    def put(self, local: str | Path, remote: str) -> list[str]:
        """Copy a local file or directory (recursively) to *remote* over SFTP, like `cp -rp`.

        If *remote* is an existing directory the copy goes inside it; missing parent directories of
        *remote* are created; permission bits (not set-id/sticky bits) and times are preserved.
        Below the top, symlinks are reproduced only if relative and inside the copied tree, special
        files are skipped; the notes on what was skipped are logged and returned.
        """
        src = Path(local)
        if not src.exists():
            raise FileNotFoundError(f"put: no such local file or directory: {src}")
        notes = self._transfer(lambda sftp: put_tree(sftp, src, remote), f"put {src} -> {remote}")
        for n in notes:
            log.warning("%s: put %s: %s", self.target.name, src, n)
        return notes

    def get(
        self,
        remote: str,
        local: str | Path,
        *,
        max_bytes: int = GET_MAX_BYTES,
        max_entries: int = GET_MAX_ENTRIES,
    ) -> list[str]:
        """Copy a remote file or directory (recursively) to *local*, like `cp -rp`, safely.

        If *local* is an existing directory the copy goes inside it. The guest is not trusted:
        the tree is walked here (lstat/readdir, remote symlinks never followed below the path
        asked for), downloaded into a private directory next to the destination and moved into
        place only when complete; nothing is created, followed or written through a link that
        leaves the destination; set-id and sticky bits are dropped; special files are skipped;
        more than *max_bytes* of file data or *max_entries* directory entries raise LimitExceeded
        (nothing is left behind). Returns the notes on what was skipped (also logged).
        """
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("max_bytes and max_entries must be >= 0")
        dst = Path(local)
        target = dst / copy_name(remote, "get", remote) if dst.is_dir() else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        notes = self._transfer(
            lambda sftp: get_tree(sftp, remote, target, max_bytes, max_entries), f"get {remote} -> {dst}"
        )
        for n in notes:
            log.warning("%s: get %s: %s", self.target.name, remote, n)
        return notes

    def write_text(self, remote: str, text: str) -> None:
        """Write *text* (UTF-8) to the remote file, replacing it; parent directories are created."""
        sync(self._sftp_op(lambda sftp: write_file(sftp, remote, text.encode()), f"write {remote}"))

    def read_text(self, remote: str, *, max_size: int = READ_TEXT_MAX) -> str:
        """The remote file's content decoded as UTF-8 (strict); LimitExceeded beyond *max_size* bytes."""
        return self._transfer(lambda sftp: read_file(sftp, remote, max_size), f"read {remote}").decode()

    def wait_ssh(self, timeout: float) -> None:
        """Retry TCP connect, SSH banner, login and `true` until they work; else raise Unreachable."""
        sync(self._await_ssh(timeout))

    def reboot(self, timeout: float) -> None:
        """Reboot the VM and wait (at most *timeout* in all) until SSH works in the new boot."""
        sync(self._reboot(timeout))

    def close(self) -> None:
        """Close the SSH connection (and agent, SFTP); a later call reconnects."""
        if started():
            sync(self._aclose())

    # -- the connection -----------------------------------------------------------------

    def _err(self, cls: type[SshError], message: str) -> SshError:
        return cls(f"{self.target.name}: {message}", vm=self.target.name)

    async def _connected(
        self, slots: asyncio.Semaphore | None = None, timeout: float | None = None
    ) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._conn_lock:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._forget()
            gate: AbstractAsyncContextManager[Any] = slots if slots is not None else nullcontext()
            async with gate:
                self._conn = await open_connection(self.target, self.connect_timeout if timeout is None else timeout)
            return self._conn

    def _forget(self, conn: asyncssh.SSHClientConnection | None = None) -> None:
        """Drop the current connection (only if it is *conn*, when given) and what rides on it."""
        if conn is not None and conn is not self._conn:
            return
        self._agent.drop()
        if self._sftp is not None:
            self._sftp.exit()
        self._sftp = self._sftp_conn = None
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    async def _aclose(self) -> None:
        conn = self._conn
        self._closes += 1
        self._forget()
        self._agent.reset()
        if conn is not None:
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass

    # -- commands ---------------------------------------------------------------------------

    async def _arun(
        self, cmd: str | Sequence[str], options: RunOptions, slots: asyncio.Semaphore | None = None
    ) -> RunResult:
        """Run *cmd* with *options*; *slots* bounds connection and agent setups (fan_out)."""
        timeout = options.get("timeout")
        limit = min(self.default_timeout if timeout is None else timeout, 1e8)  # 1e8 s: no limit
        if not limit > 0:
            raise ValueError(f"timeout must be > 0, not {limit!r}")
        max_output = options.get("max_output")
        cap = DEFAULT_MAX_OUTPUT if max_output is None else max_output
        if not isinstance(cap, int) or cap < 0:
            raise ValueError(f"max_output must be an int >= 0, not {max_output!r}")
        req = build(
            cmd,
            options.get("env"),
            options.get("cwd"),
            options.get("input"),
            options.get("sudo", False),
            self.target.user,
        )
        stdout_file, stderr_file = options.get("stdout_file"), options.get("stderr_file")
        if stdout_file is not None and stderr_file is not None and os.fspath(stdout_file) == os.fspath(stderr_file):
            raise ValueError("stdout_file and stderr_file must differ")
        with open_output(stdout_file, "stdout") as out_f, open_output(stderr_file, "stderr") as err_f:
            return await self._arun_req(req, limit, options.get("check", False), slots, cap, out_f, err_f)

    async def _arun_req(
        self,
        req: Request,
        limit: float,
        check: bool,
        slots: asyncio.Semaphore | None,
        cap: int,
        out_f: IO[bytes] | None,
        err_f: IO[bytes] | None,
    ) -> RunResult:
        vm = self.target.name
        for attempt in (1, 2):
            conn = await self._connected(slots)
            closes = self._closes
            start = time.monotonic()
            agent: AgentSession | None = None
            try:
                agent = await self._agent.get(conn, slots, enabled=self.use_agent, hello_timeout=self.connect_timeout)
                if agent is not None:
                    out, err = Capture(cap, out_f), Capture(cap, err_f)
                    status, killed = await agent.run(req, limit, out, err)
                    if killed:
                        raise TimedOut(out.value(), err.value())
                else:
                    sess = ExecSession(cap, out_f, err_f)
                    status = await self._exec.run(conn, req, limit, sess)
                    out, err = sess.out, sess.err
                    sess.flush()
            except Broken as e:
                if agent is not None and self._agent.session is agent:
                    self._agent.disable(f"protocol violation: {e}")
                raise self._err(
                    ProtocolError,
                    f"agent protocol violation while running {short(req.display)!r}: {e} "
                    "(the command may have run; exec channels are used from now on)",
                ) from None
            except Lost as e:
                if self._closes != closes:
                    what = f"connection closed by close() while running {short(req.display)!r}"
                    raise self._err(Unreachable, what) from None
                if conn.is_closed():
                    self._forget(conn)
                if e.sent or attempt == 2:
                    raise self._err(Unreachable, f"connection lost while running {short(req.display)!r}: {e}") from None
                log.info("%s: connection found dropped (%s); reconnecting", vm, e)
                continue
            except TimedOut as e:
                raise CommandTimeout(
                    f"{vm}: command {short(req.display)!r} timed out after {limit:g} s (its process group was killed)",
                    vm=vm,
                    command=req.display,
                    timeout=limit,
                    stdout_bytes=e.stdout,
                    stderr_bytes=e.stderr,
                ) from None
            for c, f, name in ((out, out_f, "stdout"), (err, err_f, "stderr")):
                if c.error is not None:
                    path = getattr(f, "name", "?")
                    raise self._err(SshError, f"cannot write {name} of {short(req.display)!r} to {path}: {c.error}")
            truncated = out.truncated or err.truncated
            result = RunResult(req.display, status, out.value(), err.value(), time.monotonic() - start, vm, truncated)
            if check and not result.ok:
                raise CommandFailed(result)
            return result
        raise AssertionError("unreachable")

    # -- files ----------------------------------------------------------------------------

    def _transfer(self, op: Callable[[asyncssh.SFTPClient], Awaitable[T]], what: str) -> T:
        """_sftp_op, with Refused and local OSErrors as this module's errors."""

        async def guarded(sftp: asyncssh.SFTPClient) -> T:
            try:
                return await op(sftp)
            except Refused as e:
                raise self._err(LimitExceeded if e.limit else SshError, f"{what}: {e}") from None
            except OSError as e:
                where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
                raise self._err(SshError, f"{what}: {e.strerror or e}{where}") from None

        return sync(self._sftp_op(guarded, what))

    async def _sftp_op(self, op: Callable[[asyncssh.SFTPClient], Awaitable[T]], what: str) -> T:
        """Run *op* with this connection's SFTP client (opened once), within default_timeout."""
        for attempt in (1, 2):
            conn = await self._connected()
            try:
                async with self._sftp_lock:
                    if self._sftp is None or self._sftp_conn is not conn:
                        self._sftp = await conn.start_sftp_client()
                        self._sftp_conn = conn
                    sftp = self._sftp
                return await asyncio.wait_for(op(sftp), self.default_timeout)
            except asyncio.TimeoutError:
                raise CommandTimeout(
                    f"{self.target.name}: {what} timed out after {self.default_timeout:g} s",
                    vm=self.target.name,
                    command=what,
                    timeout=self.default_timeout,
                ) from None
            except (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.ConnectionLost) as e:
                if conn.is_closed():
                    self._forget(conn)
                elif self._sftp_conn is conn:  # only the SFTP server went away
                    self._sftp = self._sftp_conn = None
                if attempt == 2:
                    raise self._err(Unreachable, f"{what}: connection lost: {e}") from None
            except asyncssh.SFTPError as e:
                raise self._err(SshError, f"{what}: {e.reason}") from None
            except (asyncssh.ChannelOpenError, asyncssh.DisconnectError) as e:
                if not conn.is_closed() or attempt == 2:
                    raise self._err(SshError, f"{what}: SFTP unavailable: {e}") from None
                self._forget(conn)
        raise AssertionError("unreachable")

    # -- boot and reboot ------------------------------------------------------------------

    async def _await_ssh(self, timeout: float) -> None:
        t = self.target
        deadline = time.monotonic() + timeout
        delay = 0.25
        last = "nothing tried"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._err(
                    Unreachable,
                    f"SSH not ready at {t.user}@{t.host}:{t.port} after {timeout:g} s "
                    f"(waited for TCP connect, SSH banner, login and `true`); last: {last}",
                )
            try:
                await self._connected(timeout=min(self.connect_timeout, left))
                r = await self._arun("true", {"timeout": max(1.0, min(30.0, left))})
                if r.ok:
                    return
                last = f"`true` exited with status {r.exit_status}"
            except HostKeyMismatch:
                raise
            except SshError as e:
                last = str(e).removeprefix(f"{t.name}: ")
                self._forget()
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    async def _reboot(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        async def boot_id() -> str:
            return (await self._arun(BOOT_ID_CMD, {"timeout": 30})).stdout.strip()

        before = await boot_id()
        conn = await self._connected()
        cmd = "reboot" if self.target.user == "root" else "sudo -n reboot"
        sess = ExecSession()
        try:  # don't wait for its exit status: the reboot may take sshd down before it reports one
            (await self._exec.open(conn, sess, cmd)).write_eof()
        except Lost as e:
            raise self._err(Unreachable, f"cannot issue reboot: {e}") from None
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            limit = max(0.0, min(60.0, deadline - time.monotonic()))
            await asyncio.wait([closed, sess.done], timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if sess.done.done() and not closed.done() and sess.status not in (None, 0):
                tail = sess.stderr().decode(errors="replace").strip()
                raise self._err(SshError, f"{cmd!r} failed with exit status {sess.status}: {short(tail)}")
            await asyncio.wait_for(asyncio.shield(closed), max(0.0, min(60.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            log.info("%s: connection still open after reboot; checking the boot id", self.target.name)
        finally:
            closed.cancel()
        self._forget(conn)
        while True:
            await self._await_ssh(max(0.0, deadline - time.monotonic()))
            after = await boot_id()
            if not before or after != before:
                return
            self._forget()
            if time.monotonic() > deadline:
                raise self._err(Unreachable, f"did not reboot within {timeout:g} s (same boot id)")
            await asyncio.sleep(1.0)
