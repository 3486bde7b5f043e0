"""Data the backend layer hands around: images, resources, ENV and VM specs and infos.

Pure dataclasses with JSON round-trips; no behaviour that touches the host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImageInfo:
    """A bootable template disk plus what is needed to boot and reach it.

    ``name`` is canonical ``<os>-<version>-<arch>``. File fields are relative to ``path``
    (the image's directory, set by the image store, not serialized).
    """

    name: str
    os: str
    version: str
    arch: str
    disk: str = "disk.qcow2"
    disk_mib: int = 3072
    user: str = "root"
    boot: str = "direct"  # direct (kernel+initrd given to qemu) | bios | uefi
    access: str = "ttenv"  # ttenv first-boot unit | cloud-init; both read the NoCloud seed
    kernel: str | None = "vmlinuz"
    initrd: str | None = "initrd.img"
    cmdline: str = ""
    source: str = "build"
    created: float = 0.0
    details: dict[str, str] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> ImageInfo:
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        return cls(**{k: v for k, v in data.items() if k in names}, path=path)

    def file(self, name: str) -> Path:
        """Absolute path of one of the image's files."""
        if self.path is None:
            raise ValueError(f"image {self.name} has no directory")
        return self.path / name


@dataclass(frozen=True)
class Resources:
    """What one VM gets: vCPUs, memory in MiB, disk (overlay virtual size) in MiB (0: image size)."""

    cpu: int = 2
    mem_mib: int = 512
    disk_mib: int = 0


@dataclass(frozen=True)
class VmSpec:
    """One VM to create: its name inside the ENV, the image it clones, its resources. ``restore``:
    the path (on the backend's host) of a capture to replay instead; the VM is then the captured
    one, its image and resources the capture's."""

    name: str
    image: str
    resources: Resources = Resources()
    restore: str = ""


@dataclass(frozen=True)
class EnvSpec:
    """An ENV to create. ``client_pubkey`` (OpenSSH line) is authorized in every VM.

    ``ttl`` seconds until the lease expires (None: no expiry). ``owner_pid`` ties the ENV's
    life to a process (the pytest session) where given: when it dies, the ENV is reaped by the
    next gc, and with ``die_with_owner`` its VMs are killed by the kernel at once (PDEATHSIG).
    ``boot``: ``warm`` starts VMs from a saved post-boot state of their image where one exists or
    can be made (else cold, with a progress line saying why); ``cold`` boots each VM. The plugin
    and the CLI ask for warm by default; an API caller that says nothing gets cold.
    """

    name: str
    vms: tuple[VmSpec, ...]
    client_pubkey: str
    owner: str = ""
    ttl: float | None = None
    accel: str = "auto"  # auto | kvm | tcg
    owner_pid: int | None = None
    die_with_owner: bool = True
    boot: str = "cold"  # warm | cold


BOOT_MODES = ("warm", "cold")


VM_STATES = ("creating", "booting", "running", "failed", "stopped")


@dataclass
class VmInfo:
    """Everything a client needs to reach a VM, and nothing secret of the host."""

    name: str
    image: str
    os: str
    version: str
    arch: str
    state: str = "creating"
    address: str = "127.0.0.1"
    port: int = 0
    user: str = "root"
    host_key: str = ""  # the VM's SSH host public key, one OpenSSH line
    resources: Resources = Resources()
    accel: str = ""
    console: str = ""  # path of the serial console log on the host
    pid: int = 0
    error: str = ""
    boot_seconds: float = 0.0
    boot: str = ""  # how it started: warm (from a saved state) | cold
    engine: str = "qemu"  # how it runs: qemu (a process on this machine) | libvirt
    host: str = ""  # the libvirt URI of its host ('' for this machine)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VmInfo:
        data = dict(data)
        data["resources"] = Resources(**data.get("resources", {}))
        return cls(**data)


@dataclass
class EnvInfo:
    """An ENV as the backend knows it: id, name, owner, lease and its VMs."""

    id: str
    name: str
    owner: str
    created: float
    expires: float | None
    state: str
    vms: list[VmInfo] = field(default_factory=list)
    rundir: str = ""

    def vm(self, name: str) -> VmInfo:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnvInfo:
        data = dict(data)
        data["vms"] = [VmInfo.from_dict(v) for v in data.get("vms", [])]
        return cls(**data)
