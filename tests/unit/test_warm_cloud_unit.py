"""Warm starts of cloud-init images and firmware boots, without VMs: the identity agent adopting
cloud-init's instance (on a copy of cloud-init's files in a temp dir), sealing, the identity
record, UEFI variable stores in templates (checksummed, copied per VM, qcow2 so ``savevm`` works)
and the qemu configuration of a warm firmware boot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pytest_ttenv.backend.engines import identity, qemu, seed, templates, warm
from pytest_ttenv.backend.engines.base import machine_cmdline
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import ImageInfo, Resources
from pytest_ttenv.errors import TTError

from helpers.guest import identity_agent
from helpers.qcow2 import qcow2_header
from helpers.qemu_configs import warm_config

RES = Resources(cpu=2, mem_mib=512)

OLD = "template-0123456789abcdef01234567"
NEW = "e1a2b3-vm1"


def fake_image(root: Path, **changes: Any) -> ImageInfo:
    """An image directory with placeholder files (nothing here boots it)."""
    d = root / "img-12-x86_64"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / f).write_bytes(b"x" * 16)
    info = replace(ImageInfo(d.name, "img", "12", "x86_64", cmdline="root=/dev/vda", created=1.0), **changes)
    (d / "image.json").write_text(json.dumps(info.to_dict()))
    return replace(info, path=d)


def install(store: templates.TemplateStore, key: str, files: dict[str, bytes]) -> templates.Template:
    work = store.root / f".tmp-{key}-{os.getpid()}"
    work.mkdir(parents=True)
    for name, data in files.items():
        (work / name).write_bytes(data)
    return store.install(work, key, {"image_id": templates.image_identity(store.image)}, 0.0)


@pytest.fixture
def agent(tmp_path: Path) -> ModuleType:
    """The identity agent with cloud-init's directories moved under ``tmp_path``, holding what
    cloud-init 22.4 (Debian 12) leaves after the template's first boot."""
    module = identity_agent()
    lib, run = tmp_path / "var-lib-cloud", tmp_path / "run-cloud-init"
    setattr(module, "CLOUD_LIB", str(lib))  # noqa: B010 - the agent is a script, loaded as a module
    setattr(module, "CLOUD_RUN", str(run))  # noqa: B010
    inst = lib / "instances" / OLD
    (inst / "sem").mkdir(parents=True)
    (inst / "sem" / "config_ssh").write_text("ran\n")
    (inst / "obj.pkl").write_bytes(b"pickled template datasource")
    for name in ("user-data.txt", "user-data.txt.i", "cloud-config.txt"):
        (inst / name).write_text("#cloud-config\nhostname: ttenv-template\n")
    (lib / "instance").symlink_to(inst)
    (lib / "data").mkdir()
    (lib / "data" / "instance-id").write_text(f"{OLD}\n")
    (lib / "data" / "previous-instance-id").write_text(f"{OLD}\n")
    (lib / "data" / "previous-hostname").write_text("ttenv-template\n")
    (lib / "data" / "set-hostname").write_text(json.dumps({"fqdn": "ttenv-template", "hostname": "ttenv-template"}))
    run.mkdir()
    (run / ".instance-id").write_text(f"{OLD}\n")
    data = {"v1": {"instance_id": OLD, "local_hostname": "ttenv-template"}, "ds": {"meta_data": {"instance-id": OLD}}}
    (run / "instance-data.json").write_text(json.dumps(data))
    (run / "instance-data-sensitive.json").write_text(json.dumps(data | {"note": f"{OLD}-not-a-whole-string"}))
    (run / "instance-data-sensitive.json").chmod(0o600)
    return module


