"""The plugin end to end: pytest runs (in subprocesses) against real VMs, with and without xdist.

Asserts what a user sees (ids, outcomes, failure sections, matrix, JUnit properties) and what
is left on the host afterwards (nothing, or exactly the one kept ENV).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import ImageInfo

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.leftovers import qemu_pids_under

pytestmark = pytest.mark.vm
pytest_plugins = ["pytester"]

SUITE = """
import pytest

def pytest_ttenv_vm_ready(vm):
    vm.write_text("/etc/provisioned", "yes")

def test_release(tt_vm):
    release = tt_vm.run("cat /etc/debian_version", check=True).stdout
    assert release.startswith(tt_vm.version)

def test_provisioned_once(tt_vm):
    assert tt_vm.read_text("/etc/provisioned") == "yes"

@pytest.mark.tt_os("debian12")
def test_only_on_12(tt_vm):
    assert tt_vm.name.startswith("debian-12")

@pytest.mark.tt_os("ubuntu")
def test_no_ubuntu_here(tt_vm):
    pass

def test_fresh_writes(tt_vm_fresh):
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1
    tt_vm_fresh.write_text("/root/mark", "x")

def test_fresh_again(tt_vm_fresh):
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1

def test_fails(tt_vm):
    tt_vm.run("echo failing-command-ran")
    assert False, "expected failure"

def test_env(tt_env):
    assert all(r.stdout.strip() == name for name, r in tt_env.run("hostname").items())
"""


def split_conftest(pytester: pytest.Pytester) -> None:
    hook, tests = SUITE.split("def test_release", 1)
    pytester.makeconftest(hook)
    pytester.makepyfile(test_suite="import pytest\n\ndef test_release" + tests)


@pytest.fixture
def host(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(IMAGE_ROOT))  # pytester moves HOME; keep the real cache
    state = tmp_path / "state"
    monkeypatch.setenv("TTENV_STATE_DIR", str(state))
    return state


def test_two_vms_without_xdist(
    pytester: pytest.Pytester, host: Path, images: Callable[..., list[ImageInfo]], tmp_path: Path
) -> None:
    images("debian-12", "debian-11")
    split_conftest(pytester)
    junit = tmp_path / "junit.xml"
    matrix = tmp_path / "matrix.json"
    result = pytester.runpytest_subprocess(
        "--tt-os=debian12,debian11",
        f"--tt-arch={HOST_ARCH}",
        "-p",
        "no:cacheprovider",
        "-rs",
        f"--junitxml={junit}",
        f"--tt-matrix-report={matrix}",
        timeout=900,
    )
    out = result.stdout.str()
    result.assert_outcomes(passed=10, failed=2, skipped=1)
    assert "ttenv last command on debian-12-x86_64" in out and "echo failing-command-ran" in out
    assert "ttenv console of debian-12-x86_64 (last 50 lines)" in out
    assert "no VM of this session's matrix" in out  # test_no_ubuntu_here's skip reason
    assert "ttenv matrix" in out and "deleted: 2 VM(s) stopped" in out

    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert "test_release[debian-11-x86_64]" in cases and "test_only_on_12[debian-12-x86_64]" in cases
    assert "test_only_on_12[debian-11-x86_64]" not in cases
    props = {p.get("name"): p.get("value") for p in cases["test_release[debian-11-x86_64]"].iter("property")}
    assert props == {"tt_vm": "debian-11-x86_64", "tt_os": "debian-11", "tt_arch": "x86_64"}

    report = json.loads(matrix.read_text())
    assert report["tests"]["test_suite.py::test_fails"] == {"debian-11-x86_64": "failed", "debian-12-x86_64": "failed"}
    only_12 = report["tests"]["test_suite.py::test_only_on_12"]
    assert only_12 == {"debian-11-x86_64": "not-run", "debian-12-x86_64": "passed"}

    assert LocalBackend(state_root=host).list_envs() == []
    assert qemu_pids_under(host) == []


def test_xdist_one_env_kept_then_deleted(
    pytester: pytest.Pytester, host: Path, images: Callable[..., list[ImageInfo]]
) -> None:
    images("debian-12")
    split_conftest(pytester)
    result = pytester.runpytest_subprocess(
        "--tt-os=debian12",
        f"--tt-arch={HOST_ARCH}",
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        "--tt-keep=failed",
        timeout=900,
    )
    result.assert_outcomes(passed=6, failed=1, skipped=1)
    out = result.stdout.str()
    assert "kept ENV" in out and "ssh -i" in out and "ttenv env del" in out

    backend = LocalBackend(state_root=host)
    assert backend.gc() == []  # a kept ENV outlives its pytest process: gc leaves it while leased
    envs = backend.list_envs()
    assert len(envs) == 1, "the workers must not create ENVs of their own"
    assert [vm.name for vm in envs[0].vms] == ["debian-12-x86_64"] and envs[0].expires is not None
    assert envs[0].vms[0].state == "running"  # kept alive after pytest exited
    backend.delete_env(envs[0].id)
    assert qemu_pids_under(host) == [] and backend.list_envs() == []
