"""Warm starts of an image set up by cloud-init that boots through its own boot loader: the
cloud variant (``debiancloud-12``: GRUB, Debian's initramfs, cloud-init - our stand-in for a
vendor image; nothing here depends on its name) under SeaBIOS and under OVMF, in private image
stores (its disk symlinked, so templates made here never touch the shared cache).

1. SeaBIOS: two VMs warm-started from one template (made while they wait) are each their own
   machine - hostname, machine-id, host key (checked strictly), client key, clock, RNG - and
   cloud-init reports each one's own instance-id;
2. a reboot of one comes up as the same VM: same host key, hostname, machine-id and instance, and
   cloud-init runs none of its per-instance modules again;
3. OVMF: a warm VM with its own copy of the template's variable store, reset to a snapshot
   (``tt_vm_fresh``'s revert) and used again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_ttenv.access import target
from pytest_ttenv.backend.engines import templates
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.ssh import Connection

from conftest import HOST_ARCH
from helpers.leftovers import leftovers

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.skipif(HOST_ARCH != "x86_64", reason="the cloud variant boots through x86 GRUB: x86_64 only"),
]

RES = Resources(cpu=2, mem_mib=512)
CLIENT = KeyPair.generate("client-under-test")
SEMAPHORES = "stat -c '%n %Y' /var/lib/cloud/instance/sem/*"  # per-instance modules that ran, and when


def private_store(image: ImageInfo, root: Path, boot: str) -> ImageInfo:
    """``image`` (its disk symlinked) in a store of its own under ``root``, booting through ``boot``."""
    root.mkdir()
    src = root.parent / f"src-{root.name}"
    src.mkdir()
    (src / image.disk).symlink_to(image.file(image.disk))
    ImageStore(root).install(src, replace(image, boot=boot))
    return ImageStore(root).get(image.name)


@pytest.fixture(scope="module")
def cloud(images: Callable[..., list[ImageInfo]]) -> ImageInfo:
    (image,) = images("debiancloud-12")
    assert (image.kernel, image.access, image.user) == (None, "cloud-init", "debian")
    return image


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client") / "id"
    CLIENT.write_private(path)
    return path


@pytest.fixture(scope="module")
def bios(cloud: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalBackend, ImageInfo]]:
    base = tmp_path_factory.mktemp("warm-cloud-bios")
    image = private_store(cloud, base / "images", "bios")
    lines: list[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    backend = LocalBackend(base / "images", base / "state", progress=progress)
    yield backend, image
    assert leftovers(base / "state") == []
    assert sum("making a warm template" in line for line in lines) == 1, lines
    shutil.rmtree(base, ignore_errors=True)  # templates are hundreds of MiB


@pytest.fixture(scope="module")
def env(bios: tuple[LocalBackend, ImageInfo]) -> Iterator[EnvInfo]:
    backend, image = bios
    vms = tuple(VmSpec(f"vm{i}", image.name, RES) for i in (1, 2))
    info = backend.create_env(EnvSpec("warmcloud", vms, CLIENT.public, boot="warm"))
    yield info
    backend.delete_env(info.id)


def probe(conn: Connection) -> dict[str, str]:
    """What makes the guest behind ``conn`` its own machine, as it says."""
    out = {}
    for item, cmd in {
        "user": "id -un",
        "hostname": "hostname",
        "machine_id": "cat /etc/machine-id",
        "key_file": "cat /etc/ssh/ssh_host_ed25519_key.pub",
        "host_keys": "ls /etc/ssh | grep ^ssh_host_ | tr '\\n' ' '",
        "authorized": "cat ~/.ssh/authorized_keys",
        "root_keys": "sudo -n ls -A /root/.ssh 2>/dev/null | tr '\\n' ' '",
        "instance_id": "sudo -n cloud-init query v1.instance_id",
        "instance_dir": "readlink /var/lib/cloud/instance",
        "status": "cloud-init status",
        "boot_id": "cat /proc/sys/kernel/random/boot_id",
        "semaphores": SEMAPHORES,
        "clock": "date +%s.%N",
        "urandom": "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
    }.items():
        out[item] = conn.run(cmd, timeout=120, check=True).stdout.strip()
        if item == "clock":
            out["clock_offset"] = str(float(out[item]) - time.time())
    return out


def test_two_warm_cloud_init_vms_are_each_their_own_machine(
    bios: tuple[LocalBackend, ImageInfo], env: EnvInfo, key_file: Path
) -> None:
    backend, _ = bios
    started = time.monotonic()

    def one(name: str) -> dict[str, str]:
        vm = backend.wait_vm(env.id, name)
        assert vm.boot == "warm" and vm.state == "running"
        conn = Connection(target(vm, key_file), use_agent=False)  # strict: VmInfo.host_key only
        try:
            conn.run("true", timeout=120, check=True)
            return {"first": f"{time.monotonic() - started:.1f}", "host_key": vm.host_key} | probe(conn)
        finally:
            conn.close()

    with ThreadPoolExecutor(2) as pool:
        vms = dict(zip(("vm1", "vm2"), pool.map(one, ["vm1", "vm2"]), strict=True))
    print(f"first commands after {vms['vm1']['first']} s and {vms['vm2']['first']} s (template made meanwhile)")
    for item in ("machine_id", "host_key", "urandom", "instance_id"):
        assert vms["vm1"][item] != vms["vm2"][item], item
    for name, vm in vms.items():
        assert (vm["user"], vm["hostname"], vm["instance_id"]) == ("debian", name, f"{env.id}-{name}")
        assert vm["instance_dir"] == f"/var/lib/cloud/instances/{env.id}-{name}"
        assert "status: done" in vm["status"]
        assert len(vm["machine_id"]) == 32
        assert vm["key_file"].split()[:2] == vm["host_key"].split()[:2]  # the key it serves is the one we know
        assert vm["host_keys"].split() == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]  # none shared
        assert vm["authorized"].split()[:2] == CLIENT.public.split()[:2]  # the client's, and only it
        assert vm["root_keys"] == ""  # the template's provisioning key is gone from root's file too
        assert -5 < float(vm["clock_offset"]) < 1, "clock set to now (the template was saved minutes ago)"


def test_a_reboot_comes_up_as_the_same_vm_without_cloud_init_redoing_it(
    bios: tuple[LocalBackend, ImageInfo], env: EnvInfo, key_file: Path
) -> None:
    backend, _ = bios
    vm = backend.wait_vm(env.id, "vm1")
    conn = Connection(target(vm, key_file), use_agent=False)  # strict, before and after
    try:
        before = probe(conn)
        started = time.monotonic()
        conn.reboot(600)
        print(f"rebooted in {time.monotonic() - started:.1f} s")
        conn.run("cloud-init status --wait", timeout=600, check=True)
        after = probe(conn)
        log = conn.run("sudo -n cat /var/log/cloud-init.log", timeout=60, check=True).stdout
    finally:
        conn.close()
    assert after["boot_id"] != before["boot_id"]  # it did reboot
    for item in ("hostname", "machine_id", "key_file", "host_keys", "authorized", "instance_id", "instance_dir"):
        assert after[item] == before[item], item
    assert "status: done" in after["status"]
    assert after["semaphores"] == before["semaphores"]  # no per-instance module ran again
    last_boot = log[log.rindex("running 'init-local'") :]
    assert f"previous iid found to be {env.id}-vm1" in last_boot  # the same instance, not a new one
    assert "config-ssh already ran" in last_boot or "config-ssh" not in last_boot


def test_a_warm_uefi_vm_has_its_own_variable_store_and_is_reset(
    cloud: ImageInfo, tmp_path: Path, key_file: Path
) -> None:
    image = private_store(cloud, tmp_path / "images", "uefi")
    backend = LocalBackend(tmp_path / "images", tmp_path / "state", progress=print)
    info = backend.create_env(EnvSpec("warmuefi", (VmSpec("vm1", image.name, RES),), CLIENT.public, boot="warm"))
    try:
        vm = backend.wait_vm(info.id, "vm1")
        assert vm.boot == "warm"
        argv = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
        vars_ = Path(info.rundir) / "vm1" / templates.UEFI_VARS
        assert f"if=pflash,format=qcow2,unit=1,file={vars_}".encode() in argv
        template = Path((Path(info.rundir) / "vm1" / "template").read_text())
        meta = json.loads((template / templates.META).read_text())
        assert (template / templates.UEFI_VARS).exists() and len(meta["uefi_vars_sha256"]) == 64
        conn = Connection(target(vm, key_file), use_agent=False)
        try:
            assert conn.run("test -d /sys/firmware/efi", timeout=120).ok  # booted through OVMF
            got = probe(conn)
            assert (got["hostname"], got["instance_id"]) == ("vm1", f"{info.id}-vm1")
            backend.snapshot(info.id, "vm1", "fresh")
            conn.run("touch ~/dirty", timeout=60, check=True)
        finally:
            conn.close()
        started = time.monotonic()
        backend.revert(info.id, "vm1", "fresh")
        conn = Connection(target(vm, key_file), use_agent=False)
        try:
            assert conn.run("test ! -e ~/dirty", timeout=120).ok
            print(f"UEFI reset (revert -> first command): {time.monotonic() - started:.1f} s")
            assert abs(float(conn.run("date +%s.%N", timeout=60, check=True).stdout) - time.time()) < 2.5
        finally:
            conn.close()
    finally:
        backend.delete_env(info.id)
    assert leftovers(tmp_path / "state") == []