def test_a_warm_vm_adopts_the_templates_cloud_init_instance(agent: ModuleType, tmp_path: Path) -> None:
    lib, run = Path(agent.CLOUD_LIB), Path(agent.CLOUD_RUN)
    agent.adopt_instance(NEW, "vm1", "ttenv-template", b"#cloud-config\nhostname: vm1\n")
    inst = lib / "instances" / NEW
    for name in ("cloud-config.txt", "user-data.txt"):  # per-boot modules read the VM's config
        assert (inst / name).read_text() == "#cloud-config\nhostname: vm1\n"
        assert (inst / name).stat().st_mode & 0o777 == 0o600
    assert not (inst / "user-data.txt.i").exists()  # processed again from the VM's seed at the next boot
    assert not (lib / "instances" / OLD).exists()
    assert os.readlink(lib / "instance") == str(inst)
    assert (inst / "sem" / "config_ssh").read_text() == "ran\n"  # per-instance modules count as run
    assert not (inst / "obj.pkl").exists()  # the template's cached datasource: found anew at the next boot
    for name in ("instance-id", "previous-instance-id"):  # the next boot is not a new instance
        assert (lib / "data" / name).read_text() == f"{NEW}\n"
    assert (lib / "data" / "previous-hostname").read_text() == "vm1\n"
    assert json.loads((lib / "data" / "set-hostname").read_text()) == {"fqdn": "vm1", "hostname": "vm1"}
    assert (run / ".instance-id").read_text() == f"{NEW}\n"
    data = json.loads((run / "instance-data.json").read_text())  # what `cloud-init query` tells
    assert data["v1"] == {"instance_id": NEW, "local_hostname": "vm1"}
    assert data["ds"]["meta_data"]["instance-id"] == NEW
    sensitive = run / "instance-data-sensitive.json"
    assert json.loads(sensitive.read_text())["note"] == f"{OLD}-not-a-whole-string"  # whole JSON strings only
    assert sensitive.stat().st_mode & 0o777 == 0o600
    agent.adopt_instance(NEW, "vm1", "vm1")  # applied again (a retry): nothing changes
    assert os.readlink(lib / "instance") == str(inst) and (inst / "sem" / "config_ssh").exists()


def test_no_cloud_init_nothing_to_adopt_and_bad_ids_refused(agent: ModuleType, tmp_path: Path) -> None:
    for bad in ("", "..", "a/b", "x y", "é"):
        with pytest.raises(ValueError, match="unusable instance-id"):
            agent.adopt_instance(bad, "vm1", "ttenv-template")
    shutil.rmtree(agent.CLOUD_LIB)
    agent.adopt_instance(NEW, "vm1", "ttenv-template")  # an image without cloud-init: a no-op
    assert not Path(agent.CLOUD_LIB).exists()


