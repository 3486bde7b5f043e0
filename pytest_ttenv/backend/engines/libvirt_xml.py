"""The libvirt engine's XML (pure): domains, snapshots and volumes.

A domain is the qemu engine's VM in libvirt's terms (the same devices as the guest sees them):
direct kernel boot or firmware (SeaBIOS, or UEFI with a per-domain NVRAM), TCG tuned as the qemu
engine (64 MiB translation cache, ``cpu mode='maximum'``), user-mode networking with the SSH port
forward through ``<qemu:commandline>`` (libvirt 9 has no usable passt ``<portForward>`` here), and
ttenv metadata (``NS``) naming this machine, state dir and ENV.
"""

from __future__ import annotations

import json
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from pytest_ttenv.backend.engines.base import GUEST_MAC
from pytest_ttenv.backend.engines.qemu import IDENTITY_PORT, UEFI_FIRMWARE

NS = "https://pytest-ttenv.invalid/libvirt/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("ttenv", NS)


@dataclass(frozen=True)
class DomainConfig:
    """Everything one domain definition needs; paths are paths on the host."""

    name: str
    uuid: str
    title: str
    metadata: dict[str, str]
    arch: str
    accel: str  # kvm | tcg
    cpu: int
    mem_mib: int
    pool: str
    disk_volume: str
    seed_volume: str
    console: str
    port: int
    bind_addr: str
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    uefi: bool = False
    tcg_cx16: bool = True
    disk_file: str = ""  # set: the root disk is this file (a warm template's), not ``disk_volume``
    seed_file: str = ""  # set: the seed is this file, not ``seed_volume``
    identity: bool = False  # warm boot: the identity agent's virtio-serial channel (``IDENTITY_PORT``)
    genid: str = ""  # warm boot (x86_64): the VM generation ID, a GUID new for every VM


