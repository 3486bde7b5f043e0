"""The libvirt engine against real libvirt hosts started by tests/helpers/libvirt_hosts.py: one VM
end to end, an ENV spread over two hosts, one of them reached remotely (qemu+ssh into a network
namespace) and killed mid-ENV, and ``ttenv serve --engine libvirt``.

Its parts that need no libvirt host (URIs, placement, XML, settings, libvirtd not running):
tests/unit/test_libvirt_without_hosts.py."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines.libvirt import PENDING_FILE, LibvirtEngine
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import QuotaError
from pytest_ttenv.ssh import HostKeyMismatch, SshError, fan_out

from conftest import IMAGE_ROOT
from helpers.leftovers import leftovers, port_free, qemu_pids_under
from helpers.libvirt_hosts import LibvirtHost
from helpers.vm_client import client_key, ssh

BOOT = 900.0  # seconds a VM may take to answer SSH here (TCG, 2 cores shared with other VMs)


@pytest.mark.vm
def test_one_vm_through_libvirt_end_to_end(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debian-12")
    host = libvirt_hosts()
    state = tmp_path / "state"
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=[host.uri])
    key, key_file = client_key(tmp_path)
    env = backend.create_env(EnvSpec("LV", (VmSpec("vm1", image.name, Resources(1, 320)),), key.public, accel="tcg"))
    dom = f"ttenv-{env.id}-vm1"
    try:
        vm = backend.wait_vm("LV", "vm1", BOOT)
        assert (vm.engine, vm.host, vm.address, vm.state) == ("libvirt", host.uri, "127.0.0.1", "running")
        assert host.domains() == [dom]
        overlay = host.root / "lib" / "ttenv" / f"{dom}-disk.qcow2"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(overlay)], capture_output=True, text=True, check=True
            ).stdout
        )
        assert info["backing-filename"] == str(image.file(image.disk))  # a linked clone of the store's image
        assert info["actual-size"] < 0.05 * image.file(image.disk).stat().st_size

        conn = ssh(vm, key_file)
        assert conn.run("hostname", timeout=120, check=True).stdout.strip() == "vm1"
        wrong = VmInfo(**(vm.to_dict() | {"host_key": KeyPair.generate("x").public, "resources": vm.resources}))
        with pytest.raises(HostKeyMismatch):  # strict host key: a VM presenting another key is refused
            ssh(wrong, key_file).run("true", timeout=60)

        conn.run("echo TTENV-CONSOLE-CHECK > /dev/ttyS0", timeout=60, check=True)
        assert "TTENV-CONSOLE-CHECK" in backend.console("LV", "vm1", 20)

        conn.close()
        backend.snapshot("LV", "vm1", "clean")
        conn.run("touch /root/after-snapshot", timeout=60, check=True)
        conn.close()
        backend.revert("LV", "vm1", "clean")
        conn = ssh(vm, key_file)
        assert not conn.run("test -e /root/after-snapshot", timeout=120).ok  # the disk went back too
        assert "TTENV-CONSOLE-CHECK" in backend.console("LV", "vm1", 50)  # the console survives a revert
        conn.close()
        assert backend.show_env("LV").vms[0].state == "running"
    finally:
        backend.delete_env(env.id)
    assert host.domains() == [] and host.volumes() == []  # no domain, no overlay, seed or console
    assert qemu_pids_under(Path(dom)) == []
    assert port_free(vm.port)
    assert leftovers(state) == []


@pytest.mark.vm
@pytest.mark.slow
def test_env_spread_over_two_hosts_survives_losing_one(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debian-12")
    a, b = libvirt_hosts(), libvirt_hosts(remote=True)
    state = tmp_path / "state"
    said: list[str] = []
    uris = [f"{a.uri}#cpu=2&mem=1024", f"{b.uri}#cpu=2&mem=1024"]  # equal capacity: 2 VMs each
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=uris, progress=said.append)
    key, key_file = client_key(tmp_path)
    vms = tuple(VmSpec(f"vm{i}", image.name, Resources(1, 256)) for i in range(1, 5))
    env = backend.create_env(EnvSpec("SPREAD", vms, key.public, accel="tcg"))
    try:
        on = {vm.name: vm.host for vm in env.vms}
        assert sorted(on.values()) == sorted([a.uri, a.uri, b.uri, b.uri])
        assert {vm.address for vm in env.vms if vm.host == b.uri} == {b.addr}  # its host's address
        assert {vm.address for vm in env.vms if vm.host == a.uri} == {"127.0.0.1"}
        assert sum("copying disk.qcow2" in line for line in said) == 1  # host B got the image once
        up = [backend.wait_vm("SPREAD", vm.name, BOOT) for vm in env.vms]
        conns = [ssh(vm, key_file) for vm in up]
        results = fan_out(conns, "hostname", timeout=120)
        assert {n: r.stdout.strip() for n, r in results.items() if not isinstance(r, SshError)} == {
            vm.name: vm.name for vm in up
        }
        for conn in conns:
            conn.close()
        engine = backend.engines.get("libvirt")  # a second ENV's VM on B would reuse the copy: no upload
        assert isinstance(engine, LibvirtEngine)
        said.clear()
        engine._base(engine._host(b.uri), engine._pool(engine.conn(b.uri)), image)
        assert not any("copying" in line for line in said)

        b.kill()  # host B dies: libvirtd, sshd and its VMs
        shown = backend.show_env("SPREAD")
        for vm in shown.vms:
            if vm.host == b.uri:
                assert vm.state == "stopped" and "unreachable" in vm.error, vm
            else:
                assert vm.state == "running", vm
        alive = [vm for vm in up if vm.host == a.uri]
        conns = [ssh(vm, key_file) for vm in alive]
        assert all(not isinstance(r, SshError) and r.ok for r in fan_out(conns, "true", timeout=120).values())
        for conn in conns:
            conn.close()
    finally:
        said.clear()
        backend.delete_env(env.id)
    assert sum("unreachable" in line and "removed by ttenv gc" in line for line in said) == 2
    assert backend.list_envs() == [] and leftovers(state) == []
    assert a.domains() == [] and a.volumes() == [] and all(port_free(vm.port) for vm in up if vm.host == a.uri)
    assert b.domains() and (state / PENDING_FILE).exists()  # B's remains wait for it to come back
    b.start()  # host B is back: `ttenv gc` (a new process: this one waits 10 s before retrying a host) sweeps it
    LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=uris).gc()
    assert b.domains() == [] and not (state / PENDING_FILE).exists()
    assert [v for v in b.volumes() if not v.startswith("ttenv-img-")] == []  # only the image cache stays
    for vm in up:
        if vm.host == b.uri:
            with pytest.raises(OSError):
                socket.create_connection((b.addr, vm.port), timeout=2).close()


@pytest.mark.vm
def test_server_runs_the_libvirt_engine(
    tmp_path: Path, libvirt_hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    """ttenv serve --engine libvirt: quotas from the host's (overridden) capacity, an ENV created and
    deleted through the API (deleted while booting: no boot needed), nothing left on the host."""
    from helpers.server import image_dir_with, start_server

    (image,) = images("debian-12")
    host = libvirt_hosts()
    server = start_server(
        tmp_path,
        image_dir_with(tmp_path / "images", [image]),
        options=["--engine", "libvirt", "--libvirt-uri", f"{host.uri}#cpu=3&mem=2048"],
    )
    try:
        client = server.backend()
        status = client.status()
        assert status["engine"] == "libvirt" and status["totals"]["cpu"] == 3 and status["totals"]["mem_mib"] == 2048
        spec = EnvSpec("SRV", (VmSpec("vm1", image.name, Resources(1, 256)),), KeyPair.generate("c").public)
        vm = client.create_env(spec).vms[0]
        assert (vm.engine, vm.host, vm.console, vm.state) == ("libvirt", "", "", "booting")  # no host details leak
        assert len(host.domains()) == 1
        with pytest.raises(QuotaError):  # 4 x 512 MiB does not fit what is left of 2048 MiB
            client.create_env(
                EnvSpec(
                    "BIG",
                    tuple(VmSpec(f"v{i}", image.name, Resources(1, 512)) for i in range(4)),
                    KeyPair.generate("c").public,
                )
            )
        client.delete_env("SRV")
        assert host.domains() == [] and host.volumes() == []
    finally:
        server.cleanup()
