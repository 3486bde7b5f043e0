"""Warm starts of the libvirt engine against real libvirt hosts (tests/helpers/libvirt_hosts.py):
a template made once on this machine's libvirt and VMs restored from it with their own identity,
reset (``tt_vm_fresh``'s snapshot/revert); a remote host (qemu+ssh into a network namespace) that
gets the template copied once, checked by sha256; gc of the copies; ``ttenv serve``; an image set
up by cloud-init that boots through GRUB under SeaBIOS (``debiancloud-12``) warm here and on a
remote host, each VM its own cloud-init instance, and a reboot that comes up as the same VM.

Without a libvirt host: tests/unit/test_libvirt_warm_unit.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines.templates import TemplateStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmInfo, VmSpec

from conftest import IMAGE_ROOT
from helpers.leftovers import leftovers
from helpers.libvirt_hosts import LibvirtHost
from helpers.vm_client import client_key, ssh

BOOT = 900.0  # seconds a VM may take to answer SSH here (TCG, 2 cores shared with other VMs)
WAIT = 3 * BOOT  # the first ENV also makes the template (one cold boot, then the save)
RES = Resources(1, 320)


def _facts(vm: VmInfo, key: Path) -> list[str]:
    """hostname, machine-id, seconds the guest clock is off, the host key's fingerprint line."""
    conn = ssh(vm, key)
    try:
        out = conn.run("hostname; cat /etc/machine-id; date +%s", timeout=120, check=True).stdout.split()
    finally:
        conn.close()
    return [out[0], out[1], str(abs(int(out[2]) - time.time()) < 30)]


@pytest.mark.vm
def test_warm_vms_from_a_template_on_this_machines_libvirt(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debian-12")
    host = libvirt_hosts()
    state = tmp_path / "state"
    said: list[str] = []
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=[host.uri], progress=said.append)
    key, key_file = client_key(tmp_path)
    env = backend.create_env(EnvSpec("W1", (VmSpec("vm1", image.name, RES),), key.public, accel="tcg", boot="warm"))
    try:
        vm = backend.wait_vm("W1", "vm1", WAIT)
        assert vm.boot == "warm", said
        assert _facts(vm, key_file)[::2] == ["vm1", "True"]  # its name, and the clock set to now
        backend.snapshot("W1", "vm1", "fresh")  # tt_vm_fresh: reset to the snapshot after each test
        conn = ssh(vm, key_file)
        conn.run("touch /root/dirty", timeout=60, check=True)
        conn.close()
        backend.revert("W1", "vm1", "fresh")
        conn = ssh(vm, key_file)
        assert not conn.run("test -e /root/dirty", timeout=120).ok
        conn.close()
        assert _facts(vm, key_file)[::2] == ["vm1", "True"]
    finally:
        backend.delete_env(env.id)

    # the template is there now: two VMs start warm from it, each its own machine
    said.clear()
    started = time.monotonic()
    vms = tuple(VmSpec(f"vm{i}", image.name, RES) for i in (1, 2))
    env = backend.create_env(EnvSpec("W2", vms, key.public, accel="tcg", boot="warm"))
    try:
        up = [backend.wait_vm("W2", v.name, BOOT) for v in vms]
        seconds = time.monotonic() - started
        assert [v.boot for v in up] == ["warm", "warm"], said
        assert not any("making a warm template" in line for line in said)
        facts = [_facts(v, key_file) for v in up]
        assert [f[0] for f in facts] == ["vm1", "vm2"] and facts[0][1] != facts[1][1]  # own name, machine-id
        assert up[0].host_key != up[1].host_key  # and host key (the SSH above checked it strictly)
        print(f"2 warm libvirt VMs ready {seconds:.1f} s after env add")
        assert seconds < 120
    finally:
        backend.delete_env(env.id)
    assert host.domains() == [] and host.volumes() == []
    assert leftovers(state) == []


@pytest.mark.vm
@pytest.mark.slow
def test_warm_vm_on_a_remote_host_gets_the_template_copied_once(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debian-12")
    a, b = libvirt_hosts(), libvirt_hosts(remote=True)
    state = tmp_path / "state"
    said: list[str] = []
    uris = [f"{a.uri}#mem=100", f"{b.uri}#mem=2048"]  # nothing fits on A: the VMs go to B, A makes the template
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=uris, progress=said.append)
    key, key_file = client_key(tmp_path)
    env = backend.create_env(EnvSpec("R1", (VmSpec("vm1", image.name, RES),), key.public, accel="tcg", boot="warm"))
    try:
        vm = backend.wait_vm("R1", "vm1", WAIT)
        assert (vm.boot, vm.host, vm.address) == ("warm", b.uri, b.addr), said
        assert _facts(vm, key_file)[::2] == ["vm1", "True"]
        copies = [v for v in b.volumes() if v.startswith("ttenv-tpl-")]
        assert sorted(v.rsplit("-", 1)[-1] for v in copies) == [
            "disk.qcow2",
            "disk.qcow2.sha256",
            "state",
            "state.sha256",
        ]
        assert any("state" in line and "sha256 verified" in line for line in said)
        backend.snapshot("R1", "vm1", "fresh")
        backend.revert("R1", "vm1", "fresh")  # libvirt restarts qemu there: the template's copy backs it
        assert _facts(vm, key_file)[::2] == ["vm1", "True"]
    finally:
        backend.delete_env(env.id)

    said.clear()
    started = time.monotonic()
    env = backend.create_env(EnvSpec("R2", (VmSpec("vm2", image.name, RES),), key.public, accel="tcg", boot="warm"))
    try:
        vm = backend.wait_vm("R2", "vm2", BOOT)
        seconds = time.monotonic() - started
        assert vm.boot == "warm" and not any("copying" in line for line in said), said  # the copy is there
        print(f"warm VM on the remote host ready {seconds:.1f} s after env add")
        assert _facts(vm, key_file)[0] == "vm2"
    finally:
        backend.delete_env(env.id)

    # gc: the copies there stay while this machine keeps the template; once it is gone, they go too
    backend.gc()
    assert [v for v in b.volumes() if v.startswith("ttenv-tpl-")] == copies
    key_of = copies[0][len("ttenv-tpl-") :].split("-", 1)[0]
    TemplateStore(image).remove(key_of)
    backend.gc()
    assert [v for v in b.volumes() if v.startswith("ttenv-tpl-")] == []
    assert a.domains() == [] and b.domains() == [] and leftovers(state) == []


