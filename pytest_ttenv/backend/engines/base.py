"""The engine seam: how one VM runs on a host, behind LocalBackend.

LocalBackend does what every engine shares (validation, accelerator choice, run dir, host key,
NoCloud seed, the SSH port in the store, the readiness loop) and hands each VM to an ``Engine`` for
everything that depends on how it runs: whether it starts warm or cold (``plan``), starting it,
telling whether it runs and is ready, stopping it, snapshots, its console, reaping strays.

A VM records its engine and host (``VmInfo.engine``/``host``), so any LocalBackend can show, stop
or delete it, whatever engine it was configured with for new VMs (``registry.Engines``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, VmInfo, VmSpec

DIFF_FILE = "replay.diff"  # in a replayed VM's run dir: how the capture's host differs from this one
GUEST_MAC = "52:54:00:12:34:56"  # every engine gives a VM's one NIC this MAC (qemu's default); its seed matches on it


@dataclass(frozen=True)
class Boot:
    """How an engine starts a VM, decided before anything is made for it (``Engine.plan``).

    ``how``: ``warm`` (from a saved post-boot state) or ``cold``; ``why``: one line saying so
    (the backend shows it when a warm start was asked for and the VM boots cold). For a warm start,
    ``key`` names the saved state in the engine's terms (a template key) and ``inputs`` are what
    it depends on (``key`` is their hash), kept until it is made.
    """

    how: str
    why: str
    key: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Start:
    """One VM prepared by LocalBackend for its engine to start (``Engine.start``).

    ``info`` is already in the store with its host, SSH port and ``boot``. The engine sets ``pid``
    (0 where it has no local process), ``console`` and ``boot_seconds`` (the start time, until
    wait_vm turns it into the boot duration), and calls the backend back:

    - ``record()`` stores ``info`` as it is now: as soon as the VM runs (an engine that starts a
      local process: as soon as it has the pid, before it waits for anything);
    - ``move_port()`` reserves another port for the VM and returns it (the host's port was taken);
    - ``resume()``, for a VM started later than ``Engine.start`` returned (``waiting``): a context
      held while it is started (the ENV cannot be deleted meanwhile) that gives False if it is not
      to be started any more (its ENV was deleted, or it failed meanwhile);
    - ``fail(message)``: a VM started later could not be started; it and its ENV are failed.
    """

    env: EnvInfo
    spec: EnvSpec
    vm: VmSpec
    image: ImageInfo
    accel: str
    info: VmInfo
    vmdir: Path  # the VM's directory in the ENV's run dir on this machine
    seed: Path  # the NoCloud seed ISO, in vmdir
    host_key: KeyPair  # the VM's SSH host key (in its seed; a warm VM is sent it once it runs)
    machine_id: str  # its machine-id (on its kernel command line; a warm VM is sent it)
    boot: Boot
    move_port: Callable[[], int]
    record: Callable[[], None] = lambda: None
    resume: Callable[[], AbstractContextManager[bool]] = lambda: nullcontext(True)
    fail: Callable[[str], None] = lambda message: None
    boot_timeout: float = 0.0  # seconds it is given to boot under the current load (accel.boot_timeout)

    @property
    def cmdline(self) -> str:
        """Its kernel command line for direct boot."""
        return machine_cmdline(self.image, self.machine_id)


@dataclass(frozen=True)
class Machine:
    """What of a VM's qemu a replay must reproduce to load its state."""

    arch: str
    machine: str  # versioned machine type, e.g. pc-q35-7.2 (what the alias q35 meant when it was saved)
    cpu_model: str  # qemu's -cpu
    cpus: int
    mem_mib: int
    ram_named: bool  # its RAM is the named backend ``qemu.RAM_ID`` (it mapped a warm template's RAM file)
    vmgenid: bool  # it has a VM generation ID device
    machine_id: str  # its systemd machine-id (on its kernel command line)
    qemu_version: str  # qemu's version line


@dataclass(frozen=True)
class Saved:
    """The files ``Engine.capture`` made in its work dir, and how long the VM was paused."""

    machine: Machine
    state: Path
    overlay: Path
    uefi_vars: Path | None
    console: Path
    paused: float


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

    def plan(self, spec: EnvSpec, vm: VmSpec, image: ImageInfo, accel: str, owner: str) -> Boot:
        """Whether ``vm`` starts warm or cold, and why, given the caller's preference ``spec.boot``;
        decided before anything is made for it (TTError now for what would fail later)."""
        ...

    def start(self, jobs: Sequence[Start]) -> None:
        """Start the prepared VMs of one ENV as their ``boot`` says, each recorded as soon as it
        runs. A VM that needs something made first (its warm template) is left ``waiting`` and
        started later by the engine, once that is made, or cold, saying why, if making it failed.
        BootError/TTError if a VM cannot start (the caller then removes the ENV)."""
        ...

    def ready(self, env: EnvInfo, vm: VmInfo, timeout: float) -> bool:
        """One look, of at most about ``timeout`` s, at a started VM that runs: True once clients
        may use it (cold: its sshd answers; warm: it runs its saved state and has taken its
        identity). TTError if it never will (the caller stops it and fails it with that line)."""
        ...

    def wait_budget(self, vm: VmInfo, boot_timeout: float) -> float:
        """Seconds wait_vm gives the VM, given its boot timeout: that, plus the time to make what
        it waits for while it is ``waiting``."""
        ...

    def dead(self, env: EnvInfo, vm: VmInfo) -> str | None:
        """None while the VM runs; else why it does not (one line, e.g. its host is unreachable)."""
        ...

    def boot_failure(self, env: EnvInfo, vm: VmInfo, why: str) -> str:
        """The one line for a VM that died (``why``: from ``dead``) before it was ready, with the
        engine's last words on it; drops what the VM started from if that is to blame."""
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
        """Restore snapshot ``name`` (NotFound if there is none); open SSH connections die. A
        warm-started VM then has its clock set to now and its RNG reseeded."""
        ...

    def console(self, env: EnvInfo, vm: VmInfo, tail: int) -> str:
        """The last ``tail`` lines of the VM's serial console ('' if there is none yet)."""
        ...

    def capture(self, env: EnvInfo, vm: VmInfo, image: ImageInfo, work: Path) -> Saved:
        """Save the running VM into the empty dir ``work`` (state, disk delta on ``image``, UEFI
        variables, console); it runs on afterwards. CaptureSkipped if this engine cannot."""
        ...

    def restore(self, job: Start, machine: Machine) -> None:
        """Start ``job``'s VM from the saved files in its run dir (``Saved``'s names, the overlay
        already on this host's image) as the machine ``machine``; it takes its new identity (host
        key, client key, clock) once it runs. BootError/TTError if it cannot start."""
        ...

    def abandon(self, env_id: str, rundir: Path) -> None:
        """Stop what was started for the run dir of an ENV that never made it into the store."""
        ...

    def reap_strays(self, state: Path, live: Callable[[str], bool]) -> None:
        """Stop and remove VMs of state dir ``state`` whose ENV id is not ``live`` (asked just
        before removing), and VMs of state dirs that no longer exist."""
        ...

    def reap_saved(self, images: Sequence[ImageInfo]) -> None:
        """Delete the saved states (warm templates) of ``images`` that nobody will start from:
        of an image that changed since, or unused lately."""
        ...


def waiting(vm: VmInfo) -> bool:
    """Whether the VM waits to be started by the process that created it (its warm template is
    being made): ``booting`` with no console yet (engines set it when they start a VM). Holds
    for the backend's own records; clients are shown neither console nor pid."""
    return vm.state == "booting" and not vm.console


def machine_cmdline(image: ImageInfo, machine_id: str) -> str:
    """The image's kernel command line with a VM's machine-id."""
    return f"{image.cmdline} systemd.machine_id={machine_id}".strip()


def host_label(host: str) -> str:
    """A host as users see it: the host name of a libvirt URI ('' for this machine)."""
    return (urlsplit(host).hostname or "") if host else ""
