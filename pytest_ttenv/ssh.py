"""The command channel to a VM: run / put / get / fan-out over one asyncssh connection per VM.

Contracts (details in docs/ssh.md):
- One asyncio loop runs in a daemon thread per process (`loop()`); every `Connection` does its I/O
  there, so the sync API is safe from any number of threads, and `arun` is its async twin.
- Host keys are checked strictly against `SshTarget.host_key` only; no file under ~/.ssh is read or
  written, no ssh-agent is used, no agent forwarding, no TOFU.
- A string command runs as `/bin/sh -c CMD`; a sequence is `shlex.join`ed first. `env` adds
  exported variables, `cwd` is entered with `cd` (failing like `cd` does), `sudo` prefixes
  `sudo -n` unless the user is root. Exit status: the command's, or 128+N if it died of signal N.
- Every call has a timeout (`default_timeout` when None); on expiry the remote process group is
  killed and `CommandTimeout` is raised.
- Fast path: a python3 agent (`ssh_agent.py`) started over one exec channel per connection
  multiplexes commands; without python3 on the VM, plain exec channels are used (at most
  `EXEC_CHANNELS` at once per connection). Both give byte-identical results.
- A connection found dropped (sshd restarted, VM rebooted) is reopened once, transparently, for
  the next call; a connection that drops while a command runs raises `Unreachable`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import importlib.resources
import logging
import os
import posixpath
import re
import resource
import shlex
import signal
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh_agent import EXIT, HDR, HELLO, KILL, OUT, RUN, pack, unpack

__all__ = [
    "CommandFailed",
    "CommandTimeout",
    "Connection",
    "HostKeyMismatch",
    "RunResult",
    "SshError",
    "SshTarget",
    "Unreachable",
    "close_all",
    "fan_out",
    "loop",
]

log = logging.getLogger(__name__)

EXEC_CHANNELS = 8  # sshd's MaxSessions defaults to 10 per connection: agent + sftp + 8
AGENT_GRACE = 5.0  # how long past a command's timeout to wait for the agent's own verdict
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_COUNT_MAX = 8  # a silent peer is declared dead after ~2 minutes
_BOOT_ID_CMD = "cat /proc/sys/kernel/random/boot_id"
_KEX_ALGS = (
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group14-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group14-sha1",
)
_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
# Words a shell gives a meaning of its own (keywords and builtins of dash, and of bash for systems
# whose /bin/sh is bash): a command starting with one is never exec'd directly.
_SHELL_WORDS = frozenset(
    "! { } [[ ]] case do done elif else esac fi for function if in select then time until while "
    ". : [ alias bg bind break builtin caller cd chdir command compgen complete compopt continue "
    "coproc declare dirs disown echo enable eval exec exit export false fc fg getopts hash help "
    "history jobs kill let local logout mapfile popd printf pushd pwd read readarray readonly "
    "return set shift shopt source suspend test times trap true type typeset ulimit umask unalias "
    "unset wait".split()
)
_SIMPLE = re.compile(r"[ \t]*[A-Za-z0-9_./,:@%+=-]+(?:[ \t]+[A-Za-z0-9_./,:@%+=-]+)*[ \t]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PID_MARK = re.compile(rb"\x1e([0-9]{1,10})\x1e")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class SshTarget:
    """Everything needed to reach one VM; `host_key` is its public host key as one OpenSSH line."""

    name: str
    host: str
    port: int
    user: str
    client_key: Path
    host_key: str


@dataclass(frozen=True, repr=False)
class RunResult:
    """What a command did; bytes are exact, `stdout`/`stderr` decode UTF-8 with replacement."""

    command: str
    exit_status: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    vm: str

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def __repr__(self) -> str:
        return (
            f"RunResult(vm={self.vm!r}, command={_short(self.command)!r}, "
            f"exit_status={self.exit_status}, stdout={_short(self.stdout)!r}, "
            f"stderr={_short(self.stderr)!r}, duration={self.duration:.3f})"
        )


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SshError(Exception):
    """Base of this module's errors; `str()` is one line that starts with the VM's name."""

    def __init__(self, message: str, *, vm: str = "") -> None:
        super().__init__(message)
        self.vm = vm


class HostKeyMismatch(SshError):
    """The server presented a host key other than `SshTarget.host_key`."""


class Unreachable(SshError):
    """No working SSH session: refused, no banner, login refused, timed out, or connection lost."""


class CommandTimeout(SshError):
    """The command outlived its timeout; its process group was killed. Partial output attached."""

    def __init__(
        self,
        message: str,
        *,
        vm: str = "",
        command: str = "",
        timeout: float = 0.0,
        stdout_bytes: bytes = b"",
        stderr_bytes: bytes = b"",
    ) -> None:
        super().__init__(message, vm=vm)
        self.command = command
        self.timeout = timeout
        self.stdout_bytes = stdout_bytes
        self.stderr_bytes = stderr_bytes


class CommandFailed(SshError):
    """A `check=True` command exited non-zero; `.result` is its RunResult."""

    def __init__(self, result: RunResult) -> None:
        tail = [line.strip() for line in result.stderr.strip().splitlines()[-5:] if line.strip()]
        message = f"{result.vm}: command {_short(result.command)!r} failed with exit status {result.exit_status}"
        if tail:
            message += "; stderr: " + _short(" | ".join(tail), 500)
        super().__init__(message, vm=result.vm)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (CommandFailed, (self.result,))


class _Lost(Exception):
    """The connection or the agent went away; `sent`: the command may have started."""

    def __init__(self, why: str, *, sent: bool) -> None:
        super().__init__(why)
        self.sent = sent


class _TimedOut(Exception):
    def __init__(self, stdout: bytes, stderr: bytes) -> None:
        super().__init__("timed out")
        self.stdout = stdout
        self.stderr = stderr


# ---------------------------------------------------------------------------------------------
# the event loop thread

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_thread: threading.Thread | None = None
_loop_pid = 0
_registry: weakref.WeakSet[Connection] = weakref.WeakSet()
_background: set[asyncio.Task[Any]] = set()


def loop() -> asyncio.AbstractEventLoop:
    """The process's one SSH event loop, running in a daemon thread (started on first use)."""
    global _loop, _loop_thread, _loop_pid
    with _loop_lock:
        if _loop is None or _loop_pid != os.getpid() or not _loop_thread or not _loop_thread.is_alive():
            lp = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                # Signals go to the main thread: one taken here would leave the main thread
                # blocked in a lock wait, its Ctrl-C handler not run until the command ends.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                asyncio.set_event_loop(lp)
                lp.call_soon(ready.set)
                lp.run_forever()

            thread = threading.Thread(target=run, name="ttenv-ssh-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _loop_thread, _loop_pid = lp, thread, os.getpid()
        return _loop


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run *coro* on the shared loop and wait for it from this (non-loop) thread."""
    lp = loop()
    if threading.current_thread() is _loop_thread:
        coro.close()
        raise RuntimeError("pytest_ttenv.ssh: sync call from the SSH loop thread; use arun()")
    fut = asyncio.run_coroutine_threadsafe(coro, lp)
    try:
        while True:  # short waits, so a signal taken by any other thread still interrupts us
            try:
                return fut.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue
    except BaseException:
        fut.cancel()
        raise


def _spawn(coro: Coroutine[Any, Any, Any]) -> None:
    """Run *coro* in the background on the current loop (kept referenced until done)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def close_all() -> None:
    """Close every Connection of this process (registered with atexit)."""
    lp, thread = _loop, _loop_thread
    if lp is None or thread is None or not thread.is_alive() or _loop_pid != os.getpid():
        return
    conns = list(_registry)

    async def close() -> None:
        await asyncio.gather(*(c._aclose() for c in conns), return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(close(), lp).result(timeout=10)
    except Exception as e:  # noqa: BLE001 - best effort at exit
        log.debug("close_all: %s", e)


atexit.register(close_all)


# ---------------------------------------------------------------------------------------------
# building a request


@dataclass(frozen=True)
class _Request:
    display: str  # the command as the user gave it (a sequence shlex-joined)
    script: str  # what /bin/sh -c runs: cd, exports, sudo wrapper, command
    argv: list[str] | None  # run directly (no shell) when it resolves on the VM's PATH
    env: dict[str, str]  # for the direct argv run only (the script exports them itself)
    stdin: bytes
    sudo: bool


def _build(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    input: str | bytes | None,
    sudo: bool,
    user: str,
) -> _Request:
    if isinstance(cmd, str):
        display = cmd
        words = cmd.split() if _SIMPLE.fullmatch(cmd) else None
    else:
        argv = list(cmd)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"command must be a non-empty sequence of str, not {cmd!r}")
        display = shlex.join(argv)
        words = argv
    envd = dict(env or {})
    for k, v in envd.items():
        if not _ENV_NAME.fullmatch(k) or not isinstance(v, str):
            raise ValueError(f"bad environment variable {k!r}={v!r}")
    for text in (display, cwd or "", *envd.values()):
        if "\0" in text:
            raise ValueError("NUL byte in command, cwd or env")
    parts = []
    if cwd is not None:
        parts.append(f"cd -- {shlex.quote(cwd)} || exit")
    if envd:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in envd.items()))
    script = "; ".join([*parts, display])
    if cwd is not None or not words or words[0] in _SHELL_WORDS or "=" in words[0]:
        words = None
    sudo = sudo and user != "root"
    if sudo:
        words = ["sudo", "-n", "/bin/sh", "-c", script]
        script = "sudo -n /bin/sh -c " + shlex.quote(script)
        envd = {}
    data = input.encode() if isinstance(input, str) else (input or b"")
    return _Request(display, script, words, envd, data, sudo)