@pytest.mark.vm
def test_server_starts_libvirt_vms_warm(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    """ttenv serve --engine libvirt: a warm ENV through the API (the server makes the template)."""
    from helpers.server import image_dir_with, start_server

    (image,) = images("debian-12")
    host = libvirt_hosts()
    server = start_server(
        tmp_path,
        image_dir_with(tmp_path / "images", [image]),
        options=["--engine", "libvirt", "--libvirt-uri", host.uri],
    )
    key, key_file = client_key(tmp_path)
    try:
        client = server.backend()
        client.create_env(EnvSpec("SW", (VmSpec("vm1", image.name, RES),), key.public, boot="warm"))
        vm = client.wait_vm("SW", "vm1", WAIT)
        assert vm.boot == "warm"
        assert _facts(vm, key_file)[::2] == ["vm1", "True"]
        client.snapshot("SW", "vm1", "fresh")
        client.revert("SW", "vm1", "fresh")
        assert _facts(vm, key_file)[0] == "vm1"
        client.delete_env("SW")
        assert host.domains() == [] and host.volumes() == []
    finally:
        server.cleanup()


@pytest.mark.vm
@pytest.mark.slow
def test_cloud_init_image_starts_warm_here_and_remotely_and_a_reboot_keeps_it(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debiancloud-12")
    assert (image.kernel, image.access, image.user, image.boot) == (None, "cloud-init", "debian", "bios")
    a, b = libvirt_hosts(), libvirt_hosts(remote=True)
    state = tmp_path / "state"
    said: list[str] = []
    uris = [f"{a.uri}#mem=700", f"{b.uri}#mem=600"]  # vm1 fits here, then vm2 only on B
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=uris, progress=said.append)
    key, key_file = client_key(tmp_path)
    res = Resources(1, 512)
    vms = tuple(VmSpec(f"vm{i}", image.name, res) for i in (1, 2))
    env = backend.create_env(EnvSpec("C1", vms, key.public, accel="tcg", boot="warm"))
    # hostname, machine-id, cloud-init's instance, its per-instance modules that ran (and when)
    probe = "hostname; cat /etc/machine-id; sudo -n cloud-init query v1.instance_id; "
    probe += "stat -c '%n %Y' /var/lib/cloud/instance/sem/*"
    try:
        up = [backend.wait_vm("C1", v.name, WAIT) for v in vms]
        assert [(v.boot, v.host) for v in up] == [("warm", a.uri), ("warm", b.uri)], said
        facts = []
        for vm in up:
            conn = ssh(vm, key_file)  # strict: the VM's own host key, or no connection
            try:
                facts.append(conn.run(probe, timeout=120, check=True).stdout.split("\n", 3))
                served = conn.run("cat /etc/ssh/ssh_host_ed25519_key.pub", timeout=60, check=True).stdout
                assert served.split()[:2] == vm.host_key.split()[:2]
            finally:
                conn.close()
        assert [f[0] for f in facts] == ["vm1", "vm2"] and facts[0][1] != facts[1][1]
        assert [f[2] for f in facts] == [f"{env.id}-vm1", f"{env.id}-vm2"]  # each its own cloud-init instance
        assert up[0].host_key != up[1].host_key

        vm = up[0]
        backend.snapshot("C1", "vm1", "fresh")  # tt_vm_fresh works on it (SeaBIOS: no pflash)
        backend.revert("C1", "vm1", "fresh")
        conn = ssh(vm, key_file)
        try:
            before = conn.run(probe, timeout=120, check=True).stdout
            boot_id = conn.run("cat /proc/sys/kernel/random/boot_id", timeout=60, check=True).stdout
            started = time.monotonic()
            conn.reboot(BOOT)  # through GRUB again, from its own disk and seed
            print(f"warm cloud-init VM rebooted in {time.monotonic() - started:.1f} s")
            conn.run("cloud-init status --wait", timeout=BOOT, check=True)
            after = conn.run(probe, timeout=120, check=True).stdout  # the same host key: strict connect
            assert conn.run("cat /proc/sys/kernel/random/boot_id", timeout=60, check=True).stdout != boot_id
        finally:
            conn.close()
        assert after == before  # hostname, machine-id, instance; no per-instance module ran again
    finally:
        backend.delete_env(env.id)
    assert a.domains() == [] and b.domains() == [] and leftovers(state) == []
