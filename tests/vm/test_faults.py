"""Nothing left behind: pytest sessions killed (SIGKILL, SIGINT twice, SIGTERM) during boot and
during tests, VMs that die mid-test (qemu killed, guest powered off), a VM booted without its
seed. Real pytest processes, real qemu; afterwards the host is scanned for leftovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.access import target
from pytest_ttenv.backend import local as local_backend
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.cli import main as ttenv_main
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.ssh import Connection, HostKeyMismatch

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.leftovers import interactive_signals, leftovers, qemu_pids_under

pytestmark = pytest.mark.vm

LONG_TEST = """
import pathlib, os

def test_long(tt_vm):
    pathlib.Path(os.environ["MARKER"]).write_text(str(tt_vm.info.pid))
    tt_vm.run("sleep 120", timeout=300)
"""


def start(tmp: Path, suite: str, *args: str) -> tuple[subprocess.Popen[str], Path, Path]:
    (tmp / "suite").mkdir(exist_ok=True)
    (tmp / "suite" / "test_suite.py").write_text(suite)
    state, marker = tmp / "state", tmp / "marker"
    env = dict(os.environ, TTENV_STATE_DIR=str(state), TTENV_IMAGE_DIR=str(IMAGE_ROOT), MARKER=str(marker))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--tt-os=debian12",
            f"--tt-arch={HOST_ARCH}",
            "-o",
            "timeout=0",
            *args,
            str(tmp / "suite"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=interactive_signals,
    )
    return proc, state, marker


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def qemu_started(state: Path) -> bool:
    return bool(qemu_pids_under(state))


def gc(state: Path) -> None:
    os.environ["TTENV_STATE_DIR"] = str(state)
    try:
        assert ttenv_main(["gc"]) == 0
    finally:
        del os.environ["TTENV_STATE_DIR"]


@pytest.fixture
def debian12(images: Callable[..., list[ImageInfo]]) -> ImageInfo:
    return images("debian-12")[0]


@pytest.mark.parametrize("attempt", range(5))
def test_sigkill_during_boot(tmp_path: Path, debian12: ImageInfo, attempt: int) -> None:
    proc, state, _ = start(tmp_path, LONG_TEST)
    wait_for("qemu to start", lambda: qemu_started(state), 120)
    time.sleep(0.5 * attempt)  # at different points of the boot
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    wait_for("qemu to die with its owner (PDEATHSIG)", lambda: not qemu_started(state), 5)
    gc(state)
    assert leftovers(state) == []


@pytest.mark.parametrize("attempt", range(5))
def test_sigkill_during_test(tmp_path: Path, debian12: ImageInfo, attempt: int) -> None:
    proc, state, marker = start(tmp_path, LONG_TEST)
    wait_for("the test to start on its VM", marker.exists, 300)
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    wait_for("qemu to die with its owner (PDEATHSIG)", lambda: not qemu_started(state), 5)
    gc(state)
    assert leftovers(state) == []


def test_sigint_twice_during_test(tmp_path: Path, debian12: ImageInfo) -> None:
    proc, state, marker = start(tmp_path, LONG_TEST)
    wait_for("the test to start on its VM", marker.exists, 300)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    wait_for("the VM to go down", lambda: not qemu_started(state), 5)
    down = time.monotonic() - sent
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "Traceback" not in out
    assert [ln for ln in out.splitlines() if "deleted: 1 VM(s) stopped" in ln], out
    assert leftovers(state) == []  # no gc needed: the session cleaned up itself
    print(f"SIGINT -> VMs down in {down:.2f} s")


@pytest.mark.parametrize("when", ["env-created", "qemu-started"])
def test_sigterm_during_boot(tmp_path: Path, debian12: ImageInfo, when: str) -> None:
    proc, state, _ = start(tmp_path, LONG_TEST)
    if when == "env-created":  # while create_env is still at work
        wait_for(
            "the ENV's run dir", lambda: any((state / "envs").glob("*")) if (state / "envs").is_dir() else False, 120
        )
    else:
        wait_for("qemu to start", lambda: qemu_started(state), 120)
    proc.send_signal(signal.SIGTERM)
    wait_for("the VM to go down", lambda: not qemu_started(state), 5)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "Traceback" not in out
    assert leftovers(state) == []


DYING = """
import os, signal, pytest