def _exec_command(req: _Request) -> str:
    """The exec-channel command: report the session's pid (for kill) on stderr, then run sh."""
    return f"printf '\\036%d\\036' $$ >&2; exec /bin/sh -c {shlex.quote(req.script)}"


@functools.cache
def _agent_source() -> bytes:
    return importlib.resources.files("pytest_ttenv").joinpath("ssh_agent.py").read_bytes()


def _agent_command(size: int) -> str:
    boot = (
        f"import os\nn={size}\nb=b''\nwhile len(b)<n:\n c=os.read(0,n-len(b))\n"
        " if not c:raise SystemExit(1)\n b+=c\nexec(compile(b,'ttagent','exec'))"
    )
    # the two words tell the agent whether LC_CTYPE was set: Python's C-locale coercion (PEP 538)
    # sets it in the agent's own environment, and children must not inherit that
    return "exec python3 -I -S -c " + shlex.quote(boot) + ' "${LC_CTYPE+set}" "${LC_CTYPE-}"'


def _signal_status(name: str) -> int:
    try:
        return 128 + signal.Signals["SIG" + name].value
    except KeyError:
        return 255


# ---------------------------------------------------------------------------------------------
# asyncssh sessions


class _Client(asyncssh.SSHClient):
    """Records the host key a server presented when it was not the expected one."""

    def __init__(self) -> None:
        self.presented: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.presented = key
        return False


