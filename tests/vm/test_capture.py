"""Capture and replay (``LocalBackend.capture``, ``ttenv replay``), with real VMs, real qemu state
and the real CLI, replayed into *another* state dir and image dir, as another machine sees it.

One ENV per way a VM starts, booted at once and captured once (module scope): Debian 12 warm
(its capture without the image), Debian 12 cold (with the image bundled), and the cloud-init
image cold (a user other than root: the identity agent is started through sudo). In each, before
the capture, a test-like step writes a marker file and starts ``sleep`` in the background; the
replay must hold both - the same file, the same process with the same PID - and a new host key
(checked strictly), login key and port. Damaged captures and a missing image are refused in one
line, exit 2, nothing started or left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines import qemu
from pytest_ttenv.backend.engines.identity import agent_start_command
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core import capture_format
from pytest_ttenv.core.capture_manifest import CaptureInfo, TestRecord
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmInfo, VmSpec
from pytest_ttenv.fixtures.capture import capture_name

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.leftovers import leftovers, qemu_pids_under
from helpers.vm_client import client_key, ssh

pytestmark = [pytest.mark.vm, pytest.mark.slow]
pytest_plugins = ["pytester"]

RES = Resources(cpu=2, mem_mib=512)
TEST = TestRecord("tests/test_app.py::test_fails[debian-12]", "call", "failed")
STEP = "echo captured > ~/marker; (setsid sleep 100000 >/dev/null 2>&1 & echo $! > /tmp/sleep.pid); cat /tmp/sleep.pid"


@dataclass
class Captured:
    """One VM as the capture saw it: the file, what it said, the sleeping PID, its host key."""

    path: Path
    info: CaptureInfo
    pid: int
    host_key: str
    user: str
    after: str  # the marker read over SSH after the capture: the VM ran on


def ttenv(state: Path, images: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(state), TTENV_IMAGE_DIR=str(images))
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    print(f"$ ttenv {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def other_store(root: Path, image: ImageInfo, disk: Callable[[Path, Path], None] = os.link) -> ImageStore:
    """A store of its own holding ``image`` at another path (its disk hard-linked: the same bytes,
    another name, so a replay that kept the capture's path would be seen)."""
    src = root / "src"
    src.mkdir(parents=True)
    for name in (image.disk, image.kernel, image.initrd):
        if name:
            disk(image.file(name), src / name)
    (root / "images").mkdir()
    store = ImageStore(root / "images")
    store.install(src, image)
    return store


@pytest.fixture(scope="module")
def captured(
    images: Callable[..., list[ImageInfo]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Captured]]:
    """``warm``, ``cold`` and (x86_64) ``cloud``: VMs started at once, each captured once."""
    names = ["debian-12"] + (["debiancloud-12"] if HOST_ARCH == "x86_64" else [])
    imgs = {i.name: i for i in images(*names)}
    d12, cloud = f"debian-12-{HOST_ARCH}", f"debiancloud-12-{HOST_ARCH}"
    base = tmp_path_factory.mktemp("capture")
    backend = LocalBackend(IMAGE_ROOT, base / "state", progress=print)
    key, key_file = client_key(base)
    plan = {"warm": (d12, "warm", "never"), "cold": (d12, "cold", "always")}
    if cloud in imgs:
        plan["cloud"] = (cloud, "cold", "never")
    envs = {
        kind: backend.create_env(EnvSpec(f"cap-{kind}", (VmSpec(img, img, RES),), key.public, boot=boot))
        for kind, (img, boot, _) in plan.items()
    }
    out = base / "captures"

    def one(kind: str) -> Captured:
        img, boot, policy = plan[kind]
        vm = backend.wait_vm(envs[kind].id, img)
        if kind == "warm":  # as tt_vm_fresh does: a snapshot before the test, reverted to after its capture
            backend.snapshot(envs[kind].id, img, "fresh")
        conn = ssh(vm, key_file)
        try:
            if kind == "cloud":  # its first boot done (cloud-init restarts sshd on the way)
                conn.run("cloud-init status --wait >/dev/null", timeout=300)
            pid = int(conn.run(STEP, timeout=120, check=True).stdout.strip())
            if boot == "cold":
                conn.run(agent_start_command(vm.user, embedded=True), timeout=120, check=True)
        finally:
            conn.close()
        info = backend.capture(
            envs[kind].id, img, out / f"{kind}--{img}.ttcap", TEST, image=policy, report="AssertionError: boom"
        )
        conn = ssh(vm, key_file)
        try:
            after = conn.run("cat ~/marker", timeout=120, check=True).stdout.strip()
        finally:
            conn.close()
        if kind == "warm":
            backend.revert(envs[kind].id, img, "fresh")
            conn = ssh(vm, key_file)
            try:
                assert conn.run("test -e ~/marker", timeout=120).exit_status == 1  # the snapshot's, as before
            finally:
                conn.close()
        return Captured(Path(info.path), info, pid, vm.host_key, vm.user, after)

    try:
        with ThreadPoolExecutor(len(plan)) as pool:
            done = dict(zip(plan, pool.map(one, plan), strict=True))
        yield done
    finally:
        for env in envs.values():
            backend.delete_env(env.id)
        assert leftovers(base / "state") == []


def replay_and_check(cap: Captured, state: Path, images: Path) -> VmInfo:
    """``ttenv replay`` into ``state``/``images``: the marker, the same sleeping PID, a new host
    key (``env run`` checks it strictly); returns the replayed VM; the ENV is deleted after."""
    res = ttenv(state, images, "replay", str(cap.path), "--name", "again")
    assert res.returncode == 0, res.stderr
    assert "login: ssh -i" in res.stdout and "StrictHostKeyChecking=yes" in res.stdout
    backend = LocalBackend(images, state)
    (vm,) = backend.show_env("again").vms
    try:
        assert vm.state == "running" and vm.host_key != cap.host_key
        sudo = "" if cap.user == "root" else "sudo -n "
        check = f"cat ~/marker; {sudo}kill -0 {cap.pid} && echo alive; {sudo}cat /proc/{cap.pid}/comm"
        run = ttenv(state, images, "env", "run", "again", "--cmd", check)
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.splitlines()[1:4] == ["captured", "alive", "sleep"]
        overlay = Path(backend.show_env("again").rundir) / vm.name / "overlay.qcow2"
        disk = ImageStore(images).get(vm.image) if (images / vm.image).exists() else None
        backing = qemu.backing_file(overlay)
        assert backing is not None and str(IMAGE_ROOT) not in backing  # pointed at this "machine's" image
        if disk is not None:
            assert backing == str(disk.file(disk.disk).resolve())
        console = ttenv(state, images, "env", "console", "again", vm.name)
        assert "ttenv: replayed from" in console.stdout
    finally:
        assert ttenv(state, images, "env", "del", "again").returncode == 0
    assert leftovers(state) == []
    assert not list((state / "replays").iterdir())
    return vm


def test_capture_runs_on_and_holds_what_a_replay_needs(captured: dict[str, Captured]) -> None:
    for kind, cap in captured.items():
        assert cap.after == "captured", kind  # the VM ran on after its capture
        manifest = capture_format.read_manifest(cap.path)
        assert manifest.test == TEST
        roles = [m.role for m in manifest.members]
        assert roles[:2] == ["state", "overlay"] and "console" in roles and "report" in roles
        assert manifest.vm.boot == ("warm" if kind == "warm" else "cold")
        assert manifest.vm.image.bundled == (kind == "cold") == ("image" in roles)
        assert manifest.vm.machine.startswith(("pc-q35-", "virt-"))  # the versioned type, not the alias
        assert (cap.path.stat().st_mode & 0o777) == 0o600  # it holds the VM's disk and memory
        print(f"{kind}: {cap.info.size / 2**20:.1f} MiB in {cap.info.seconds:.1f} s (paused {cap.info.paused:.1f} s)")


def test_replay_of_a_warm_vm_elsewhere(captured: dict[str, Captured], tmp_path: Path) -> None:
    cap = captured["warm"]
    (image,) = [i for i in ImageStore(IMAGE_ROOT).all() if i.name == f"debian-12-{HOST_ARCH}"]
    store = other_store(tmp_path / "machine-b", image)
    replay_and_check(cap, tmp_path / "machine-b" / "state", store.root)


def test_replay_of_a_cold_vm_with_its_image_inside(captured: dict[str, Captured], tmp_path: Path) -> None:
    vm = replay_and_check(captured["cold"], tmp_path / "state", tmp_path / "no-images")
    assert vm.image == f"debian-12-{HOST_ARCH}"
    assert not (tmp_path / "no-images").exists() or not any((tmp_path / "no-images").iterdir())


def test_replay_of_a_cloud_init_vm(captured: dict[str, Captured], tmp_path: Path) -> None:
    if "cloud" not in captured:
        pytest.skip("the cloud variant boots through x86 GRUB: x86_64 only")
    (image,) = [i for i in ImageStore(IMAGE_ROOT).all() if i.name == f"debiancloud-12-{HOST_ARCH}"]
    store = other_store(tmp_path / "machine-b", image)
    replay_and_check(captured["cloud"], tmp_path / "machine-b" / "state", store.root)


def _refused(res: subprocess.CompletedProcess[str], state: Path, *words: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttenv: error: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in res.stderr
    assert leftovers(state) == [] and qemu_pids_under(state) == []
    assert not (state / "replays").exists() or not list((state / "replays").iterdir())


def test_damaged_captures_and_a_missing_image_are_refused(captured: dict[str, Captured], tmp_path: Path) -> None:
    cap = captured["warm"]
    (image,) = [i for i in ImageStore(IMAGE_ROOT).all() if i.name == f"debian-12-{HOST_ARCH}"]
    store = other_store(tmp_path / "b", image)
    state = tmp_path / "b" / "state"
    size = cap.path.stat().st_size

    flipped = tmp_path / "flipped.ttcap"
    shutil.copyfile(cap.path, flipped)
    with open(flipped, "r+b") as f:  # one byte in the middle: inside the compressed state
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    _refused(ttenv(state, store.root, "replay", str(flipped)), state, "damaged")

    truncated = tmp_path / "truncated.ttcap"
    with open(cap.path, "rb") as whole, open(truncated, "wb") as dst:
        dst.write(whole.read(size - 4096))
    _refused(ttenv(state, store.root, "replay", str(truncated)), state)

    # the image swapped: a store whose debian-12 is another build (another disk digest)
    swapped = tmp_path / "swapped"
    src = swapped / "src"
    src.mkdir(parents=True)
    backed = ["-F", "qcow2", "-b", str(image.file(image.disk))]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *backed, str(src / image.disk)], check=True)
    for name in (image.kernel, image.initrd):
        if name:
            os.link(image.file(name), src / name)
    (swapped / "images").mkdir()
    ImageStore(swapped / "images").install(src, image)
    _refused(ttenv(state, swapped / "images", "replay", str(cap.path)), state, "needs image", "another build")
    assert leftovers(state) == []


