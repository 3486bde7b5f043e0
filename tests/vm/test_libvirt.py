"""The libvirt engine: pure parts (host URIs, placement, domain XML) and, against real libvirt
hosts started by tests/libvirt_hosts.py, one VM end to end and an ENV spread over two hosts, one of
them reached remotely (qemu+ssh into a network namespace) and killed mid-ENV."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_ttenv.access import target
from pytest_ttenv.backend.engines.libvirt import (
    PENDING_FILE,
    Capacity,
    DomainConfig,
    domain_xml,
    parse_host,
    parse_hosts,
    place,
    qcow2_virtual_size,
    snapshot_xml,
    volume_xml,
)
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.config import resolve
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import QuotaError, TTError, UsageError
from pytest_ttenv.ssh import Connection, HostKeyMismatch, SshError, fan_out

from conftest import IMAGE_ROOT
from helpers.leftovers import leftovers, port_free, qemu_pids_under
from helpers.libvirt_hosts import LibvirtHost, missing

pytest_plugins = ["pytester"]
BOOT = 900.0  # seconds a VM may take to answer SSH here (TCG, 2 cores shared with other VMs)


# -- pure ----------------------------------------------------------------------------------------
def test_host_uris_and_overrides() -> None:
    h = parse_host("qemu+ssh://root@hostB/system?keyfile=/k#cpu=8&mem=16G&addr=10.0.0.7")
    assert (h.uri, h.cpu, h.mem_mib, h.addr, h.remote, h.label) == (
        "qemu+ssh://root@hostB/system?keyfile=/k", 8, 16384, "10.0.0.7", True, "hostb")  # fmt: skip
    local = parse_host("qemu:///system")
    assert not local.remote and local.cpu is None and local.label == "this machine"
    assert not parse_host("qemu+unix:///system?socket=/run/x").remote
    assert [h.uri for h in parse_hosts([])] == ["qemu:///system"]
    for bad in ("http://hostB/", "qemu+ssh://hostB/other", "qemu:///system#cpu=0", "qemu:///system#gpu=1",
                "qemu:///system#mem=lots"):  # fmt: skip
        with pytest.raises(UsageError):
            parse_host(bad)
    with pytest.raises(UsageError, match="given twice"):
        parse_hosts(["qemu:///system", "qemu:///system#cpu=2"])


def _vm(name: str, mem: int, host: str = "", cpu: int = 1) -> VmInfo:
    return VmInfo(name, "img", "debian", "12", "x86_64", state="running", resources=Resources(cpu, mem), host=host)


def test_placement_by_free_memory_spreads_and_refuses_what_fits_nowhere() -> None:
    hosts = [Capacity("qemu:///system", 2, 1024), Capacity("qemu+ssh://b/system", 2, 1024)]
    vms = [VmSpec(f"vm{i}", "img", Resources(1, 256)) for i in range(4)]
    assert place(vms, hosts, []) == [hosts[0].uri, hosts[1].uri, hosts[0].uri, hosts[1].uri]
    held = [_vm("x", 512, hosts[0].uri)]  # what live VMs hold counts
    assert place(vms[:2], hosts, held) == [hosts[1].uri, hosts[1].uri]
    live = [Capacity("a", 4, 4096, free_now_mib=300), Capacity("b", 1, 2048)]  # libvirt's free memory bounds
    assert place(vms[:2], live, []) == ["b", "b"]
    with pytest.raises(QuotaError, match="no libvirt host has 2048 MiB free for VM big"):
        place([VmSpec("big", "img", Resources(1, 2048))], hosts, [])


def _config(**kw: object) -> DomainConfig:
    base = dict(name="ttenv-0123456789ab-vm1", uuid="7b3f1d2e-1111-2222-3333-444455556666", title="ttenv E/vm1",
                metadata={"machine": "m", "state": "/s", "env": "0123456789ab", "vm": "vm1"}, arch="x86_64",
                accel="tcg", cpu=1, mem_mib=256, pool="ttenv", disk_volume="d.qcow2", seed_volume="s.iso",
                console="/p/c.log", port=20022, bind_addr="127.0.0.1", kernel="/i/vmlinuz", initrd="/i/initrd.img",
                cmdline="root=/dev/vda console=ttyS0", tcg_cx16=False)  # fmt: skip
    return DomainConfig(**(base | kw))  # type: ignore[arg-type]


def test_domain_xml_matches_the_qemu_engine_and_libvirts_schema(tmp_path: Path) -> None:
    xml = domain_xml(_config())
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu" and dom.findtext("os/kernel") == "/i/vmlinuz"
    assert dom.find("cpu/feature").attrib == {"policy": "disable", "name": "cx16"}  # type: ignore[union-attr]
    assert dom.find("features/tcg/tb-cache").text == "64"  # type: ignore[union-attr]
    disks = dom.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    assert disks[1].find("readonly") is not None and disks[1].get("snapshot") == "no"
    assert dom.find("devices/serial/source").attrib == {"path": "/p/c.log", "append": "on"}  # type: ignore[union-attr]
    args = [a.get("value") for a in dom.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert args[1] == "user,id=ttnet0,hostfwd=tcp:127.0.0.1:20022-:22"
    assert json.loads(args[3] or "") == {
        "driver": "virtio-net-pci",
        "netdev": "ttnet0",
        "mac": "52:54:00:12:34:56",
        "romfile": "",
    }
    firmware = ET.fromstring(domain_xml(_config(kernel=None, initrd=None, uefi=True, accel="kvm")))
    assert firmware.get("type") == "kvm" and firmware.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert firmware.find("os/nvram").get("template", "").endswith("VARS_4M.fd")  # type: ignore[union-attr]
    assert firmware.find("os/kernel") is None and firmware.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    snap = ET.fromstring(snapshot_xml("boot"))
    assert snap.findtext("name") == "boot" and snap.find("memory").get("snapshot") == "internal"  # type: ignore[union-attr]
    overlay = ET.fromstring(volume_xml("o.qcow2", 3 << 30, "qcow2", backing="/b/disk.qcow2"))
    assert overlay.findtext("backingStore/path") == "/b/disk.qcow2"
    if shutil.which("virt-xml-validate") and Path("/usr/share/libvirt/schemas/domain.rng").exists():
        for kind, text in (("domain", xml), ("domain", ET.tostring(firmware, encoding="unicode")),
                           ("domainsnapshot", snapshot_xml("boot"))):  # fmt: skip
            f = tmp_path / f"{kind}.xml"
            f.write_text(text)
            res = subprocess.run(["virt-xml-validate", str(f), kind], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr + res.stdout


def test_qcow2_virtual_size_reads_the_header(tmp_path: Path) -> None:
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img not installed")
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "3G"], check=True)
    assert qcow2_virtual_size(disk) == 3 << 30
    raw = tmp_path / "r.img"
    raw.write_bytes(b"x" * 1000)
    assert qcow2_virtual_size(raw) == 1000


def test_engine_settings_are_checked(tmp_path: Path) -> None:
    values = {"os": "", "arch": "", "backend": "local", "token": "", "lease": "180", "engine": "libvirt",
              "libvirt_uri": "qemu:///system, qemu+ssh://root@b/system#cpu=2", "accel": "tcg", "cpu": "1",
              "mem": "256", "disk": "", "boot_timeout": "", "keep": "never", "image_dir": "", "image_source": "pull",
              "dist": "shared", "matrix_report": ""}  # fmt: skip
    assert resolve(values).libvirt_uri == ("qemu:///system", "qemu+ssh://root@b/system#cpu=2")
    with pytest.raises(UsageError, match="needs --tt-engine=libvirt"):
        resolve(values | {"engine": "qemu"})
    with pytest.raises(UsageError, match="needs --engine libvirt"):
        LocalBackend(tmp_path / "i", tmp_path / "s", libvirt_uris=["qemu:///system"])
    with pytest.raises(UsageError, match="not a libvirt qemu URI"):
        LocalBackend(tmp_path / "i", tmp_path / "s", engine="libvirt", libvirt_uris=["xen:///system"])
    res = subprocess.run([sys.executable, "-m", "pytest_ttenv.cli", "env", "add", "E", "--os-prefix", "deb",
                          "--engine", "libvirt", "--libvirt-uri", "http://x/"], capture_output=True, text=True,
                         env=os.environ | {"TTENV_STATE_DIR": str(tmp_path / "s")})  # fmt: skip
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a libvirt qemu URI" in res.stderr


def test_libvirtd_not_running_is_one_line_saying_how_to_start_it(tmp_path: Path) -> None:
    if missing() and "libvirt-python" in (missing() or ""):
        pytest.skip(missing() or "")
    images = tmp_path / "images"
    (images / "fake-1-x86_64").mkdir(parents=True)
    meta = {"name": "fake-1-x86_64", "os": "fake", "version": "1", "arch": "x86_64", "disk_mib": 64}
    (images / "fake-1-x86_64" / "image.json").write_text(json.dumps(meta))
    backend = LocalBackend(images, tmp_path / "state", engine="libvirt",
                           libvirt_uris=[f"qemu:///system?socket={tmp_path}/no-libvirt-sock"])  # fmt: skip
    spec = EnvSpec("E", (VmSpec("vm1", "fake-1-x86_64", Resources(1, 256)),), KeyPair.generate("c").public,
                   accel="tcg")  # fmt: skip
    with pytest.raises(TTError) as err:
        backend.create_env(spec)
    assert "no libvirt host reachable" in str(err.value) and "start libvirtd: virtlogd -d && libvirtd -d" in str(
        err.value
    )
    assert "\n" not in str(err.value) and backend.list_envs() == []


# -- real hosts ----------------------------------------------------------------------------------
@pytest.fixture
def hosts() -> Iterator[Callable[..., LibvirtHost]]:
    """``hosts(remote=False)`` -> a started LibvirtHost; every one is killed and removed after the test."""
    reason = missing()
    if reason:
        pytest.skip(f"no libvirt hosts here: {reason}")
    made: list[LibvirtHost] = []
    roots: list[Path] = []

    def make(remote: bool = False) -> LibvirtHost:
        root = Path(tempfile.mkdtemp(prefix="ttlv-", dir="/tmp"))  # short: libvirt's socket lives there
        roots.append(root)
        host = LibvirtHost(root, remote=remote)
        made.append(host)
        return host.start()

    yield make
    for host in made:
        host.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def _ssh(vm: VmInfo, key: Path) -> Connection:
    return Connection(target(vm, key), use_agent=False, connect_timeout=60)


@pytest.mark.vm
def test_one_vm_through_libvirt_end_to_end(
    tmp_path: Path, hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debian-12")
    host = hosts()
    state = tmp_path / "state"
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=[host.uri])
    key = KeyPair.generate("client")
    key_file = tmp_path / "id"
    key.write_private(key_file)
    env = backend.create_env(EnvSpec("LV", (VmSpec("vm1", image.name, Resources(1, 320)),), key.public, accel="tcg"))
    dom = f"ttenv-{env.id}-vm1"
    try:
        vm = backend.wait_vm("LV", "vm1", BOOT)
        assert (vm.engine, vm.host, vm.address, vm.state) == ("libvirt", host.uri, "127.0.0.1", "running")
        assert host.domains() == [dom]
        overlay = host.root / "lib" / "ttenv" / f"{dom}-disk.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                                         capture_output=True, text=True, check=True).stdout)  # fmt: skip
        assert info["backing-filename"] == str(image.file(image.disk))  # a linked clone of the store's image
        assert info["actual-size"] < 0.05 * image.file(image.disk).stat().st_size

        conn = _ssh(vm, key_file)
        assert conn.run("hostname", timeout=120, check=True).stdout.strip() == "vm1"
        wrong = VmInfo(**(vm.to_dict() | {"host_key": KeyPair.generate("x").public, "resources": vm.resources}))
        with pytest.raises(HostKeyMismatch):  # strict host key: a VM presenting another key is refused
            _ssh(wrong, key_file).run("true", timeout=60)

        conn.run("echo TTENV-CONSOLE-CHECK > /dev/ttyS0", timeout=60, check=True)
        assert "TTENV-CONSOLE-CHECK" in backend.console("LV", "vm1", 20)

        conn.close()
        backend.snapshot("LV", "vm1", "clean")
        conn.run("touch /root/after-snapshot", timeout=60, check=True)
        conn.close()
        backend.revert("LV", "vm1", "clean")
        conn = _ssh(vm, key_file)
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
    tmp_path: Path, hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    (image,) = images("debian-12")
    a, b = hosts(), hosts(remote=True)
    state = tmp_path / "state"
    said: list[str] = []
    uris = [f"{a.uri}#cpu=2&mem=1024", f"{b.uri}#cpu=2&mem=1024"]  # equal capacity: 2 VMs each
    backend = LocalBackend(IMAGE_ROOT, state, engine="libvirt", libvirt_uris=uris, progress=said.append)
    key = KeyPair.generate("client")
    key_file = tmp_path / "id"
    key.write_private(key_file)
    vms = tuple(VmSpec(f"vm{i}", image.name, Resources(1, 256)) for i in range(1, 5))
    env = backend.create_env(EnvSpec("SPREAD", vms, key.public, accel="tcg"))
    try:
        on = {vm.name: vm.host for vm in env.vms}
        assert sorted(on.values()) == sorted([a.uri, a.uri, b.uri, b.uri])
        assert {vm.address for vm in env.vms if vm.host == b.uri} == {b.addr}  # its host's address
        assert {vm.address for vm in env.vms if vm.host == a.uri} == {"127.0.0.1"}
        assert sum("copying disk.qcow2" in line for line in said) == 1  # host B got the image once
        up = [backend.wait_vm("SPREAD", vm.name, BOOT) for vm in env.vms]
        conns = [_ssh(vm, key_file) for vm in up]
        results = fan_out(conns, "hostname", timeout=120)
        assert {n: r.stdout.strip() for n, r in results.items() if not isinstance(r, SshError)} == {
            vm.name: vm.name for vm in up
        }
        for conn in conns:
            conn.close()
        engine = backend._libvirt_engine()  # a second ENV's VM on B would reuse the copy: no upload
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
        conns = [_ssh(vm, key_file) for vm in alive]
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


def test_server_runs_the_libvirt_engine(
    tmp_path: Path, hosts: Callable[..., LibvirtHost], images: Callable[..., list[ImageInfo]]
) -> None:
    """ttenv serve --engine libvirt: quotas from the host's (overridden) capacity, an ENV created and
    deleted through the API (deleted while booting: no boot needed), nothing left on the host."""
    from helpers.server import image_dir_with, start_server

    (image,) = images("debian-12")
    host = hosts()
    server = start_server(tmp_path, image_dir_with(tmp_path / "images", [image]),
                          options=["--engine", "libvirt", "--libvirt-uri", f"{host.uri}#cpu=3&mem=2048"])  # fmt: skip
    try:
        client = server.backend()
        status = client.status()
        assert status["engine"] == "libvirt" and status["totals"]["cpu"] == 3 and status["totals"]["mem_mib"] == 2048
        spec = EnvSpec("SRV", (VmSpec("vm1", image.name, Resources(1, 256)),), KeyPair.generate("c").public)
        vm = client.create_env(spec).vms[0]
        assert (vm.engine, vm.host, vm.console, vm.state) == ("libvirt", "", "", "booting")  # no host details leak
        assert len(host.domains()) == 1
        with pytest.raises(QuotaError):  # 4 x 512 MiB does not fit what is left of 2048 MiB
            client.create_env(EnvSpec("BIG", tuple(VmSpec(f"v{i}", image.name, Resources(1, 512)) for i in range(4)),
                                      KeyPair.generate("c").public))  # fmt: skip
        client.delete_env("SRV")
        assert host.domains() == [] and host.volumes() == []
    finally:
        server.cleanup()


def test_plugin_engine_options_reach_the_backend(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, images: Callable[..., list[ImageInfo]]
) -> None:
    """--tt-engine=libvirt --tt-libvirt-uri=... make the session's ENV on that libvirtd: one that is
    not running is one usage-error line saying how to start it (no VM is booted)."""
    if missing() and "libvirt-python" in (missing() or ""):
        pytest.skip(missing() or "")
    images("debian-12")
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(IMAGE_ROOT))
    monkeypatch.setenv("TTENV_STATE_DIR", str(tmp_path / "state"))
    pytester.makepyfile("def test_x(tt_vm):\n    pass\n")
    uri = f"qemu:///system?socket={tmp_path}/x"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--tt-os=debian12", "--tt-arch=x86_64",
                                           "--tt-engine=libvirt", f"--tt-libvirt-uri={uri}")  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [ln for ln in result.stderr.lines if ln.strip()]
    assert len(errors) == 1 and "no libvirt host reachable" in errors[0] and "libvirtd -d" in errors[0], errors
