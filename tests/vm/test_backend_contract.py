"""One contract suite for the Backend API, run against LocalBackend and against HttpBackend talking
to a real ``ttenv serve`` on 127.0.0.1: the same calls, the same answers, the same exceptions.

Per backend one ENV of one real VM (module scope) goes through its whole life: create (returns at
once) -> wait -> SSH with the VM's host key -> snapshot/revert -> console -> renew/keep -> delete,
after which nothing is left: no qemu process, run dir, socket dir, row or forwarded port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_ttenv.access import target
from pytest_ttenv.backend import Backend
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvInfo, EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.errors import NotFound, UsageError
from pytest_ttenv.ssh import Connection

from helpers.leftovers import leftovers, port_free, qemu_pids_under
from helpers.server import Server, image_dir_with, start_server

pytestmark = pytest.mark.vm
ENV = "contract"


@dataclass
class Subject:
    """A backend under test, where its state lives, and its server (HTTP only)."""

    backend: Backend
    state: Path
    image: ImageInfo
    server: Server | None = None

    def leftovers(self) -> list[str]:
        skip = {f"qemu pid {self.server.proc.pid}"} if self.server and self.server.proc else set()
        return [item for item in leftovers(self.state) if item not in skip]


@pytest.fixture(scope="module", params=["local", "http"])
def subject(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, images: Callable[..., list[ImageInfo]]
) -> Iterator[Subject]:
    (image,) = images("debian-12")
    tmp = tmp_path_factory.mktemp(f"contract-{request.param}")
    image_dir = image_dir_with(tmp / "images", [image])
    if request.param == "local":
        local = LocalBackend(image_dir, tmp / "state")
        yield Subject(local, tmp / "state", image)
        for env in local.list_envs():
            local.delete_env(env.id)
        return
    server = start_server(tmp, image_dir)
    try:
        yield Subject(server.backend("alice"), server.state, image, server)
    finally:
        server.cleanup()


@dataclass
class Live:
    env: EnvInfo
    key: Path
    create_seconds: float


@pytest.fixture(scope="module")
def live(subject: Subject, tmp_path_factory: pytest.TempPathFactory) -> Live:
    key = KeyPair.generate("contract-client")
    key_file = tmp_path_factory.mktemp("client") / "id_ed25519"
    key.write_private(key_file)
    spec = EnvSpec(ENV, (VmSpec("vm1", subject.image.name, Resources(1, 256)),), key.public, ttl=1800)
    started = time.monotonic()
    env = subject.backend.create_env(spec)
    return Live(env, key_file, time.monotonic() - started)


def test_images_and_resolve(subject: Subject) -> None:
    backend = subject.backend
    assert [i.name for i in backend.images()] == [subject.image.name]
    assert backend.resolve(["deb"]) == [subject.image.name]
    assert backend.resolve(["Debian-12"], [subject.image.arch]) == [subject.image.name]
    with pytest.raises(UsageError, match="OS prefix 'fedora' matches no image; available: debian-12-"):
        backend.resolve(["fedora"])
    with pytest.raises(UsageError, match="unknown arch 'sparc'"):
        backend.resolve(["deb"], ["sparc"])


def test_create_returns_at_once_with_what_a_client_needs(subject: Subject, live: Live) -> None:
    env = live.env
    assert live.create_seconds < 10, "create_env must not wait for the boot"
    assert env.name == ENV and len(env.id) == 12 and env.state == "booting"
    assert env.expires is not None and env.expires - time.time() > 1700
    (vm,) = env.vms
    assert vm.name == "vm1" and vm.image == subject.image.name and vm.state == "booting"
    assert vm.address == "127.0.0.1" and 10022 <= vm.port <= 32767 and vm.user == "root"
    assert vm.host_key.startswith("ssh-ed25519 ")
    assert vm.resources == Resources(1, 256, 0)


def test_wait_then_ssh_with_the_vm_host_key(live: Live, subject: Subject) -> None:
    vm = subject.backend.wait_vm(ENV, "vm1", timeout=600)  # generous: the host may be busy
    assert vm.state == "running" and 0 < vm.boot_seconds < 600
    conn = Connection(target(vm, live.key), connect_timeout=30, use_agent=False)
    try:
        res = conn.run("hostname; id -un", timeout=60)
    finally:
        conn.close()
    assert res.ok and res.stdout.split() == ["vm1", "root"]
    assert subject.backend.wait_vm(live.env.id, "vm1", timeout=5).state == "running"  # at once when up


def test_show_and_list(live: Live, subject: Subject) -> None:
    by_name = subject.backend.show_env(ENV)
    by_id = subject.backend.show_env(live.env.id)
    assert by_name.id == by_id.id == live.env.id and by_name.name == ENV
    assert by_name.state == "running" and by_name.vms[0].state == "running"
    assert [e.name for e in subject.backend.list_envs()] == [ENV]


def test_snapshot_and_revert(live: Live, subject: Subject) -> None:
    vm = subject.backend.show_env(ENV).vm("vm1")

    def run(cmd: str) -> str:
        conn = Connection(target(vm, live.key), connect_timeout=30, use_agent=False)
        try:
            return conn.run(cmd, timeout=60, check=True).stdout
        finally:
            conn.close()

    run("rm -f /root/marker; sync")
    subject.backend.snapshot(ENV, "vm1", "clean")
    run("echo dirty > /root/marker; sync")
    subject.backend.revert(ENV, "vm1", "clean")
    assert run("test -e /root/marker && echo present || echo absent").strip() == "absent"
    with pytest.raises(NotFound, match="no snapshot named 'nosuch'"):
        subject.backend.revert(ENV, "vm1", "nosuch")


def test_console(live: Live, subject: Subject) -> None:
    vm = subject.backend.show_env(ENV).vm("vm1")
    conn = Connection(target(vm, live.key), connect_timeout=30, use_agent=False)
    try:
        conn.run("for i in 1 2 3 4 5 6; do echo console-line-$i; done > /dev/ttyS0", timeout=60, check=True)
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while "console-line-6" not in subject.backend.console(ENV, "vm1", 5) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert subject.backend.console(ENV, "vm1", 2).splitlines() == ["console-line-5", "console-line-6"]
    assert "console-line-1" in subject.backend.console(ENV, "vm1", 2000)


def test_renew_and_keep(live: Live, subject: Subject) -> None:
    renewed = subject.backend.renew(ENV, 600)
    assert renewed.expires is not None and abs(renewed.expires - (time.time() + 600)) < 30
    kept = subject.backend.keep(live.env.id, 1200)
    assert kept.expires is not None and abs(kept.expires - (time.time() + 1200)) < 30
    assert kept.vms[0].state == "running"


def test_unknown_names_are_not_found(live: Live, subject: Subject) -> None:
    backend = subject.backend
    for call in (
        lambda: backend.show_env("nope"),
        lambda: backend.delete_env("nope"),
        lambda: backend.renew("nope", 60),
        lambda: backend.console("nope", "vm1"),
        lambda: backend.show_env("../" + ENV),
        lambda: backend.wait_vm(ENV, "novm", 5),
        lambda: backend.console(ENV, "novm"),
        lambda: backend.snapshot(ENV, "novm", "s"),
    ):
        with pytest.raises(NotFound):
            call()


def test_bad_create_requests_are_usage_errors(live: Live, subject: Subject) -> None:
    backend, image = subject.backend, subject.image.name
    pub = KeyPair.generate("c").public
    bad = [
        EnvSpec("bad name", (VmSpec("vm1", image),), pub),
        EnvSpec("ok", (), pub),
        EnvSpec("ok", (VmSpec("vm1", image, Resources(cpu=0)),), pub),
        EnvSpec("ok", (VmSpec("vm1", image), VmSpec("vm1", image)), pub),
        EnvSpec(ENV, (VmSpec("vm1", image, Resources(1, 256)),), pub),  # the name is taken
    ]
    for spec in bad:
        with pytest.raises(UsageError):
            backend.create_env(spec)
    with pytest.raises(NotFound, match="debian-99-x86_64"):
        backend.create_env(EnvSpec("ok", (VmSpec("vm1", "debian-99-x86_64"),), pub))
    assert [e.name for e in backend.list_envs()] == [ENV], "a refused create left something behind"


def test_delete_leaves_nothing(live: Live, subject: Subject) -> None:
    env = subject.backend.show_env(ENV)
    port = env.vms[0].port
    deleted = subject.backend.delete_env(ENV)
    assert deleted.id == env.id and deleted.name == ENV
    with pytest.raises(NotFound):
        subject.backend.show_env(env.id)
    assert subject.backend.list_envs() == []
    assert qemu_pids_under(subject.state / "envs") == []
    assert not (subject.state / "envs" / env.id).exists()
    assert subject.leftovers() == []
    assert port_free(port)
