"""Warm boot with real VMs, in a private image store (symlinks to the cached Debian 12 image, so
templates made here never touch the shared cache). In file order, sharing one template:

1. a process SIGKILLed while making a template leaves only a work dir, which is never used;
2. a template made with a known provisioning key; an ENV of 2 VMs warm-started from it;
3. each VM is its own machine (hostname, machine-id, host key, client key, clock, RNG), the
   provisioning key no longer logs in, and the disks are linked clones (no copies);
4. a pytest session with ``tt_vm_fresh``: a file written in one test is gone in the next;
5. after the image changed, two ENVs created at once make one new template (in the background,
   under its lock) and the old one is reaped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import pytest_ttenv
from pytest_ttenv.access import target
from pytest_ttenv.backend import validate
from pytest_ttenv.backend.engines import accel as accel_mod
from pytest_ttenv.backend.engines import templates, warm
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.ssh import Connection, SshError

from conftest import HOST_ARCH
from helpers.leftovers import qemu_pids_under

pytestmark = pytest.mark.vm
pytest_plugins = ["pytester"]

RES = Resources(cpu=2, mem_mib=512)  # the plugin's defaults: its session reuses the template
LOGIN = KeyPair.generate("provisioning-key-under-test")
CLIENT = KeyPair.generate("client-under-test")
KILLED = """
import os, sys, time
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import EnvSpec, Resources, VmSpec
backend = LocalBackend(sys.argv[1], sys.argv[2], progress=lambda line: print(line, flush=True))
vm = VmSpec("vm1", sys.argv[3], Resources(2, 512))
backend.create_env(EnvSpec("killed", (vm,), sys.argv[4], owner_pid=os.getpid(), boot="warm"))
time.sleep(900)
"""


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def store(images: Callable[..., list[ImageInfo]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageInfo]:
    """Debian 12 in a private image store (its files symlinked, its metadata copied)."""
    src = images("debian-12")[0]
    root = tmp_path_factory.mktemp("warm-images")
    (root / src.name).mkdir()
    for name in (src.disk, src.kernel, src.initrd):
        assert name is not None
        (root / src.name / name).symlink_to(src.file(name))
    shutil.copy(src.file("image.json"), root / src.name / "image.json")
    yield ImageStore(root).get(src.name)
    shutil.rmtree(root, ignore_errors=True)  # templates are 150 MiB each


@pytest.fixture(scope="module")
def backend(store: ImageInfo, tmp_path_factory: pytest.TempPathFactory) -> LocalBackend:
    assert store.path is not None
    return LocalBackend(store.path.parent, tmp_path_factory.mktemp("warm-state"), progress=print)


def test_sigkill_while_making_a_template_leaves_nothing_used(store: ImageInfo, tmp_path: Path) -> None:
    assert store.path is not None
    warmdir = store.path / "warm"
    pythonpath = str(Path(pytest_ttenv.__file__).parents[1])
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED, str(store.path.parent), str(tmp_path / "state"), store.name, CLIENT.public],
            env=dict(os.environ, PYTHONPATH=pythonpath),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:  # the moment of most risk: the state file is being written
        wait_for("the template's state being saved", lambda: any(warmdir.glob(f".tmp-*-{proc.pid}/state")), 900)
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in warmdir.iterdir() if not p.name.startswith(".")] == []  # no complete template
    (half,) = warmdir.glob(f".tmp-*-{proc.pid}")
    assert (half / "state").exists() and not (half / templates.META).exists()
    wait_for("the template VM to die with its maker", lambda: not qemu_pids_under(half), 10)


@pytest.fixture(scope="module")
def template(store: ImageInfo, backend: LocalBackend) -> templates.Template:
    """The template every later test starts from, made with a provisioning key we know."""
    vm = VmSpec("vm", store.name, RES)
    acc = accel_mod.choose("auto", store).name
    spec = EnvSpec("E", (vm,), CLIENT.public, boot="warm")
    boot = backend.engines.new.plan(spec, vm, store, acc, validate.current_user())
    assert boot.how == "warm", boot.why
    tstore = templates.TemplateStore(store)
    with tstore.lock(boot.key, 60):
        return warm.make_template(tstore, boot.key, boot.inputs, RES, 900, print, login=LOGIN)


@pytest.fixture(scope="module")
def env(backend: LocalBackend, template: templates.Template, store: ImageInfo) -> Iterator[EnvInfo]:
    vms = tuple(VmSpec(f"vm{i}", store.name, RES) for i in (1, 2))
    info = backend.create_env(EnvSpec("warm2", vms, CLIENT.public, boot="warm"))
    yield info
    backend.delete_env(info.id)


def test_killed_work_was_reaped_and_a_fresh_template_made(store: ImageInfo, template: templates.Template) -> None:
    assert store.path is not None
    assert not list((store.path / "warm").glob(".tmp-*")), "the killed maker's work dir is reaped"
    assert template.meta["created"] > time.time() - 3600
    # VM templating: the guest RAM is a file of its own, the state only the devices
    assert template.ram is not None and template.ram.stat().st_size == RES.mem_mib << 20
    assert template.state.stat().st_size < 8 << 20


def test_two_warm_vms_answer_and_are_each_their_own_machine(
    backend: LocalBackend, env: EnvInfo, template: templates.Template, store: ImageInfo, tmp_path: Path
) -> None:
    key_file = tmp_path / "client"
    CLIENT.write_private(key_file)
    started = time.monotonic()

    def probe(name: str) -> dict[str, str]:
        vm = backend.wait_vm(env.id, name)
        assert vm.boot == "warm" and vm.state == "running"
        conn = Connection(target(vm, key_file), use_agent=False)  # strict: VmInfo.host_key only
        try:
            out = {"first": f"{time.monotonic() - started:.1f}", "host_key": vm.host_key}
            for item, cmd in {
                "hostname": "hostname",
                "machine_id": "cat /etc/machine-id",
                "key_file": "cat /etc/ssh/ssh_host_ed25519_key.pub",
                "authorized": "cat /root/.ssh/authorized_keys",
                "clock": "date +%s.%N",
                "urandom": "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            }.items():
                out[item] = conn.run(cmd, timeout=60, check=True).stdout.strip()
                if item == "clock":
                    out["clock_offset"] = str(float(out[item]) - time.time())
            return out
        finally:
            conn.close()

    with ThreadPoolExecutor(2) as pool:
        one, two = pool.map(probe, ["vm1", "vm2"])
    print(f"first commands after {one['first']} s and {two['first']} s")
    assert (one["hostname"], two["hostname"]) == ("vm1", "vm2")
    for item in ("machine_id", "host_key", "urandom"):
        assert one[item] != two[item], item
    for vm in (one, two):
        assert len(vm["machine_id"]) == 32
        assert vm["key_file"].split()[:2] == vm["host_key"].split()[:2]  # the key it serves is the one we know
        assert vm["authorized"].split()[:2] == CLIENT.public.split()[:2]  # the client's, and only it
        assert -5 < float(vm["clock_offset"]) < 1, "clock set to now (the template was saved minutes ago)"
    chain = json.loads(
        subprocess.run(
            [
                "qemu-img",
                "info",
                "-U",
                "--backing-chain",
                "--output=json",
                str(Path(env.rundir) / "vm1" / "overlay.qcow2"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    backing = [layer.get("backing-filename") for layer in chain]  # image <- template disk <- overlay: no copies
    assert backing == [str(template.disk), str(store.file(store.disk).resolve()), None]
    assert template.ram is not None
    for info in backend.show_env(env.id).vms:  # each maps the template's RAM file, privately
        maps = Path(f"/proc/{info.pid}/maps").read_text().splitlines()
        assert any(line.split()[1] == "rw-p" and line.endswith(str(template.ram)) for line in maps), maps[:5]
    templates.TemplateStore(store).verify(template)  # what the VMs wrote went to their own pages, not the file


def test_provisioning_key_no_longer_logs_in(backend: LocalBackend, env: EnvInfo, tmp_path: Path) -> None:
    for key, name in ((LOGIN, "template"), (KeyPair.generate("stranger"), "stranger")):
        path = tmp_path / name
        key.write_private(path)
        vm = backend.wait_vm(env.id, "vm1")
        conn = Connection(target(vm, path), use_agent=False, connect_timeout=60)
        with pytest.raises(SshError, match="login refused"):
            conn.run("true", timeout=60)
        conn.close()


FRESH_SUITE = """
import time