def test_seal_removes_the_users_and_roots_keys(
    agent: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    homes = {"debian": tmp_path / "home-debian", "root": tmp_path / "root"}
    for home in homes.values():
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAA provisioning\n")
    monkeypatch.setattr(agent, "home_of", lambda user: (str(homes[user]), 0, 0))
    monkeypatch.setattr(agent, "sshd_sessions", lambda: [])
    agent.seal({"user": b"debian"})
    assert not any((home / ".ssh" / "authorized_keys").exists() for home in homes.values())


def test_identity_carries_what_the_vms_seed_tells_cloud_init(tmp_path: Path) -> None:
    key = KeyPair.generate("host")
    data = seed.SeedData("vm1", seed.instance_id("e1", "vm1"), "debian", "ssh-ed25519 AAAA c", key)
    seed.write_seed_iso(data, tmp_path / "seed.iso")
    assert seed.seed_instance_id(tmp_path / "seed.iso") == "e1-vm1"
    user_data = seed.read_seed_file(tmp_path / "seed.iso", "user-data")
    assert user_data == seed.user_data(data) and seed.read_seed_file(tmp_path / "seed.iso", "nope") == ""
    ident = identity.Identity("vm1", "ab" * 16, "debian", "ssh-ed25519 AAAA c", key, "e1-vm1", user_data)
    assert identity.Identity.from_dict(ident.to_dict()) == ident
    old = ident.to_dict()
    del old["instance_id"], old["user_data"]  # written by a ttenv before these fields
    assert identity.Identity.from_dict(old) == replace(ident, instance_id="", user_data="")


def test_a_uefi_template_keeps_its_variable_store_checked(tmp_path: Path) -> None:
    store = templates.TemplateStore(fake_image(tmp_path))
    plain = install(store, "k1", {"disk.qcow2": qcow2_header(), "state": b"state"})
    assert plain.uefi_vars is None and "uefi_vars_sha256" not in plain.meta
    template = install(store, "k2", {"disk.qcow2": qcow2_header(), "state": b"state", templates.UEFI_VARS: b"vars"})
    assert template.uefi_vars == template.path / templates.UEFI_VARS
    assert template.uefi_vars.stat().st_mode & 0o777 == 0o400
    store.verify(template)
    template.uefi_vars.chmod(0o600)
    template.uefi_vars.write_bytes(b"VARS")
    with pytest.raises(TTError, match="its UEFI variable store fails its checksum"):
        store.verify(template)


def test_warm_firmware_boots_have_the_cold_device_set_plus_the_warm_devices(tmp_path: Path) -> None:
    bios = fake_image(tmp_path, kernel=None, initrd=None, boot="bios", access="cloud-init", user="debian")
    uefi = replace(bios, boot="uefi")
    for image, vars_ in ((bios, None), (uefi, tmp_path / templates.UEFI_VARS)):
        cfg = warm_config(
            image, tmp_path, RES, cmdline=machine_cmdline(image, "0"), vmgenid="g", incoming="exec:x", uefi_vars=vars_
        )
        argv = qemu.build_argv(cfg)
        joined = " ".join(argv)
        assert "-kernel" not in argv and "-append" not in argv and "virtio-blk-pci,drive=root,bootindex=0" in argv
        assert ("pflash" in joined) == (vars_ is not None)
        assert "vmgenid,id=vmgenid0,guid=g" in joined and joined.endswith("-incoming exec:x")
    assert f"if=pflash,format=qcow2,unit=1,file={tmp_path / templates.UEFI_VARS}" in joined
    keys = {warm.template_key(warm.template_inputs(image, "tcg", RES, "me")) for image in (bios, uefi)}
    assert len(keys) == 2  # the firmware is part of the device set, so of the key
    argv = warm.template_inputs(uefi, "tcg", RES, "me")["argv"]
    assert "if=pflash,format=qcow2,unit=1,file=/x.qcow2" in argv  # per-VM path blanked


@pytest.mark.skipif(
    shutil.which("qemu-img") is None or not Path(qemu.UEFI_FIRMWARE["x86_64"][1]).exists(),
    reason="qemu-img or OVMF not installed",
)
def test_uefi_variable_stores_are_qcow2_copies(tmp_path: Path) -> None:
    def info(path: Path) -> dict[str, object]:
        out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, check=True)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    empty = qemu.uefi_vars_copy("x86_64", tmp_path / "a.qcow2")
    raw_size = Path(qemu.UEFI_FIRMWARE["x86_64"][1]).stat().st_size
    assert info(empty)["format"] == "qcow2" and info(empty)["virtual-size"] == raw_size  # pflash needs the size
    assert empty.stat().st_mode & 0o777 == 0o600
    copy = qemu.uefi_vars_copy("x86_64", tmp_path / "b.qcow2", source=empty)  # a VM's, from its template's
    assert info(copy)["format"] == "qcow2" and "backing-filename" not in info(copy)  # a copy, not a clone
    raw = qemu.uefi_vars_copy("x86_64", tmp_path / "c.fd")  # the old layout still works
    assert raw.read_bytes() == Path(qemu.UEFI_FIRMWARE["x86_64"][1]).read_bytes()
    with pytest.raises(TTError, match="no UEFI firmware for riscv64 guests"):
        qemu.uefi_vars_copy("riscv64", tmp_path / "d.qcow2")
    image = fake_image(tmp_path, kernel=None, initrd=None, boot="uefi")
    assert qemu.uses_uefi(image) and not qemu.uses_uefi(replace(image, boot="bios"))
    assert qemu.uses_uefi(replace(image, arch="aarch64", boot="bios"))  # aarch64 firmware is UEFI
    assert not qemu.uses_uefi(fake_image(tmp_path / "direct"))
