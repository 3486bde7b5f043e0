"""Warm boot without VMs: template keys, eligibility, the template store (atomic install, reaping,
checks, lock), verified state streaming, the agent's request format, settings and argv."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_ttenv.backend.engines import deferred, identity, qemu, statecat, templates, warm
from pytest_ttenv.backend.engines.base import Boot, Start, machine_cmdline
from pytest_ttenv.backend.engines.deferred import StartLater
from pytest_ttenv.backend.engines.libvirt import LibvirtEngine
from pytest_ttenv.backend.engines.libvirt_place import parse_hosts
from pytest_ttenv.backend.engines.libvirt_warm import LibvirtWarm
from pytest_ttenv.backend.engines.qemu_arch import QEMU_BINARY
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.config import SETTINGS, resolve
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.errors import TTError, UsageError

from helpers.guest import identity_agent
from helpers.qcow2 import qcow2_header
from helpers.qemu_configs import warm_config

RES = Resources(cpu=2, mem_mib=512)


def fake_image(root: Path, name: str = "debian-12-x86_64", **changes: Any) -> ImageInfo:
    """An image directory with placeholder files (nothing here boots it)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for f in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (d / f).write_bytes(b"x" * 16)
    info = replace(ImageInfo(name, "debian", "12", "x86_64", cmdline="root=/dev/vda", created=1.0), **changes)
    (d / "image.json").write_text(json.dumps(info.to_dict()))
    return replace(info, path=d)


