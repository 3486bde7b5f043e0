"""The libvirt engine without a libvirt host: host URIs and their overrides, placement by free
memory, the domain, snapshot and volume XML (checked against libvirt's schemas when
virt-xml-validate is installed), qcow2 sizes, the engine settings, and a libvirtd that is not
running (through the backend and through the plugin: one line saying how to start it).

Against real libvirt hosts (tests/helpers/libvirt_hosts.py): tests/vm/test_libvirt.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines.libvirt_place import Capacity, parse_host, parse_hosts, place
from pytest_ttenv.backend.engines.libvirt_xml import (
    DomainConfig,
    domain_xml,
    qcow2_virtual_size,
    snapshot_xml,
    volume_xml,
)
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.config import resolve
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import QuotaError, TTError, UsageError

from helpers.libvirt_hosts import missing

pytest_plugins = ["pytester"]


def _fake_image(images: Path, name: str) -> None:
    """An image dir entry the backend lists (its metadata only: no VM is ever booted from it)."""
    os_name, version, arch = name.split("-")
    (images / name).mkdir(parents=True)
    meta = {"name": name, "os": os_name, "version": version, "arch": arch, "disk_mib": 64}
    (images / name / "image.json").write_text(json.dumps(meta))


def test_host_uris_and_overrides() -> None:
    h = parse_host("qemu+ssh://root@hostB/system?keyfile=/k#cpu=8&mem=16G&addr=10.0.0.7")
    assert (h.uri, h.cpu, h.mem_mib, h.addr, h.remote, h.label) == (
        "qemu+ssh://root@hostB/system?keyfile=/k",
        8,
        16384,
        "10.0.0.7",
        True,
        "hostb",
    )
    local = parse_host("qemu:///system")
    assert not local.remote and local.cpu is None and local.label == "this machine"
    assert not parse_host("qemu+unix:///system?socket=/run/x").remote
    assert [h.uri for h in parse_hosts([])] == ["qemu:///system"]
    for bad in (
        "http://hostB/",
        "qemu+ssh://hostB/other",
        "qemu:///system#cpu=0",
        "qemu:///system#gpu=1",
        "qemu:///system#mem=lots",
    ):
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
    base = dict(
        name="ttenv-0123456789ab-vm1",
        uuid="7b3f1d2e-1111-2222-3333-444455556666",
        title="ttenv E/vm1",
        metadata={"machine": "m", "state": "/s", "env": "0123456789ab", "vm": "vm1"},
        arch="x86_64",
        accel="tcg",
        cpu=1,
        mem_mib=256,
        pool="ttenv",
        disk_volume="d.qcow2",
        seed_volume="s.iso",
        console="/p/c.log",
        port=20022,
        bind_addr="127.0.0.1",
        kernel="/i/vmlinuz",
        initrd="/i/initrd.img",
        cmdline="root=/dev/vda console=ttyS0",
        tcg_cx16=False,
    )
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
        for kind, text in (
            ("domain", xml),
            ("domain", ET.tostring(firmware, encoding="unicode")),
            ("domainsnapshot", snapshot_xml("boot")),
        ):
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
    values = {
        "os": "",
        "arch": "",
        "backend": "local",
        "token": "",
        "lease": "180",
        "engine": "libvirt",
        "libvirt_uri": "qemu:///system, qemu+ssh://root@b/system#cpu=2",
        "accel": "tcg",
        "cpu": "1",
        "mem": "256",
        "disk": "",
        "boot_timeout": "",
        "keep": "never",
        "image_dir": "",
        "image_source": "pull",
        "dist": "shared",
        "matrix_report": "",
    }
    assert resolve(values).libvirt_uri == ("qemu:///system", "qemu+ssh://root@b/system#cpu=2")
    with pytest.raises(UsageError, match="needs --tt-engine=libvirt"):
        resolve(values | {"engine": "qemu"})
    with pytest.raises(UsageError, match="needs --engine libvirt"):
        LocalBackend(tmp_path / "i", tmp_path / "s", libvirt_uris=["qemu:///system"])
    with pytest.raises(UsageError, match="not a libvirt qemu URI"):
        LocalBackend(tmp_path / "i", tmp_path / "s", engine="libvirt", libvirt_uris=["xen:///system"])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_ttenv.cli",
            "env",
            "add",
            "E",
            "--os-prefix",
            "deb",
            "--engine",
            "libvirt",
            "--libvirt-uri",
            "http://x/",
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"TTENV_STATE_DIR": str(tmp_path / "s")},
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a libvirt qemu URI" in res.stderr


def test_libvirtd_not_running_is_one_line_saying_how_to_start_it(tmp_path: Path) -> None:
    if missing() and "libvirt-python" in (missing() or ""):
        pytest.skip(missing() or "")
    images = tmp_path / "images"
    _fake_image(images, "fake-1-x86_64")
    backend = LocalBackend(
        images, tmp_path / "state", engine="libvirt", libvirt_uris=[f"qemu:///system?socket={tmp_path}/no-libvirt-sock"]
    )
    spec = EnvSpec("E", (VmSpec("vm1", "fake-1-x86_64", Resources(1, 256)),), KeyPair.generate("c").public, accel="tcg")
    with pytest.raises(TTError) as err:
        backend.create_env(spec)
    assert "no libvirt host reachable" in str(err.value) and "start libvirtd: virtlogd -d && libvirtd -d" in str(
        err.value
    )
    assert "\n" not in str(err.value) and backend.list_envs() == []


def test_plugin_engine_options_reach_the_backend(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--tt-engine=libvirt --tt-libvirt-uri=... make the session's ENV on that libvirtd: one that is
    not running is one usage-error line saying how to start it (no VM is booted)."""
    if missing() and "libvirt-python" in (missing() or ""):
        pytest.skip(missing() or "")
    _fake_image(tmp_path / "images", "debian-12-x86_64")  # listed, so the plugin neither builds nor pulls it
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("TTENV_STATE_DIR", str(tmp_path / "state"))
    pytester.makepyfile("def test_x(tt_vm):\n    pass\n")
    uri = f"qemu:///system?socket={tmp_path}/x"
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--tt-os=debian12",
        "--tt-arch=x86_64",
        "--tt-engine=libvirt",
        f"--tt-libvirt-uri={uri}",
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [ln for ln in result.stderr.lines if ln.strip()]
    assert len(errors) == 1 and "no libvirt host reachable" in errors[0] and "libvirtd -d" in errors[0], errors
