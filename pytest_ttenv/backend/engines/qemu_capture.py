"""Capturing a running VM of the qemu engine, and the qemu configuration that brings it back.

``save`` pauses the VM only while it saves: its whole state (devices and all of its RAM, RAM
mapped from a warm template's file included) is migrated into a file, its disk flattened into one
qcow2 delta on the image (``qemu-img convert -B``: a warm VM's template disk folded in, internal
snapshots left out), a UEFI VM's variable store copied; then it runs on (QMP ``cont``). What a
replay must reproduce to load that state (``Machine``: the versioned machine type, CPU model, RAM
backend, devices) is read from the VM's own command line and monitor. ``restore_config`` is the
qemu configuration of a replay: the same machine on this host's files, with a new port, sockets
and seed.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.engines.base import Machine, Saved
from pytest_ttenv.backend.engines.identity import agent_request
from pytest_ttenv.backend.engines.qemu_arch import QEMU_BINARY
from pytest_ttenv.core.capture_manifest import CaptureError
from pytest_ttenv.core.model import ImageInfo, Resources
from pytest_ttenv.errors import TTError

CMDLINE_MAX = 1 << 16  # bytes of a qemu command line read from /proc
CONSOLE_MAX = 1 << 20  # bytes of the console log's end that a capture keeps
SAVE_TIMEOUT = 300.0
COPY_TIMEOUT = 300.0
_EXTERNAL_DATA = 1 << 2  # qcow2 incompatible feature bit: the guest's data is in another file
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


def save(pid: int, vmdir: Path, qmp: Path, identity: Path, image: ImageInfo, work: Path, what: str) -> Saved:
    """Capture the running VM ``pid`` (run dir ``vmdir``) into the empty dir ``work``; it runs on
    afterwards, also when saving fails. TTError (one line) if its identity agent does not answer
    (a replay could not give it new keys) or qemu cannot save it."""
    agent_request(identity, "ping", 10.0, f"{what}: its identity agent")
    machine = _machine(pid, vmdir, qmp, image.arch)
    state, overlay = work / "state", work / "overlay.qcow2"
    uefi_src = vmdir / "uefi-vars.qcow2"
    uefi_vars = work / "uefi-vars.qcow2" if uefi_src.exists() else None
    ignoring = _ignore_shared(qmp)
    _set_ignore_shared(qmp, False)  # all of its RAM into the state, also RAM mapped from a template's file
    paused_at = time.monotonic()
    try:
        try:
            qemu.save_state(qmp, state, SAVE_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):  # a migration still going on: stopped, the VM runs on
                qemu.qmp_command(qmp, "migrate_cancel", timeout=10.0)
            raise
        _flatten(vmdir / "overlay.qcow2", image.file(image.disk), overlay)
        if uefi_vars is not None:
            _flatten(uefi_src, None, uefi_vars)
    finally:
        if ignoring:  # as it was: its snapshots (tt_vm_fresh) were saved with it, and loadvm checks that
            _set_ignore_shared(qmp, True)
        if qemu.run_state(qmp) in ("postmigrate", "paused"):
            qemu.qmp_command(qmp, "cont", timeout=10.0)
    paused = time.monotonic() - paused_at
    console = work / "console.log"
    _copy_end(vmdir / "console.log", console, CONSOLE_MAX)
    return Saved(machine, state, overlay, uefi_vars, console, paused)


def _ignore_shared(qmp: Path) -> bool:
    """Whether the VM's ``x-ignore-shared`` migration capability is on (a warm VM loaded with it)."""
    caps = qemu.qmp_command(qmp, "query-migrate-capabilities", timeout=10.0)
    return any(
        isinstance(c, dict) and c.get("capability") == "x-ignore-shared" and bool(c.get("state"))
        for c in (caps if isinstance(caps, list) else [])
    )


def _set_ignore_shared(qmp: Path, state: bool) -> None:
    capability = {"capability": "x-ignore-shared", "state": state}
    qemu.qmp_command(qmp, "migrate-set-capabilities", timeout=10.0, capabilities=[capability])


