"""The libvirt engine's warm starts without a libvirt host: libvirt's save image header (read, and
rewritten with a VM's own domain XML), the warm domain XML (identity channel, VM generation ID,
a template's file disks; against libvirt's schemas when virt-xml-validate is installed), the plan
(warm, keyed by the domain's device set; cold with one line when no host here makes templates),
firmware and cloud-init images (SeaBIOS warm, UEFI cold with one line), a warm VM's identity
(its seed's cloud-init instance) kept and sent once through a stream like virDomainOpenChannel's,
and gc of template copies on remote hosts.

Against real libvirt hosts: tests/vm/test_libvirt_warm.py."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
import subprocess
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_ttenv.backend.engines.base import Boot, Start
from pytest_ttenv.backend.engines.libvirt_place import Host, parse_hosts
from pytest_ttenv.backend.engines.libvirt_warm import LibvirtWarm, blank_config, uefi_cold
from pytest_ttenv.backend.engines.libvirt_xml import (
    SAVE_HEADER,
    SAVE_MAGIC,
    domain_xml,
    read_save_head,
    save_head_with,
)
from pytest_ttenv.backend.engines.seed import SeedData, read_seed_file, write_seed_iso
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import TTError

from helpers.guest import identity_agent

RES = Resources(cpu=1, mem_mib=256)


def _image(root: Path, **changes: Any) -> ImageInfo:
    d = root / "debian-12-x86_64"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / f).write_bytes(b"x" * 16)
    info = replace(ImageInfo("debian-12-x86_64", "debian", "12", "x86_64", cmdline="root=/dev/vda"), **changes)
    (d / "image.json").write_text(json.dumps(info.to_dict()))
    return replace(info, path=d)


def _save_image(xml: str, cookie: bytes, stream: bytes, pad: int = 64 * 1024) -> bytes:
    """A save image as libvirt 9 writes one (qemuSaveImageCreate)."""
    body, ck = xml.encode() + b"\0", cookie + b"\0"
    data_len = len(body) + len(ck) + pad
    head = SAVE_HEADER.pack(SAVE_MAGIC, 2, data_len, 1, 0, len(body))
    return head + (body + ck).ljust(data_len, b"\0") + stream


def test_save_image_head_is_read_and_rewritten_with_another_domain() -> None:
    stream = b"QEVM\0\0\0\3" + b"ram" * 100
    image = _save_image("<domain><name>tpl</name></domain>", b"<qemu-migration/>", stream)
    head = read_save_head(image)
    assert head.xml == "<domain><name>tpl</name></domain>" and head.cookie == b"<qemu-migration/>"
    assert image[head.length :] == stream  # qemu's migration stream starts right after the head
    mine = save_head_with(head, "<domain><name>ttenv-0123456789ab-vm1</name></domain>")
    assert len(mine) == head.length  # it replaces the head of a copy in place
    again = read_save_head(mine + stream)
    assert again.xml == "<domain><name>ttenv-0123456789ab-vm1</name></domain>"
    assert again.cookie == head.cookie and again.fields[:4] == head.fields[:4]
    with pytest.raises(ValueError, match="does not fit"):
        save_head_with(head, "<domain>" + "x" * 70000 + "</domain>")
    partial = b"LibvirtQemudPart" + image[16:]
    with pytest.raises(ValueError, match="not a complete raw libvirt save image"):
        read_save_head(partial)  # a save cut short (libvirt marks it complete last)
    with pytest.raises(ValueError, match="cut short"):
        read_save_head(image[:200])


def test_warm_domain_xml_adds_the_identity_channel_and_a_generation_id(tmp_path: Path) -> None:
    image = _image(tmp_path)
    cfg = dataclasses.replace(blank_config(image, "tcg", RES), genid="6f1b1f3c-4a51-4a2e-9f3e-0d1d0c6f7a10")
    xml = domain_xml(cfg)
    assert "<genid>6f1b1f3c-4a51-4a2e-9f3e-0d1d0c6f7a10</genid>" in xml
    assert '<channel type="unix"><source mode="bind" /><target type="virtio" name="org.ttenv.identity" />' in xml
    tpl = domain_xml(dataclasses.replace(cfg, disk_file="/t/disk.qcow2", seed_file="/t/seed.iso"))
    assert '<disk type="file" device="disk"><driver name="qemu" type="qcow2"' in tpl
    assert '<source file="/t/disk.qcow2" />' in tpl and '<source file="/t/seed.iso" />' in tpl
    cold = domain_xml(dataclasses.replace(cfg, identity=False, genid=""))
    assert "genid" not in cold and "channel" not in cold
    aarch64 = domain_xml(dataclasses.replace(cfg, arch="aarch64"))
    assert "genid" not in aarch64  # vmgenid is an x86 device
    validate = shutil.which("virt-xml-validate")
    if validate:
        for text in (xml, tpl):
            (tmp_path / "d.xml").write_text(text)
            res = subprocess.run([validate, str(tmp_path / "d.xml"), "domain"], capture_output=True, text=True)
            assert res.returncode == 0, res.stdout + res.stderr


class _FakeConn:
    """What LibvirtWarm asks of a connection, without libvirt."""

    def __init__(self, versions: tuple[int, int] = (7002000, 9000000), agent: Any = None) -> None:
        self._versions = versions
        self.agent = agent or identity_agent()
        self.opened: list[tuple[str, str]] = []
        self.vols = ["ttenv-tpl-aaaa-state", "ttenv-tpl-aaaa-state.sha256", "ttenv-tpl-bbbb-disk.qcow2", "other"]
        self.deleted: list[str] = []

    def versions(self) -> tuple[int, int]:
        return self._versions

    def channel(self, name: str, port: str) -> _FakeChannel:
        self.opened.append((name, port))
        return _FakeChannel(self.agent)


class _FakeChannel:
    """A non-blocking stream to the guest agent's port: each line written is answered."""

    def __init__(self, agent: Any) -> None:
        self.agent, self.buf, self.out, self.closed = agent, b"", b"", False

    def send(self, data: bytes) -> int:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.out += self.agent.handle(line)
        return len(data)

    def recv(self, size: int) -> bytes | None:
        if not self.out:
            return None
        chunk, self.out = self.out[:size], self.out[size:]
        return chunk

    def close(self) -> None:
        self.closed = True


