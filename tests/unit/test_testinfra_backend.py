"""The ``ttenv://`` testinfra backend without a VM: the message when pytest-testinfra is missing,
commands run through the VM handle (testinfra's sudo wrapping, root needing none), and a bad or
unused VM name as one line.

testinfra on real VMs, and reboots: tests/vm/test_testinfra_reboot.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import testinfra

from pytest_ttenv.core.model import VmInfo
from pytest_ttenv.errors import TTError, UsageError
from pytest_ttenv.fixtures import handles
from pytest_ttenv.ssh import RunResult


def test_without_testinfra_host_says_how_to_install_it() -> None:
    code = """
import sys
sys.modules["testinfra"] = None  # as if pytest-testinfra were not installed
import pytest_ttenv.plugin  # loads without it
from pytest_ttenv.core.model import VmInfo
from pytest_ttenv.fixtures.handles import Vm, register_testinfra
from pytest_ttenv.session import VmState

class Session:
    vms = {"debian-12-x86_64": VmState(info=VmInfo("debian-12-x86_64", "debian-12-x86_64", "debian", "12", "x86_64"))}

assert not register_testinfra()
try:
    Vm(Session(), "debian-12-x86_64").host
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "TTError: tt_vm.host needs pytest-testinfra: pip install 'pytest-ttenv[testinfra]'\n"


@dataclass
class FakeVm:
    """Stands in for a Vm handle: records commands, answers with a fixed result."""

    name: str
    info: VmInfo
    commands: list[str]

    def run(self, cmd: str) -> RunResult:
        self.commands.append(cmd)
        if "getpreferredencoding" in cmd:
            return RunResult(cmd, 0, b"UTF-8\n", b"", 0.0, self.name)
        return RunResult(cmd, 3, b"out\xc3\xa9", b"err", 0.0, self.name)


@pytest.fixture
def fake_vm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], FakeVm]]:
    def make(user: str) -> FakeVm:
        vm = FakeVm(f"fake-{user}", VmInfo(f"fake-{user}", "fake", "debian", "12", "x86_64", user=user), [])
        monkeypatch.setitem(handles._ACTIVE, vm.name, vm)
        return vm

    assert handles.register_testinfra()
    yield make


def test_backend_runs_through_the_vm_handle_with_testinfra_sudo(fake_vm: Callable[[str], FakeVm]) -> None:
    vm = fake_vm("debian")
    r = testinfra.get_host(f"ttenv://{vm.name}").run("ls %s", "a b")
    assert (r.rc, r.stdout, r.stderr, r.command) == (3, "out\u00e9", "err", b"ls 'a b'")
    host = testinfra.get_host(f"ttenv://{vm.name}", sudo=True)
    host.run("id")
    with host.sudo("www-data"):  # type: ignore[call-arg,attr-defined]  # testinfra types host.X as a Module class
        host.run("id")
    assert vm.commands == [
        "ls 'a b'",
        "python3 -c 'import locale;print(locale.getpreferredencoding())'",  # testinfra: non-ASCII output
        "sudo -n /bin/sh -c id",
        "sudo -n /bin/sh -c 'sudo -n -u www-data /bin/sh -c id'",
    ]
    root = fake_vm("root")  # root needs no sudo to be root
    testinfra.get_host(f"ttenv://{root.name}", sudo=True).run("id")
    testinfra.get_host(f"ttenv://{root.name}", sudo=True, sudo_user="nobody").run("id")
    assert root.commands == ["id", "sudo -n -u nobody /bin/sh -c id"]


def test_backend_bad_or_unused_vm_is_one_line() -> None:
    assert handles.register_testinfra()
    with pytest.raises(UsageError, match=r"bad testinfra host ttenv://root@vm: give a VM name"):
        testinfra.get_host("ttenv://root@vm")
    with pytest.raises(TTError, match=r"ttenv://no-such-vm: no VM of that name is in use by this test process"):
        testinfra.get_host("ttenv://no-such-vm").run("true")
