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
- The guest is untrusted (code under test runs there as root): what it sends is bounded and
  checked. Output kept in memory is capped per stream (`max_output`, head and tail kept,
  `RunResult.truncated`) or streamed to a local file; agent frames are validated (size, type,
  request id, EXIT payload) and a violation fails the command at once (`ProtocolError`);
  `get` walks the remote tree itself and never creates, follows or writes through a link that
  leaves the destination, drops set-id bits, skips special files and caps bytes and entries
  (`LimitExceeded`); `read_text` is capped too.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import importlib.resources
import logging
import os
import posixpath
import re
import resource
import shlex
import shutil
import signal
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from pytest_ttenv.quiet import asyncssh
from pytest_ttenv.ssh_agent import ERR, EXIT, HDR, HELLO, KILL, OUT, RUN, pack

__all__ = [
    "CommandFailed",
    "CommandTimeout",
    "Connection",
    "HostKeyMismatch",
    "LimitExceeded",
    "ProtocolError",
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
MiB = 1 << 20
DEFAULT_MAX_OUTPUT = 64 * MiB  # per stream (stdout, stderr) kept in memory by run()
MAX_FRAME = 1 * MiB  # the largest agent -> client frame payload accepted (the agent sends <= 64 KiB)
GET_MAX_BYTES = 1 << 30  # get(): total bytes of file data
GET_MAX_ENTRIES = 100_000  # get(): directory entries listed
READ_TEXT_MAX = 16 * MiB  # read_text(): file size
_XFER_CHUNK = 1 * MiB  # one SFTP read/write call (asyncssh splits it into parallel requests)
_DROP_MODE = 0o777  # file modes kept by get/put: permission bits only (no setuid/setgid/sticky)

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
    truncated: bool = False  # stdout or stderr went over max_output: its middle was dropped

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
            f"stderr={_short(self.stderr)!r}, duration={self.duration:.3f}"
            + (", truncated=True)" if self.truncated else ")")
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


class LimitExceeded(SshError):
    """The guest sent more than a cap allows (get: bytes or entries; read_text: size)."""


class ProtocolError(SshError):
    """The far side broke the agent protocol (oversized or unknown frame, bad EXIT, stray reply).

    The command's fate is unknown; the agent is not used again on that connection."""


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


class _Broken(Exception):
    """The agent broke the protocol; its channel was closed."""


class _Capture:
    """One output stream of one command, bounded: written to *file*, or kept in memory whole up
    to *cap* bytes, beyond that only its first cap // 2 and its last cap - cap // 2 bytes."""

    __slots__ = ("error", "file", "head", "head_cap", "tail", "tail_cap", "total")

    def __init__(self, cap: int, file: IO[bytes] | None = None) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.head_cap = cap // 2
        self.tail_cap = cap - cap // 2
        self.total = 0
        self.file = file
        self.error: OSError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.total += len(data)
        if self.file is not None:
            if self.error is None:
                try:
                    self.file.write(data)
                except OSError as e:
                    self.error = e
            return
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            if len(data) <= room:
                return
            data = data[room:]
        self.tail += data
        excess = len(self.tail) - self.tail_cap
        if excess > 0:
            del self.tail[:excess]  # bytearray drops its front in O(1) amortized

    @property
    def truncated(self) -> bool:
        return self.file is None and self.total > self.head_cap + self.tail_cap

    def value(self) -> bytes:
        """What was kept (b"" when written to a file); frees the buffers."""
        head, self.head = self.head, bytearray()
        head += self.tail
        self.tail = bytearray()
        return bytes(head)


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


@contextlib.contextmanager
def _open_output(path: str | os.PathLike[str] | None, what: str) -> Iterator[IO[bytes] | None]:
    """A local file for a command's *what* (stdout/stderr), created or truncated; None: no file."""
    if path is None:
        yield None
        return
    try:
        f = open(path, "wb")
    except OSError as e:
        raise ValueError(f"cannot open {what} file {os.fspath(path)!r}: {e.strerror or e}") from None
    try:
        yield f
    finally:
        f.close()


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
    """Collects one exec channel's output (bounded, see _Capture) and exit status."""

    def __init__(
        self,
        max_output: int = DEFAULT_MAX_OUTPUT,
        out_file: IO[bytes] | None = None,
        err_file: IO[bytes] | None = None,
    ) -> None:
        self.out = _Capture(max_output, out_file)
        self.err = _Capture(max_output, err_file)
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
        self.status = _signal_status(signal)

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


@dataclass
class _Pending:
    fut: asyncio.Future[tuple[int, bytes]]
    out: _Capture
    err: _Capture


_EXIT_STATUS = re.compile(rb"[0-9]{1,3}")
_EXIT_FLAGS = re.compile(rb"[t!]{0,2}")


def _parse_exit(payload: bytes) -> tuple[int, bytes]:
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


class _AgentSession(asyncssh.SSHClientSession[bytes]):
    """Client side of the agent protocol (see ssh_agent.py) over one exec channel.

    The agent runs in the guest and is not trusted: every frame is checked (payload at most
    MAX_FRAME, a known type, HELLO once with id 0 and before anything else, OUT/ERR/EXIT only for
    a request we sent and have not seen the EXIT of, a well-formed EXIT). A violation closes the
    channel and fails every pending command at once with _Broken (`failed` says why).
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
        except _Broken as e:
            self._fail(str(e))

    def _frames(self) -> None:
        buf = self.buf
        hsize = HDR.size
        while len(buf) >= hsize:
            typ, rid, n = HDR.unpack_from(buf, 0)
            if n > MAX_FRAME:
                raise _Broken(f"frame of {n} bytes (type {typ}, id {rid}) exceeds the {MAX_FRAME}-byte limit")
            if typ not in (HELLO, OUT, ERR, EXIT):
                raise _Broken(f"unknown frame type {typ} (id {rid})")
            if len(buf) < hsize + n:
                return
            if typ == HELLO:
                if rid != 0 or self.hello.done():
                    raise _Broken(f"unexpected HELLO frame (id {rid})")
                self.hello.set_result(bytes(buf[hsize : hsize + n]) or b"?")
            else:
                if not self.hello.done():
                    raise _Broken(f"frame type {typ} (id {rid}) before HELLO")
                p = self.pending.get(rid)
                if p is None and rid not in self.abandoned:
                    raise _Broken(f"frame type {typ} for request {rid}, which is not running")
                if typ == EXIT:
                    try:
                        status, flags = _parse_exit(bytes(buf[hsize : hsize + n]))
                    except ValueError:
                        head = bytes(buf[hsize : hsize + min(n, 64)])
                        raise _Broken(f"malformed EXIT frame for request {rid}: {head!r}") from None
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
                p.fut.set_exception(_Broken(why))
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
                p.fut.set_exception(_Lost(why, sent=True))
        self.pending.clear()

    def _send(self, typ: int, rid: int, payload: bytes) -> None:
        assert self.chan is not None
        self.chan.write(HDR.pack(typ, rid, len(payload)))
        if payload:
            self.chan.write(payload)

    async def run(self, req: _Request, timeout: float, out: _Capture, err: _Capture) -> tuple[int, bool]:
        """Run *req*, its output going to *out* and *err*; returns (status, killed)."""
        if self.closed or self.chan is None:
            raise _Lost("agent channel closed", sent=False)
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
            raise _Lost(f"agent channel: {e}", sent=False) from None
        self.pending[rid] = p
        try:
            status, flags = await asyncio.wait_for(p.fut, timeout + AGENT_GRACE)
        except asyncio.TimeoutError:
            self._kill(rid)
            raise _TimedOut(out.value(), err.value()) from None
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


# ---------------------------------------------------------------------------------------------
# file transfers: our own tree walks (the guest's SFTP server is not trusted)


class _Refused(Exception):
    """A transfer stopped on purpose (a cap, a conflict); the message is for the user."""

    def __init__(self, message: str, *, limit: bool = False) -> None:
        super().__init__(message)
        self.limit = limit


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


def _copy_name(path: str, op: str, shown: str) -> str:
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


class _Download:
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
            raise _Refused(f"{remote} is not a regular file or a directory (refusing to copy it)")
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
                    raise _Refused(f"more than {self.max_entries} directory entries (max_entries=)", limit=True)
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
                        raise _Refused(f"more than {self.max_bytes} bytes of file data (max_bytes=)", limit=True)
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
            raise _Refused(f"cannot copy {what} onto {os.fsdecode(dst)}, which is not")
        if not src_dir:
            os.replace(src, dst)  # replaces a symlink itself, never its target
            return
        for name in os.listdir(src):
            self.place(os.path.join(src, name), os.path.join(dst, name))


class _Upload:
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
            raise _Refused(f"{src} is not a regular file or a directory (refusing to copy it)")

    async def tree(self, ltop: bytes, rtop: bytes, top_st: os.stat_result) -> None:
        dirs: list[tuple[bytes, os.stat_result]] = []
        todo: list[tuple[bytes, bytes, tuple[bytes, ...], os.stat_result]] = [(ltop, rtop, (), top_st)]
        while todo:
            ldir, rdir, parts, st = todo.pop()
            kind = await self.rkind(rdir)
            if kind is None:
                await self.sftp.mkdir(rdir)
            elif kind != "dir":
                raise _Refused(f"{os.fsdecode(rdir)} exists on the VM and is not a directory")
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
            raise _Refused(f"{os.fsdecode(rpath)} is a symlink on the VM (refusing to write through it)")
        fd = os.open(lpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise _Refused(f"{os.fsdecode(lpath)} changed while copying")
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
        max_output: int | None = None,
        stdout_file: str | os.PathLike[str] | None = None,
        stderr_file: str | os.PathLike[str] | None = None,
    ) -> RunResult:
        """Run *cmd* on the VM and wait for it; see the module docstring for semantics.

        At most *max_output* bytes (default DEFAULT_MAX_OUTPUT, 64 MiB) of stdout and of stderr
        are kept: beyond that, the first and the last half of it, and `RunResult.truncated` is
        set. *stdout_file* / *stderr_file*: write that stream to this local file (created or
        truncated, written as it arrives, never held in memory) instead; its bytes in the
        RunResult are then b"".
        """
        return _sync(
            self._arun(
                cmd,
                timeout=timeout,
                check=check,
                env=env,
                cwd=cwd,
                input=input,
                sudo=sudo,
                max_output=max_output,
                stdout_file=stdout_file,
                stderr_file=stderr_file,
            )
        )

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
        max_output: int | None = None,
        stdout_file: str | os.PathLike[str] | None = None,
        stderr_file: str | os.PathLike[str] | None = None,
    ) -> RunResult:
        """Async twin of run(); may be awaited from any event loop."""
        coro = self._arun(
            cmd,
            timeout=timeout,
            check=check,
            env=env,
            cwd=cwd,
            input=input,
            sudo=sudo,
            max_output=max_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        lp = loop()
        if asyncio.get_running_loop() is lp:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, lp))

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
        up: _Upload | None = None

        async def op(sftp: asyncssh.SFTPClient) -> None:
            nonlocal up
            dest = remote
            try:
                if (await sftp.stat(dest)).type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                    dest = posixpath.join(dest, _copy_name(src.resolve().name, "put", str(src)))
            except asyncssh.SFTPNoSuchFile:
                parent = posixpath.dirname(remote.rstrip("/"))
                if parent:
                    await sftp.makedirs(parent, exist_ok=True)
            up = _Upload(sftp)
            await up.run(src, dest)

        self._transfer(op, f"put {src} -> {remote}")
        notes = up.notes if up is not None else []
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
        target = dst / _copy_name(remote, "get", remote) if dst.is_dir() else dst
        target.parent.mkdir(parents=True, exist_ok=True)
        down: _Download | None = None

        async def op(sftp: asyncssh.SFTPClient) -> None:
            nonlocal down
            down = _Download(sftp, max_bytes, max_entries)
            await down.run(remote, target)

        self._transfer(op, f"get {remote} -> {dst}")
        notes = down.notes if down is not None else []
        for n in notes:
            log.warning("%s: get %s: %s", self.target.name, remote, n)
        return notes

    def write_text(self, remote: str, text: str) -> None:
        """Write *text* (UTF-8) to the remote file, replacing it; parent directories are created."""

        async def op(sftp: asyncssh.SFTPClient) -> None:
            parent = posixpath.dirname(remote.rstrip("/"))
            if parent:
                await sftp.makedirs(parent, exist_ok=True)
            async with sftp.open(remote, "wb") as f:
                await f.write(text.encode())

        _sync(self._sftp_op(op, f"write {remote}"))

    def read_text(self, remote: str, *, max_size: int = READ_TEXT_MAX) -> str:
        """The remote file's content decoded as UTF-8 (strict); LimitExceeded beyond *max_size* bytes."""

        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            data = bytearray()
            async with sftp.open(remote, "rb") as f:
                while True:
                    chunk: bytes = await f.read(min(_XFER_CHUNK, max_size + 1 - len(data)), len(data))
                    if not chunk:
                        return bytes(data)
                    data += chunk
                    if len(data) > max_size:
                        raise _Refused(f"larger than {max_size} bytes (max_size=)", limit=True)

        return self._transfer(op, f"read {remote}").decode()

    def _transfer(self, op: Callable[[asyncssh.SFTPClient], Awaitable[T]], what: str) -> T:
        """_sftp_op, with _Refused and local OSErrors as this module's errors."""

        async def guarded(sftp: asyncssh.SFTPClient) -> T:
            try:
                return await op(sftp)
            except _Refused as e:
                raise self._err(LimitExceeded if e.limit else SshError, f"{what}: {e}") from None
            except OSError as e:
                where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
                raise self._err(SshError, f"{what}: {e.strerror or e}{where}") from None

        return _sync(self._sftp_op(guarded, what))

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
        if a is not None and a.failed and not self._agent_off:
            self._disable_agent(f"protocol violation: {a.failed}")
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
            why = (f"protocol violation: {sess.failed}" if sess.failed else "") or sess.exit or "no answer"
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

    async def _exec(self, conn: asyncssh.SSHClientConnection, req: _Request, timeout: float, sess: _ExecSession) -> int:
        async with self._exec_slots:
            chan = await self._open_channel(conn, sess, _exec_command(req))
            if req.stdin:
                chan.write(req.stdin)
            chan.write_eof()
            try:
                await asyncio.wait_for(asyncio.shield(sess.done), timeout)
            except asyncio.TimeoutError:
                await self._exec_kill(conn, chan, sess, req.sudo)
                raise _TimedOut(sess.stdout(), sess.stderr()) from None
            except asyncio.CancelledError:
                _spawn(self._exec_kill(conn, chan, sess, req.sudo))
                raise
        if sess.status is None:
            raise _Lost("connection lost while the command ran", sent=True)
        return sess.status

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
        max_output: int | None = None,
        stdout_file: str | os.PathLike[str] | None = None,
        stderr_file: str | os.PathLike[str] | None = None,
    ) -> RunResult:
        limit = min(self.default_timeout if timeout is None else timeout, 1e8)  # 1e8 s: no limit
        if not limit > 0:
            raise ValueError(f"timeout must be > 0, not {limit!r}")
        cap = DEFAULT_MAX_OUTPUT if max_output is None else max_output
        if not isinstance(cap, int) or cap < 0:
            raise ValueError(f"max_output must be an int >= 0, not {max_output!r}")
        req = _build(cmd, env, cwd, input, sudo, self.target.user)
        if stdout_file is not None and stderr_file is not None and os.fspath(stdout_file) == os.fspath(stderr_file):
            raise ValueError("stdout_file and stderr_file must differ")
        with (
            _open_output(stdout_file, "stdout") as out_f,
            _open_output(stderr_file, "stderr") as err_f,
        ):
            return await self._arun_req(req, limit, check, slots, cap, out_f, err_f)

    async def _arun_req(
        self,
        req: _Request,
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
            agent: _AgentSession | None = None
            try:
                agent = await self._agent_for(conn, slots)
                if agent is not None:
                    out, err = _Capture(cap, out_f), _Capture(cap, err_f)
                    status, killed = await agent.run(req, limit, out, err)
                    if killed:
                        raise _TimedOut(out.value(), err.value())
                else:
                    sess = _ExecSession(cap, out_f, err_f)
                    status = await self._exec(conn, req, limit, sess)
                    out, err = sess.out, sess.err
                    sess.flush()
            except _Broken as e:
                if agent is not None and self._agent is agent:
                    self._disable_agent(f"protocol violation: {e}")
                raise self._err(
                    ProtocolError,
                    f"agent protocol violation while running {_short(req.display)!r}: {e} "
                    "(the command may have run; exec channels are used from now on)",
                ) from None
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
            for c, f, name in ((out, out_f, "stdout"), (err, err_f, "stderr")):
                if c.error is not None:
                    path = getattr(f, "name", "?")
                    raise self._err(SshError, f"cannot write {name} of {_short(req.display)!r} to {path}: {c.error}")
            truncated = out.truncated or err.truncated
            result = RunResult(req.display, status, out.value(), err.value(), time.monotonic() - start, vm, truncated)
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