def test_writes(tt_vm_fresh):
    assert tt_vm_fresh.info.boot == "warm"
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1
    tt_vm_fresh.write_text("/root/mark", "x")
    time.sleep(5)  # a clock left at the snapshot's time would now be 5 s behind

def test_gone_and_clock_now(tt_vm_fresh):
    started = time.monotonic()
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1
    print(f"reset and first command: {time.monotonic() - started:.1f} s")
    assert abs(float(tt_vm_fresh.run("date +%s.%N").stdout) - time.time()) < 2.5
"""


@pytest.fixture
def plugin_env(monkeypatch: pytest.MonkeyPatch, store: ImageInfo, tmp_path: Path) -> None:
    assert store.path is not None
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(store.path.parent))  # pytester moves HOME
    monkeypatch.setenv("TTENV_STATE_DIR", str(tmp_path / "state"))


def test_tt_vm_fresh_reverts_a_warm_vm(
    pytester: pytest.Pytester, plugin_env: None, template: templates.Template
) -> None:
    pytester.makepyfile(test_fresh=FRESH_SUITE)
    result = pytester.runpytest_subprocess(
        "--tt-os=debian12",
        f"--tt-arch={HOST_ARCH}",
        "--tt-boot=warm",
        "-p",
        "no:cacheprovider",
        "-s",
        timeout=600,
    )
    result.assert_outcomes(passed=2)  # the first test asserts its VM started warm
    assert [p.name for p in template.path.parent.iterdir() if not p.name.startswith(".")] == [template.key]


def test_changed_image_gets_one_new_template_for_two_envs_at_once(
    backend: LocalBackend, store: ImageInfo, template: templates.Template, tmp_path: Path
) -> None:
    assert store.path is not None
    meta = store.file("image.json")
    os.utime(meta)  # touched: a new image identity
    lines: list[str] = []
    backends = [backend, LocalBackend(store.path.parent, tmp_path / "other-state")]  # as two processes would
    for b in backends:
        b.progress = lines.append
    spec = EnvSpec("changed", (VmSpec("vm1", store.name, RES),), CLIENT.public, boot="warm")
    with ThreadPoolExecutor(2) as pool:
        envs = list(pool.map(lambda b: b.create_env(spec), backends))
    try:
        with ThreadPoolExecutor(2) as pool:
            vms = list(pool.map(lambda be: be[0].wait_vm(be[1].id, "vm1"), zip(backends, envs, strict=True)))
        assert all(vm.boot == "warm" and vm.state == "running" for vm in vms)
    finally:
        for b, env in zip(backends, envs, strict=True):
            b.delete_env(env.id)
    assert sum("making a warm template" in line for line in lines) == 1, lines  # the other waited on the lock
    assert not template.path.exists(), "the old image's template is reaped"
    assert len([p for p in (store.path / "warm").iterdir() if not p.name.startswith(".")]) == 1
