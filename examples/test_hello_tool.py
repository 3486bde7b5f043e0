"""An example suite: checks a small tool installed into every VM of the matrix.

pytest examples --tt-os=debian11,debian12,debian13
"""

import pytest

from pytest_ttenv.fixtures import Env, Vm


def test_version(tt_vm: Vm) -> None:
    result = tt_vm.run("hello-tt --version", check=True)
    assert result.stdout.startswith("hello-tt 1.4")


def test_greets_with_os_name(tt_vm: Vm) -> None:
    out = tt_vm.run("hello-tt", check=True).stdout
    assert f"hello from {tt_vm.name}" in out
    assert "Debian" in out


def test_python_available(tt_vm: Vm) -> None:
    assert tt_vm.run(["python3", "-c", "print(6 * 7)"]).stdout == "42\n"


@pytest.mark.tt_os("debian12", "debian13")
def test_systemd_runs_sshd(tt_vm: Vm) -> None:
    assert tt_vm.run("systemctl is-active ssh").stdout.strip() == "active"


def test_changes_are_undone(tt_vm_fresh: Vm) -> None:
    assert tt_vm_fresh.run("test -e /root/scribble").exit_status == 1
    tt_vm_fresh.write_text("/root/scribble", "left by a test")


def test_all_vms_at_once(tt_env: Env) -> None:
    results = tt_env.run("hello-tt --version")
    assert set(results) == set(tt_env.vms)
    assert all(r.ok for r in results.values())
