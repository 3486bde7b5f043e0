"""The qemu engine: one direct qemu process per VM, no daemon.

``build_argv`` is pure (unit-tested); the rest starts, inspects and stops processes.
A VM's process is identified by its pid *and* its run dir appearing in its command line,
so a reused pid is never mistaken for the VM.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.backend.model import Resources
from pytest_ttenv.errors import TTError

QEMU_BINARY = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64", "riscv64": "qemu-system-riscv64"}
QEMU_PACKAGE = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm", "riscv64": "qemu-system-misc"}
GUEST_MAC = "52:54:00:12:34:56"  # qemu's default for a first NIC, set explicitly: the seed matches on it
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class QemuConfig:
    """Everything one qemu invocation needs; paths are absolute."""

    name: str
    arch: str
    accel: str  # kvm | tcg
    resources: Resources
    disk: Path
    seed: Path | None
    kernel: Path | None
    initrd: Path | None
    cmdline: str
    port: int
    console: Path
    qmp: Path
    pidfile: Path
    uefi_vars: Path | None = None  # UEFI boot: this VM's writable copy of the firmware variables
    tcg_cx16: bool = True  # False: hide CMPXCHG16B from x86_64 TCG guests (see tcg_cx16_safe)
    bind_addr: str = "127.0.0.1"  # host address the SSH port is forwarded on (a server: its listen address)


def build_argv(cfg: QemuConfig) -> list[str]:
    """The qemu command line for ``cfg``: direct kernel boot, virtio disk/net/rng, user-mode
    networking with guest port 22 forwarded from ``bind_addr``:``port``, serial console to a file,
    QMP on a unix socket. TCG uses multi-threaded translation with a 64 MiB translation cache.
    Without a kernel the image's own boot loader runs under the firmware (SeaBIOS, or UEFI when
    ``uefi_vars`` is given), booting from the root disk first. No NIC option ROM is loaded
    (iPXE: nothing network-boots, and it costs firmware time under emulation).
    """
    if cfg.accel == "kvm":
        accel, cpu = ["-accel", "kvm"], "host"
    else:
        accel, cpu = ["-accel", "tcg,thread=multi,tb-size=64"], "max" if cfg.tcg_cx16 else "max,-cx16"
    if cfg.arch == "x86_64":
        machine = ["-machine", "q35"]
    elif cfg.arch == "aarch64":
        machine = ["-machine", "virt,gic-version=max" if cfg.accel == "kvm" else "virt"]
        cpu = "host" if cfg.accel == "kvm" else "max,pauth-impdef=on"
    else:
        machine = ["-machine", "virt"]
        cpu = "rv64" if cfg.accel != "kvm" else "host"
    argv = [
        QEMU_BINARY[cfg.arch], "-name", f"ttenv:{cfg.name}",
        "-nodefaults", "-no-user-config", "-display", "none",
        *machine, *accel, "-cpu", cpu,
        "-smp", str(cfg.resources.cpu), "-m", str(cfg.resources.mem_mib),
        "-chardev", f"file,id=console,path={cfg.console}", "-serial", "chardev:console",
        "-qmp", f"unix:{cfg.qmp},server=on,wait=off",
        "-pidfile", str(cfg.pidfile),
        "-drive", f"if=none,id=root,file={cfg.disk},format=qcow2,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-pci,drive=root" + (",bootindex=0" if cfg.kernel is None else ""),
        "-netdev", f"user,id=net0,hostfwd=tcp:{cfg.bind_addr}:{cfg.port}-:22",
        "-device", f"virtio-net-pci,netdev=net0,mac={GUEST_MAC},romfile=",
        "-device", "virtio-rng-pci",
        # A guest kernel panic ends qemu, so a dead guest is seen at once, not after a timeout.
        "-device", "pvpanic" if cfg.arch == "x86_64" else "pvpanic-pci", "-action", "panic=exit-failure",
    ]  # fmt: skip
    if cfg.seed is not None:
        argv += ["-drive", f"if=none,id=seed,file={cfg.seed},format=raw,readonly=on"]
        argv += ["-device", "virtio-blk-pci,drive=seed"]
    if cfg.kernel is not None:
        argv += ["-kernel", str(cfg.kernel), "-append", cfg.cmdline]
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]
    elif cfg.uefi_vars is not None:  # the image's own boot loader, under UEFI firmware
        code, _ = UEFI_FIRMWARE[cfg.arch]
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}"]
        argv += ["-drive", f"if=pflash,format=raw,unit=1,file={cfg.uefi_vars}"]
    # else: the image's own boot loader under the default BIOS (SeaBIOS boots virtio-blk)
    return argv


# (firmware code, template of its variable store) per arch, from Debian's ovmf / qemu-efi-aarch64
UEFI_FIRMWARE = {
    "x86_64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "aarch64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
}
UEFI_PACKAGE = {"x86_64": "ovmf", "aarch64": "qemu-efi-aarch64"}


def uefi_vars_copy(arch: str, dest: Path) -> Path:
    """A per-VM writable copy of the UEFI variable store for ``arch`` (TTError if not installed)."""
    if arch not in UEFI_FIRMWARE or not Path(UEFI_FIRMWARE[arch][0]).exists():
        pkg = UEFI_PACKAGE.get(arch)
        raise TTError(f"no UEFI firmware for {arch} guests", f"apt-get install -y {pkg}" if pkg else None)
    shutil.copyfile(UEFI_FIRMWARE[arch][1], dest)
    return dest


def tcg_cx16_safe(arch: str) -> bool:
    """Whether an x86_64 TCG guest may see CMPXCHG16B.

    QEMU 7.2's multi-threaded TCG intermittently double-faults Linux 6.12 guests (Debian 13)
    in SLUB's per-CPU ``cmpxchg16b`` (measured: 4 of 5 boots panicked; 0 of 3 without cx16,
    0 of 2 single-threaded but 50 % slower). So QEMU < 8 hides the flag under TCG; newer QEMUs
    keep it (not verified on them). Guests that require x86-64-v2 (EL9) need cx16: KVM or QEMU >= 8.
    """
    if arch != "x86_64":
        return True
    m = re.search(r"version (\d+)\.", version(arch))
    return m is None or int(m.group(1)) >= 8


def create_overlay(base: Path, overlay: Path, size_mib: int = 0) -> None:
    """Create a qcow2 linked clone of ``base`` (backing file, never a copy), optionally larger."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)]
    if size_mib:
        argv.append(f"{size_mib}M")
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise TTError(f"cannot create overlay {overlay}: {res.stderr.strip()}")


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start(cfg: QemuConfig, log: Path, die_with_parent: bool) -> subprocess.Popen[bytes]:
    """Start qemu for ``cfg`` in its own session; stdout/stderr go to ``log``.

    ``die_with_parent``: the kernel kills qemu when the calling thread's process dies
    (call from a long-lived thread: PDEATHSIG follows the forking thread).
    """
    with open(log, "ab") as out:
        try:
            return subprocess.Popen(
                build_argv(cfg), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent if die_with_parent else None,
            )  # fmt: skip
        except FileNotFoundError:
            raise TTError(
                f"{QEMU_BINARY[cfg.arch]} not found", f"apt-get install -y {QEMU_PACKAGE[cfg.arch]}"
            ) from None