class _ExecSession(asyncssh.SSHClientSession[bytes]):
    """Collects one exec channel's output and exit status."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.status: int | None = None
        self.pid: int | None = None
        self.mark: tuple[int, int] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.err += data
            if self.mark is None:  # the login shell's printf comes first; look at the start only
                m = _PID_MARK.search(self.err, 0, 4096)
                if m:
                    self.pid, self.mark = int(m.group(1)), m.span()
                elif len(self.err) >= 4096:
                    self.mark = (0, 0)
        else:
            self.out += data

    def exit_status_received(self, status: int) -> None:
        self.status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.status = _signal_status(signal)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def stderr(self) -> bytes:
        if self.mark is not None:
            a, b = self.mark
            del self.err[a:b]
            self.mark = (0, 0)
        return bytes(self.err)


@dataclass
class _Pending:
    fut: asyncio.Future[tuple[int, bytes]]
    out: bytearray
    err: bytearray


class _AgentSession(asyncssh.SSHClientSession[bytes]):
    """Client side of the agent protocol (see ssh_agent.py) over one exec channel."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.buf = bytearray()
        self.pending: dict[int, _Pending] = {}
        self.hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.closed = False
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
        buf = self.buf
        buf += data
        hsize = HDR.size
        while len(buf) >= hsize:
            typ, rid, n = HDR.unpack_from(buf, 0)
            if len(buf) < hsize + n:
                break
            p = self.pending.get(rid)
            if typ == EXIT:
                status, flags = unpack(bytes(buf[hsize : hsize + n]))
                if p is not None:
                    del self.pending[rid]
                    if not p.fut.done():
                        p.fut.set_result((int(status), flags))
            elif p is not None:
                with memoryview(buf) as view:
                    (p.out if typ == OUT else p.err).extend(view[hsize : hsize + n])
            elif typ == HELLO and not self.hello.done():
                self.hello.set_result(bytes(buf[hsize : hsize + n]))
            del buf[: hsize + n]

    def exit_status_received(self, status: int) -> None:
        self.exit = f"exit status {status}"

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit = f"killed by SIG{signal}"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = f"agent channel closed ({self.exit or exc or 'no exit status'})"
        if not self.hello.done():
            self.hello.set_result(b"")  # b"": it never said hello
        for p in self.pending.values():
            if not p.fut.done():
                p.fut.set_exception(_Lost(why, sent=True))
        self.pending.clear()

    def _send(self, typ: int, rid: int, payload: bytes) -> None:
        assert self.chan is not None
        self.chan.write(HDR.pack(typ, rid, len(payload)))
        if payload:
            self.chan.write(payload)

    async def run(self, req: _Request, timeout: float) -> tuple[int, bytes, bytes, bool]:
        """Run *req*; returns (status, stdout, stderr, killed)."""
        if self.closed or self.chan is None:
            raise _Lost("agent channel closed", sent=False)
        self._next = self._next % 0xFFFFFFFF + 1
        rid = self._next
        p = _Pending(asyncio.get_running_loop().create_future(), bytearray(), bytearray())
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
            raise _Lost(f"agent channel: {e}", sent=False) from None
        self.pending[rid] = p
        try:
            status, flags = await asyncio.wait_for(p.fut, timeout + AGENT_GRACE)
        except asyncio.TimeoutError:
            self._kill(rid)
            raise _TimedOut(bytes(p.out), bytes(p.err)) from None
        except asyncio.CancelledError:
            self._kill(rid)
            raise
        return status, bytes(p.out), bytes(p.err), b"t" in flags

    def _kill(self, rid: int) -> None:
        self.pending.pop(rid, None)
        if not self.closed:
            try:
                self._send(KILL, rid, b"")
            except (OSError, asyncssh.Error):
                pass