class _FakePool:
    def __init__(self, conn: _FakeConn) -> None:
        self.conn = conn

    def volumes(self) -> list[str]:
        return list(self.conn.vols)

    def delete(self, name: str) -> bool:
        self.conn.deleted.append(name)
        return True


def _warm(hosts: list[str], conn: _FakeConn, lines: list[str]) -> LibvirtWarm:
    return LibvirtWarm(
        parse_hosts(hosts),
        lambda uri: conn,  # type: ignore[arg-type,return-value]
        lambda c: _FakePool(conn),  # type: ignore[arg-type,return-value]
        lambda key: threading.Lock(),
        lines.append,
        "machine",
    )


def test_plan_is_warm_keyed_by_the_device_set_or_cold_saying_why(tmp_path: Path) -> None:
    image = _image(tmp_path)
    lines: list[str] = []
    conn = _FakeConn()
    vm = VmSpec("vm1", image.name, RES)
    spec = EnvSpec("E", (vm,), "k", boot="warm")
    here = _warm(["qemu:///system", "qemu+ssh://root@hostb/system"], conn, lines)
    boot = here.plan(spec, vm, image, "tcg", "me")
    assert boot.how == "warm" and boot.inputs["xml"] == domain_xml(blank_config(image, "tcg", RES))
    assert boot.inputs["libvirt"] == [7002000, 9000000] and boot.inputs["format"] == "libvirt-1"
    assert here.plan(spec, vm, image, "tcg", "you").key != boot.key  # never shared between owners
    bigger = VmSpec("vm1", image.name, Resources(2, 256))
    assert here.plan(spec, bigger, image, "tcg", "me").key != boot.key
    assert here.plan(EnvSpec("E", (vm,), "k", boot="cold"), vm, image, "tcg", "me").why == "cold requested"
    bigger_disk = here.plan(
        spec, VmSpec("vm1", image.name, replace(RES, disk_mib=image.disk_mib + 1)), image, "tcg", "me"
    )
    assert bigger_disk.how == "cold" and bigger_disk.why.startswith("a disk larger than the image's")
    remote_only = _warm(["qemu+ssh://root@hostb/system"], conn, lines).plan(spec, vm, image, "tcg", "me")
    assert remote_only.how == "cold"
    assert remote_only.why == "libvirt warm starts need this machine's libvirt among the hosts (it makes templates)"


