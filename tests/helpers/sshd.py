"""A real OpenSSH sshd on 127.0.0.1 for tests and benchmarks (no mocks), and a farm of asyncssh servers.

`start_sshd(workdir)` generates an ed25519 host key and client key, writes an `authorized_keys` and an
`sshd_config` into *workdir*, and runs `/usr/sbin/sshd -D -e` on a free loopback port as root.
Commands run as root through root's login shell (bash), with `SetEnv SHLVL=1` so that bash does not
source `~/.bashrc` (which here runs `pyenv init`, ~125 ms per command): bash only reads `.bashrc`
for an ssh command when `SHLVL` was unset, and sshd's `SetEnv` sets it before the shell starts.

Needs: openssh-server (`/usr/sbin/sshd`), openssh-client (`ssh-keygen`), running as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_ttenv.quiet import asyncssh

if TYPE_CHECKING:
    from pytest_ttenv.ssh import SshTarget

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keygen(path: Path) -> str:
    """Create an unencrypted ed25519 key pair at *path*; return the public key line."""
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
            check=True,
        )
    return path.with_suffix(".pub").read_text().strip()


def wait_banner(port: int, timeout: float = 10.0) -> None:
    """Block until something on 127.0.0.1:*port* sends an `SSH-` banner."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SSH banner on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.02)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


@dataclass
class Sshd:
    """One running sshd; `restart()` kills it with every session it forked and starts it again."""

    workdir: Path
    port: int
    host_key: str
    client_key: Path
    extra_config: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "sshd_config"

    def target(self, name: str = "sshd-test", *, user: str = "root") -> SshTarget:
        from pytest_ttenv.ssh import SshTarget

        return SshTarget(name, "127.0.0.1", self.port, user, self.client_key, self.host_key)

    def write_config(self) -> None:
        w = self.workdir
        self.config_path.write_text(
            f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {w}/host_ed25519
PidFile none
AuthorizedKeysFile {w}/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
LogLevel ERROR
MaxStartups 200:30:400
Subsystem sftp internal-sftp
SetEnv SHLVL=1 {self.extra_config}
"""
        )

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.write_config()
        log = open(self.workdir / "sshd.log", "ab")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config_path)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        wait_banner(self.port)

    def stop(self) -> None:
        """Kill sshd and every process it started (sessions, shells, agents)."""
        if self.proc is None:
            return
        victims = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 5
        while True:  # the port may linger a moment
            try:
                self.start()
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
                self.stop()


def start_sshd(workdir: Path, *, extra_config: str = "") -> Sshd:
    """Start a fresh sshd with new keys in *workdir*; `extra_config` is appended to `SetEnv`'s line.

    Use e.g. `extra_config="PATH=/some/bin"` to give sessions another PATH.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(workdir / "host_ed25519")
    client_pub = keygen(workdir / "client_ed25519")
    auth = workdir / "authorized_keys"
    auth.write_text(client_pub + "\n")
    auth.chmod(0o600)
    sshd = Sshd(workdir, free_port(), host_pub, workdir / "client_ed25519", extra_config)
    sshd.start()
    return sshd


def path_without_python(bindir: Path) -> str:
    """Fill *bindir* with links to /usr/bin and /bin except python*; return it as a PATH."""
    bindir.mkdir(parents=True, exist_ok=True)
    for src in (Path("/usr/bin"), Path("/bin")):
        for entry in src.iterdir():
            if entry.name.startswith("python") or (bindir / entry.name).exists():
                continue
            (bindir / entry.name).symlink_to(entry)
    return str(bindir)


def have_sshd() -> bool:
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None and os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# many endpoints: asyncssh servers in a child process (so they don't share the client's CPU/GIL)


@dataclass
class Farm:
    """N asyncssh SSH servers on 127.0.0.1 in one child process.

    Each answers any exec request with its own port number on stdout and exit status 0, except a
    command that mentions python3 (the agent bootstrap), which fails with 127 like a VM without
    python3. All share one host key and accept one client key.
    """

    ports: list[int]
    host_key: str
    client_key: Path
    proc: subprocess.Popen[bytes]

    def target(self, i: int) -> SshTarget:
        from pytest_ttenv.ssh import SshTarget

        return SshTarget(f"ep{i:04d}", "127.0.0.1", self.ports[i], "root", self.client_key, self.host_key)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                pipe.close()


def start_farm(workdir: Path, n: int) -> Farm:
    """Start *n* asyncssh servers with fresh keys in *workdir*; returns when all listen."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(workdir / "host_ed25519")
    client_pub = keygen(workdir / "client_ed25519")
    (workdir / "authorized_keys").write_text(client_pub + "\n")
    proc = subprocess.Popen(
        [sys.executable, __file__, "farm", str(n), str(workdir)], stdout=subprocess.PIPE, stdin=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"farm of {n} servers did not start (exit {proc.returncode})")
    return Farm(json.loads(line), host_pub, workdir / "client_ed25519", proc)


async def _farm(n: int, workdir: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        if "python3" in (process.command or ""):
            process.stderr.write(b"sh: 1: exec: python3: not found\n")
            process.exit(127)
            return
        port = process.get_extra_info("sockname")[1]
        process.stdout.write(f"{port}\n".encode())
        process.exit(0)

    options = asyncssh.SSHServerConnectionOptions(
        server_host_keys=[asyncssh.read_private_key(workdir / "host_ed25519")],
        authorized_client_keys=asyncssh.read_authorized_keys(str(workdir / "authorized_keys")),
        kex_algs=["curve25519-sha256"],
        encryption_algs=["aes128-gcm@openssh.com"],
        compression_algs=None,
        gss_host=None,
        allow_pty=False,
        x11_forwarding=False,
        agent_forwarding=False,
    )
    servers = [
        await asyncssh.listen("127.0.0.1", 0, options=options, process_factory=handle, encoding=None) for _ in range(n)
    ]
    print(json.dumps([srv.get_port() for srv in servers]), flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(0, done.set)  # parent gone or stdin closed: stop
    await done.wait()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "farm":
    asyncio.run(_farm(int(sys.argv[2]), Path(sys.argv[3])))
