"""testinfra through ``tt_vm.host`` (the ``ttenv://`` backend), reboots inside tests, and
``ttenv env run --reboot``.

testinfra's own kind of tests run unchanged on Debian 11 and 13 in one pytest run (a subprocess),
and on Debian 12 in another together with the reboot tests (a reboot under TCG takes twice as long
with two more VMs on the cores); that one keeps its ENV, which the CLI tests then reboot and delete.
The backend's sudo wrapping and the missing-extra message need no VM:
tests/unit/test_testinfra_backend.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import ImageInfo

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.leftovers import qemu_pids_under

BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
VM12 = f"debian-12-{HOST_ARCH}"

CONFTEST = """
import pytest

def pytest_ttenv_vm_ready(vm):
    vm.run("cp /proc/sys/kernel/random/boot_id /etc/ready-boot-id", check=True)

@pytest.fixture
def host(tt_vm):  # testinfra's tests take `host`: here it is the VM of this test instance
    return tt_vm.host
"""

TESTINFRA_SUITE = """
import testinfra

def test_package(host):
    assert host.package("openssh-server").is_installed
    assert not host.package("no-such-package").is_installed

def test_file(host):
    release = host.file("/etc/os-release")
    assert release.is_file and release.user == "root"
    assert release.contains("Debian")
    assert not host.file("/no/such/file").exists

def test_service(host):
    assert host.service("ssh").is_running

def test_run(host):
    r = host.run("printf '%%s|' %s; echo err >&2; exit 3", "a b; c")
    assert (r.rc, r.stdout, r.stderr) == (3, "a b; c|", "err\\n")
    assert host.run("true").succeeded and host.run("false").failed
    assert host.check_output("uname -s") == "Linux"
    assert host.check_output("printf 'caf\\\\303\\\\251'") == "caf\\u00e9"

def test_user_sysctl_exists_socket(host):
    user = host.user()
    assert (user.name, user.uid, user.home) == ("root", 0, "/root")
    assert host.sysctl("kernel.ostype") == "Linux"
    assert host.exists("sh") and not host.exists("no-such-command")
    assert host.socket("tcp://22").is_listening

def test_sudo(host):
    with host.sudo():
        assert host.check_output("id -un") == "root"
    with host.sudo("nobody"):
        assert host.check_output("id -un") == "nobody"

def test_get_host(tt_vm):
    plain = testinfra.get_host(f"ttenv://{tt_vm.name}")
    assert plain is tt_vm.host and plain.backend.get_pytest_id() == f"ttenv://{tt_vm.name}"
    assert plain.check_output("hostname") == tt_vm.name
    assert testinfra.get_host(f"ttenv://{tt_vm.name}?sudo=true&sudo_user=nobody").check_output("id -un") == "nobody"

def test_failure_shows_command(host):
    assert host.run("echo from-testinfra").rc == 1
"""

REBOOT_SUITE = """
import time

import pytest

pytestmark = pytest.mark.tt_os("debian12")
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"

def test_1_reboot(tt_vm):
    before = tt_vm.run(BOOT_ID, check=True).stdout
    assert before == tt_vm.read_text("/etc/ready-boot-id")
    tt_vm.write_text("/root/written-before-reboot", "disk")
    tt_vm.reboot()
    assert tt_vm.run(BOOT_ID, check=True).stdout != before
    assert tt_vm.read_text("/root/written-before-reboot") == "disk"

def test_2_next_test_on_that_vm(tt_vm, host):
    assert tt_vm.run(BOOT_ID, check=True).stdout != tt_vm.read_text("/etc/ready-boot-id")
    assert host.service("ssh").is_running and host.file("/root/written-before-reboot").exists
    assert tt_vm._session.connection(tt_vm.name).agent_pid is not None  # the fast channel is back

def test_3_fresh_after_reboot(tt_vm_fresh):  # the post-boot snapshot: the first boot, memory and disk
    assert tt_vm_fresh.run(BOOT_ID, check=True).stdout == tt_vm_fresh.read_text("/etc/ready-boot-id")
    assert tt_vm_fresh.run("test -e /root/written-before-reboot").exit_status == 1
    assert abs(float(tt_vm_fresh.run("date +%s.%N").stdout) - time.time()) < 5

def test_4_reboot_in_a_fresh_test(tt_vm_fresh):
    tt_vm_fresh.reboot()
    assert tt_vm_fresh.host.check_output(BOOT_ID) != tt_vm_fresh.read_text("/etc/ready-boot-id").strip()

def test_5_fresh_again(tt_vm_fresh):
    assert tt_vm_fresh.run(BOOT_ID, check=True).stdout == tt_vm_fresh.read_text("/etc/ready-boot-id")

BEFORE = []

def test_6_plain_reboot_command(tt_vm):  # not tt_vm.reboot(): the test reboots the guest itself
    BEFORE.append(tt_vm.run(BOOT_ID, check=True).stdout)
    restarts = tt_vm.console(100000).count("reboot: Restarting system")  # the kernel's last words
    tt_vm.run("nohup sh -c 'sleep 1; reboot' >/dev/null 2>&1 &", check=True)
    deadline = time.monotonic() + 300
    while tt_vm.console(100000).count("reboot: Restarting system") == restarts:
        assert time.monotonic() < deadline, tt_vm.console()
        time.sleep(0.5)