def _machine(pid: int, vmdir: Path, qmp: Path, arch: str) -> Machine:
    """The VM's ``Machine``, from its command line (/proc) and its monitor (the machine type)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read(CMDLINE_MAX).split(b"\0")]
    except OSError as exc:
        raise TTError(f"cannot read the command line of qemu process {pid}: {exc}") from None
    opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-")}
    alias = opts.get("-machine", "").split(",")[0]
    machines = qemu.qmp_command(qmp, "query-machines", timeout=10.0)
    known = machines if isinstance(machines, list) else []
    resolved = next(
        (str(m["name"]) for m in known if isinstance(m, dict) and alias in (m.get("alias"), m.get("name"))), alias
    )
    machine_id = (vmdir / "machine-id").read_text().strip() if (vmdir / "machine-id").exists() else ""
    if not _MACHINE_ID.fullmatch(machine_id):
        raise TTError(f"VM dir {vmdir} holds no machine-id")
    return Machine(
        arch=arch,
        machine=resolved,
        cpu_model=opts.get("-cpu", ""),
        cpus=int(opts.get("-smp", "1")),
        mem_mib=int(opts.get("-m", "512")),
        ram_named=any(f"memory-backend={qemu.RAM_ID}" in a for a in argv),
        vmgenid=any(a.startswith("vmgenid,") for a in argv),
        machine_id=machine_id,
        qemu_version=qemu.version(arch),
    )


def _flatten(src: Path, base: Path | None, dest: Path) -> None:
    """``src`` (and whatever of its backing chain is above ``base``) as one qcow2 file, a delta on
    ``base`` if given; its internal snapshots are left out. Reads a disk its qemu holds (``-U``:
    the VM is paused and its disks inactive while this runs)."""
    argv = ["qemu-img", "convert", "-U", "-q", "-O", "qcow2"]
    if base is not None:
        argv += ["-B", str(base.resolve()), "-F", "qcow2"]
    try:
        res = subprocess.run(
            [*argv, str(src), str(dest)], capture_output=True, text=True, umask=qemu.PRIVATE_UMASK, timeout=COPY_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise TTError(f"copying {src} took longer than {COPY_TIMEOUT:.0f} s") from None
    if res.returncode != 0:
        raise TTError(f"cannot copy {src}: {res.stderr.strip()}")


def _copy_end(src: Path, dest: Path, limit: int) -> None:
    """The last ``limit`` bytes of ``src`` (as it is now: it grows) into ``dest``; empty if none."""
    data = b""
    try:
        with open(src, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        pass
    with open(dest, "wb") as out:
        out.write(data)


def rebase(overlay: Path, base: Path) -> None:
    """Point the replayed ``overlay`` at this host's copy of its image's disk (unsafe rebase: the
    bytes are the same, checked by digest before). The overlay came from another machine: it must
    be a plain qcow2 file (no external data file, which would make qemu use a file it names)."""
    plain_qcow2(overlay)
    res = subprocess.run(
        ["qemu-img", "rebase", "-u", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", "qcow2", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if res.returncode != 0:
        raise TTError(f"cannot point {overlay} at {base}: {res.stderr.strip()}")


def plain_qcow2(path: Path) -> None:
    """CaptureError unless ``path`` is a qcow2 image (version 2 or 3) without an external data file."""
    try:
        with open(path, "rb") as f:
            header = f.read(80)
    except OSError as exc:
        raise TTError(f"cannot read {path.name}: {exc}") from None
    version = int.from_bytes(header[4:8], "big") if len(header) >= 8 else 0
    incompatible = int.from_bytes(header[72:80], "big") if version >= 3 and len(header) >= 80 else 0
    if header[:4] != b"QFI\xfb" or version not in (2, 3) or incompatible & _EXTERNAL_DATA:
        raise CaptureError(f"{path.name} in the capture is not a plain qcow2 disk: do not use this file")


def restore_config(
    machine: Machine,
    image: ImageInfo,
    accel: str,
    *,
    name: str,
    vmdir: Path,
    seed: Path,
    port: int,
    qmp: Path,
    identity: Path,
    bind_addr: str,
) -> qemu.QemuConfig:
    """The qemu configuration that loads the state in ``vmdir`` (``state``, ``overlay.qcow2``,
    ``uefi-vars.qcow2`` as ``save`` named them) into the machine it was saved from."""
    uefi_vars = vmdir / "uefi-vars.qcow2"
    return qemu.QemuConfig(
        name=name,
        arch=image.arch,
        accel=accel,
        resources=Resources(machine.cpus, machine.mem_mib),
        disk=vmdir / "overlay.qcow2",
        seed=seed,
        kernel=image.file(image.kernel) if image.kernel else None,
        initrd=image.file(image.initrd) if image.initrd else None,
        cmdline=f"{image.cmdline} systemd.machine_id={machine.machine_id}".strip(),
        port=port,
        console=vmdir / "console.log",
        qmp=qmp,
        pidfile=vmdir / "qemu.pid",
        tcg_cx16="-cx16" not in machine.cpu_model,
        uefi_vars=uefi_vars if uefi_vars.exists() else None,
        bind_addr=bind_addr,
        identity=identity,
        vmgenid=str(uuid.uuid4()) if machine.vmgenid else None,
        incoming="exec:" + shlex.join(["cat", str(vmdir / "state")]),
        ram_anon=machine.ram_named,
        machine_type=machine.machine,
    )


def differences(machine: Machine, accel_there: str, accel_here: str) -> str:
    """What differs between the host a capture was made on and this one ('' if nothing)."""
    here = qemu.version(machine.arch)
    diff = []
    if _number(here) != _number(machine.qemu_version):
        diff.append(f"qemu {_number(machine.qemu_version) or '?'} there, {_number(here) or 'none'} here")
    if accel_here != accel_there:
        diff.append(f"accelerator {accel_there} there, {accel_here} here")
    return ", ".join(diff)


def _number(version_line: str) -> str:
    m = re.search(r"\d+\.\d+(\.\d+)?", version_line)
    return m.group(0) if m else ""


def qemu_has_machine(arch: str, machine: str) -> bool:
    """Whether this host's qemu for ``arch`` knows the machine type ``machine``."""
    binary = shutil.which(QEMU_BINARY[arch])
    if binary is None:
        return False
    try:
        out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split()[:1] == [machine] for line in out.splitlines())
