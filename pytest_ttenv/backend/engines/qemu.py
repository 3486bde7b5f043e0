"""qemu itself, for the qemu engine (``qemu_engine``): one direct qemu process per VM, no daemon.

``build_argv`` is pure (unit-tested); the rest starts, inspects and stops processes.
A VM's process is identified by its pid *and* its run dir appearing in its command line,
so a reused pid is never mistaken for the VM.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.backend.engines.base import GUEST_MAC
from pytest_ttenv.backend.engines.qemu_arch import QEMU_ARCH, QEMU_BINARY, QEMU_PACKAGE
from pytest_ttenv.core.model import ImageInfo, Resources
from pytest_ttenv.core.paths import socket_dir
from pytest_ttenv.errors import TTError

RAM_ID = "ttenv.ram"  # the memory backend of a VM whose RAM is a file (VM templating)
SHARED_RAM_QEMU = 5  # qemu major version from which a machine takes its RAM from -machine memory-backend=
IDENTITY_PORT = "org.ttenv.identity"  # the virtio-serial port name the guest's identity agent serves
_PR_SET_PDEATHSIG = 1
PRIVATE_UMASK = 0o077  # qemu and qemu-img run with it: disks, console logs, pidfiles, saved states 0600


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
    uefi_vars: Path | None = None  # UEFI boot: this VM's writable copy of the firmware variables (qcow2 if so named)
    tcg_cx16: bool = True  # False: hide CMPXCHG16B from x86_64 TCG guests (see tcg_cx16_safe)
    bind_addr: str = "127.0.0.1"  # host address the SSH port is forwarded on (a server: its listen address)
    identity: Path | None = None  # unix socket of the virtio-serial port the identity agent serves
    vmgenid: str | None = None  # warm boot (x86_64): the VM generation ID, a GUID new for every VM
    incoming: str | None = None  # warm boot: the migration stream to start from (``exec:...``)
    ram_file: Path | None = None  # VM templating: guest RAM in this file (see build_argv) ...
    ram_share: bool = False  # ... written through (a template) or mapped copy-on-write (a clone)
    ram_anon: bool = False  # guest RAM in plain memory named as a RAM file's (a replay of a VM that mapped one)
    machine_type: str = ""  # a versioned machine type (``pc-q35-7.2``) instead of the arch's alias (a replay)


def qmp_path(env_id: str, vm_name: str) -> Path:
    """The VM's QMP socket: in the short private runtime dir, not the (possibly deep) run dir."""
    return socket_dir(env_id) / f"{vm_name}.qmp"


def identity_path(env_id: str, vm_name: str) -> Path:
    """A VM's identity agent channel (its virtio-serial port's host end), beside its QMP socket."""
    return socket_dir(env_id) / f"{vm_name}.id"