def test_plan_starts_cloud_init_images_under_seabios_warm_and_uefi_ones_cold(tmp_path: Path) -> None:
    direct = _image(tmp_path)
    cloud = replace(direct, kernel=None, initrd=None, cmdline="", access="cloud-init", user="debian", boot="bios")
    vm = VmSpec("vm1", cloud.name, RES)
    spec = EnvSpec("E", (vm,), "k", boot="warm")
    here = _warm(["qemu:///system"], _FakeConn(), [])
    boot = here.plan(spec, vm, cloud, "tcg", "me")
    assert boot.how == "warm", boot.why
    xml = boot.inputs["xml"]
    assert "<kernel>" not in xml and "<cmdline>" not in xml and "<loader" not in xml  # SeaBIOS, its own boot loader
    assert '<boot dev="hd" />' in xml and '<target type="virtio" name="org.ttenv.identity" />' in xml
    assert boot.key != here.plan(spec, vm, direct, "tcg", "me").key
    uefi = here.plan(spec, vm, replace(cloud, boot="uefi"), "tcg", "me")
    assert (uefi.how, uefi.why) == (
        "cold",
        "the libvirt engine starts UEFI images cold: libvirt cannot snapshot a VM with UEFI (pflash) firmware, "
        "so a warm one could not be reset (tt_vm_fresh)",
    )
    assert uefi_cold(cloud) == "" and uefi_cold(direct) == ""
    no_sudo = here.plan(spec, vm, replace(direct, user="debian"), "tcg", "me")  # ttenv-built, not root
    assert (no_sudo.how, no_sudo.why) == (
        "cold",
        "debian-12-x86_64 logs in as debian without cloud-init's sudo; warm starts need root or sudo",
    )


class _Recorder:
    """An identity agent that answers ``ok`` and keeps each request's fields."""

    def __init__(self) -> None:
        self.requests: list[dict[str, bytes]] = []

    def handle(self, line: bytes) -> bytes:
        op, nonce, *fields = line.decode().split()
        self.requests.append(
            {"op": op.encode()} | {k: base64.b64decode(v) for k, v in (f.split("=", 1) for f in fields)}
        )
        return f"ok {nonce} 0.000\n".encode()


def test_a_warm_vm_takes_its_seeds_cloud_init_instance_once_or_boots_cold_saying_why(tmp_path: Path) -> None:
    image = replace(_image(tmp_path), kernel=None, initrd=None, access="cloud-init", user="debian")
    spec = EnvSpec("E", (VmSpec("vm1", image.name, RES),), "ssh-ed25519 AAAAclient c", boot="warm")
    vmdir = tmp_path / "run" / "vm1"
    vmdir.mkdir(parents=True)
    host_key = KeyPair.generate("vm1")
    write_seed_iso(SeedData("vm1", "e1-vm1", "debian", spec.client_pubkey, host_key), vmdir / "seed.iso")
    job = Start(
        EnvInfo("e1", "E", "me", 0.0, None, "booting", rundir=str(tmp_path / "run")),
        spec,
        spec.vms[0],
        image,
        "tcg",
        VmInfo("vm1", image.name, "debiancloud", "12", "x86_64", state="booting", boot="warm"),
        vmdir,
        vmdir / "seed.iso",
        host_key,
        "ab" * 16,
        Boot("warm", "", "k1"),
        move_port=lambda: 1,
    )
    agent, lines = _Recorder(), list[str]()
    conn = _FakeConn(agent=agent)
    warm = _warm(["qemu:///system"], conn, lines)
    warm.keep_identity(job)
    assert (vmdir / "identity.json").stat().st_mode & 0o777 == 0o600  # it holds the host key
    assert warm.ready(conn, "ttenv-e1-vm1", vmdir, "vm1")  # type: ignore[arg-type]
    (sent,) = agent.requests
    assert sent["op"] == b"identity" and sent["hostname"] == b"vm1" and sent["user"] == b"debian"
    assert sent["instance_id"] == b"e1-vm1"  # cloud-init's instance becomes the seed's: a reboot is the same VM
    assert sent["user_data"] == read_seed_file(vmdir / "seed.iso", "user-data").encode()
    assert sent["host_key_pub"] == host_key.public.encode() + b"\n" and sent["machine_id"] == b"ab" * 16
    assert not (vmdir / "identity.json").exists()
    assert warm.ready(conn, "ttenv-e1-vm1", vmdir, "vm1")  # type: ignore[arg-type]
    assert len(agent.requests) == 1 and conn.opened == [("ttenv-e1-vm1", "org.ttenv.identity")]  # once
    warm.keep_identity(job)
    warm.cold_instead(job, "hostb runs qemu/libvirt [1, 2]")
    assert lines == ["vm1: cold boot (no warm start: hostb runs qemu/libvirt [1, 2])"]
    assert job.info.boot == "cold" and not (vmdir / "identity.json").exists()


def test_a_remote_host_with_another_libvirt_cannot_restore_the_template(tmp_path: Path) -> None:
    image = _image(tmp_path)
    lines: list[str] = []
    vm = VmSpec("vm1", image.name, RES)
    here = _warm(["qemu:///system", "qemu+ssh://root@hostb/system"], _FakeConn(), lines)
    boot = here.plan(EnvSpec("E", (vm,), "k", boot="warm"), vm, image, "tcg", "me")
    job: Any = type("Job", (), {"boot": boot})()
    local, remote = here.hosts
    assert here.unusable(job, local) == "" and here.unusable(job, remote) == ""
    other = _warm([local.uri, remote.uri], _FakeConn((8002000, 10000000)), lines)
    assert other.unusable(job, remote) == (
        "hostb runs qemu/libvirt [8002000, 10000000], its template was made with [7002000, 9000000]"
    )