def test_7_next_test_after_a_plain_reboot(tt_vm):  # waits for SSH in the new boot instead of failing
    assert tt_vm.run(BOOT_ID, check=True).stdout not in BEFORE
"""


# -- real VMs -------------------------------------------------------------------------------------
@dataclass
class Kept:
    state: Path
    env: str
    output: str


def ttenv(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(state))
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    print(f"$ ttenv {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def run_suite(tmp: Path, prefixes: str, *args: str, reboot: bool = False) -> str:
    """pytest on the VMs of ``prefixes`` in a subprocess (state in ``tmp/state``); its output."""
    suite = tmp / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_infra.py").write_text(TESTINFRA_SUITE)
    if reboot:
        (suite / "test_reboot.py").write_text(REBOOT_SUITE)
    env = dict(os.environ, TTENV_STATE_DIR=str(tmp / "state"), TTENV_IMAGE_DIR=str(IMAGE_ROOT))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=0",
            f"--tt-os={prefixes}",
            f"--tt-arch={HOST_ARCH}",
            "-rf",
            "--durations=5",
            *args,
            str(suite),
        ],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(res.stdout[-6000:], res.stderr[-3000:])
    return res.stdout


@pytest.mark.vm
def test_testinfra_tests_run_unchanged_on_debian_11_and_13(
    tmp_path: Path, images: Callable[..., list[ImageInfo]]
) -> None:
    images("debian-11", "debian-13")
    out = run_suite(tmp_path, "debian11,debian13")
    assert re.search(r"\b2 failed, 14 passed\b", out), out[-3000:]
    for name in (f"debian-11-{HOST_ARCH}", f"debian-13-{HOST_ARCH}"):  # the failure report shows the command
        assert f"FAILED test_infra.py::test_failure_shows_command[{name}]" in out
        assert re.search(rf"ttenv last command on {name} -+\necho from-testinfra\n", out)
    assert "deleted: 2 VM(s) stopped" in out
    assert qemu_pids_under(tmp_path / "state") == []


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory, images: Callable[..., list[ImageInfo]]) -> Iterator[Kept]:
    """Both suites on Debian 12, the ENV kept afterwards (deleted when the module is done)."""
    images("debian-12")
    tmp = tmp_path_factory.mktemp("reboot")
    out = run_suite(tmp, "debian12", "--tt-keep=always", reboot=True)
    backend = LocalBackend(state_root=tmp / "state")
    envs = backend.list_envs()
    try:
        yield Kept(tmp / "state", envs[0].name if envs else "", out)
    finally:
        for e in backend.list_envs():
            backend.delete_env(e.id)
        assert qemu_pids_under(tmp / "state") == []


@pytest.mark.vm
def test_reboot_in_tests_keeps_the_vm_usable_and_testinfra_runs_on_debian_12(kept: Kept) -> None:
    out = kept.output
    assert re.search(r"\b1 failed, 14 passed\b", out), out[-3000:]  # 8 testinfra tests, 7 reboot tests
    assert f"FAILED test_infra.py::test_failure_shows_command[{VM12}]" in out
    assert "kept ENV" in out and kept.env


@pytest.mark.vm
def test_cli_env_run_reboot(kept: Kept) -> None:
    first = _boot_id(kept)
    one = ttenv(kept.state, "env", "run", "--reboot", kept.env, VM12, "--cmd", BOOT_ID)
    assert one.returncode == 0, one.stdout + one.stderr
    second = _boot_id(kept)
    assert second != first
    pattern = rf"== {VM12}: rebooted, ssh up after [\d.]+ s\n== {VM12}: exit 0 \(\d+ ms\)\n{second}\n"
    assert re.fullmatch(pattern, one.stdout)  # the command ran in the new boot

    nothing = ttenv(kept.state, "env", "run", kept.env)
    assert nothing.returncode == 2 and nothing.stderr == (
        "ttenv: error: env run needs --cmd, --reboot or both (e.g. ttenv env run NAME --cmd 'uname -a')\n"
    )
    unknown = ttenv(kept.state, "env", "run", kept.env, "no-such-vm", "--reboot")
    assert unknown.returncode == 2 and unknown.stderr.startswith("ttenv: error: no VM named no-such-vm in ENV")
    assert unknown.stderr.count("\n") == 1

    late = ttenv(
        kept.state, "env", "run", kept.env, "--vm", VM12, "--reboot", "--boot-timeout", "0.5", "--cmd", "echo not-run"
    )
    assert late.returncode == 1 and late.stdout.startswith(f"== {VM12}: error: reboot failed: ")
    assert late.stdout.count("\n") == 1  # no command on a VM that did not come back


def _boot_id(kept: Kept) -> str:
    res = ttenv(kept.state, "env", "run", kept.env, "--cmd", BOOT_ID)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.fullmatch(rf"== {VM12}: exit 0 \(\d+ ms\)\n(\S+)\n", res.stdout)
    assert m, res.stdout
    return m.group(1)
