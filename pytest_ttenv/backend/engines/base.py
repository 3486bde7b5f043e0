"""The engine seam: how one VM runs on a host, behind LocalBackend.

LocalBackend does what every engine shares (validation, accelerator choice, run dir, host key,
NoCloud seed, the SSH port in the store, waiting for the SSH banner) and hands each VM to an
``Engine`` for everything that depends on how it runs: starting it, telling whether it still
runs, stopping it, snapshots, its console, reaping strays.

Two engines: ``QemuEngine`` here (one direct qemu process per VM, no daemon) and
``LibvirtEngine`` in ``libvirt.py`` (domains on one or more libvirt hosts). A VM records its
engine and host (``VmInfo.engine``/``host``), so any LocalBackend can show, stop or delete it,
whatever engine it was configured with for new VMs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from pytest_ttenv.backend.engines import qemu, warm
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec
from pytest_ttenv.core.paths import is_private_dir, runtime_candidates, socket_dir, write_private
from pytest_ttenv.errors import BootError, NotFound, TTError

ENGINES = ("qemu", "libvirt")
TAIL_BYTES = 64 * 1024  # a console tail reads at most this much of the end of a log
LOG_MAX = 4 * 2**20  # a console log (or qemu's own log) longer than this is rotated ...
LOG_KEEP = 1 * 2**20  # ... keeping its last MiB in <log>.1, then truncated (see cap_log)
CAP_INTERVAL = 2.0  # seconds between two checks of the logs of the VMs this process started
# Terminal escape sequences: CSI (ESC [ or 8-bit CSI ... final byte); the string sequences OSC
# (ESC ], e.g. OSC 52 clipboard writes, OSC 8 links), DCS (ESC P), SOS (ESC X), PM (ESC ^), APC
# (ESC _) up to their terminator (BEL or ST) or the end of the line; any other ESC sequence.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1


@dataclass
class Start:
    """One VM prepared by LocalBackend for its engine to start.

    ``info`` is already in the store with its host and SSH port; the engine sets ``pid`` (0 where
    it has no local process), ``console`` and ``boot_seconds`` (the start time, until wait_vm
    turns it into the boot duration). ``move_port()`` reserves another port for the VM and returns
    it: the engine calls it when the host's port turns out to be taken. ``record()`` stores
    ``info`` as it is now: an engine that starts a local process calls it as soon as it has the
    pid, before it waits for anything (a kill of this process then leaves no unrecorded qemu).
    """

    env: EnvInfo
    spec: EnvSpec
    vm: VmSpec
    image: ImageInfo
    accel: str
    info: VmInfo
    vmdir: Path  # the VM's directory in the ENV's run dir on this machine
    seed: Path  # the NoCloud seed ISO, in vmdir
    cmdline: str  # kernel command line for direct boot
    move_port: Callable[[], int]
    template: warm.Template | None = None  # warm boot (qemu engine): start from its saved state
    record: Callable[[], None] = lambda: None


class Engine(Protocol):
    """How VMs run. Every method raises TTError subclasses with one clear line; none blocks
    without a timeout."""

    name: str

    def place(self, vms: Sequence[VmSpec], held: Sequence[VmInfo]) -> list[str]:
        """The host of each new VM ('' for this machine), given the live VMs ``held`` of this
        backend; QuotaError when some VM fits no host."""
        ...

    def address(self, host: str) -> str:
        """The address clients reach VMs on ``host`` at ('' for the backend's public address)."""
        ...

    def start(self, job: Start) -> None:
        """Start the prepared VM; returns once it runs (booting). BootError/TTError otherwise."""
        ...

    def dead(self, env: EnvInfo, vm: VmInfo) -> str | None:
        """None while the VM runs; else why it does not (one line, e.g. its host is unreachable)."""
        ...

    def boot_log(self, env: EnvInfo, vm: VmInfo) -> str:
        """The engine's own last words on a VM that died during boot ('' if it has none)."""
        ...

    def probe_addr(self, vm: VmInfo) -> str:
        """Where this machine reaches the VM's forwarded SSH port."""
        ...

    def halt(self, env: EnvInfo, vm: VmInfo) -> None:
        """Stop the VM if it runs, keeping its disk and console; returns once it is stopped."""
        ...

    def remove(self, env: EnvInfo, vm: VmInfo) -> str | None:
        """Stop the VM and remove what the engine made for it outside the run dir. Never fails
        for a VM that is already gone; a host that cannot be reached is not an error either:
        returns a line saying what is left there and when it goes (else None)."""
        ...

    def snapshot(self, env: EnvInfo, vm: VmInfo, name: str) -> None:
        """Save the running VM's memory and disk state as ``name`` (replacing one of that name)."""
        ...

    def revert(self, env: EnvInfo, vm: VmInfo, name: str) -> None:
        """Restore snapshot ``name`` (NotFound if there is none); open SSH connections die."""
        ...

    def console(self, env: EnvInfo, vm: VmInfo, tail: int) -> str:
        """The last ``tail`` lines of the VM's serial console ('' if there is none yet)."""
        ...

    def reap_strays(self, state: Path, live: Callable[[str], bool]) -> None:
        """Stop and remove VMs of state dir ``state`` whose ENV id is not ``live`` (asked just
        before removing), and VMs of state dirs that no longer exist."""
        ...


def clean_text(text: str) -> str:
    """``text`` safe to print on a terminal: escape sequences removed whole, then every control
    character but newline and tab (CR, BEL, backspace, DEL, C1). Every console tail ttenv shows
    goes through this: the guest writes its console, and the code under test is hostile."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def tail_text(data: bytes, lines: int) -> str:
    """The last ``lines`` lines of console output, made safe to print (``clean_text``)."""
    text = clean_text(data.decode(errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


def _read_end(path: Path, max_bytes: int) -> bytes:
    """At most the last ``max_bytes`` of ``path`` (b'' if unreadable): seeks, never reads it all."""
    if max_bytes <= 0:
        return b""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - max_bytes))
            return f.read(max_bytes)
    except OSError:
        return b""


def rotated(path: Path) -> Path:
    """Where ``cap_log`` keeps the end of ``path`` before truncating it."""
    return path.with_name(path.name + ".1")


def tail_file(path: Path, lines: int, max_bytes: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of a log file (with the end of its rotated part, ``<log>.1``, in
    front when the log itself is short), made safe to print; '' if absent. Reads at most
    ``max_bytes`` in all."""
    data = _read_end(path, max_bytes)
    if data.count(b"\n") < lines and len(data) < max_bytes:
        data = _read_end(rotated(path), max_bytes - len(data)) + data
    return tail_text(data, lines)


def cap_log(path: Path, limit: int = LOG_MAX, keep: int = LOG_KEEP) -> bool:
    """If the log ``path`` is longer than ``limit``: its last ``keep`` bytes into ``<log>.1``
    (replaced), then ``path`` truncated to nothing; returns whether it did. The writer (qemu, a
    file chardev with ``append=on``; qemu's stderr, opened O_APPEND) goes on at the new end. What is
    written between the copy and the truncation is lost: a few lines at worst."""
    try:
        if os.stat(path).st_size <= limit:
            return False
    except OSError:
        return False
    old = rotated(path)
    tmp = old.with_name(f"{old.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    write_private(tmp, _read_end(path, keep))
    os.replace(tmp, old)
    os.truncate(path, 0)
    return True


class _LogCapper:
    """One daemon thread per process: every ``CAP_INTERVAL`` s, ``cap_log`` on the logs of the VMs
    this process started, while they run (a guest writing its console as fast as it can fills
    at most its cap plus what it writes in one interval). VMs of no live ttenv process are capped
    by the next ``gc`` (any ttenv command that creates, and the server's reaper every second)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logs: dict[int, tuple[str, tuple[Path, ...]]] = {}  # pid -> (marker, logs)
        self._thread: threading.Thread | None = None

    def watch(self, pid: int, marker: str, logs: tuple[Path, ...]) -> None:
        with self._lock:
            self._logs[pid] = (marker, logs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ttenv-log-capper", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(CAP_INTERVAL)
            with self._lock:
                watched = list(self._logs.items())
            for pid, (marker, logs) in watched:
                try:
                    if not qemu.is_running(pid, marker):
                        with self._lock:
                            self._logs.pop(pid, None)
                        continue
                    for log in logs:
                        cap_log(log)
                except Exception:  # noqa: BLE001 - a vanished run dir: the VM is gone
                    continue


_CAPPER = _LogCapper()


def host_label(host: str) -> str:
    """A host as users see it: the host name of a libvirt URI ('' for this machine)."""
    return (urlsplit(host).hostname or "") if host else ""


def qmp_path(env_id: str, vm_name: str) -> Path:
    """The VM's QMP socket: in the short private runtime dir, not the (possibly deep) run dir."""
    return socket_dir(env_id) / f"{vm_name}.qmp"


def identity_path(env_id: str, vm_name: str) -> Path:
    """A warm VM's identity agent channel (its virtio-serial port's host end), beside its QMP socket."""
    return socket_dir(env_id) / f"{vm_name}.id"


# The qemu processes this process started, by pid, shared by every QemuEngine of the process: the
# one that stops a VM (another backend instance, gc) reaps its Popen, so none is left "still
# running" for the garbage collector to warn about in some unrelated test of the user's.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class QemuEngine:
    """One direct qemu process per VM on this machine (``qemu.py``), identified by its pid and
    its run dir in its command line; QMP on a socket in the runtime dir. ``bind_addr``: where SSH
    ports are forwarded; ``probe_addr``: where this machine reaches them."""

    name = "qemu"

    def __init__(
        self, bind_addr: str = "127.0.0.1", probe_addr: str = "127.0.0.1", progress: Callable[[str], None] | None = None
    ) -> None:
        self.bind_addr = bind_addr
        self._probe_addr = probe_addr
        self.progress = progress or (lambda line: None)
        self._procs = _CHILDREN

    def place(self, vms: Sequence[VmSpec], held: Sequence[VmInfo]) -> list[str]:
        return ["" for _ in vms]

    def address(self, host: str) -> str:
        return ""

    def probe_addr(self, vm: VmInfo) -> str:
        return self._probe_addr

    def start(self, job: Start) -> None:
        """Linked-clone overlay in the VM dir, then qemu; a taken port moves the VM (5 tries). With
        ``job.template``: the overlay clones the template's disk and qemu loads its saved state."""
        vmdir, image, info, template = job.vmdir, job.image, job.info, job.template
        overlay = vmdir / "overlay.qcow2"
        if template is not None:
            qemu.create_overlay(template.disk, overlay)
            write_private(vmdir / "template", str(template.path))
            made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(template.meta.get("created", 0)))
            write_private(vmdir / "console.log",
                f"ttenv: warm start from the saved state of {image.name} (template {template.key}, made {made}; "
                f"its boot log: {template.path / 'console.log'})\n"
            )  # fmt: skip
        else:
            qemu.create_overlay(image.file(image.disk), overlay, job.vm.resources.disk_mib)
        uefi_vars = None
        if image.kernel is None and (image.boot == "uefi" or image.arch == "aarch64"):
            uefi_vars = qemu.uefi_vars_copy(image.arch, vmdir / "uefi-vars.fd")
        for _attempt in range(5):
            cfg = qemu.QemuConfig(
                name=f"{job.spec.name}/{job.vm.name}", arch=image.arch, accel=job.accel, resources=job.vm.resources,
                disk=overlay, seed=job.seed,
                kernel=image.file(image.kernel) if image.kernel else None,
                initrd=image.file(image.initrd) if image.initrd else None,
                cmdline=job.cmdline, port=info.port, console=vmdir / "console.log",
                qmp=qmp_path(job.env.id, job.vm.name), pidfile=vmdir / "qemu.pid",
                tcg_cx16=qemu.tcg_cx16_safe(image.arch), uefi_vars=uefi_vars, bind_addr=self.bind_addr,
            )  # fmt: skip
            if template is not None:
                cfg = warm.qemu_config(
                    image, job.accel, job.vm.resources, name=cfg.name, disk=overlay, seed=job.seed, port=info.port,
                    rundir=vmdir, qmp=cfg.qmp, identity=identity_path(job.env.id, job.vm.name), cmdline=job.cmdline,
                    vmgenid=str(uuid.uuid4()), bind_addr=self.bind_addr, incoming=template.incoming(),
                )  # fmt: skip
            die = job.spec.owner_pid is not None and job.spec.die_with_owner
            proc = qemu.start(cfg, vmdir / "qemu.log", die_with_parent=die)
            self._procs[proc.pid] = proc
            info.pid, info.console = proc.pid, str(vmdir / "console.log")
            info.boot_seconds = time.time()  # start time until wait_vm turns it into the boot duration
            job.record()  # before any wait: a kill of this process from here on leaves a recorded qemu
            _CAPPER.watch(proc.pid, str(vmdir), (vmdir / "console.log", vmdir / "qemu.log"))
            if self._wait_monitor(proc, cfg.qmp):
                return
            log = tail_file(vmdir / "qemu.log", 5)
            if "host forwarding" not in log:
                raise BootError(f"qemu for VM {job.vm.name} exited at start: {log.splitlines()[-1] if log else ''}")
            info.port = job.move_port()  # its port was taken: move it
        raise TTError(f"no usable host port for VM {job.vm.name} after 5 tries")

    @staticmethod
    def _wait_monitor(proc: subprocess.Popen[bytes], qmp: Path, timeout: float = 10.0) -> bool:
        """True once qemu's monitor socket accepts connections; False if qemu exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if qmp.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(qmp))
                        return True
                    except OSError:
                        pass
            time.sleep(0.02)
        return proc.poll() is None

    @staticmethod
    def _marker(env: EnvInfo, vm: VmInfo) -> str:
        return str(Path(env.rundir) / vm.name)

    def dead(self, env: EnvInfo, vm: VmInfo) -> str | None:
        if qemu.is_running(vm.pid, self._marker(env, vm)):
            self._cap(env, vm)
            return None
        self._reap(vm.pid)
        return "qemu is not running"

    def boot_log(self, env: EnvInfo, vm: VmInfo) -> str:
        return tail_file(Path(env.rundir) / vm.name / "qemu.log", 3)

    def halt(self, env: EnvInfo, vm: VmInfo) -> None:
        qemu.stop(vm.pid, self._marker(env, vm), qmp_path(env.id, vm.name))
        self._reap(vm.pid)

    def remove(self, env: EnvInfo, vm: VmInfo) -> str | None:
        self.halt(env, vm)  # everything else of the VM is in the run dir, removed by the backend
        return None

    def _reap(self, pid: int) -> None:
        proc = self._procs.pop(pid, None)
        if proc is not None and proc.poll() is None:
            proc.wait(timeout=5)

    def snapshot(self, env: EnvInfo, vm: VmInfo, name: str) -> None:
        """QMP ``savevm`` (HMP through QMP): memory and disk, into the overlay."""
        self._hmp(env, vm, f"savevm {name}")

    def revert(self, env: EnvInfo, vm: VmInfo, name: str) -> None:
        """QMP ``loadvm``. qemu's ``loadvm`` pauses the VM before it looks for the snapshot and
        leaves it paused when there is none: then it is continued and NotFound raised."""
        try:
            self._hmp(env, vm, f"loadvm {name}")
        except TTError as exc:
            if type(exc) is not TTError or "does not exist" not in exc.message:
                raise
            qemu.qmp_command(qmp_path(env.id, vm.name), "cont", timeout=10)
            raise NotFound(f"VM {vm.name} has no snapshot named {name!r}", "snapshot it first") from None

    def _hmp(self, env: EnvInfo, vm: VmInfo, command: str) -> None:
        out = qemu.qmp_command(qmp_path(env.id, vm.name), "human-monitor-command", timeout=120,
                               **{"command-line": command})  # fmt: skip
        if isinstance(out, str) and out.strip():
            raise TTError(f"{command.split()[0]} on VM {vm.name} failed: {out.strip()}")

    def console(self, env: EnvInfo, vm: VmInfo, tail: int) -> str:
        self._cap(env, vm)
        return tail_file(Path(env.rundir) / vm.name / "console.log", tail)

    @staticmethod
    def _cap(env: EnvInfo, vm: VmInfo) -> None:
        """Rotate the VM's console and qemu logs if they grew past ``LOG_MAX``."""
        for log in ("console.log", "qemu.log"):
            try:
                cap_log(Path(env.rundir) / vm.name / log)
            except OSError:
                pass

    def reap_strays(self, state: Path, live: Callable[[str], bool]) -> None:
        """Kill qemu processes of state dir ``state`` whose run dir no longer exists (deleted from
        under them), cap the logs of the others, and drop socket dirs whose run dir is gone.

        Only this user's processes whose run dir is under ``<state>/envs/`` are considered: another
        user's, or another state dir's (another server, a test session), are never touched. A
        process that cannot be inspected or stopped is skipped with one progress line."""
        envs = Path(os.path.abspath(state / "envs"))
        for pid, vmdir in qemu.ttenv_processes():
            vmdir = Path(os.path.abspath(vmdir))
            if vmdir.parent.parent != envs:
                continue
            try:
                if vmdir.exists():
                    for log in ("console.log", "qemu.log"):
                        cap_log(vmdir / log)
                    continue
                qemu.stop(pid, str(vmdir), qmp_path(vmdir.parent.name, vmdir.name), grace=1.0)
                self._reap(pid)
            except Exception as exc:  # noqa: BLE001 - one process must not stop gc
                self.progress(f"gc: skipped qemu process {pid} ({vmdir}): {exc}")
        for root in runtime_candidates():
            if not is_private_dir(root):  # not made yet, or not ours: nothing of ours in it
                continue
            try:
                dirs = list(root.iterdir())
            except OSError:
                continue
            for sockets in dirs:
                try:
                    owner = Path((sockets / "rundir").read_text())
                    if Path(os.path.abspath(owner)).parent == envs and not owner.exists():
                        shutil.rmtree(sockets, ignore_errors=True)
                except OSError:
                    continue

    def reap_rundir(self, env_id: str, rundir: Path) -> None:
        """Stop qemu processes of a run dir that never made it into the store."""
        rundir = Path(os.path.abspath(rundir))
        for pid, vmdir in qemu.ttenv_processes():
            if Path(os.path.abspath(vmdir)).parent == rundir:
                qemu.stop(pid, str(vmdir), qmp_path(env_id, vmdir.name))
                self._reap(pid)