def domain_xml(cfg: DomainConfig) -> str:
    """The libvirt domain XML for ``cfg``: the qemu engine's VM (same devices as the guest sees
    them) in libvirt's terms, with the SSH port forward through the qemu:commandline passthrough."""
    x86 = cfg.arch == "x86_64"
    dom = ET.Element("domain", type="kvm" if cfg.accel == "kvm" else "qemu")
    ET.SubElement(dom, "name").text = cfg.name
    ET.SubElement(dom, "uuid").text = cfg.uuid
    if cfg.genid and x86:
        ET.SubElement(dom, "genid").text = cfg.genid
    ET.SubElement(dom, "title").text = cfg.title
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(meta, f"{{{NS}}}vm", cfg.metadata)
    ET.SubElement(dom, "memory", unit="MiB").text = str(cfg.mem_mib)
    ET.SubElement(dom, "vcpu").text = str(cfg.cpu)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch=cfg.arch, machine="q35" if x86 else "virt").text = "hvm"
    if cfg.kernel:
        ET.SubElement(os_, "kernel").text = cfg.kernel
        if cfg.initrd:
            ET.SubElement(os_, "initrd").text = cfg.initrd
        ET.SubElement(os_, "cmdline").text = cfg.cmdline
    elif cfg.uefi:
        code, template = UEFI_FIRMWARE[cfg.arch]
        ET.SubElement(os_, "loader", readonly="yes", type="pflash").text = code
        ET.SubElement(os_, "nvram", template=template)
    if not cfg.kernel:
        ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    if x86 or cfg.uefi:
        ET.SubElement(features, "acpi")
    if cfg.accel == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    else:
        ET.SubElement(ET.SubElement(features, "tcg"), "tb-cache", unit="MiB").text = "64"
        cpu = ET.SubElement(dom, "cpu", mode="maximum")
        if x86 and not cfg.tcg_cx16:
            ET.SubElement(cpu, "feature", policy="disable", name="cx16")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    dev = ET.SubElement(dom, "devices")
    disk = ET.SubElement(dev, "disk", type="file" if cfg.disk_file else "volume", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
    if cfg.disk_file:
        ET.SubElement(disk, "source", file=cfg.disk_file)
    else:
        ET.SubElement(disk, "source", pool=cfg.pool, volume=cfg.disk_volume)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    seed = ET.SubElement(dev, "disk", type="file" if cfg.seed_file else "volume", device="disk", snapshot="no")
    ET.SubElement(seed, "driver", name="qemu", type="raw")
    if cfg.seed_file:
        ET.SubElement(seed, "source", file=cfg.seed_file)
    else:
        ET.SubElement(seed, "source", pool=cfg.pool, volume=cfg.seed_volume)
    ET.SubElement(seed, "target", dev="vdb", bus="virtio")
    ET.SubElement(seed, "readonly")
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=cfg.console, append="on")  # survives a revert's qemu restart
    if cfg.identity:  # libvirt picks the host socket's path; reached with virDomainOpenChannel
        chan = ET.SubElement(dev, "channel", type="unix")
        ET.SubElement(chan, "source", mode="bind")
        ET.SubElement(chan, "target", type="virtio", name=IDENTITY_PORT)
    rng = ET.SubElement(dev, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    if x86:
        ET.SubElement(dev, "panic", model="isa")  # a guest panic ends the domain at once
    ET.SubElement(dev, "controller", type="usb", model="none")
    ET.SubElement(dev, "memballoon", model="none")
    ET.SubElement(ET.SubElement(dev, "video"), "model", type="none")
    # libvirt 9 here rejects <interface type='user'><backend type='passt'/> (no passt): qemu's own
    # user networking through the passthrough. The device is JSON so qemu creates it after
    # libvirt's own (JSON) devices and gives it a free slot.
    nic = {"driver": "virtio-net-pci", "netdev": "ttnet0", "mac": GUEST_MAC, "romfile": ""}  # as the qemu engine's
    net = json.dumps(nic, separators=(",", ":"))
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in ("-netdev", f"user,id=ttnet0,hostfwd=tcp:{cfg.bind_addr}:{cfg.port}-:22", "-device", net):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(dom, encoding="unicode")


def snapshot_xml(name: str) -> str:
    """An internal snapshot of memory and the root disk (the seed disk is read-only: not saved)."""
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = name
    ET.SubElement(snap, "memory", snapshot="internal")
    disks = ET.SubElement(snap, "disks")
    ET.SubElement(disks, "disk", name="vda", snapshot="internal")
    ET.SubElement(disks, "disk", name="vdb", snapshot="no")
    return ET.tostring(snap, encoding="unicode")


def volume_xml(name: str, capacity: int, fmt: str = "raw", backing: str | None = None) -> str:
    """A volume of ``capacity`` bytes; with ``backing``, a qcow2 overlay of that qcow2 file."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(ET.SubElement(vol, "target"), "format", type=fmt)
    if backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = backing
        ET.SubElement(store, "format", type="qcow2")
    return ET.tostring(vol, encoding="unicode")


def qcow2_virtual_size(path: Path) -> int:
    """The virtual size of a qcow2 file (its header), or the file's size for anything else."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[:4] == b"QFI\xfb" and len(head) == 32:
        return int.from_bytes(head[24:32], "big")
    return path.stat().st_size


def domain_name(env_id: str, vm_name: str) -> str:
    return f"ttenv-{env_id}-{vm_name}"


# libvirt's save image (virDomainSave): a 92-byte header (magic, version, data_len, was_running,
# format, cookieOffset, 14 unused; native byte order), then data_len bytes (the domain XML and the
# migration cookie, each NUL-terminated, zero-padded: libvirt leaves 64 KiB spare for an edited
# XML), then qemu's migration stream.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("=16s5I56x")


@dataclass(frozen=True)
class SaveImage:
    """The parsed head of a libvirt save image."""

    length: int  # bytes of header and data: where qemu's migration stream starts
    xml: str
    cookie: bytes
    fields: tuple[int, int, int, int, int]  # version, data_len, was_running, format, cookieOffset


def read_save_head(head: bytes) -> SaveImage:
    """The head of a save image (at least its first 92 + data_len bytes); ValueError
    if it is not a complete, raw (uncompressed) libvirt save image of version 2."""
    if len(head) < SAVE_HEADER.size:
        raise ValueError("too short for a libvirt save image")
    magic, version, data_len, running, fmt, cookie_at = SAVE_HEADER.unpack_from(head)
    if magic != SAVE_MAGIC or version != 2 or fmt != 0:
        raise ValueError(f"not a complete raw libvirt save image (magic {magic!r}, version {version}, format {fmt})")
    data = head[SAVE_HEADER.size : SAVE_HEADER.size + data_len]
    if len(data) != data_len:
        raise ValueError("its header is cut short")
    xml_end = cookie_at or data_len
    xml = data[:xml_end].split(b"\0", 1)[0].decode()
    cookie = data[xml_end:].split(b"\0", 1)[0] if cookie_at else b""
    return SaveImage(SAVE_HEADER.size + data_len, xml, cookie, (version, data_len, running, fmt, cookie_at))


def save_head_with(image: SaveImage, xml: str) -> bytes:
    """``image``'s head with the domain XML ``xml`` instead of its own: the same length, so it
    replaces the first ``image.length`` bytes of a copy of the save image. ValueError if it does
    not fit."""
    version, data_len, running, fmt, _ = image.fields
    body = xml.encode() + b"\0"
    cookie = image.cookie + b"\0" if image.cookie else b""
    if len(body) + len(cookie) > data_len:
        raise ValueError(f"a domain XML of {len(body)} bytes does not fit the save image's {data_len}")
    data = (body + cookie).ljust(data_len, b"\0")
    return SAVE_HEADER.pack(SAVE_MAGIC, version, data_len, running, fmt, len(body) if cookie else 0) + data
