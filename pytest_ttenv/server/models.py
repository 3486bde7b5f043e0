"""The API's request and response bodies as pydantic models (they make the OpenAPI document).

Names (ENV, VM, snapshot) match NAME_PATTERN: 1-63 letters, digits, ``.``, ``_``, ``-``,
starting with a letter or digit, never two dots in a row, so never ``..`` and never ``/``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pytest_ttenv.backend.engines.base import host_label
from pytest_ttenv.core.model import EnvInfo, ImageInfo, VmInfo

# no lookahead (JSON Schema and pydantic's regex engine have none): a dot is followed by a non-dot
NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
NAME_MAX = 63
PUBKEY_PATTERN = (
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [ -~]{0,200})?$"
)
MAX_LEASE_ANY = 366 * 24 * 3600.0  # the schema's bound; the server's --max-lease caps further

Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]
Seconds = Annotated[float, Field(gt=0, le=MAX_LEASE_ANY)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourcesIn(_Strict):
    cpu: Annotated[int, Field(ge=1, le=64)] = 2
    mem_mib: Annotated[int, Field(ge=128, le=1024 * 1024)] = 512
    disk_mib: Annotated[int, Field(ge=0, le=64 * 1024 * 1024, description="0: the image's size")] = 0


class VmIn(_Strict):
    name: Name
    image: Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]
    resources: ResourcesIn = ResourcesIn()


class EnvCreate(_Strict):
    """POST /v1/envs: the ENV's name, its VMs, the client's public key (OpenSSH line)."""

    name: Name
    vms: Annotated[list[VmIn], Field(min_length=1, max_length=64)]
    client_pubkey: Annotated[str, Field(max_length=16384, pattern=PUBKEY_PATTERN)]
    ttl: Seconds | None = None
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    boot: Literal["warm", "cold"] = Field("cold", description="warm: from a saved post-boot state of the image")


class Lease(_Strict):
    ttl: Seconds


class SnapshotIn(_Strict):
    name: Name


class Resources(BaseModel):
    cpu: int
    mem_mib: int
    disk_mib: int


class Vm(BaseModel):
    """What a client needs to reach a VM: address, port, user, the VM's host public key."""

    name: str
    image: str
    os: str
    version: str
    arch: str
    state: Literal["creating", "booting", "running", "failed", "stopped"]
    address: str
    port: int
    user: str
    host_key: str
    resources: Resources
    accel: str
    console: str = Field(description="always empty: read the console through the API")
    pid: int = Field(description="always 0 (a server-side detail)")
    error: str
    boot_seconds: float = Field(description="seconds from start to SSH once running; the start time while booting")
    boot: str = Field("", description="how it started: warm (from a saved post-boot state) or cold")
    engine: str = Field("qemu", description="how it runs: qemu or libvirt")
    host: str = Field("", description="the libvirt host it runs on (its name; empty for the server's own machine)")

    @classmethod
    def of(cls, vm: VmInfo) -> Vm:
        data: dict[str, Any] = vm.to_dict() | {"console": "", "pid": 0, "host": host_label(vm.host)}
        return cls.model_validate(data)


class Env(BaseModel):
    id: str
    name: str
    owner: str
    created: float
    expires: float | None
    state: str
    vms: list[Vm]
    rundir: str = Field(description="always empty (a server-side detail)")

    @classmethod
    def of(cls, env: EnvInfo) -> Env:
        return cls(
            id=env.id,
            name=env.name,
            owner=env.owner,
            created=env.created,
            expires=env.expires,
            state=env.state,
            vms=[Vm.of(vm) for vm in env.vms],
            rundir="",
        )


class Image(BaseModel):
    name: str
    os: str
    version: str
    arch: str
    disk: str
    disk_mib: int
    user: str
    boot: str
    access: str
    kernel: str | None
    initrd: str | None
    cmdline: str
    source: str
    created: float
    details: dict[str, str]

    @classmethod
    def of(cls, image: ImageInfo) -> Image:
        return cls.model_validate(image.to_dict())


class Amounts(BaseModel):
    cpu: int
    mem_mib: int
    disk_mib: int


class Limits(BaseModel):
    cpu: int | None = Field(None, description="vCPUs the owner's ENVs may hold at once (null: no cap)")
    mem_mib: int | None = Field(None, description="memory (MiB) the owner's ENVs may hold at once")
    vms: int | None = Field(None, description="VMs the owner's ENVs may hold at once")


class Status(BaseModel):
    """An admin token sees the whole server (``scope`` "server"); any other token its own usage,
    ENVs and caps, and what it may still take (``free``: the server's free capacity within its caps)."""

    version: str
    engine: str
    public_addr: str
    scope: Literal["server", "owner"]
    totals: Amounts
    used: Amounts
    free: Amounts
    limits: Limits
    envs: int
    vms: int
    vms_running: int
    owners: int


class Console(BaseModel):
    text: str


class Error(BaseModel):
    """Every error: its kind, one line, what to do, and a console tail for boot failures."""

    error: Literal[
        "usage", "auth", "not_found", "quota", "conflict", "too_large", "boot", "died", "too_many", "busy", "server"
    ]
    message: str
    hint: str | None
    console: str | None
    free: Amounts | None = Field(None, description="quota errors: what is free")