def build_argv(cfg: QemuConfig) -> list[str]:
    """The qemu command line for ``cfg``: direct kernel boot, virtio disk/net/rng, user-mode
    networking with guest port 22 forwarded from ``bind_addr``:``port`` (the NIC's MAC: ``GUEST_MAC``),
    serial console to a file, QMP on a unix socket. TCG uses multi-threaded translation with a 64 MiB translation cache.
    Without a kernel the image's own boot loader runs under the firmware (SeaBIOS, or UEFI when
    ``uefi_vars`` is given: a ``.qcow2`` variable store is given to the pflash device as qcow2, so
    ``savevm`` can snapshot it with the disk), booting from the root disk first. No NIC option ROM is loaded
    (iPXE: nothing network-boots, and it costs firmware time under emulation).
    ``identity`` adds the identity agent's virtio-serial port (every VM of the engine has it; a cold
    VM's agent is started only to capture it); warm boot adds a VM generation ID (x86_64) and, for
    a VM started from a saved state, ``-incoming``. ``machine_type`` and ``ram_anon``: a replay's.
    With ``ram_file`` the guest's RAM is that file
    (``memory-backend-file``): ``ram_share`` maps it shared (a template writes its RAM there, and
    its saved state leaves that RAM out), else private, copy-on-write (a clone of the template:
    its RAM pages stay the file's until the guest writes them, so clones share what they do not
    change); a clone loads its state only after ``load_state`` has set ``x-ignore-shared``.
    The console log is always opened for appending (``append=on``), so the backend can cap it by
    truncating it from outside (``console.cap_log``): qemu's next write then starts at the new end.
    """
    spec = QEMU_ARCH[cfg.arch]
    accel = ["-accel", "kvm"] if cfg.accel == "kvm" else ["-accel", "tcg,thread=multi,tb-size=64"]
    cpu = spec.cpu_for(cfg.accel) + ("" if cfg.accel == "kvm" or cfg.tcg_cx16 else ",-cx16")
    machine = ["-machine", spec.machine_for(cfg.accel)]
    bus = spec.bus
    if cfg.machine_type:
        machine[-1] = ",".join([cfg.machine_type, *machine[-1].split(",")[1:]])
    if cfg.ram_file is not None or cfg.ram_anon:
        machine[-1] += f",memory-backend={RAM_ID}"
    argv = [
        spec.binary,
        "-name",
        f"ttenv:{cfg.name}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        *machine,
        *accel,
        "-cpu",
        cpu,
        "-smp",
        str(cfg.resources.cpu),
        "-m",
        str(cfg.resources.mem_mib),
        "-chardev",
        f"file,id=console,path={cfg.console},append=on",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{cfg.qmp},server=on,wait=off",
        "-pidfile",
        str(cfg.pidfile),
        "-drive",
        f"if=none,id=root,file={cfg.disk},format=qcow2,cache=unsafe,discard=unmap",
        "-device",
        f"virtio-blk-{bus},drive=root" + (",bootindex=0" if cfg.kernel is None else ""),
        "-netdev",
        f"user,id=net0,hostfwd=tcp:{cfg.bind_addr}:{cfg.port}-:22",
        "-device",
        f"virtio-net-{bus},netdev=net0,mac={GUEST_MAC}" + (",romfile=" if bus == "pci" else ""),
        "-device",
        f"virtio-rng-{bus}",
        # A guest kernel panic ends qemu, so a dead guest is seen at once, not after a timeout.
        "-action",
        "panic=exit-failure",
    ]
    if spec.panic is not None:
        argv += ["-device", spec.panic]
    if cfg.identity is not None:
        argv += ["-device", f"virtio-serial-{bus},id=vser"]
        argv += ["-chardev", f"socket,id=identity,path={cfg.identity},server=on,wait=off"]
        argv += ["-device", f"virtserialport,chardev=identity,name={IDENTITY_PORT}"]
    if cfg.vmgenid is not None and spec.vmgenid:
        argv += ["-device", f"vmgenid,id=vmgenid0,guid={cfg.vmgenid}"]
    if cfg.seed is not None:
        argv += ["-drive", f"if=none,id=seed,file={cfg.seed},format=raw,readonly=on"]
        argv += ["-device", f"virtio-blk-{bus},drive=seed"]
    if cfg.kernel is not None:
        argv += ["-kernel", str(cfg.kernel), "-append", cfg.cmdline]
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]
    elif cfg.uefi_vars is not None:  # the image's own boot loader, under UEFI firmware
        code, _ = UEFI_FIRMWARE[cfg.arch]
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}"]
        fmt = "qcow2" if cfg.uefi_vars.suffix == ".qcow2" else "raw"
        argv += ["-drive", f"if=pflash,format={fmt},unit=1,file={cfg.uefi_vars}"]
    # else: the image's own boot loader under the default BIOS (SeaBIOS boots virtio-blk)
    if cfg.ram_file is not None:
        share = "on" if cfg.ram_share else "off"
        mem = f"size={cfg.resources.mem_mib}M,mem-path={cfg.ram_file},share={share}"
        argv += ["-object", f"memory-backend-file,id={RAM_ID},{mem}"]
    elif cfg.ram_anon:
        argv += ["-object", f"memory-backend-ram,id={RAM_ID},size={cfg.resources.mem_mib}M"]
    if cfg.incoming is not None:
        argv += ["-incoming", "defer" if deferred_incoming(cfg) else cfg.incoming]
    return argv


def deferred_incoming(cfg: QemuConfig) -> bool:
    """Whether the VM loads its state only when ``load_state`` says so (its RAM is a template's)."""
    return cfg.incoming is not None and cfg.ram_file is not None and not cfg.ram_share


# (firmware code, template of its variable store) per arch, from Debian's ovmf / qemu-efi-aarch64 / qemu-efi-arm
UEFI_FIRMWARE = {
    "x86_64": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "aarch64": ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),
    "armhf": ("/usr/share/AAVMF/AAVMF32_CODE.fd", "/usr/share/AAVMF/AAVMF32_VARS.fd"),
}
UEFI_PACKAGE = {"x86_64": "ovmf", "aarch64": "qemu-efi-aarch64", "armhf": "qemu-efi-arm"}


def uses_uefi(image: ImageInfo) -> bool:
    """Whether the image's own boot loader runs under UEFI firmware (no kernel given, and UEFI
    asked for or the only firmware of its arch)."""
    return image.kernel is None and (image.boot == "uefi" or image.arch == "aarch64")


def require_uefi(arch: str) -> None:
    """TTError, one line with the apt command, if there is no UEFI firmware for ``arch`` guests."""
    if arch not in UEFI_FIRMWARE or not Path(UEFI_FIRMWARE[arch][0]).exists():
        pkg = UEFI_PACKAGE.get(arch)
        raise TTError(f"no UEFI firmware for {arch} guests", f"apt-get install -y {pkg}" if pkg else None)


