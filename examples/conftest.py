"""Provisioning for the example suite: install the "package under test" once per VM."""

from pathlib import Path

from pytest_ttenv.fixtures import Vm

TOOL = Path(__file__).parent / "hello-tool" / "hello-tt"


def pytest_ttenv_vm_ready(vm: Vm) -> None:
    vm.put(TOOL, "/tmp/hello-tt")
    vm.run("install -m 0755 /tmp/hello-tt /usr/local/bin/hello-tt", check=True)
