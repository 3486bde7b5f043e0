"""Access injection: per-VM SSH host keys and the NoCloud seed (``cidata`` ISO) that carries them.

One seed serves both readers: cloud-init (user-data / meta-data / network-config) in vendor
images, and the ttenv first-boot unit in images we build (the ``ttenv/`` directory).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import yaml

from pytest_ttenv.backend.engines.base import GUEST_MAC
from pytest_ttenv.core.keys import KeyPair


@dataclass(frozen=True)
class SeedData:
    """What one VM is told at boot."""

    hostname: str
    instance_id: str
    user: str
    authorized_key: str
    host_key: KeyPair
    address: str | None = "10.0.2.15/24"  # None: DHCP
    gateway: str = "10.0.2.2"
    dns: str = "10.0.2.3"
    resize: bool = False  # the overlay is larger than the image: grow the root file system
    mac: str = GUEST_MAC  # the MAC of the VM's NIC (qemu's argv sets the same)


def instance_id(env_id: str, vm_name: str) -> str:
    """The cloud-init instance-id in a VM's seed (a warm VM's cloud-init instance is renamed to it)."""
    return f"{env_id}-{vm_name}"


def cloud_hostname(name: str) -> str:
    """``name`` as a valid host name (RFC 1123 label): other characters become ``-``."""
    return re.sub(r"[^A-Za-z0-9-]", "-", name).strip("-")[:63] or "vm"


def user_data(seed: SeedData) -> str:
    """cloud-init user-data: our client key, our host key, no password login."""
    doc = {
        "users": [
            {"name": seed.user, "ssh_authorized_keys": [seed.authorized_key], "lock_passwd": True}
            | ({} if seed.user == "root" else {"sudo": "ALL=(ALL) NOPASSWD:ALL"})
        ],
        # cloud-init sets the hostname with hostname(1), which refuses '_' (VMs are named like images)
        "hostname": cloud_hostname(seed.hostname),
        "disable_root": seed.user != "root",
        "ssh_pwauth": False,
        "manage_etc_hosts": "localhost",  # the hostname resolves (sudo complains otherwise)
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],  # already given below, so nothing is generated ([] fails the schema)
        "ssh_keys": {"ed25519_private": seed.host_key.private, "ed25519_public": seed.host_key.public},
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def network_config(seed: SeedData) -> str:
    """Network config (cloud-init's version 1) for the one NIC, matched by the MAC qemu gives it so
    it is found whatever the image calls it (cloud-init names it eth0). Version 1 because its
    ``gateway`` renders natively for every renderer (eni, netplan, networkd, sysconfig): version 2's
    ``gateway4`` is deprecated, and its default ``routes`` need net-tools under eni."""
    subnet: dict[str, object] = {"type": "dhcp"}
    if seed.address:
        subnet = {"type": "static", "address": seed.address, "gateway": seed.gateway, "dns_nameservers": [seed.dns]}
    nic = {"type": "physical", "name": "eth0", "mac_address": seed.mac, "subnets": [subnet]}
    return yaml.safe_dump({"version": 1, "config": [nic]}, sort_keys=False)


def seed_files(seed: SeedData) -> dict[str, str]:
    """Every file of the seed, by path inside the volume."""
    meta = f"instance-id: {seed.instance_id}\nlocal-hostname: {seed.hostname}\n"
    net = f"address={seed.address}\ngateway={seed.gateway}\ndns={seed.dns}\n" if seed.address else "dhcp=1\n"
    return {
        "meta-data": meta,
        "user-data": user_data(seed),
        "network-config": network_config(seed),
        "ttenv/authorized_keys": seed.authorized_key + "\n",
        "ttenv/ssh_host_ed25519_key": seed.host_key.private,
        "ttenv/ssh_host_ed25519_key.pub": seed.host_key.public + "\n",
        "ttenv/network": net,
        "ttenv/user": seed.user + "\n",
    } | ({"ttenv/resize": "1\n"} if seed.resize else {})


def read_seed_file(iso_path: Path, name: str) -> str:
    """The text of file ``name`` (e.g. ``user-data``) in a seed ISO ('' if it has none)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        buf = io.BytesIO()
        try:
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
        except pycdlib.pycdlibexception.PyCdlibInvalidInput:
            return ""
        return buf.getvalue().decode()
    finally:
        iso.close()


def seed_instance_id(iso_path: Path) -> str:
    """The instance-id in a seed ISO's meta-data ('' if none)."""
    for line in read_seed_file(iso_path, "meta-data").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "instance-id":
            return value.strip()
    return ""


def write_seed_iso(seed: SeedData, dest: Path) -> None:
    """Write the seed as an ISO 9660 volume labelled ``cidata`` with Rock Ridge and Joliet names."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    dirs_done: set[str] = set()
    for n, (path, text) in enumerate(sorted(seed_files(seed).items())):
        parts = path.split("/")
        if len(parts) == 2 and parts[0] not in dirs_done:
            iso.add_directory(f"/{parts[0].upper()}", rr_name=parts[0], joliet_path=f"/{parts[0]}")
            dirs_done.add(parts[0])
        data = text.encode()
        iso_dir = f"/{parts[0].upper()}" if len(parts) == 2 else ""
        iso.add_fp(io.BytesIO(data), len(data), f"{iso_dir}/F{n}.;1", rr_name=parts[-1], joliet_path=f"/{path}")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)  # created 0600 below: it holds the VM's host private key
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
            iso.write_fp(f)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        iso.close()