def uefi_vars_copy(arch: str, dest: Path, source: Path | None = None) -> Path:
    """A per-VM writable copy (0600) of the UEFI variable store for ``arch``: the firmware's empty
    one, or ``source`` (a warm template's). Written as qcow2 if ``dest`` ends in ``.qcow2`` (then
    ``savevm`` snapshots it like the disk), else raw. TTError if the firmware is not installed."""
    require_uefi(arch)
    src = source or Path(UEFI_FIRMWARE[arch][1])
    if dest.suffix != ".qcow2":
        shutil.copyfile(src, dest)
        dest.chmod(0o600)
        return dest
    fmt = "qcow2" if src.suffix == ".qcow2" else "raw"
    argv = ["qemu-img", "convert", "-q", "-f", fmt, "-O", "qcow2", str(src), str(dest)]
    res = subprocess.run(argv, capture_output=True, text=True, umask=PRIVATE_UMASK)
    if res.returncode != 0:
        raise TTError(f"cannot copy the UEFI variable store {src} to {dest}: {res.stderr.strip()}")
    dest.chmod(0o600)
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
    major = major_version(arch)
    return major is None or major >= 8


def major_version(arch: str) -> int | None:
    """The major version of this host's qemu for ``arch`` guests (None if unknown)."""
    m = re.search(r"version (\d+)\.", version(arch))
    return int(m.group(1)) if m else None


def create_overlay(base: Path, overlay: Path, size_mib: int = 0) -> None:
    """Create a qcow2 linked clone of ``base`` (backing file, never a copy), optionally larger.
    The backing file is recorded by its real path: a link to it (an image dir reached through a
    symlink) may be gone when the clone is next opened."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base.resolve()), str(overlay)]
    if size_mib:
        argv.append(f"{size_mib}M")
    res = subprocess.run(argv, capture_output=True, text=True, umask=PRIVATE_UMASK)
    if res.returncode != 0:
        raise TTError(f"cannot create overlay {overlay}: {res.stderr.strip()}")
    overlay.chmod(0o600)  # an overlay made by an older qemu-img that ignored the umask


def backing_file(path: Path) -> str | None:
    """The backing file a qcow2 image names in its header (None if it has none); TTError if
    ``path`` is not a readable qcow2 image."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                raise TTError(f"{path} is not a qcow2 image")
            offset, size = int.from_bytes(header[8:16], "big"), int.from_bytes(header[16:20], "big")
            if offset == 0:
                return None
            f.seek(offset)
            return f.read(min(size, 1023)).decode(errors="replace")
    except OSError as exc:
        raise TTError(f"cannot read {path}: {exc}") from None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def require(arch: str) -> None:
    """TTError, one line with the apt command, if qemu for ``arch`` guests is not installed."""
    if shutil.which(QEMU_BINARY[arch]) is None:
        raise TTError(f"{QEMU_BINARY[arch]} not found", f"apt-get install -y {QEMU_PACKAGE[arch]}")


