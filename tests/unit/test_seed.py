"""The NoCloud seed ISO: label, file names both readers expect, key modes (real pycdlib)."""

import io
import os
import stat
from pathlib import Path
from typing import Any

import pycdlib
import yaml

from pytest_ttenv.backend.engines.base import GUEST_MAC
from pytest_ttenv.backend.engines.seed import SeedData, seed_files, write_seed_iso
from pytest_ttenv.core.keys import KeyPair


def seed(user: str = "root", **kw: Any) -> SeedData:
    return SeedData(
        hostname="debian-12-x86_64",
        instance_id="e1-vm",
        user=user,
        authorized_key="ssh-ed25519 AAAAclient c",
        host_key=KeyPair.generate("h"),
        **kw,
    )


def read_iso(path: Path) -> tuple[str, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    files = {}
    for rel in seed_files(seed()):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path="/" + rel)
        files[rel] = out.getvalue()
    label = iso.pvd.volume_identifier.decode().strip()
    iso.close()
    return label, files


def test_iso_is_cidata_with_rock_ridge_names(tmp_path: Path) -> None:
    s = seed()
    write_seed_iso(s, tmp_path / "seed.iso")
    label, files = read_iso(tmp_path / "seed.iso")
    assert label == "cidata"
    assert files["meta-data"] == b"instance-id: e1-vm\nlocal-hostname: debian-12-x86_64\n"
    assert files["ttenv/authorized_keys"] == b"ssh-ed25519 AAAAclient c\n"
    assert files["ttenv/ssh_host_ed25519_key"].decode() == s.host_key.private
    assert files["ttenv/network"] == b"address=10.0.2.15/24\ngateway=10.0.2.2\ndns=10.0.2.3\n"
    assert stat.S_IMODE(os.stat(tmp_path / "seed.iso").st_mode) == 0o600


def test_user_data_is_cloud_config_with_our_keys() -> None:
    s = seed()
    text = seed_files(s)["user-data"]
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    assert doc["ssh_keys"]["ed25519_public"] == s.host_key.public
    assert doc["users"][0]["ssh_authorized_keys"] == ["ssh-ed25519 AAAAclient c"]
    assert doc["ssh_pwauth"] is False


def test_dhcp_and_resize_flags() -> None:
    files = seed_files(seed(address=None, resize=True))
    assert files["ttenv/network"] == "dhcp=1\n"
    assert files["ttenv/resize"] == "1\n"
    assert yaml.safe_load(files["network-config"])["config"][0]["subnets"] == [{"type": "dhcp"}]


def test_private_key_written_0600(tmp_path: Path) -> None:
    key = KeyPair.generate("c")
    key.write_private(tmp_path / "id")
    assert stat.S_IMODE(os.stat(tmp_path / "id").st_mode) == 0o600
    assert (tmp_path / "id").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert key.public.startswith("ssh-ed25519 ")


def test_non_root_user_gets_sudo_and_the_distro_default_shell() -> None:
    doc = yaml.safe_load(seed_files(seed(user="debian"))["user-data"])
    user = doc["users"][0]
    assert user["name"] == "debian" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert "shell" not in user  # Alpine and FreeBSD have no bash: cloud-init would not create the user
    assert doc["disable_root"] is True


def test_cloud_init_gets_a_valid_hostname_and_finds_the_nic_by_mac() -> None:
    files = seed_files(seed())
    doc = yaml.safe_load(files["user-data"])
    assert doc["hostname"] == "debian-12-x86-64"  # hostname(1) refuses '_'
    assert "local-hostname: debian-12-x86_64\n" in files["meta-data"]  # the ttenv unit keeps the VM's name
    assert doc["ssh_genkeytypes"] == ["ed25519"]  # the injected key exists already: nothing generated
    (nic,) = yaml.safe_load(files["network-config"])["config"]
    assert nic["mac_address"] == GUEST_MAC and nic["name"] == "eth0"
    assert nic["subnets"] == [
        {"type": "static", "address": "10.0.2.15/24", "gateway": "10.0.2.2", "dns_nameservers": ["10.0.2.3"]}
    ]
