"""The plugin against a real ``ttenv serve``: the same suite behaves as on the local backend
(under xdist too), the session's lease is renewed while pytest runs, and a SIGKILLed session's
ENV is reaped by the server when its lease runs out."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import ImageInfo

from conftest import HOST_ARCH
from helpers.server import Server, env_vars, image_dir_with, qemu_of, start_server

pytestmark = pytest.mark.vm
pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_release(tt_vm):
    assert tt_vm.run("cat /etc/debian_version", check=True).stdout.startswith(tt_vm.version)

def test_reached_through_the_server_address(tt_vm):
    assert tt_vm.info.address == "127.0.0.1" and tt_vm.info.port > 0

def test_fresh_writes(tt_vm_fresh):
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1
    tt_vm_fresh.write_text("/root/mark", "x")

def test_fresh_again(tt_vm_fresh):
    assert tt_vm_fresh.run("test -e /root/mark").exit_status == 1

def test_env(tt_env):
    assert all(r.stdout.strip() == name for name, r in tt_env.run("hostname").items())

def test_fails(tt_vm):
    assert False, "expected failure"
"""


@pytest.fixture(scope="module")
def server(images: Callable[..., list[ImageInfo]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("plugin-server")
    srv = start_server(tmp, image_dir_with(tmp / "images", images("debian-12")))
    yield srv
    srv.cleanup()


def _client_env(tmp: Path, server: Server, **extra: str) -> dict[str, str]:
    """A client with its own (empty) local state and no images: everything comes from the server."""
    return env_vars(
        TTENV_STATE_DIR=str(tmp / "client-state"),
        TTENV_IMAGE_DIR=str(tmp / "no-images"),
        TTENV_BACKEND=server.url,
        TTENV_TOKEN=server.tokens["alice"],
        **extra,
    )


def test_suite_runs_on_the_server_like_on_local(pytester: pytest.Pytester, server: Server, tmp_path: Path) -> None:
    pytester.makepyfile(test_suite=SUITE)
    for key, value in _client_env(tmp_path, server).items():
        pytester._monkeypatch.setenv(key, value)
    result = pytester.runpytest_subprocess(
        "--tt-os=debian12", f"--tt-arch={HOST_ARCH}", "-n", "2", "-rA", "-p", "no:cacheprovider", timeout=900
    )
    result.assert_outcomes(passed=5, failed=1)
    vm = f"debian-12-{HOST_ARCH}"
    assert f"PASSED test_suite.py::test_release[{vm}]" in result.stdout.str()
    assert "deleted: 1 VM(s) stopped" in result.stdout.str()
    assert server.backend().list_envs() == [], "the session's ENV outlived the session on the server"
    assert qemu_of(server.state) == []
    assert LocalBackend(tmp_path / "no-images", tmp_path / "client-state").list_envs() == []
    sessions = tmp_path / "client-state" / "sessions"
    assert not sessions.exists() or list(sessions.iterdir()) == [], "session dir left on the client"


def test_killed_session_is_reaped_after_its_lease(pytester: pytest.Pytester, server: Server, tmp_path: Path) -> None:
    lease = 6.0
    # the ENV is created after collection, for a test that needs a VM: this one waits for its VM, then hangs
    suite = pytester.makepyfile(test_hang="import time\n\ndef test_hang(tt_vm):\n    time.sleep(600)\n")
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(suite),
        "--tt-os=debian12",
        f"--tt-arch={HOST_ARCH}",
        f"--tt-lease={lease}",
        "-p",
        "no:cacheprovider",
        "-q",
    ]
    log = tmp_path / "pytest.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, cwd=pytester.path, env=_client_env(tmp_path, server), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        alice = server.backend()
        deadline = time.monotonic() + 120
        while not alice.list_envs():
            assert proc.poll() is None, f"pytest exited early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no ENV on the server after 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        (env,) = alice.list_envs()
        time.sleep(2.5 * lease)  # well past one lease: only the background renewals keep it
        assert [e.id for e in alice.list_envs()] == [env.id], "the lease was not renewed while pytest ran"
        assert env.expires is not None
        renewed = alice.show_env(env.id).expires
        assert renewed is not None and renewed > env.expires
    finally:
        proc.kill()
        proc.wait(timeout=10)
    killed = time.monotonic()
    while alice.list_envs():
        assert time.monotonic() - killed < lease + 30, "the server did not reap the killed session's ENV"
        time.sleep(0.5)
    gone_after = time.monotonic() - killed
    deadline = time.monotonic() + 15
    while qemu_of(server.state):
        assert time.monotonic() < deadline, "qemu still running after the ENV was reaped"
        time.sleep(0.2)
    assert gone_after <= lease + 30