def start(cfg: QemuConfig, log: Path, die_with_parent: bool) -> subprocess.Popen[bytes]:
    """Start qemu for ``cfg`` in its own session; stdout/stderr go to ``log`` (0600, appended to).
    qemu runs with umask 077: every file it creates (console log, pidfile, a saved state) is 0600.

    ``die_with_parent``: the kernel kills qemu when the calling thread's process dies
    (call from a long-lived thread: PDEATHSIG follows the forking thread).
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "ab") as out:
        try:
            return subprocess.Popen(
                build_argv(cfg),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if die_with_parent else None,
                umask=PRIVATE_UMASK,
            )
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
    """Run one QMP command on the VM's monitor socket and return its result; connecting and the
    command each wait at most ``timeout`` s (``TimeoutError``). Each call runs on an event loop of
    its own that is closed afterwards, with the socket: qemu.qmp's sync shim (``legacy``) keeps a
    loop per thread open forever, which a project running with ``filterwarnings = error`` sees as
    an unclosed-resource error in whichever of its tests the garbage collector runs."""
    from qemu.qmp import QMPClient

    async def call() -> object:
        client = QMPClient()
        try:
            await asyncio.wait_for(client.connect(str(qmp)), timeout)
            return await asyncio.wait_for(client.execute(command, dict(args) if args else None), timeout)
        finally:
            await client.disconnect()

    return asyncio.run(call())


def save_state(qmp: Path, dest: Path, timeout: float, *, ignore_shared: bool = False) -> None:
    """Migrate the running VM's state (devices and RAM) into the file ``dest``; the VM is left
    paused (``postmigrate``). ``ignore_shared``: RAM that is a shared file (``ram_share``) is left
    out, only the devices are saved. TTError if the migration fails or is not done within
    ``timeout`` s."""
    if ignore_shared:
        _ignore_shared(qmp)
    qmp_command(qmp, "migrate", uri=f"exec:cat > {shlex.quote(str(dest))}")
    deadline = time.monotonic() + timeout
    while True:
        info = qmp_command(qmp, "query-migrate")
        info = info if isinstance(info, dict) else {}
        status = str(info.get("status", ""))
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise TTError(f"saving the VM state to {dest} failed: {info.get('error-desc', status)}")
        if time.monotonic() >= deadline:
            raise TTError(f"saving the VM state to {dest} did not finish within {timeout:.0f} s ({status})")
        time.sleep(0.05)


def load_state(cfg: QemuConfig, timeout: float = 10.0) -> None:
    """Start loading the saved state of a VM whose qemu waits for it (``deferred_incoming``): RAM
    that is a file is taken as it is (``x-ignore-shared``), the rest streamed from ``incoming``.
    No-op for other VMs. A monitor that does not take the connection yet is asked again for
    ``timeout`` s. TTError if qemu refuses, or never answers."""
    if not deferred_incoming(cfg):
        return
    from qemu.qmp import ExecuteError

    deadline = time.monotonic() + timeout
    while True:
        try:
            _ignore_shared(cfg.qmp)
            qmp_command(cfg.qmp, "migrate-incoming", timeout=10.0, uri=cfg.incoming)
            return
        except ExecuteError as exc:
            raise TTError(f"qemu of {cfg.name} refused its saved state: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - OSError, a timeout, qemu.qmp's ConnectError: ask again
            if time.monotonic() >= deadline:
                raise TTError(
                    f"qemu of {cfg.name} did not take its saved state within {timeout:.0f} s: {exc}"
                ) from None
            time.sleep(0.1)


def _ignore_shared(qmp: Path) -> None:
    capability = {"capability": "x-ignore-shared", "state": True}
    qmp_command(qmp, "migrate-set-capabilities", timeout=10.0, capabilities=[capability])


def shares_ram(arch: str) -> str:
    """'' if this host's qemu for ``arch`` can run VM templates whose clones map the template's
    RAM (x-ignore-shared, ``-machine memory-backend``: qemu >= 5), else why not."""
    major = major_version(arch)
    if major is None:
        return f"the version of {QEMU_BINARY[arch]} is unknown"
    if major < SHARED_RAM_QEMU:
        return f"{QEMU_BINARY[arch]} {major}.x cannot map a template's memory (needs qemu >= {SHARED_RAM_QEMU}.0)"
    return ""


def run_state(qmp: Path) -> str:
    """The VM's run state from QMP ``query-status``: ``inmigrate`` while it loads a saved state,
    then ``running`` (``postmigrate``, ``paused``, ...); '' if the monitor does not answer."""
    try:
        info = qmp_command(qmp, "query-status", timeout=2.0)
    except Exception:  # noqa: BLE001 - not up yet, or gone: the caller checks the process
        return ""
    return str(info.get("status", "")) if isinstance(info, dict) else ""


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
    if pid <= 0:  # never waitpid(0) or (-1): that would collect some other child
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


_versions: dict[tuple[str, int], str] = {}  # (binary, mtime) -> version line: asked once per process


def version(arch: str = "x86_64") -> str:
    """qemu's version string (``QEMU emulator version 7.2.x``), or '' if qemu is missing."""
    binary = shutil.which(QEMU_BINARY[arch])
    try:
        memo = (str(binary), os.stat(binary).st_mtime_ns) if binary else None
    except OSError:
        memo = None
    if memo is None:
        return ""
    if memo not in _versions:
        try:
            out = subprocess.run([memo[0], "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
        if not out:
            return ""
        _versions[memo] = out.splitlines()[0].strip()
    return _versions[memo]


def ttenv_processes(uid: int | None = None) -> list[tuple[int, Path]]:
    """Every live qemu process started by ttenv on this host *as this user* (``uid``, default
    ours: another user's VMs are never considered), with its VM run dir as given to it (absolute
    unless its state dir was given as a relative path)."""
    uid = os.getuid() if uid is None else uid
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) < 3 or args[1:3] != [b"-name", args[2]] or not args[2].startswith(b"ttenv:"):
            continue
        for arg in args:
            if arg.startswith(b"file,id=console,path="):
                spec = arg.split(b"path=", 1)[1].decode(errors="replace")
                console = Path(re.sub(r",append=on$", "", spec))
                if is_running(int(entry.name), str(console.parent)):
                    found.append((int(entry.name), console.parent))
    return found