def test_identity_requests_reach_the_agent_through_the_domains_channel(tmp_path: Path) -> None:
    conn = _FakeConn()
    warm = _warm(["qemu:///system"], conn, [])
    assert warm.request(conn, "ttenv-x-vm1", "ping", 5.0, "VM vm1") == "0.000"  # type: ignore[arg-type]
    assert conn.opened == [("ttenv-x-vm1", "org.ttenv.identity")]
    with pytest.raises(TTError, match="VM vm1: the identity agent failed: ValueError: unknown op bogus"):
        warm.request(conn, "ttenv-x-vm1", "bogus", 5.0, "VM vm1")  # type: ignore[arg-type]
    with warm.channel(conn, "ttenv-x-vm1") as sock:  # type: ignore[arg-type]
        assert sock.exists()
    assert not sock.parent.exists()  # the relay's socket dir goes with it, and the stream is closed


def test_channel_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    conn = _FakeConn()

    def refuse(name: str, port: str) -> _FakeChannel:
        raise TTError("opening channel org.ttenv.identity of vm1 failed")

    conn.channel = refuse  # type: ignore[method-assign]
    warm = _warm(["qemu:///system"], conn, [])
    with pytest.raises(TTError, match=r"opening channel org\.ttenv\.identity of vm1 failed"):
        warm.request(conn, "vm1", "ping", 5.0, "VM vm1")  # type: ignore[arg-type]


def test_gc_removes_template_copies_nobody_keeps_or_uses(tmp_path: Path) -> None:
    image = _image(tmp_path)
    conn = _FakeConn()
    kept = image.path / "warm" / "bbbb"  # type: ignore[operator]
    kept.mkdir(parents=True)
    lines: list[str] = []
    warm = _warm(["qemu:///system", "qemu+ssh://root@hostb/system"], conn, lines)
    warm.reap([image], lambda c: set())
    # bbbb has no meta.json: the store reaps it here, so its copy there goes too
    assert conn.deleted == ["ttenv-tpl-aaaa-state", "ttenv-tpl-aaaa-state.sha256", "ttenv-tpl-bbbb-disk.qcow2"]
    conn.deleted.clear()
    warm.reap([image], lambda c: {"aaaa", "bbbb"})  # a VM there still starts from them: kept
    assert conn.deleted == []
    assert all(isinstance(h, Host) for h in warm.hosts)


class _MemPool:
    """A storage pool in memory: volumes as bytes (``corrupt``: what is read back differs)."""

    path = "/pool"

    def __init__(self, corrupt: bool = False) -> None:
        self.vols: dict[str, bytearray] = {}
        self.corrupt, self.uploads = corrupt, 0

    def exists(self, name: str) -> bool:
        return name in self.vols

    def create(self, xml: str, name: str) -> str:
        self.vols[name] = bytearray()
        return f"{self.path}/{name}"

    def delete(self, name: str) -> bool:
        return self.vols.pop(name, None) is not None

    def upload(self, name: str, src: Any, length: int) -> Any:
        self.uploads += 1
        data = src.read(length)
        self.vols[name][: len(data)] = data
        yield data

    def download(self, name: str) -> Any:
        yield bytes(self.vols[name]) + (b"!" if self.corrupt else b"")


def test_upload_once_copies_verifies_and_marks_a_file_once(tmp_path: Path) -> None:
    from pytest_ttenv.backend.engines.libvirt_upload import upload_once

    src = tmp_path / "state"
    src.write_bytes(b"saved state" * 1000)
    pool, lines = _MemPool(), list[str]()
    path = upload_once(pool, "hostb", src, "ttenv-tpl-k-state", "warm template k state", lines.append)  # type: ignore[arg-type]
    assert path == "/pool/ttenv-tpl-k-state" and pool.vols["ttenv-tpl-k-state"] == src.read_bytes()
    assert pool.vols["ttenv-tpl-k-state.sha256"].decode().split()[0] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert lines[0] == "warm template k state: copying state (0 MiB) to hostb (once)"
    assert lines[-1].endswith("sha256 verified")
    uploads = pool.uploads
    upload_once(pool, "hostb", src, "ttenv-tpl-k-state", "warm template k state", lines.append)  # type: ignore[arg-type]
    assert pool.uploads == uploads  # marked complete: not sent again
    bad = _MemPool(corrupt=True)
    with pytest.raises(TTError, match="the copy of warm template k state on hostb does not match"):
        upload_once(bad, "hostb", src, "ttenv-tpl-k-state", "warm template k state", lines.append)  # type: ignore[arg-type]
    assert bad.vols == {}  # nothing kept