@pytest.mark.tt_os("debian11")
def test_1_qemu_killed(tt_vm):
    os.kill(tt_vm.info.pid, signal.SIGKILL)
    tt_vm.run("true")

@pytest.mark.tt_os("debian12")
def test_1_guest_powers_off(tt_vm):
    tt_vm.run("systemctl poweroff --no-block; sleep 30", timeout=120)

def test_2_later(tt_vm):
    assert tt_vm.run("true").ok
"""


def test_vms_dying_mid_test(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> None:
    images("debian-12", "debian-11")
    junit = tmp_path / "junit.xml"
    proc, state, _ = start(tmp_path, DYING, "--tt-os=debian12,debian11", f"--junitxml={junit}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert "VM debian-11-x86_64 died (qemu is not running)" in out
    assert "VM debian-12-x86_64 died" in out
    assert "ttenv console of debian-12-x86_64 (last 50 lines)" in out
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    for name in ("test_1_qemu_killed[debian-11-x86_64]", "test_1_guest_powers_off[debian-12-x86_64]"):
        assert cases[name].find("failure") is not None
    for vm in ("debian-11-x86_64", "debian-12-x86_64"):  # later tests fail fast, same reason
        later = cases[f"test_2_later[{vm}]"]
        assert later.find("error") is not None or later.find("failure") is not None
        assert f"VM {vm} died" in ET.tostring(later, encoding="unicode")
        assert float(later.get("time", "99")) < 3.0
    assert leftovers(state) == []


def test_vm_without_its_seed_is_refused(tmp_path: Path, debian12: ImageInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed is lost before boot: the guest makes its own host key, which the client refuses."""
    monkeypatch.setattr(local_backend, "write_seed_iso", lambda seed, dest: dest.write_bytes(b""))
    backend = LocalBackend(state_root=tmp_path / "state")
    key = KeyPair.generate("c")
    key.write_private(tmp_path / "id")
    env = backend.create_env(EnvSpec("NOSEED", (VmSpec("vm", debian12.name, Resources(2, 512)),), key.public))
    try:
        vm = backend.wait_vm(env.id, "vm")
        conn = Connection(target(vm, tmp_path / "id"), connect_timeout=30)
        with pytest.raises(HostKeyMismatch, match=r"^vm: "):
            conn.run("true")
        conn.close()
    finally:
        backend.delete_env(env.id)
    assert leftovers(tmp_path / "state") == []


def run_cli(state: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(state), TTENV_IMAGE_DIR=str(IMAGE_ROOT))
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_qemu_missing_is_one_line_and_leaves_nothing(tmp_path: Path, debian12: ImageInfo) -> None:
    bin_dir = tmp_path / "bin"  # qemu-img but no qemu-system-*
    bin_dir.mkdir()
    (bin_dir / "qemu-img").symlink_to("/usr/bin/qemu-img")
    res = run_cli(
        tmp_path / "state", "env", "add", "NOQEMU", "--os-prefix=debian12", "--arch", HOST_ARCH, path=str(bin_dir)
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == [
        f"ttenv: error: qemu-system-{debian12.arch} not found (apt-get install -y qemu-system-x86)"
    ]
    assert leftovers(tmp_path / "state") == []


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path: Path, debian12: ImageInfo) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill up")
    try:
        state = small / "state"
        run_cli(state, "env", "list")  # the store fits; an ENV's overlays and seeds do not
        res = run_cli(state, "env", "add", "FULL", "--os-prefix=debian12,debian11", "--arch", HOST_ARCH)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.splitlines()) == 1 and "No space left on device" in res.stderr, res.stderr
        assert leftovers(state) == []
    finally:  # a just-killed qemu may hold its overlay for a moment: retry, then detach lazily
        for _ in range(20):
            if subprocess.run(["umount", str(small)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(small)], check=False)
