"""The qemu engine: one direct qemu process per VM on this machine (``qemu`` runs the processes),
no daemon. A VM is identified by its pid and its run dir in its command line; QMP is on a socket in
the short runtime dir (``qemu.qmp_path``). Warm starts: ``qemu_warm``.

Files in a VM's run dir: ``overlay.qcow2`` (linked clone of the image, or of a warm template's
disk), ``console.log`` and ``qemu.log`` (capped: ``console.cap_log``), ``qemu.pid``, and for UEFI
boot ``uefi-vars.qcow2`` (its firmware variables: qcow2, so ``savevm`` snapshots them with the disk).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.engines.base import DIFF_FILE, Boot, Machine, Saved, Start, waiting
from pytest_ttenv.backend.engines.console import cap_log, tail_file
from pytest_ttenv.backend.engines.deferred import start_all
from pytest_ttenv.backend.engines.net import ssh_banner
from pytest_ttenv.backend.engines.qemu import identity_path, qmp_path
from pytest_ttenv.backend.engines.qemu_capture import restore_config, save
from pytest_ttenv.backend.engines.qemu_warm import WarmStarts
from pytest_ttenv.backend.engines.templates import UEFI_VARS, Template
from pytest_ttenv.backend.engines.warm import qemu_config, template_budget
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec
from pytest_ttenv.core.paths import is_private_dir, runtime_candidates, runtime_dir
from pytest_ttenv.errors import BootError, NotFound, TTError, UsageError

CAP_INTERVAL = 2.0  # seconds between two checks of the logs of the VMs this process started
SOCKET_PATH_MAX = 107  # bytes in a unix socket path (sun_path less its NUL)


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

# The qemu processes this process started, by pid, shared by every QemuEngine of the process: the
# one that stops a VM (another backend instance, gc) reaps its Popen, so none is left "still
# running" for the garbage collector to warn about in some unrelated test of the user's.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class QemuEngine:
    """The qemu engine (see the module doc). ``bind_addr``: where SSH ports are forwarded;
    ``probe_addr``: where this machine reaches them."""

    name = "qemu"

    def __init__(
        self, bind_addr: str = "127.0.0.1", probe_addr: str = "127.0.0.1", progress: Callable[[str], None] | None = None
    ) -> None:
        self.bind_addr = bind_addr
        self._probe_addr = probe_addr
        self.progress = progress or (lambda line: None)
        self._procs = _CHILDREN
        self.warm = WarmStarts(self.progress)

    def place(self, vms: Sequence[VmSpec], held: Sequence[VmInfo]) -> list[str]:
        return ["" for _ in vms]

    def address(self, host: str) -> str:
        return ""

    def plan(self, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str) -> Boot:
        return self.warm.plan(spec, vm, image, accel, owner)

    # -- start -----------------------------------------------------------------------------------
    def start(self, jobs: Sequence[Start]) -> None:
        """Each VM cold, or warm from its template; VMs whose template does not exist yet wait
        (recorded with pid 0, no console) while one thread per template makes it, then start
        (``deferred.start_all``)."""
        longest = max((len(str(qmp_path(job.env.id, job.vm.name))) for job in jobs), default=0)
        if longest > SOCKET_PATH_MAX:
            raise UsageError(
                f"{runtime_dir()} is too deep for qemu's monitor socket paths", "set TMPDIR to a shorter path"
            )
        start_all(jobs, self.warm, self._launch, self.progress)

    def _launch(self, job: Start, template: Template | None) -> None:
        """Linked-clone overlay in the VM dir, then qemu; a taken port moves the VM (5 tries). With
        ``template``: the overlay clones the template's disk and qemu loads its saved state."""
        vmdir, image = job.vmdir, job.image
        overlay = vmdir / "overlay.qcow2"
        if template is not None:
            self.warm.clone(job, template, overlay)
        else:
            qemu.create_overlay(image.file(image.disk), overlay, job.vm.resources.disk_mib)
        uefi_vars = None
        if qemu.uses_uefi(image):  # qcow2, so savevm snapshots it (tt_vm_fresh); a warm VM's starts as its template's
            source = template.uefi_vars if template is not None else None
            uefi_vars = qemu.uefi_vars_copy(image.arch, vmdir / UEFI_VARS, source)

        def config(port: int) -> qemu.QemuConfig:
            cfg = qemu.QemuConfig(
                name=f"{job.spec.name}/{job.vm.name}",
                arch=image.arch,
                accel=job.accel,
                resources=job.vm.resources,
                disk=overlay,
                seed=job.seed,
                kernel=image.file(image.kernel) if image.kernel else None,
                initrd=image.file(image.initrd) if image.initrd else None,
                cmdline=job.cmdline,
                port=port,
                console=vmdir / "console.log",
                qmp=qmp_path(job.env.id, job.vm.name),
                pidfile=vmdir / "qemu.pid",
                tcg_cx16=qemu.tcg_cx16_safe(image.arch),
                uefi_vars=uefi_vars,
                bind_addr=self.bind_addr,
                identity=identity_path(job.env.id, job.vm.name),  # a capture starts its agent
            )
            if template is None:
                return cfg
            return qemu_config(
                image,
                job.accel,
                job.vm.resources,
                name=cfg.name,
                disk=overlay,
                seed=job.seed,
                port=port,
                rundir=vmdir,
                qmp=cfg.qmp,
                identity=identity_path(job.env.id, job.vm.name),
                cmdline=job.cmdline,
                vmgenid=str(uuid.uuid4()),
                bind_addr=self.bind_addr,
                incoming=template.incoming(),
                uefi_vars=uefi_vars,
                ram=template.ram,
            )

        self._run(job, config, f"warm start from template {template.key}" if template is not None else "booting")

    def restore(self, job: Start, machine: Machine) -> None:
        """qemu loads the VM's saved state (``qemu_capture.restore_config``); it is sent its
        identity once it runs, as a warm VM is."""
        self.warm.keep_identity(job)

        def config(port: int) -> qemu.QemuConfig:
            return restore_config(
                machine,
                job.image,
                job.accel,
                name=f"{job.spec.name}/{job.vm.name}",
                vmdir=job.vmdir,
                seed=job.seed,
                port=port,
                qmp=qmp_path(job.env.id, job.vm.name),
                identity=identity_path(job.env.id, job.vm.name),
                bind_addr=self.bind_addr,
            )

        self._run(job, config, "restoring its captured state")

    def _run(self, job: Start, config: Callable[[int], qemu.QemuConfig], how: str) -> None:
        """Start qemu with ``config(port)``, recorded at once; a taken port moves the VM (5 tries)."""
        vmdir, info = job.vmdir, job.info
        for _attempt in range(5):
            cfg = config(info.port)
            die = job.spec.owner_pid is not None and job.spec.die_with_owner
            proc = qemu.start(cfg, vmdir / "qemu.log", die_with_parent=die)
            self._procs[proc.pid] = proc
            info.pid, info.console = proc.pid, str(vmdir / "console.log")
            info.boot_seconds = time.time()  # start time until wait_vm turns it into the boot duration
            job.record()  # before any wait: a kill of this process from here on leaves a recorded qemu
            _CAPPER.watch(proc.pid, str(vmdir), (vmdir / "console.log", vmdir / "qemu.log"))
            if self._wait_monitor(proc, cfg.qmp):
                qemu.load_state(cfg)  # a VM mapping its template's RAM loads the rest of its state now
                self.progress(f"{job.vm.name}: {how} ({job.accel}, ssh port {info.port})")
                return
            log = tail_file(vmdir / "qemu.log", 5)
            if "host forwarding" not in log:
                raise BootError(f"qemu for VM {job.vm.name} exited at start: {log.splitlines()[-1] if log else ''}")
            info.port = job.move_port()  # its port was taken: move it
        raise TTError(f"no usable host port for VM {job.vm.name} after 5 tries")

    def capture(self, env: EnvInfo, vm: VmInfo, image: ImageInfo, work: Path) -> Saved:
        """``qemu_capture.save``: paused while its state and disk are saved, then it runs on."""
        vmdir = Path(env.rundir) / vm.name
        qmp, ident = qmp_path(env.id, vm.name), identity_path(env.id, vm.name)
        return save(vm.pid, vmdir, qmp, ident, image, work, f"VM {vm.name}")

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

    def ready(self, env: EnvInfo, vm: VmInfo, timeout: float) -> bool:
        if vm.boot == "warm":
            return self.warm.ready(env, vm)
        return ssh_banner(self._probe_addr, vm.port, timeout)

    def wait_budget(self, vm: VmInfo, boot_timeout: float) -> float:
        extra = template_budget(boot_timeout) if waiting(vm) and vm.boot == "warm" else 0.0
        return boot_timeout + extra

    def boot_failure(self, env: EnvInfo, vm: VmInfo, why: str) -> str:
        """With qemu's last words; a warm VM whose qemu could not load its template's state drops
        that template (the next ENV makes a new one)."""
        detail = tail_file(Path(env.rundir) / vm.name / "qemu.log", 3)
        if vm.boot != "warm":
            return f"VM {vm.name} died during boot ({why}) {detail}".strip()
        vmdir = Path(env.rundir) / vm.name
        if (vmdir / DIFF_FILE).exists():  # a replay qemu could not load
            diff = (vmdir / DIFF_FILE).read_text()
            return f"VM {vm.name}: qemu could not load the capture ({diff}): {detail}".strip()
        dropped = self.warm.drop_bad(vmdir, detail)
        msg = f"VM {vm.name} died during its warm start ({why}) {detail}".strip()
        return msg + ("; its template was removed" if dropped else "")

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
        leaves it paused when there is none: then it is continued and NotFound raised. A warm VM
        is then sent the time and fresh entropy (its identity agent)."""
        try:
            self._hmp(env, vm, f"loadvm {name}")
        except TTError as exc:
            if type(exc) is not TTError or "does not exist" not in exc.message:
                raise
            qemu.qmp_command(qmp_path(env.id, vm.name), "cont", timeout=10)
            raise NotFound(f"VM {vm.name} has no snapshot named {name!r}", "snapshot it first") from None
        if vm.boot == "warm":
            self.warm.refresh(env, vm)

    def _hmp(self, env: EnvInfo, vm: VmInfo, command: str) -> None:
        out = qemu.qmp_command(
            qmp_path(env.id, vm.name), "human-monitor-command", timeout=120, **{"command-line": command}
        )
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

    def reap_saved(self, images: Sequence[ImageInfo]) -> None:
        self.warm.reap(images)

    def abandon(self, env_id: str, rundir: Path) -> None:
        """Stop qemu processes of a run dir that never made it into the store."""
        rundir = Path(os.path.abspath(rundir))
        for pid, vmdir in qemu.ttenv_processes():
            if Path(os.path.abspath(vmdir)).parent == rundir:
                qemu.stop(pid, str(vmdir), qmp_path(env_id, vmdir.name))
                self._reap(pid)