def test_key_changes_with_every_input(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    key = warm.template_key(warm.template_inputs(image, "tcg", RES, "alice"))
    assert key == warm.template_key(warm.template_inputs(image, "tcg", RES, "alice"))
    assert key == warm.template_key(warm.template_inputs(image, "tcg", replace(RES, disk_mib=3072), "alice"))
    others = [
        warm.template_inputs(image, "tcg", replace(RES, mem_mib=1024), "alice"),
        warm.template_inputs(image, "tcg", replace(RES, cpu=1), "alice"),
        warm.template_inputs(image, "kvm", RES, "alice"),
        warm.template_inputs(image, "tcg", RES, "bob"),
        warm.template_inputs(image, "tcg", RES, "alice") | {"protocol": identity.PROTOCOL - 1},  # the agent's protocol
    ]
    assert len({key, *(warm.template_key(i) for i in others)}) == 6
    meta = image.file("image.json")
    os.utime(meta, ns=(meta.stat().st_atime_ns, meta.stat().st_mtime_ns + 1000))  # touched: a new identity
    assert warm.template_key(warm.template_inputs(image, "tcg", RES, "alice")) != key


def test_ineligible_images_say_why(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    assert warm.ineligible(image, RES) == ""
    firmware = replace(image, kernel=None, initrd=None, boot="bios")
    vendor = replace(firmware, access="cloud-init", user="debian")  # pulled, imported or our cloud variant
    # an engine that says nothing starts only direct-kernel images ttenv built warm
    assert "cloud-init" in warm.ineligible(replace(image, access="cloud-init"), RES)
    assert "firmware" in warm.ineligible(firmware, RES)
    assert "root" in warm.ineligible(replace(image, user="debian"), RES)
    assert "larger" in warm.ineligible(image, replace(RES, disk_mib=image.disk_mib + 1))
    # the qemu engine's warm starts serve firmware boots and cloud-init images too
    for eligible in (replace(image, access="cloud-init"), firmware, replace(firmware, boot="uefi"), vendor):
        assert warm.ineligible(eligible, RES, firmware=True, cloud_init=True) == ""
    assert warm.ineligible(replace(image, user="debian"), RES, firmware=True, cloud_init=True) == (
        "debian-12-x86_64 logs in as debian without cloud-init's sudo; warm starts need root or sudo"
    )
    assert "firmware" in warm.ineligible(vendor, RES, cloud_init=True)


def test_cold_fallback_is_one_line(tmp_path: Path) -> None:
    lines: list[str] = []
    backend = LocalBackend(tmp_path / "images", tmp_path / "state", progress=lines.append)
    image = fake_image(tmp_path / "images")
    vm = VmSpec("vm1", image.name, replace(RES, disk_mib=image.disk_mib + 1))
    warm_spec, qemu_engine = EnvSpec("E", (vm,), "k", boot="warm"), backend.engines.new
    assert backend._plan(qemu_engine, warm_spec, vm, image, "tcg", "me").how == "cold"
    assert lines == ["vm1: cold boot (a disk larger than the image's (3073 > 3072 MiB) needs a cold boot)"]
    cold = backend._plan(qemu_engine, EnvSpec("E", (vm,), "k", boot="cold"), vm, image, "tcg", "me")
    assert cold == Boot("cold", "cold requested") and len(lines) == 1  # cold asked for: nothing to explain
    libvirt = object.__new__(LibvirtEngine)  # its plan needs no libvirt host to say why not (nor libvirt-python)
    libvirt.warm = LibvirtWarm(parse_hosts(["qemu+ssh://root@b/system"]), *(None,) * 3, lines.append, "m")  # type: ignore[arg-type]
    fits = VmSpec("vm1", image.name, RES)
    assert backend._plan(libvirt, warm_spec, fits, fake_image(tmp_path / "images"), "tcg", "me").how == "cold"
    assert lines[-1] == (
        "vm1: cold boot (libvirt warm starts need this machine's libvirt among the hosts (it makes templates))"
    )


@pytest.mark.skipif(shutil.which(QEMU_BINARY["x86_64"]) is None, reason="qemu-system-x86_64 not installed")
def test_an_image_ttenv_built_is_planned_warm_with_its_template_key(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "images", tmp_path / "state")
    image = fake_image(tmp_path / "images")
    vm = VmSpec("vm1", image.name, RES)
    boot = backend.engines.new.plan(EnvSpec("E", (vm,), "k", boot="warm"), vm, image, "tcg", "me")
    inputs = warm.template_inputs(image, "tcg", RES, "me")
    assert (boot.how, boot.key, boot.inputs) == ("warm", warm.template_key(inputs), inputs)


def _job(tmp_path: Path, name: str, events: list[str], wanted: bool = True) -> Start:
    """A job for StartLater alone: nothing is started, what happens is noted in ``events``."""
    image = fake_image(tmp_path)
    spec = EnvSpec("E", (VmSpec(name, image.name, RES),), "k", boot="warm")
    env = EnvInfo("e1", "E", "me", 0.0, None, "booting", rundir=str(tmp_path))
    info = VmInfo(name, image.name, "debian", "12", "x86_64", state="booting", boot="warm")

    @contextlib.contextmanager
    def resume() -> Iterator[bool]:
        events.append(f"{name}: resume on {threading.current_thread().name}")
        yield wanted

    return Start(
        env,
        spec,
        spec.vms[0],
        image,
        "tcg",
        info,
        tmp_path,
        tmp_path / "seed.iso",
        KeyPair.generate("t"),
        "0" * 32,
        Boot("warm", "", "k1"),
        move_port=lambda: 1,
        resume=resume,
        fail=lambda message: events.append(f"{name}: failed: {message}"),
    )


def test_start_later_starts_waiting_vms_once_made_or_without_it(tmp_path: Path) -> None:
    events: list[str] = []
    started = threading.Semaphore(0)

    def start(job: Start, made: str | None, why: str) -> None:
        events.append(f"{job.vm.name}: start with {made!r} ({why})")
        started.release()
        if job.vm.name == "vm3":
            raise TTError("qemu exited")

    later = StartLater()
    later.after(
        "template-k1",
        [_job(tmp_path, "vm1", events), _job(tmp_path, "vm2", events, wanted=False)],
        lambda: "template k1",
        start,
    )  # vm2: its ENV was deleted meanwhile
    assert started.acquire(timeout=10)

    def fails() -> str:
        raise TTError("no space left\nmore detail")

    later.after("template-k2", [_job(tmp_path, "vm3", events)], fails, start)
    assert started.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while not any("failed" in e for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == [
        "vm1: resume on ttenv-starter",
        "vm1: start with 'template k1' ()",
        "vm2: resume on ttenv-starter",
        "vm3: resume on ttenv-starter",
        "vm3: start with None (no space left)",
        "vm3: failed: VM vm3 could not be started: qemu exited",
    ]


class _Warm:
    """An engine's warm side for ``start_all``: templates are strings; ``found`` exist, the others
    are made once ``go`` is set (``k3`` fails to be made)."""

    def __init__(self, events: list[str], found: set[str]) -> None:
        self.events, self.found, self.later, self.go = events, found, StartLater(), threading.Event()

    def keep_identity(self, job: Start) -> None:
        self.events.append(f"{job.vm.name}: identity kept")

    def find(self, image: ImageInfo, key: str) -> str | None:
        return f"template {key}" if key in self.found else None

    def make(self, job: Start) -> str:
        assert self.go.wait(10)
        self.events.append(f"make {job.boot.key} for {job.vm.name}")
        if job.boot.key == "k3":
            raise TTError("no space left")
        return f"new template {job.boot.key}"

    def cold_instead(self, job: Start, why: str) -> None:
        self.events.append(f"{job.vm.name}: cold instead ({why})")


def test_start_all_launches_now_or_once_the_template_is_made_one_per_key(tmp_path: Path) -> None:
    events: list[str] = []
    launched = threading.Semaphore(0)

    def job(name: str, boot: Boot) -> Start:
        made = replace(_job(tmp_path / name, name, events), boot=boot)
        made.record = lambda: events.append(f"{name}: recorded")
        return made

    def launch(job: Start, template: str | None) -> None:
        events.append(f"{job.vm.name}: launch from {template}")
        launched.release()

    jobs = [
        job("vm1", Boot("warm", "", "k1")),
        job("vm2", Boot("cold", "cold requested")),
        job("vm3", Boot("warm", "", "k2")),
        job("vm4", Boot("warm", "", "k2")),
        job("vm5", Boot("warm", "", "k3")),
        job("vm6", Boot("warm", "", "k1")),
    ]
    said: list[str] = []
    unusable = {"vm6": "its host runs another libvirt"}
    warm_side = _Warm(events, {"k1"})
    deferred.start_all(jobs, warm_side, launch, said.append, lambda job: unusable.get(job.vm.name, ""))
    now = events[:]
    warm_side.go.set()
    assert now == [
        "vm1: identity kept",
        "vm1: launch from template k1",
        "vm2: launch from None",
        "vm3: identity kept",
        "vm3: recorded",
        "vm4: identity kept",
        "vm4: recorded",
        "vm5: identity kept",
        "vm5: recorded",
        "vm6: cold instead (its host runs another libvirt)",
        "vm6: launch from None",
    ]
    assert said == [f"vm{i}: waiting for the warm template of debian-12-x86_64" for i in (3, 4, 5)]
    for _ in range(6):  # vm1, vm2 and vm6 now; vm3, vm4 and vm5 on the starter thread
        assert launched.acquire(timeout=10)
    later = events[len(now) :]
    k2 = [e for e in later if "k2" in e or e.startswith(("vm3", "vm4"))]
    k3 = [e for e in later if "k3" in e or e.startswith("vm5")]
    assert k2 == [
        "make k2 for vm3",  # one template per key, made once for the VMs that wait for it
        "vm3: resume on ttenv-starter",
        "vm3: launch from new template k2",
        "vm4: resume on ttenv-starter",
        "vm4: launch from new template k2",
    ]
    assert k3 == [
        "make k3 for vm5",
        "vm5: resume on ttenv-starter",
        "vm5: cold instead (no space left)",
        "vm5: launch from None",
    ]
    assert sorted(k2 + k3) == sorted(later)


def _installed(store: templates.TemplateStore, key: str) -> templates.Template:
    work = store.root / f".tmp-{key}-{os.getpid()}"
    work.mkdir(parents=True)
    (work / "disk.qcow2").write_bytes(qcow2_header())
    (work / "state").write_bytes(b"state" * 1000)
    return store.install(work, key, {"image_id": templates.image_identity(store.image)}, time.time())


def test_a_template_whose_image_disk_is_gone_is_refused_and_reaped(tmp_path: Path) -> None:
    store = templates.TemplateStore(fake_image(tmp_path))
    kept = _installed(store, "k1")
    assert qemu.backing_file(kept.disk) is None
    work = store.root / f".tmp-k2-{os.getpid()}"
    work.mkdir()
    (work / "disk.qcow2").write_bytes(qcow2_header(str(tmp_path / "gone" / "disk.qcow2")))
    (work / "state").write_bytes(b"state")
    orphan = store.install(work, "k2", {"image_id": templates.image_identity(store.image)}, time.time())
    assert qemu.backing_file(orphan.disk) == str(tmp_path / "gone" / "disk.qcow2")
    with pytest.raises(TTError, match=r"the image disk it was made from \(.*/gone/disk.qcow2\) is gone"):
        store.verify(orphan)
    assert [p.name for p in store.reap()] == ["k2"] and store.find("k1") == kept


def test_store_installs_finds_verifies_and_reaps(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    store = templates.TemplateStore(image)
    assert store.find("k1") is None
    template = _installed(store, "k1")
    assert store.find("k1") == template and not list(store.root.glob(".tmp-*"))
    assert template.meta["state_sha256"] == hashlib.sha256(b"state" * 1000).hexdigest()
    assert oct(template.state.stat().st_mode & 0o777) == "0o400"
    store.verify(template)

    dead = subprocess.Popen(["true"])
    dead.wait()
    (store.root / f".tmp-k2-{dead.pid}").mkdir()  # killed while making k2: a half template
    (store.root / f".tmp-k3-{os.getpid()}").mkdir()  # being made by a live process
    (store.root / "k4").mkdir()  # no metadata: never complete
    assert store.find("k4") is None
    assert sorted(p.name for p in store.reap()) == sorted([f".tmp-k2-{dead.pid}", "k4"])
    assert store.find("k1") is not None and (store.root / f".tmp-k3-{os.getpid()}").exists()

    old = _installed(store, "k5")
    store.mark_used(template)
    past = time.time() - 8 * 86400
    for f in (old.path / templates.META, template.path / templates.META):
        os.utime(f, (past, past))
    assert [p.name for p in store.reap()] == ["k5"]  # unused for 8 days; k1 was used just now

    meta = image.file("image.json")
    meta.write_text(meta.read_text().replace('"created": 1.0', '"created": 2.0'))  # the image changed
    assert [p.name for p in store.reap()] == ["k1"] and store.find("k1") is None


def test_verify_catches_a_changed_disk_or_state(tmp_path: Path) -> None:
    store = templates.TemplateStore(fake_image(tmp_path))
    template = _installed(store, "k1")
    template.disk.chmod(0o600)
    template.disk.write_bytes(b"DISK")
    with pytest.raises(TTError, match="its disk fails its checksum"):
        store.verify(template)
    template = _installed(store, "k2")
    template.state.chmod(0o600)
    with open(template.state, "ab") as f:
        f.write(b"!")
    with pytest.raises(TTError, match="its state is 5001 bytes, not the 5000 saved"):
        store.verify(template)


def test_usable_templates_are_marked_used_and_the_others_removed_saying_so(tmp_path: Path) -> None:
    store = templates.TemplateStore(fake_image(tmp_path))
    said: list[str] = []
    assert store.usable("k1", said.append) is None and said == []  # none yet
    template = _installed(store, "k1")
    assert not (template.path / "used").exists()
    assert store.usable("k1", said.append) == template and (template.path / "used").exists() and said == []

    def unreadable(template: templates.Template) -> None:
        raise ValueError(f"{template.key}: a header that does not parse")

    assert store.usable("k1", said.append, unreadable) is None
    assert said == ["k1: a header that does not parse: removing it, a new one is made"] and store.find("k1") is None
    template = _installed(store, "k2")
    template.disk.chmod(0o600)
    template.disk.write_bytes(b"DISK")
    assert store.usable("k2", said.append) is None and store.find("k2") is None
    assert said[1] == (
        f"warm template k2 of {store.image.name}: its disk fails its checksum: removing it, a new one is made"
    )


def test_a_template_work_dir_is_new_empty_and_private(tmp_path: Path) -> None:
    store = templates.TemplateStore(fake_image(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (store.root / f".tmp-k2-{dead.pid}").mkdir(parents=True)  # a process killed while making k2
    work = store.workdir("k1")
    (work / "left").write_text("by an earlier attempt of this process")
    assert store.workdir("k1") == work == store.root / f".tmp-k1-{os.getpid()}"
    assert list(work.iterdir()) == [] and work.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in store.root.iterdir()] == [work.name]


def test_lock_timeout_names_what_it_waited_for(tmp_path: Path) -> None:
    store = templates.TemplateStore(fake_image(tmp_path))
    with store.lock("k1", 1.0):
        done = threading.Event()
        errors: list[str] = []

        def other() -> None:  # another open file description: excluded like another process
            try:
                with store.lock("k1", 0.3):
                    pass
            except TTError as exc:
                errors.append(str(exc))
            done.set()

        threading.Thread(target=other).start()
        assert done.wait(5)
    assert errors == ["waited 0 s for the lock of warm template k1 of debian-12-x86_64 (another process is making it)"]


def test_statecat_withholds_the_end_of_a_corrupt_state(tmp_path: Path) -> None:
    data = os.urandom(statecat.HOLD + 3 * statecat.CHUNK + 123)
    state = tmp_path / "state"
    state.write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    out = subprocess.run([sys.executable, "-I", "-S", statecat.__file__, str(state), good], capture_output=True)
    assert out.returncode == 0 and out.stdout == data
    out = subprocess.run([sys.executable, "-I", "-S", statecat.__file__, str(state), "0" * 64], capture_output=True)
    assert out.returncode == 1 and b"refusing the saved VM state" in out.stderr
    assert len(out.stdout) < len(data) - statecat.HOLD + statecat.CHUNK and data.startswith(out.stdout)


def test_agent_requests_round_trip(tmp_path: Path) -> None:
    agent = identity_agent()
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    seen: list[bytes] = []

    def serve() -> None:  # the agent's request handling, over a socket instead of the virtio port
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                line = conn.makefile("rb").readline().rstrip(b"\n")
                seen.append(line)
                conn.sendall(agent.handle(line))

    threading.Thread(target=serve, daemon=True).start()
    assert identity.agent_request(path, "ping", 5, "VM x", note="a b=c\n") == "0.000"
    op, nonce, note = seen[0].split(b" ")
    assert op == b"ping" and len(nonce) == 32 and int(nonce, 16) >= 0  # a new nonce per request
    assert note == b"note=" + base64.b64encode(b"a b=c\n")
    with pytest.raises(TTError, match="VM x: the identity agent failed: ValueError: unknown op bogus"):
        identity.agent_request(path, "bogus", 5, "VM x")
    server.close()


def test_agent_request_timeout_names_the_vm(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    with pytest.raises(TTError, match="VM y: no answer from the identity agent within 0 s"):
        identity.agent_request(path, "ping", 0.2, "VM y")
    server.close()


def test_boot_setting() -> None:
    values = {s.name: s.default for s in SETTINGS}
    assert resolve(values).boot == "warm"
    assert resolve(values | {"boot": "cold"}).boot == "cold"
    with pytest.raises(UsageError, match="--tt-boot='hot' is not valid"):
        resolve(values | {"boot": "hot"})


def test_argv_of_a_warm_vm(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    cfg = warm_config(
        image,
        tmp_path,
        RES,
        identity=tmp_path / "vm.id",
        cmdline=machine_cmdline(image, "ab" * 16),
        vmgenid="g-u-i-d",
        incoming="exec:cat state",
    )
    argv = " ".join(qemu.build_argv(cfg))
    assert f"socket,id=identity,path={tmp_path / 'vm.id'},server=on,wait=off" in argv
    assert "virtserialport,chardev=identity,name=org.ttenv.identity" in argv
    assert "vmgenid,id=vmgenid0,guid=g-u-i-d" in argv and argv.endswith("-incoming exec:cat state")
    assert "systemd.machine_id=" + "ab" * 16 in argv and ",append=on" in argv
    arm = qemu.build_argv(replace(cfg, arch="aarch64"))
    assert not any("vmgenid" in a for a in arm)  # x86 ACPI only


def test_the_server_passes_the_boot_mode_through() -> None:
    from pytest_ttenv.core.model import VmInfo
    from pytest_ttenv.server import models as m
    from pytest_ttenv.server.service import spec_of

    body = {"name": "e", "vms": [{"name": "vm1", "image": "debian-12-x86_64"}], "client_pubkey": "ssh-ed25519 AAAA"}
    assert m.EnvCreate.model_validate(body).boot == "cold"  # an API caller that says nothing
    create = m.EnvCreate.model_validate(body | {"boot": "warm"})
    assert spec_of("e", [], "k", None, "auto", create.boot).boot == "warm"
    assert m.Vm.of(VmInfo("vm1", "i", "debian", "12", "x86_64", boot="warm")).boot == "warm"


def test_shared_ram_is_part_of_the_key_and_the_ram_file_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = fake_image(tmp_path)
    shared = warm.template_inputs(image, "tcg", RES, "alice")
    monkeypatch.setenv("TTENV_SHARED_RAM", "0")
    assert warm.ram_sharing("x86_64") == "TTENV_SHARED_RAM=0 turned it off"
    plain = warm.template_inputs(image, "tcg", RES, "alice")
    assert shared["shared_ram"] and not plain["shared_ram"]
    assert warm.template_key(shared) != warm.template_key(plain)
    assert "memory-backend=ttenv.ram" in " ".join(shared["argv"]) and "memory-backend" not in " ".join(plain["argv"])

    store = templates.TemplateStore(image)
    work = store.root / f".tmp-k1-{os.getpid()}"
    work.mkdir(parents=True)
    (work / "disk.qcow2").write_bytes(qcow2_header())
    (work / "state").write_bytes(b"devices")
    (work / templates.RAM).write_bytes(b"ram" * 1000)
    template = store.install(work, "k1", shared, time.time())
    assert template.ram == template.path / "ram" and template.meta["ram_sha256"] == templates.sha256_file(
        template.ram, sparse=True
    )
    assert template.ram.stat().st_mode & 0o777 == 0o600  # qemu opens it read-write, even to map it private
    store.verify(template)
    with open(template.ram, "r+b") as f:
        f.write(b"RAM")
    with pytest.raises(TTError, match="its RAM file fails its checksum"):
        store.verify(template)
    assert _installed(store, "k2").ram is None  # a template whose state holds its RAM


def test_a_sparse_digest_reads_only_data_and_still_sees_every_byte(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(64 << 20)  # a hole, but for the page written below
        f.seek(32 << 20)
        f.write(b"guest page".ljust(4096, b"\0"))
    digest = templates.sha256_file(ram, sparse=True)
    assert digest != templates.sha256_file(ram)  # its own digest: size, extents and their bytes
    with open(ram, "r+b") as f:
        f.seek((32 << 20) + 1)
        f.write(b"U")
    assert templates.sha256_file(ram, sparse=True) != digest


@pytest.mark.parametrize(
    ("machine", "add_entropy", "reseed"),
    [
        ("x86_64", 0x40085203, 0x5207),
        ("s390x", 0x40085203, 0x5207),
        ("armv7l", 0x40085203, 0x5207),
        ("ppc64le", 0x80085203, 0x20005207),  # asm-powerpc/ioctl.h: 3 direction bits, write = 4
    ],
)
def test_agent_ioctl_numbers_follow_the_guest_arch(
    monkeypatch: pytest.MonkeyPatch, machine: str, add_entropy: int, reseed: int
) -> None:
    """RNDADDENTROPY / RNDRESEEDCRNG as <linux/random.h> defines them on each arch's kernel."""
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, real.release, real.version, machine))
    monkeypatch.setattr(os, "uname", lambda: fake)
    agent = identity_agent()
    assert (agent.RNDADDENTROPY, agent.RNDRESEEDCRNG) == (add_entropy, reseed)
