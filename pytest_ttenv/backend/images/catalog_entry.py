"""One catalog entry (an OS release as its vendor publishes it) and its rendering for one arch
(``CatalogImage``: every URL filled in), with the values the catalog format allows. Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HASHES = {"sha256": 64, "sha512": 128}  # algorithm -> length of its hex digest
CHECKSUM_FORMATS = ("sums", "bsd", "sidecar", "json")
DISK_FORMATS = ("qcow2", "raw", "vmdk", "vhdx")
COMPRESSIONS = ("xz", "gz", "bz2")
# How a vendor image's own boot loader is started: "bios" is the machine's built-in firmware reading
# the disk (SeaBIOS on x86, SLOF on ppc64le's pseries, the s390-ccw loader on s390x), "uefi" UEFI
# firmware given to the machine. DEFAULT_BOOT is an arch's boot when its entry names none;
# ONLY_BOOT the arches whose qemu machine has one kind of firmware.
BOOTS = ("bios", "uefi")
DEFAULT_BOOT = {
    "x86_64": "bios",
    "aarch64": "uefi",
    "riscv64": "uefi",
    "ppc64le": "bios",
    "s390x": "bios",
    "i386": "bios",
    "armhf": "uefi",
}
ONLY_BOOT = {"aarch64": "uefi", "armhf": "uefi", "ppc64le": "bios", "s390x": "bios"}
ACCESS = ("cloud-init",)


@dataclass(frozen=True)
class CatalogImage:
    """One entry rendered for one arch: everything ``pull`` needs, URLs filled in."""

    name: str  # canonical <os>-<version>-<arch>
    entry: str  # <os>-<version>
    os: str
    version: str
    arch: str
    url: str
    file: str  # the image's file name as published (looked up in the checksum file)
    checksum_url: str
    checksum_format: str
    checksum_key: str | None
    hash: str
    format: str  # qcow2 | raw | vmdk | vhdx, optionally .xz | .gz | .bz2
    boot: str
    user: str
    access: str = "cloud-init"
    notes: str = ""

    @property
    def disk_format(self) -> str:
        return self.format.split(".")[0]

    @property
    def compression(self) -> str | None:
        parts = self.format.split(".")
        return parts[1] if len(parts) > 1 else None


@dataclass(frozen=True)
class ArchSpec:
    vendor_arch: str
    boot: str
    url: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One OS release as the vendor publishes it, for one or more arches."""

    key: str
    os: str
    version: str
    user: str
    url: str
    checksum_url: str
    checksum_format: str
    hash: str
    format: str
    arches: Mapping[str, ArchSpec]
    checksum_key: str | None = None
    mirror: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    access: str = "cloud-init"
    notes: str = ""

    def names(self) -> list[str]:
        return [f"{self.key}-{arch}" for arch in self.arches]

    def render(self, arch: str) -> CatalogImage:
        """The image for ``arch`` with every URL template filled in."""
        spec = self.arches[arch]
        values = {
            **self.vars,
            **spec.vars,
            "mirror": self.mirror or "",
            "os": self.os,
            "version": self.version,
            "arch": arch,
            "vendor_arch": spec.vendor_arch,
            "boot": spec.boot,
        }
        url = (spec.url or self.url).format_map(values)
        file = Path(urlsplit(url).path).name
        values["file"] = file
        return CatalogImage(
            name=f"{self.key}-{arch}",
            entry=self.key,
            os=self.os,
            version=self.version,
            arch=arch,
            url=url,
            file=file,
            checksum_url=self.checksum_url.format_map(values),
            checksum_format=self.checksum_format,
            checksum_key=self.checksum_key.format_map(values) if self.checksum_key else None,
            hash=self.hash,
            format=self.format,
            boot=spec.boot,
            user=self.user,
            access=self.access,
            notes=self.notes,
        )
