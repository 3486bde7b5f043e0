"""ttagent: the guest-side command agent of pytest_ttenv.ssh (this file is sent to the VM as is).

`pytest_ttenv.ssh.agent_channel` starts it over one SSH exec channel as `python3 -I -S -c BOOTSTRAP`;
the bootstrap reads this source from stdin and runs it, and from then on stdin/stdout carry frames.
It runs stand-alone: it needs Python >= 3.6 and only modules that Debian's python3-minimal has (os,
sys, struct, selectors, subprocess, signal, errno, time), so it must stay free of newer syntax, of
typing (annotations live in type comments) and of any import from pytest_ttenv. The host side
imports the wire format (HDR, the frame types, pack) from here: this is its one definition.

Frame: a 9-byte header `>BII` (type, request id, payload length), then the payload.
  client -> agent  RUN  b"R": packed [timeout, script, packed argv, packed env, stdin, flags]
                   KILL b"K": empty; kill that request's process group now
  agent -> client  HELLO b"H" (id 0): b"ttagent 1 pid=N python=X.Y"
                   OUT b"O" / ERR b"E": a chunk (<= 64 KiB) of the child's stdout / stderr
                   EXIT b"X": packed [status, flags]; flags has b"t" if killed on timeout or
                   request, b"!" if the command could not be started (status is then 127)
"packed" is a `>I` count followed by `>I`-length-prefixed byte strings.

The bootstrap passes two words, "set" or "" and $LC_CTYPE, so that the agent can give children the
environment of the login shell exactly (Python's C-locale coercion sets LC_CTYPE in its own).

Each RUN becomes a child in its own session/process group (setsid). A non-empty argv whose first
word resolves on PATH is executed directly (no shell); otherwise `/bin/sh -c script` runs. The
child's stdin gets the request's stdin bytes, then EOF. The status is the exit code, or 128+N
when the child died of signal N. On timeout the whole process group gets SIGKILL (with flag
b"s" - sudo - SIGTERM first, then SIGKILL 2 s later). Output is read only while less than
1 MiB of frames waits to be written to the client, so memory stays bounded whatever the output
size. EOF on stdin kills every child and ends the agent.
"""

import errno
import os
import selectors
import signal
import struct
import subprocess
import sys
import time

HDR = struct.Struct(">BII")
LEN = struct.Struct(">I")
CHUNK = 65536
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
KILL_GRACE = 2.0

RUN, KILL, HELLO, OUT, ERR, EXIT = b"RKHOEX"


def pack(items):  # type: (list[bytes]) -> bytes
    """Length-prefix each item, after a count."""
    return LEN.pack(len(items)) + b"".join(LEN.pack(len(x)) + x for x in items)


def unpack(data):  # type: (bytes) -> list[bytes]
    """Inverse of pack()."""
    (count,) = LEN.unpack_from(data, 0)
    pos = LEN.size
    items = []
    for _ in range(count):
        (n,) = LEN.unpack_from(data, pos)
        pos += LEN.size
        items.append(bytes(data[pos : pos + n]))
        pos += n
    return items


def shell_pwd():  # type: () -> bytes
    """The PWD that /bin/sh would export: $PWD if it names the cwd, else getcwd()."""
    pwd = os.environb.get(b"PWD", b"")
    try:
        if pwd.startswith(b"/") and os.path.samestat(os.stat(pwd), os.stat(".")):
            return pwd
    except OSError:
        pass
    return os.getcwdb()


def which(name, path):  # type: (bytes, bytes) -> bytes | None
    """Resolve a command like the shell's PATH search; None if it is not an executable file."""
    if b"/" in name:
        candidates = [name]
    else:
        candidates = [(d or b".") + b"/" + name for d in path.split(b":")]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class Child:
    """A spawned command: its pid, our ends of its stdin/stdout/stderr pipes, its exit code."""

    def __init__(self, pid, stdin, stdout, stderr, popen=None):
        # type: (int, int, int, int, subprocess.Popen[bytes] | None) -> None
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.popen = popen
        self.returncode = None  # type: int | None  # negative: killed by that signal

    def poll(self):  # type: () -> int | None
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                try:
                    pid, st = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, st = self.pid, 255 << 8
                if pid:
                    self.returncode = -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
        return self.returncode


