"""A vendor-style cloud image for real: its own boot loader (no -kernel) under SeaBIOS and under
OVMF, Debian's initramfs, cloud-init reading our NoCloud seed. The image is built on first use
(the cloud variant: ``ttenv image build debian-12 --variant cloud``), booted through the local
backend, and checked over SSH with strict host-key checking: our client key is accepted for the
image's user, the host key is the one injected, password login is off and cloud-init reports done;
a snapshot revert (``tt_vm_fresh``'s) works under both firmwares. Its warm starts:
``test_warm_cloud``."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_ttenv.access import target
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.ssh import Connection

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.leftovers import leftovers

pytestmark = [pytest.mark.vm, pytest.mark.slow]

CLOUD_INIT_TIMEOUT = 300.0  # cloud-init's last stage after SSH is up: ~10-30 s under TCG here


@pytest.mark.skipif(HOST_ARCH != "x86_64", reason="the cloud variant boots through x86 GRUB: x86_64 only")
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_cloud_image_boots_from_its_own_boot_loader_with_our_seed(
    firmware: str, tmp_path: Path, images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debiancloud-12")
    assert (image.boot, image.kernel, image.initrd, image.access, image.user) == (
        "bios",
        None,
        None,
        "cloud-init",
        "debian",
    )
    image_root = IMAGE_ROOT
    if firmware == "uefi":  # the same (hybrid) disk, described as a UEFI image in a store of its own
        image_root = tmp_path / "images"
        image_root.mkdir()
        src = tmp_path / "uefi-image"
        src.mkdir()
        (src / image.disk).symlink_to(image.file(image.disk))
        ImageStore(image_root).install(src, replace(image, boot="uefi"))
    state = tmp_path / "state"
    backend = LocalBackend(image_root=image_root, state_root=state)
    key = KeyPair.generate("client")
    key_file = tmp_path / "id"
    key.write_private(key_file)
    started = time.monotonic()
    vms = (VmSpec("vm1", image.name, Resources(2, 512)),)
    env = backend.create_env(EnvSpec("CLOUD", vms, key.public, boot="cold"))
    try:
        cmdline = Path(f"/proc/{env.vms[0].pid}/cmdline").read_bytes().split(b"\0")
        assert b"-kernel" not in cmdline and b"-initrd" not in cmdline  # the image's own GRUB boots it
        assert any(b"if=pflash" in arg for arg in cmdline) == (firmware == "uefi")  # OVMF, else SeaBIOS
        vm = backend.wait_vm(env.id, "vm1")
        print(f"{firmware}: ssh banner after {vm.boot_seconds:.1f} s ({vm.accel})")
        conn = Connection(target(vm, key_file))  # strict: only the host key we injected is accepted
        try:
            _check_guest(conn, vm.host_key, f"{env.id}-vm1", started)
            efi = conn.run("test -d /sys/firmware/efi").ok
            assert efi == (firmware == "uefi")
            backend.snapshot(env.id, "vm1", "fresh")  # tt_vm_fresh's: UEFI's variable store is qcow2 for it
            conn.run("touch ~/dirty", check=True)
        finally:
            conn.close()
        backend.revert(env.id, "vm1", "fresh")
        conn = Connection(target(vm, key_file))
        try:
            assert conn.run("test ! -e ~/dirty", timeout=120).ok
        finally:
            conn.close()
        _check_password_login_refused(vm.port, vm.host_key, tmp_path)
        assert "GRUB: loading Linux" in Path(vm.console).read_text(errors="replace")
    finally:
        backend.delete_env(env.id)
    assert leftovers(state) == []


def _check_guest(conn: Connection, host_key: str, instance_id: str, started: float) -> None:
    status = conn.run(["cloud-init", "status", "--wait", "--long"], timeout=CLOUD_INIT_TIMEOUT)
    print(f"cloud-init done {time.monotonic() - started:.1f} s after env creation:\n{status.stdout}")
    assert status.ok and "status: done" in status.stdout, status.stdout + status.stderr
    assert conn.run("id -un", check=True).stdout.strip() == "debian"
    assert conn.run("hostname", check=True).stdout.strip() == "vm1"
    # cloud-init used our seed: the NoCloud datasource and this VM's instance id
    assert conn.run("cloud-init query v1.platform", sudo=True, check=True).stdout.strip() == "nocloud"
    assert conn.run("cloud-init query v1.instance_id", sudo=True, check=True).stdout.strip() == instance_id
    # the injected host key is the only one sshd has (the image shipped none)
    keys = conn.run("ls /etc/ssh", check=True).stdout.split()
    assert [k for k in keys if k.startswith("ssh_host_")] == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    served = conn.run("cat /etc/ssh/ssh_host_ed25519_key.pub", sudo=True, check=True).stdout.split()[:2]
    assert served == host_key.split()[:2]
    sshd = conn.run("sshd -T", sudo=True, check=True).stdout.splitlines()
    assert "passwordauthentication no" in sshd
    shadow = conn.run("getent shadow root debian", sudo=True, check=True).stdout.splitlines()
    assert all(line.split(":")[1][:1] in ("!", "*") for line in shadow), shadow  # no usable password
    assert "default via 10.0.2.2" in conn.run("ip route", check=True).stdout


def _check_password_login_refused(port: int, host_key: str, tmp_path: Path) -> None:
    """From the outside: OpenSSH, host key pinned, offers no authentication at all and is told
    which methods may continue: only publickey."""
    if not shutil.which("ssh"):
        pytest.skip("openssh-client not installed")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_key}\n")
    res = subprocess.run(
        [
            "ssh",
            "-v",
            "-p",
            str(port),
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "PreferredAuthentications=none",
            "-o",
            "ConnectTimeout=30",
            "-F",
            "/dev/null",
            "debian@127.0.0.1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "Authentications that can continue: publickey\n" in res.stderr, res.stderr[-2000:]