def is_running(pid: int, marker: str) -> bool:
    """True if ``pid`` is a live (non-zombie) process whose command line contains ``marker``."""
    if pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X") and marker.encode() in cmdline


def qmp_command(qmp: Path, command: str, timeout: float = 3.0, **args: object) -> object:
    """Run one QMP command on the VM's monitor socket and return its result."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    mon = QEMUMonitorProtocol(str(qmp))
    mon.connect()
    try:
        mon.settimeout(timeout)
        return mon.cmd(command, **args) if args else mon.cmd(command)
    finally:
        mon.close()


def stop(pid: int, marker: str, qmp: Path, grace: float = 2.0) -> None:
    """Stop the VM's qemu: QMP ``quit``, then SIGTERM, then SIGKILL; returns once it is gone."""
    if not is_running(pid, marker):
        _reap(pid)
        return
    try:
        qmp_command(qmp, "quit", timeout=1.0)
    except Exception:  # noqa: BLE001 - a dead or wedged monitor just means we escalate
        pass
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and is_running(pid, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and is_running(pid, marker):
            _reap(pid)
            time.sleep(0.02)
        if not is_running(pid, marker):
            break
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our exited child (no zombie left behind); ignore otherwise."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def version(arch: str = "x86_64") -> str:
    """qemu's version string (``QEMU emulator version 7.2.x``), or '' if qemu is missing."""
    try:
        out = subprocess.run([QEMU_BINARY[arch], "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0].strip() if out else ""


def ttenv_processes() -> list[tuple[int, Path]]:
    """Every live qemu process started by ttenv on this host, with its VM run dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) < 3 or args[1:3] != [b"-name", args[2]] or not args[2].startswith(b"ttenv:"):
            continue
        for arg in args:
            if arg.startswith(b"file,id=console,path="):
                console = Path(arg.split(b"path=", 1)[1].decode(errors="replace"))
                if is_running(int(entry.name), str(console.parent)):
                    found.append((int(entry.name), console.parent))
    return found