def spawn(argv, exe, env):
    # type: (list[bytes], bytes, dict[bytes, bytes]) -> Child
    """Start *exe* in a new session with pipes on fds 0-2; OSError if it cannot be executed.

    posix_spawn (Python >= 3.8) costs less than Popen, which matters under emulation. Our own fds
    are all close-on-exec (Python's default), so the child gets exactly 0, 1 and 2.
    """
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    popen = None
    try:
        if hasattr(os, "posix_spawn"):
            pid = os.posix_spawn(
                exe,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        else:  # pragma: no cover - Python 3.6/3.7
            popen = subprocess.Popen(
                argv, executable=exe, env=env, stdin=in_r, stdout=out_w, stderr=err_w, start_new_session=True
            )
            pid = popen.pid
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    return Child(pid, in_w, out_r, err_r, popen)


class Job:
    """One running command."""

    def __init__(self, rid, proc, deadline, stdin, sudo):
        # type: (int, Child, float | None, bytes, bool) -> None
        self.rid = rid
        self.proc = proc
        self.deadline = deadline  # when to kill it; then when to give up on its pipes
        self.stdin = memoryview(stdin)
        self.sudo = sudo
        self.kills = 0
        self.status = None  # type: int | None
        self.fds = set()  # type: set[int]  # our open pipe ends
        self.kinds = {}  # type: dict[int, int]  # output fd -> OUT or ERR


class Agent:
    """The select loop: client frames in, child output and exit statuses out."""

    def __init__(self):  # type: () -> None
        self.sel = selectors.DefaultSelector()
        self.events = {}  # type: dict[int, int]
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.jobs = {}  # type: dict[int, Job]
        self.fd_jobs = {}  # type: dict[int, Job]
        self.paused = False
        self.reap = False  # a SIGCHLD arrived since the last look at the children
        self.base_env = dict(os.environb)
        if len(sys.argv) == 3:  # ["-c", "set" or "", $LC_CTYPE]: undo Python's C-locale coercion
            if sys.argv[1]:
                self.base_env[b"LC_CTYPE"] = os.fsencode(sys.argv[2])
            else:
                self.base_env.pop(b"LC_CTYPE", None)
        if b"_" in self.base_env:
            self.base_env[b"_"] = b"/bin/sh"  # what the login shell exports when it runs sh
        self.base_env[b"PWD"] = shell_pwd()
        os.set_blocking(0, False)
        os.set_blocking(1, False)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.want(0, selectors.EVENT_READ)
        self.want(self.wake_r, selectors.EVENT_READ)

    def want(self, fd, events):  # type: (int, int) -> None
        """Make the selector watch *fd* for *events* (0: not at all)."""
        have = self.events.get(fd, 0)
        if have == events:
            return
        if not have:
            self.sel.register(fd, events)
        elif not events:
            self.sel.unregister(fd)
        else:
            self.sel.modify(fd, events)
        if events:
            self.events[fd] = events
        else:
            del self.events[fd]

    def send(self, typ, rid, payload):  # type: (int, int, bytes) -> None
        self.outbuf += HDR.pack(typ, rid, len(payload))
        self.outbuf += payload

    def flush(self):  # type: () -> None
        while self.outbuf:
            try:
                n = os.write(1, self.outbuf)
            except BlockingIOError:
                break
            del self.outbuf[:n]

    def run(self):  # type: () -> None
        hello = b"ttagent 1 pid=%d python=%d.%d" % (os.getpid(), sys.version_info[0], sys.version_info[1])
        self.send(HELLO, 0, hello)
        while True:
            self.flush()
            self.want(1, selectors.EVENT_WRITE if self.outbuf else 0)
            paused = len(self.outbuf) > HIGH_WATER or (self.paused and len(self.outbuf) > LOW_WATER)
            if paused != self.paused:
                self.paused = paused
                for fd, job in self.fd_jobs.items():
                    if fd in job.kinds:
                        self.want(fd, 0 if paused else selectors.EVENT_READ)
            for key, _ in self.sel.select(self.next_timeout()):
                fd = key.fd
                if fd == 0:
                    if not self.read_client():
                        self.shutdown()
                        return
                elif fd == self.wake_r:  # SIGCHLD: some child exited
                    self.reap = True
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif fd in self.fd_jobs:
                    job = self.fd_jobs[fd]
                    if fd in job.kinds:
                        self.read_child(job, fd)
                    else:
                        self.write_stdin(job, fd)
            self.tick()

    def next_timeout(self):  # type: () -> float | None
        times = [j.deadline for j in self.jobs.values() if j.deadline is not None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def read_client(self):  # type: () -> bool
        try:
            data = os.read(0, 262144)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.inbuf += data
        while len(self.inbuf) >= HDR.size:
            typ, rid, n = HDR.unpack_from(self.inbuf, 0)
            if len(self.inbuf) < HDR.size + n:
                break
            payload = bytes(self.inbuf[HDR.size : HDR.size + n])
            del self.inbuf[: HDR.size + n]
            if typ == RUN:
                self.start(rid, payload)
            elif typ == KILL and rid in self.jobs and not self.jobs[rid].kills:
                self.kill(self.jobs[rid])
        return True

    def start(self, rid, payload):  # type: (int, bytes) -> None
        timeout, script, argv_packed, env_packed, stdin, flags = unpack(payload)
        env = dict(self.base_env)
        for item in unpack(env_packed):
            k, _, v = item.partition(b"=")
            env[k] = v
        proc = None
        argv = unpack(argv_packed)
        exe = which(argv[0], env.get(b"PATH", os.defpath.encode())) if argv else None
        if exe is not None:
            try:
                proc = spawn(argv, exe, env)
            except OSError:
                proc = None  # e.g. ENOEXEC: let the shell have a go, as it would have anyway
        if proc is None:
            try:
                proc = spawn([b"/bin/sh", b"-c", script], b"/bin/sh", env)
            except OSError as e:
                self.send(ERR, rid, f"ttagent: cannot start /bin/sh: {e}\n".encode())
                self.send(EXIT, rid, pack([b"127", b"!"]))
                return
        deadline = time.monotonic() + float(timeout) if timeout else None
        job = Job(rid, proc, deadline, stdin, b"s" in flags)
        self.jobs[rid] = job
        for fd, kind in ((proc.stdout, OUT), (proc.stderr, ERR)):
            job.fds.add(fd)
            job.kinds[fd] = kind
            self.fd_jobs[fd] = job
            if not self.paused:
                self.want(fd, selectors.EVENT_READ)
        if job.stdin:
            os.set_blocking(proc.stdin, False)
            job.fds.add(proc.stdin)
            self.fd_jobs[proc.stdin] = job
            self.want(proc.stdin, selectors.EVENT_WRITE)
        else:
            os.close(proc.stdin)

    def close(self, job, fd):  # type: (Job, int) -> None
        self.want(fd, 0)
        del self.fd_jobs[fd]
        job.kinds.pop(fd, None)
        job.fds.discard(fd)
        os.close(fd)

    def read_child(self, job, fd):  # type: (Job, int) -> None
        try:
            data = os.read(fd, CHUNK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return
            data = b""
        if data:
            self.send(job.kinds[fd], job.rid, data)
        else:
            self.close(job, fd)

    def write_stdin(self, job, fd):  # type: (Job, int) -> None
        try:
            n = os.write(fd, job.stdin[:CHUNK])
            job.stdin = job.stdin[n:]
            if job.stdin:
                return
        except BlockingIOError:
            return
        except OSError:
            pass  # EPIPE: the child did not read it all, as with any pipe
        self.close(job, fd)

    def kill(self, job):  # type: (Job) -> None
        """Signal the job's process group: SIGKILL (sudo: SIGTERM, relayed by sudo, then SIGKILL)."""
        job.kills += 1
        sig = signal.SIGTERM if job.sudo and job.kills == 1 else signal.SIGKILL
        try:
            os.killpg(job.proc.pid, sig)
        except OSError:
            pass
        job.deadline = time.monotonic() + KILL_GRACE

    def tick(self):  # type: () -> None
        """Reap exited children, enforce deadlines, report finished jobs."""
        now = time.monotonic()
        reap, self.reap = self.reap, False
        for job in list(self.jobs.values()):
            if job.status is None and (reap or job.kills):
                rc = job.proc.poll()
                if rc is not None:
                    job.status = 128 - rc if rc < 0 else rc
            if job.deadline is not None and now >= job.deadline:
                if job.status is None or not job.kills:
                    self.kill(job)
                else:
                    # the group is gone, but a process that left it may still hold our pipes
                    job.deadline = None
                    for fd in list(job.kinds):
                        self.close(job, fd)
            if job.status is not None and not job.kinds:
                for fd in list(job.fds):
                    self.close(job, fd)
                del self.jobs[job.rid]
                flags = b"t" if job.kills else b""
                self.send(EXIT, job.rid, pack([str(job.status).encode(), flags]))

    def shutdown(self):  # type: () -> None
        for job in self.jobs.values():
            for sig in (signal.SIGTERM, signal.SIGKILL) if job.sudo else (signal.SIGKILL,):
                try:
                    os.killpg(job.proc.pid, sig)
                except OSError:
                    pass


def main():  # type: () -> None
    Agent().run()


if __name__ == "__main__":
    main()
