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
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from pytest_ttenv.backend import qemu, warm
from pytest_ttenv.backend.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec
from pytest_ttenv.backend.paths import runtime_dir
from pytest_ttenv.errors import BootError, NotFound, TTError

ENGINES = ("qemu", "libvirt")
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\r")


@dataclass
class Start:
    """One VM prepared by LocalBackend for its engine to start.

    ``info`` is already in the store with its host and SSH port; the engine sets ``pid`` (0 where
    it has no local process), ``console`` and ``boot_seconds`` (the start time, until wait_vm
    turns it into the boot duration). ``move_port()`` reserves another port for the VM and returns
    it: the engine calls it when the host's port turns out to be taken.
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


def tail_file(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file, terminal escapes and CRs removed ('' if absent)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return tail_text(data, lines)


def tail_text(data: bytes, lines: int) -> str:
    """The last ``lines`` lines of console output, terminal escapes and CRs removed."""
    text = _ANSI.sub(b"", data).decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def host_label(host: str) -> str:
    """A host as users see it: the host name of a libvirt URI ('' for this machine)."""
    return (urlsplit(host).hostname or "") if host else ""


def qmp_path(env_id: str, vm_name: str) -> Path:
    """The VM's QMP socket: in the short private runtime dir, not the (possibly deep) run dir."""
    return runtime_dir() / env_id / f"{vm_name}.qmp"


def identity_path(env_id: str, vm_name: str) -> Path:
    """A warm VM's identity agent channel (its virtio-serial port's host end), beside its QMP socket."""
    return runtime_dir() / env_id / f"{vm_name}.id"


class QemuEngine:
    """One direct qemu process per VM on this machine (``qemu.py``), identified by its pid and
    its run dir in its command line; QMP on a socket in the runtime dir. ``bind_addr``: where SSH
    ports are forwarded; ``probe_addr``: where this machine reaches them."""

    name = "qemu"

    def __init__(self, bind_addr: str = "127.0.0.1", probe_addr: str = "127.0.0.1") -> None:
        self.bind_addr = bind_addr
        self._probe_addr = probe_addr
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

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
            (vmdir / "template").write_text(str(template.path))
            made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(template.meta.get("created", 0)))
            (vmdir / "console.log").write_text(
                f"ttenv: warm start from the saved state of {image.name} (template {template.key}, made {made}; "
                f"its boot log: {template.path / 'console.log'})\n"
            )
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
            info.pid, info.console = proc.pid, str(vmdir / "console.log")
            info.boot_seconds = time.time()  # start time until wait_vm turns it into the boot duration
            self._procs[proc.pid] = proc
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
        return tail_file(Path(env.rundir) / vm.name / "console.log", tail)

    def reap_strays(self, state: Path, live: Callable[[str], bool]) -> None:
        """Kill qemu processes and drop socket dirs whose run dir no longer exists (its state
        was deleted from under it), whichever state dir they belonged to."""
        for pid, vmdir in qemu.ttenv_processes():
            if not vmdir.exists():
                qemu.stop(pid, str(vmdir), qmp_path(vmdir.parent.name, vmdir.name), grace=1.0)
        for sockets in runtime_dir().iterdir():
            try:
                owner = Path((sockets / "rundir").read_text())
            except OSError:
                continue
            if not owner.exists():
                shutil.rmtree(sockets, ignore_errors=True)

    def reap_rundir(self, env_id: str, rundir: Path) -> None:
        """Stop qemu processes of a run dir that never made it into the store."""
        for pid, vmdir in qemu.ttenv_processes():
            if vmdir.parent == rundir:
                qemu.stop(pid, str(vmdir), qmp_path(env_id, vmdir.name))