PLUGIN_SUITE = """
import pathlib

def test_passes(tt_vm):
    assert tt_vm.run("true").ok

def test_fails_after_writing(tt_vm_fresh):
    out = tt_vm_fresh.run("echo captured > /root/marker; (setsid sleep 100000 >/dev/null 2>&1 &"
                          " echo $! > /tmp/sleep.pid); cat /tmp/sleep.pid", check=True).stdout
    pathlib.Path("sleep.pid").write_text(out.strip())
    assert False, "the app is broken"

def test_fails_too(tt_vm):
    assert tt_vm.run("false").ok
"""


def test_plugin_captures_failed_tests_under_xdist_and_they_replay(
    pytester: pytest.Pytester, images: Callable[..., list[ImageInfo]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tt-capture=failed -n 2``: each failed test's VM captured before ``tt_vm_fresh`` reverts
    it, named in its report section and the JUnit file; the capture replays elsewhere, alive."""
    (image,) = images("debian-12")
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(IMAGE_ROOT))  # pytester moves HOME; keep the real cache
    state = tmp_path / "state"
    monkeypatch.setenv("TTENV_STATE_DIR", str(state))
    pytester.makepyfile(test_app=PLUGIN_SUITE)
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "--tt-os=debian12",
        f"--tt-arch={HOST_ARCH}",
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        "--tt-capture=failed",
        "--tt-capture-image=never",
        f"--junitxml={junit}",
        timeout=900,
    )
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert "tt capture" in out and "ttenv: 2 capture(s)" in out
    captures = pytester.path / "ttenv-captures"
    fresh = captures / capture_name(f"test_app.py::test_fails_after_writing[{image.name}]", image.name)
    too = capture_name(f"test_app.py::test_fails_too[{image.name}]", image.name)
    assert sorted(p.name for p in captures.iterdir()) == sorted([fresh.name, too]), out
    props = [str(p.get("value")) for p in ET.parse(junit).getroot().iter("property") if p.get("name") == "tt_capture"]
    assert sorted(props) == sorted(f"ttenv-captures/{p.name}" for p in captures.iterdir())
    assert capture_format.read_manifest(fresh).test.nodeid.endswith(f"test_fails_after_writing[{image.name}]")
    assert leftovers(state) == []

    other = tmp_path / "machine-b"
    store = other_store(other, image)
    pid = int((pytester.path / "sleep.pid").read_text())
    cap = Captured(fresh, CaptureInfo(str(fresh), image.name, 0, 0, 0, False), pid, "", "root", "")
    replay_and_check(cap, other / "state", store.root)