# ---------------------------------------------------------------------------------------------
# the connection

_options_cache: dict[tuple[str, str, int, str], asyncssh.SSHClientConnectionOptions] = {}
_options_lock = threading.Lock()


def _options(target: SshTarget) -> asyncssh.SSHClientConnectionOptions:
    """asyncssh options for *target* (cached: fan-out targets usually share key and host key)."""
    try:
        mtime = os.stat(target.client_key).st_mtime_ns
    except OSError:
        mtime = 0
    key = (target.user, str(target.client_key), mtime, target.host_key.strip())
    with _options_lock:
        opts = _options_cache.get(key)
        if opts is not None:
            return opts
        try:
            client_key = asyncssh.read_private_key(target.client_key)
        except (OSError, asyncssh.KeyImportError, ValueError) as e:
            raise SshError(f"{target.name}: cannot read client key {target.client_key}: {e}", vm=target.name) from None
        try:
            host_key = asyncssh.import_public_key(target.host_key.strip())
        except (asyncssh.KeyImportError, ValueError) as e:
            raise SshError(f"{target.name}: bad host key {target.host_key!r}: {e}", vm=target.name) from None
        opts = asyncssh.SSHClientConnectionOptions(
            username=target.user,
            client_keys=[client_key],
            known_hosts=([host_key], [], []),
            config=None,
            agent_path=None,
            agent_forwarding=False,
            x509_trusted_certs=None,
            x509_trusted_cert_paths=None,
            gss_host=None,
            gss_kex=False,
            gss_auth=False,
            kbdint_auth=False,
            password_auth=False,
            host_based_auth=False,
            preferred_auth="publickey",
            kex_algs=list(_KEX_ALGS),
            encryption_algs=list(_CIPHERS),
            compression_algs=None,
            keepalive_interval=KEEPALIVE_INTERVAL,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
        )
        _options_cache[key] = opts
        return opts


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
        self._agent: _AgentSession | None = None
        self._agent_lock = asyncio.Lock()
        self._agent_off = ""  # why the agent is not used ("" while it may be)
        self._agent_deaths = 0
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._sftp_lock = asyncio.Lock()
        self._exec_slots = asyncio.Semaphore(EXEC_CHANNELS)
        self._closes = 0  # close() calls so far: tells "closed by us" from "dropped"
        _registry.add(self)

    def __repr__(self) -> str:
        t = self.target
        return f"Connection({t.name!r}, {t.user}@{t.host}:{t.port})"

    @property
    def agent_pid(self) -> int | None:
        """The pid of the running agent on the VM, or None (not started, or not available)."""
        a = self._agent
        return a.pid if a is not None and not a.closed else None

    # -- public sync API ------------------------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: str | bytes | None = None,
        sudo: bool = False,
    ) -> RunResult:
        """Run *cmd* on the VM and wait for it; see the module docstring for semantics."""
        return _sync(self._arun(cmd, timeout=timeout, check=check, env=env, cwd=cwd, input=input, sudo=sudo))

    async def arun(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None = None,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        input: str | bytes | None = None,
        sudo: bool = False,
    ) -> RunResult:
        """Async twin of run(); may be awaited from any event loop."""
        coro = self._arun(cmd, timeout=timeout, check=check, env=env, cwd=cwd, input=input, sudo=sudo)
        lp = loop()
        if asyncio.get_running_loop() is lp:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, lp))

    def put(self, local: str | Path, remote: str) -> None:
        """Copy a local file or directory (recursively) to *remote* over SFTP, like `cp -rp`.

        If *remote* is an existing directory the copy goes inside it; missing parent directories of
        *remote* are created; modes and times are preserved.
        """
        src = Path(local)
        if not src.exists():
            raise FileNotFoundError(f"put: no such local file or directory: {src}")

        async def op(sftp: asyncssh.SFTPClient) -> None:
            parent = posixpath.dirname(remote.rstrip("/"))
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            await sftp.put(str(src), remote, recurse=True, preserve=True)

        _sync(self._sftp_op(op, f"put {src} -> {remote}"))

    def get(self, remote: str, local: str | Path) -> None:
        """Copy a remote file or directory (recursively) to *local*, like `cp -rp`."""
        dst = Path(local)
        dst.parent.mkdir(parents=True, exist_ok=True)

        async def op(sftp: asyncssh.SFTPClient) -> None:
            await sftp.get(remote, str(dst), recurse=True, preserve=True)

        _sync(self._sftp_op(op, f"get {remote} -> {dst}"))

    def write_text(self, remote: str, text: str) -> None:
        """Write *text* (UTF-8) to the remote file, replacing it; parent directories are created."""

        async def op(sftp: asyncssh.SFTPClient) -> None:
            parent = posixpath.dirname(remote.rstrip("/"))
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            async with sftp.open(remote, "wb") as f:
                await f.write(text.encode())

        _sync(self._sftp_op(op, f"write {remote}"))

    def read_text(self, remote: str) -> str:
        """The remote file's content decoded as UTF-8 (strict)."""

        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            async with sftp.open(remote, "rb") as f:
                data: bytes = await f.read()
                return data

        data = _sync(self._sftp_op(op, f"read {remote}"))
        return data.decode()

    def wait_ssh(self, timeout: float) -> None:
        """Retry TCP connect, SSH banner, login and `true` until they work; else raise Unreachable."""
        _sync(self._await_ssh(timeout))

    def reboot(self, timeout: float) -> None:
        """Reboot the VM and wait (at most *timeout* in all) until SSH works in the new boot."""
        _sync(self._reboot(timeout))

    def close(self) -> None:
        """Close the SSH connection (and agent, SFTP); a later call reconnects."""
        if _loop is not None and _loop_pid == os.getpid():
            _sync(self._aclose())

    # -- internals ----------------------------------------------------------------------

    def _err(self, cls: type[SshError], message: str) -> SshError:
        return cls(f"{self.target.name}: {message}", vm=self.target.name)

    async def _open(self, timeout: float) -> asyncssh.SSHClientConnection:
        t = self.target
        where = f"{t.user}@{t.host}:{t.port}"
        client = _Client()
        try:
            opts = _options(t)
            return await asyncio.wait_for(
                asyncssh.connect(t.host, t.port, options=opts, client_factory=lambda: client), timeout
            )
        except asyncssh.HostKeyNotVerifiable:
            got = client.presented
            shown = f"{got.get_algorithm()} {got.get_fingerprint()}" if got is not None else "another key"
            expected = asyncssh.import_public_key(t.host_key.strip())
            raise self._err(
                HostKeyMismatch,
                f"host key mismatch at {t.host}:{t.port}: expected {expected.get_algorithm()} "
                f"{expected.get_fingerprint()}, server presented {shown} (wrong VM on this port?)",
            ) from None
        except asyncssh.KeyExchangeFailed as e:
            cls = HostKeyMismatch if "host key" in str(e).lower() else Unreachable
            raise self._err(cls, f"SSH key exchange with {t.host}:{t.port} failed: {e}") from None
        except asyncssh.PermissionDenied:
            raise self._err(Unreachable, f"login refused at {where} (public key {t.client_key} not accepted)") from None
        except asyncio.TimeoutError:
            raise self._err(
                Unreachable, f"no SSH session with {where} within {timeout:g} s (TCP, banner or login)"
            ) from None
        except ConnectionRefusedError:
            raise self._err(Unreachable, f"connection refused at {t.host}:{t.port}") from None
        except (OSError, asyncssh.Error) as e:
            raise self._err(Unreachable, f"cannot open SSH to {where}: {type(e).__name__}: {e or 'closed'}") from None

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
                self._conn = await self._open(self.connect_timeout if timeout is None else timeout)
            return self._conn

    def _forget(self, conn: asyncssh.SSHClientConnection | None = None) -> None:
        """Drop the current connection (only if it is *conn*, when given) and what rides on it."""
        if conn is not None and conn is not self._conn:
            return
        if self._agent is not None and self._agent.chan is not None:
            self._agent.chan.close()
        self._agent = None
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
        self._agent_off = ""
        self._agent_deaths = 0
        if conn is not None:
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass

    async def _agent_for(
        self, conn: asyncssh.SSHClientConnection, slots: asyncio.Semaphore | None
    ) -> _AgentSession | None:
        a = self._agent
        if a is not None and not a.closed and a.conn is conn:
            return a
        if not self.use_agent or self._agent_off:
            return None
        async with self._agent_lock:
            a = self._agent
            if a is not None and not a.closed and a.conn is conn:
                return a
            if self._agent_off:
                return None
            if a is not None and a.conn is conn:  # it died on a live connection
                self._agent_deaths += 1
                log.info("%s: agent ended (%s)", self.target.name, a.exit or "?")
                if self._agent_deaths >= 3:
                    self._disable_agent(f"it ended {self._agent_deaths} times")
                    return None
            gate: AbstractAsyncContextManager[Any] = slots if slots is not None else nullcontext()
            async with gate:
                a = await self._start_agent(conn)
            self._agent = a
            return a

    async def _start_agent(self, conn: asyncssh.SSHClientConnection) -> _AgentSession | None:
        src = _agent_source()
        sess = _AgentSession(conn)
        try:
            chan = await self._open_channel(conn, sess, _agent_command(len(src)))
        except SshError as e:
            self._disable_agent(str(e).removeprefix(f"{self.target.name}: "))
            return None
        try:
            chan.write(src)
        except (OSError, asyncssh.Error):
            pass  # it ended at once; sess.hello tells
        try:
            hello = await asyncio.wait_for(sess.hello, self.connect_timeout)
        except asyncio.TimeoutError:
            hello = b""
        if not hello:
            chan.close()
            if conn.is_closed():
                raise _Lost("connection closed while starting the agent", sent=False)
            err = sess.stderr_tail.decode(errors="replace").strip().splitlines()
            why = sess.exit or "no answer"
            self._disable_agent(why + (f": {err[-1]}" if err else ""))
            return None
        m = re.search(rb"pid=(\d+)", hello)
        sess.pid = int(m.group(1)) if m else None
        log.debug("%s: agent up: %s", self.target.name, hello.decode(errors="replace"))
        return sess

    def _disable_agent(self, why: str) -> None:
        self._agent_off = why
        log.info("%s: python3 agent unavailable (%s); using exec channels", self.target.name, why)

    async def _open_channel(
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
                    raise _Lost(f"channel open failed: {e.reason}", sent=False) from None
                if attempt == 11:
                    raise self._err(SshError, f"cannot open an SSH channel: {e.reason}") from None
            except (OSError, asyncssh.Error) as e:
                raise _Lost(f"channel open failed: {e}", sent=False) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise AssertionError("unreachable")

    async def _exec(
        self, conn: asyncssh.SSHClientConnection, req: _Request, timeout: float
    ) -> tuple[int, bytes, bytes]:
        async with self._exec_slots:
            sess = _ExecSession()
            chan = await self._open_channel(conn, sess, _exec_command(req))
            if req.stdin:
                chan.write(req.stdin)
            chan.write_eof()
            try:
                await asyncio.wait_for(asyncio.shield(sess.done), timeout)
            except asyncio.TimeoutError:
                await self._exec_kill(conn, chan, sess, req.sudo)
                raise _TimedOut(bytes(sess.out), sess.stderr()) from None
            except asyncio.CancelledError:
                _spawn(self._exec_kill(conn, chan, sess, req.sudo))
                raise
        if sess.status is None:
            raise _Lost("connection lost while the command ran", sent=True)
        return sess.status, bytes(sess.out), sess.stderr()

    async def _exec_kill(
        self,
        conn: asyncssh.SSHClientConnection,
        chan: asyncssh.SSHClientChannel[bytes],
        sess: _ExecSession,
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
            done = _ExecSession()
            (await self._open_channel(conn, done, killer + " 2>/dev/null")).write_eof()
            await done.done

        try:
            await asyncio.wait_for(kill(), 10)
        except (asyncio.TimeoutError, SshError, _Lost) as e:
            log.info("%s: could not kill process group %s: %r", self.target.name, sess.pid, e)
        chan.close()

    async def _arun(
        self,
        cmd: str | Sequence[str],
        *,
        timeout: float | None,
        check: bool,
        env: Mapping[str, str] | None,
        cwd: str | None,
        input: str | bytes | None,
        sudo: bool,
        slots: asyncio.Semaphore | None = None,
    ) -> RunResult:
        limit = min(self.default_timeout if timeout is None else timeout, 1e8)  # 1e8 s: no limit
        if not limit > 0:
            raise ValueError(f"timeout must be > 0, not {limit!r}")
        req = _build(cmd, env, cwd, input, sudo, self.target.user)
        vm = self.target.name
        for attempt in (1, 2):
            conn = await self._connected(slots)
            closes = self._closes
            start = time.monotonic()
            try:
                agent = await self._agent_for(conn, slots)
                if agent is not None:
                    status, out, err, killed = await agent.run(req, limit)
                    if killed:
                        raise _TimedOut(out, err)
                else:
                    status, out, err = await self._exec(conn, req, limit)
            except _Lost as e:
                if self._closes != closes:
                    what = f"connection closed by close() while running {_short(req.display)!r}"
                    raise self._err(Unreachable, what) from None
                if conn.is_closed():
                    self._forget(conn)
                if e.sent or attempt == 2:
                    raise self._err(
                        Unreachable, f"connection lost while running {_short(req.display)!r}: {e}"
                    ) from None
                log.info("%s: connection found dropped (%s); reconnecting", vm, e)
                continue
            except _TimedOut as e:
                raise CommandTimeout(
                    f"{vm}: command {_short(req.display)!r} timed out after {limit:g} s (its process group was killed)",
                    vm=vm,
                    command=req.display,
                    timeout=limit,
                    stdout_bytes=e.stdout,
                    stderr_bytes=e.stderr,
                ) from None
            result = RunResult(req.display, status, out, err, time.monotonic() - start, vm)
            if check and not result.ok:
                raise CommandFailed(result)
            return result
        raise AssertionError("unreachable")

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
                r = await self._arun(
                    "true",
                    timeout=max(1.0, min(30.0, left)),
                    check=False,
                    env=None,
                    cwd=None,
                    input=None,
                    sudo=False,
                )
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

        async def quick(cmd: str) -> RunResult:
            return await self._arun(cmd, timeout=30, check=False, env=None, cwd=None, input=None, sudo=False)

        before = (await quick(_BOOT_ID_CMD)).stdout.strip()
        conn = await self._connected()
        cmd = "reboot" if self.target.user == "root" else "sudo -n reboot"
        sess = _ExecSession()
        try:  # don't wait for its exit status: the reboot may take sshd down before it reports one
            (await self._open_channel(conn, sess, cmd)).write_eof()
        except _Lost as e:
            raise self._err(Unreachable, f"cannot issue reboot: {e}") from None
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            limit = max(0.0, min(60.0, deadline - time.monotonic()))
            await asyncio.wait([closed, sess.done], timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if sess.done.done() and not closed.done() and sess.status not in (None, 0):
                tail = sess.stderr().decode(errors="replace").strip()
                raise self._err(SshError, f"{cmd!r} failed with exit status {sess.status}: {_short(tail)}")
            await asyncio.wait_for(asyncio.shield(closed), max(0.0, min(60.0, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            log.info("%s: connection still open after reboot; checking the boot id", self.target.name)
        finally:
            closed.cancel()
        self._forget(conn)
        while True:
            await self._await_ssh(max(0.0, deadline - time.monotonic()))
            after = (await quick(_BOOT_ID_CMD)).stdout.strip()
            if not before or after != before:
                return
            self._forget()
            if time.monotonic() > deadline:
                raise self._err(Unreachable, f"did not reboot within {timeout:g} s (same boot id)")
            await asyncio.sleep(1.0)


# ---------------------------------------------------------------------------------------------
# fan-out


def _raise_nofile(need: int) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one if *need* more descriptors may not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need + 256:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d: %s", soft, e)


def fan_out(
    conns: Sequence[Connection],
    cmd: str,
    *,
    timeout: float | None = None,
    max_concurrent_connects: int = 50,
) -> dict[str, RunResult | SshError]:
    """Run *cmd* on every connection at once; {VM name: RunResult, or the SshError it raised}.

    At most *max_concurrent_connects* connections (and agent starts) are set up at a time; once
    connected, commands run concurrently without a bound. Names must be unique.
    """
    names = [c.target.name for c in conns]
    if len(set(names)) != len(names):
        raise ValueError("fan_out: VM names must be unique")
    _raise_nofile(2 * len(conns))

    async def run_all() -> list[RunResult | SshError]:
        slots = asyncio.Semaphore(max_concurrent_connects)

        async def one(c: Connection) -> RunResult | SshError:
            try:
                return await c._arun(
                    cmd,
                    timeout=timeout,
                    check=False,
                    env=None,
                    cwd=None,
                    input=None,
                    sudo=False,
                    slots=slots,
                )
            except SshError as e:
                return e

        return await asyncio.gather(*(one(c) for c in conns))

    return dict(zip(names, _sync(run_all()), strict=True))
