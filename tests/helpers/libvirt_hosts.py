"""Real libvirt hosts for tests and benchmarks, started here (no systemd; nothing in /etc changed).

Each host is a ``libvirtd`` + ``virtlogd`` of its own in a mount and PID namespace (``unshare``):
its own ``/etc/libvirt`` (a ``qemu.conf`` with ``user = "root"``, ``dynamic_ownership = 0``: see
MACHINE-NOTES; no cgroups), ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``
and ``/etc/passwd``/``/etc/group`` (adding the ``libvirt-qemu`` user libvirtd looks up, which only
libvirt-daemon-system would create), all bind-mounted from the host's root dir. The namespace's
PID 1 is this file run as a script: it reaps orphans (libvirtd double-forks qemu; an init that
does not reap leaves zombies libvirt waits on for minutes) and killing it kills the whole host.

- ``LibvirtHost(root)``: this machine's kind of host, reached as
  ``qemu:///system?socket=<root>/run/libvirt-sock`` (the system driver on a socket of its own).
- ``LibvirtHost(root, remote=True)``: a host in a network namespace of its own (a veth pair,
  ``10.251.N.2``) with an sshd, reached as ``qemu+ssh://root@10.251.N.2/system`` (libvirt's own
  remote protocol through ssh; a wrapper pins the host key and the client key). Its VMs' SSH
  ports are forwarded on that address.

Needs root, ``unshare``/``ip`` (util-linux, iproute2), libvirt-daemon, libvirt-clients (virsh,
virt-ssh-helper), openssh-server and libvirt-python.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# No cgroups: libvirt would put its VMs into one "machine" cgroup whose CPU share is that of a single
# process among everything else on the box (VMs boot ~1.5x slower under load), and leave that cgroup
# behind in /sys/fs/cgroup.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""
LIBVIRTD_CONF = """\
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
"""
BINDS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "passwd": "/etc/passwd",
    "group": "/etc/group",
}


def missing() -> str | None:
    """Why libvirt hosts cannot be started here (None if they can)."""
    if os.geteuid() != 0:
        return "starting libvirtd in namespaces needs root"
    for tool in ("libvirtd", "virtlogd", "virsh", "unshare", "ip", "/usr/sbin/sshd", "qemu-img"):
        if not shutil.which(tool):
            return f"{tool} not installed (run scripts/setup.sh)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python not installed (run scripts/setup.sh)"
    return None


class LibvirtHost:
    """A libvirtd of its own under ``root`` (a short path: sockets live there). ``start()``,
    ``kill()`` (SIGKILL to every process of the host, as a host that dies), ``start()`` again on
    the same dirs (the host comes back), ``close()`` (kill and remove the network namespace)."""

    def __init__(self, root: Path, *, remote: bool = False) -> None:
        self.root = root
        self.remote = remote
        self.netns = f"ttlv{os.getpid() % 10000}{random.randint(10, 99)}" if remote else ""
        self.addr = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepare()

    # -- setup -----------------------------------------------------------------------------------
    def _prepare(self) -> None:
        for sub in ("etc", "run", "lib", "cache", "log", "ssh"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        if "\nlibvirt-qemu:" not in "\n" + passwd:
            passwd += "libvirt-qemu:x:64055:64055:libvirt qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        for name, gid in (("libvirt-qemu", 64055), ("kvm", 64056)):
            if f"\n{name}:" not in "\n" + group:
                group += f"{name}:x:{gid}:\n"
        (self.root / "passwd").write_text(passwd)
        (self.root / "group").write_text(group)
        if self.remote:
            self._prepare_network()
            self._prepare_sshd()

    def _prepare_network(self) -> None:
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        for _ in range(50):
            net = random.randint(1, 250)
            if f" 10.251.{net}." not in used:
                break
        self.addr = f"10.251.{net}.2"
        outer, inner = f"{self.netns}a", f"{self.netns}b"
        for cmd in (
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
            ["ip", "link", "set", inner, "netns", self.netns],
            ["ip", "addr", "add", f"10.251.{net}.1/30", "dev", outer],
            ["ip", "link", "set", outer, "up"],
            ["ip", "netns", "exec", self.netns, "ip", "addr", "add", f"{self.addr}/30", "dev", inner],
            ["ip", "netns", "exec", self.netns, "ip", "link", "set", inner, "up"],
            ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)

    def _prepare_sshd(self) -> None:
        ssh = self.root / "ssh"
        for key in ("host_key", "client_key"):
            if not (ssh / key).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(ssh / key)], check=True
                )
        shutil.copy(ssh / "client_key.pub", ssh / "authorized_keys")
        (ssh / "sshd_config").write_text(
            f"ListenAddress {self.addr}\nHostKey {ssh / 'host_key'}\nAuthorizedKeysFile {ssh / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nPidFile {ssh / 'sshd.pid'}\nSetEnv SHLVL=1\n"
        )
        host_key = (ssh / "host_key.pub").read_text().split()
        (ssh / "known_hosts").write_text(f"{self.addr} {host_key[0]} {host_key[1]}\n")
        wrapper = ssh / "ssh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"exec ssh -i {ssh / 'client_key'} -o UserKnownHostsFile={ssh / 'known_hosts'} "
            '-o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=5 "$@"\n'
        )
        wrapper.chmod(0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    # -- life --------------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        if self.remote:
            return f"qemu+ssh://root@{self.addr}/system?command={self.root / 'ssh' / 'ssh'}"
        return f"qemu:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    def start(self, timeout: float = 60.0) -> LibvirtHost:
        """Start the host's daemons; return once libvirtd (and sshd) accept connections."""
        for stale in ("ready", "init.pid", "libvirtd.pid", "virtlogd.pid"):
            (self.root / stale).unlink(missing_ok=True)
        argv = [
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--propagation",
            "private",
            sys.executable,
            __file__,
            str(self.root),
        ]
        if self.remote:
            argv = ["ip", "netns", "exec", self.netns, *argv, str(self.root / "ssh" / "sshd_config")]
        log = open(self.root / "host.log", "ab")
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            exited = self._proc.poll() is not None
            if exited or time.monotonic() > deadline:
                tail = (self.root / "host.log").read_text(errors="replace")[-2000:]
                self.kill()
                what = "exited at start" if exited else f"did not come up within {timeout:.0f} s"
                raise TimeoutError(f"libvirt host {self.root} {what}:\n{tail}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        if not (self.root / "ready").exists():
            return False
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.root / "run" / "libvirt-sock"))
            except OSError:
                return False
        if self.remote:
            try:
                with socket.create_connection((self.addr, 22), timeout=1) as s:
                    return s.recv(4) == b"SSH-"
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """Kill every process of the host at once (its PID 1 dies, the kernel kills the rest)."""
        try:
            pid = int((self.root / "init.pid").read_text())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        (self.root / "ready").unlink(missing_ok=True)

    def close(self) -> None:
        self.kill()
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)

    # -- what is on it -----------------------------------------------------------------------------
    def domains(self) -> list[str]:
        """Domains the host has defined (its config files: readable while the host is down too)."""
        return sorted(p.stem for p in (self.root / "etc" / "qemu").glob("*.xml"))

    def volumes(self) -> list[str]:
        """Files in the host's ttenv storage pool."""
        pool = self.root / "lib" / "ttenv"
        return sorted(p.name for p in pool.iterdir()) if pool.is_dir() else []


def _init(root: Path, sshd_config: str | None) -> None:
    """PID 1 of a host: private libvirt dirs, the daemons, then reap orphans until killed."""
    (root / "init.pid").write_text(Path("/proc/self/status").read_text().split("NSpid:")[1].split()[0])
    for src, dst in BINDS.items():
        if (root / src).is_dir():
            Path(dst).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(root / src), dst], check=True)
    subprocess.run(["mount", "-t", "proc", "proc", "/proc"], check=True)
    subprocess.run(["virtlogd", "-d", "-p", str(root / "virtlogd.pid")], check=True)
    subprocess.run(["libvirtd", "-d", "-p", str(root / "libvirtd.pid")], check=True)
    if sshd_config:
        with open(root / "sshd.log", "ab") as log:
            subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", sshd_config], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
    (root / "ready").write_text("1")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # PID 1 exiting takes every process with it
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.5)


if __name__ == "__main__":
    _init(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
