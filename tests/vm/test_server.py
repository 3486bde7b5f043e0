"""The host server with real VMs: names and paths, owners, quotas, leases, many clients at once,
restarts. Everything talks to a real ``ttenv serve`` subprocess on 127.0.0.1 (raw ``http.client``
where the exact bytes on the wire matter) and boots real VMs where a VM is needed: one shared ENV,
created through the CLI, serves every test that needs a running VM.

The API without VMs (addresses, auth, tokens, body limits, malformed requests):
tests/unit/test_server_api.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.errors import NotFound, QuotaError, UsageError
from pytest_ttenv.server.auth import TokenStore

from conftest import HOST_ARCH
from helpers.leftovers import leftovers, port_free
from helpers.server import Server, error_of, image_dir_with, qemu_of, raw, start_server, ttenv

IMAGE = f"debian-12-{HOST_ARCH}"
PUB = KeyPair.generate("test-client").public


# -- one server for the module ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(images: Callable[..., list[ImageInfo]]) -> ImageInfo:
    (img,) = images("debian-12")
    return img


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, image: ImageInfo) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    server = start_server(
        tmp,
        image_dir_with(tmp / "images", [image]),
        options=["--cpu-total", "4", "--mem-total", "2048", "--disk-total", "100000"],
    )
    try:
        yield server
    finally:
        server.cleanup()


def token_file(srv: Server, owner: str) -> str:
    """A file (mode 0600) holding ``owner``'s token, for ``--token-file``."""
    path = srv.state.parent / f"{owner}.token"
    path.touch(mode=0o600)
    path.write_text(srv.tokens[owner] + "\n")
    return str(path)


@pytest.fixture(scope="module")
def client_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-state")


@pytest.fixture(scope="module")
def shared(srv: Server, client_state: Path) -> str:
    """alice's ENV ``SHARED`` of one booted VM, created with ``ttenv env add --backend URL``."""
    res = ttenv(
        "env",
        "add",
        "SHARED",
        "--os-prefix",
        "debian12",
        "--arch",
        HOST_ARCH,
        "--cpu",
        "1",
        "--mem",
        "256",
        "--ttl",
        "3600",
        "--boot-timeout",
        "900",
        "--backend",
        srv.url,
        state=client_state,
        token=srv.tokens["alice"],
    )
    assert res.returncode == 0, res.stderr
    assert f"{IMAGE}: ready - ssh up after" in res.stdout
    return "SHARED"


# -- names and paths -------------------------------------------------------------------------------
TRAVERSALS = [
    ("GET", "/v1/envs/..%2F..%2F..%2Fetc%2Fpasswd"),
    ("GET", "/v1/envs/%2E%2E"),
    ("GET", "/v1/envs/.."),
    ("GET", "/v1/envs/%2E%2E%2F%2E%2E%2Fstate.sqlite"),
    ("DELETE", "/v1/envs/..%2FSHARED"),
    ("GET", "/v1/envs/SHARED/vms/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd/console"),
    ("GET", "/v1/envs/SHARED/vms/../../../../../etc/passwd/console"),
    ("GET", "/v1/envs/SHARED/vms/%2E%2E/console"),
    ("GET", f"/v1/envs/SHARED/vms/{IMAGE}%00/console"),
    ("GET", f"/v1/envs/SHARED/vms/{IMAGE}%2F..%2F..%2Fowner.json/console"),
    ("POST", f"/v1/envs/SHARED/vms/{IMAGE}/snapshots/..%2F..%2Fx/revert"),
    ("POST", f"/v1/envs/SHARED/vms/{IMAGE}/snapshots/a..b/revert"),
    ("GET", "/v1/envs/SHARED%2F..%2F..%2F/vms/x/console"),
    ("GET", "/v1/envs/" + "a" * 64),
    ("GET", "/v1/envs/%20SHARED"),
    ("GET", "//v1/envs/SHARED"),
]


@pytest.mark.vm
@pytest.mark.parametrize(("method", "path"), TRAVERSALS)
def test_path_traversal_is_refused(srv: Server, shared: str, method: str, path: str) -> None:
    status, _, data = raw(srv, method, path)
    assert status == 404, data
    assert error_of(status, data)["error"] == "not_found"
    assert b"root:x:0:0" not in data and b"SQLite" not in data


@pytest.mark.vm
def test_names_in_bodies_are_checked(srv: Server, shared: str) -> None:
    hdrs = {"Content-Type": "application/json"}
    for body in (
        {"name": "../../x", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB},
        {"name": "E", "vms": [{"name": "../../../etc", "image": IMAGE}], "client_pubkey": PUB},
        {"name": "E", "vms": [{"name": "v", "image": "../../../../etc"}], "client_pubkey": PUB},
        {"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB, "ttl": 5, "accel": "kvm; rm -rf /"},
    ):
        status, _, data = raw(srv, "POST", "/v1/envs", json.dumps(body).encode(), hdrs)
        assert status == 422 and error_of(status, data)["error"] == "usage"
    for name in ("../x", "a/b", "x y", "..", "a" * 64):
        status, _, data = raw(srv, "POST", f"/v1/envs/SHARED/vms/{IMAGE}/snapshots", json.dumps({"name": name}), hdrs)
        assert status == 422, name
    assert [e.name for e in srv.backend().list_envs()] == ["SHARED"]
    assert len(list((srv.state / "envs").iterdir())) == 1


# -- owners, quotas, leases ------------------------------------------------------------------------
@pytest.mark.vm
def test_another_owners_env_is_404_and_names_are_per_owner(srv: Server, shared: str) -> None:
    alice, bob = srv.backend("alice"), srv.backend("bob")
    env = alice.show_env(shared)
    vm = env.vms[0].name
    assert bob.list_envs() == []
    for call in (
        lambda: bob.show_env(shared),
        lambda: bob.show_env(env.id),
        lambda: bob.delete_env(env.id),
        lambda: bob.renew(shared, 60),
        lambda: bob.keep(env.id, 60),
        lambda: bob.wait_vm(env.id, vm, 5),
        lambda: bob.console(env.id, vm),
        lambda: bob.snapshot(env.id, vm, "s"),
        lambda: bob.revert(env.id, vm, "s"),
    ):
        with pytest.raises(NotFound, match="no ENV named"):
            call()
    mine = bob.create_env(EnvSpec(shared, (VmSpec("vm1", IMAGE, Resources(1, 256)),), PUB, ttl=300, accel="tcg"))
    try:
        assert mine.name == shared and mine.owner == "bob" and mine.id != env.id
        assert [e.id for e in bob.list_envs()] == [mine.id] and [e.id for e in alice.list_envs()] == [env.id]
    finally:
        bob.delete_env(shared)
    assert alice.show_env(shared).vms[0].state == "running"
    with pytest.raises(UsageError, match="an ENV named 'SHARED' exists already"):
        alice.create_env(EnvSpec(shared, (VmSpec("vm1", IMAGE, Resources(1, 256)),), PUB))


@pytest.mark.vm
def test_quota_overflow_is_409_with_what_is_free(srv: Server, shared: str, image: ImageInfo) -> None:
    alice = srv.backend("alice")
    before = sorted(p.name for p in (srv.state / "envs").iterdir())
    four = tuple(VmSpec(f"vm{i}", IMAGE, Resources(1, 256)) for i in range(4))
    with pytest.raises(QuotaError) as err:
        alice.create_env(EnvSpec("BIG", four, PUB))
    disk = image.disk_mib
    assert err.value.free == {"cpu": 3, "mem_mib": 2048 - 256, "disk_mib": 100000 - disk}
    assert f"ENV BIG needs 4 CPU, 1024 MiB memory, {4 * disk} MiB disk; free: 3 CPU, 1792 MiB memory" in str(err.value)
    with pytest.raises(QuotaError, match="exceeds the server's totals"):
        alice.create_env(EnvSpec("BIG", (VmSpec("vm1", IMAGE, Resources(1, 4096)),), PUB))
    with pytest.raises(QuotaError, match="free: 3 CPU"):
        alice.create_env(EnvSpec("BIG", (VmSpec("vm1", IMAGE, Resources(1, 256, 99000)),), PUB))
    status, _, data = raw(
        srv,
        "POST",
        "/v1/envs",
        json.dumps({"name": "BIG", "vms": [{"name": f"v{i}", "image": IMAGE} for i in range(4)], "client_pubkey": PUB}),
        {"Content-Type": "application/json"},
    )
    body = error_of(status, data)
    assert status == 409 and body["error"] == "quota" and body["free"]["cpu"] == 3
    assert sorted(p.name for p in (srv.state / "envs").iterdir()) == before, "a refused create started something"
    used = srv.backend("alice").status()["used"]
    assert used == {"cpu": 1, "mem_mib": 256, "disk_mib": disk}


@pytest.mark.vm
def test_cli_against_the_server(srv: Server, shared: str, client_state: Path) -> None:
    remote = ["--backend", srv.url, "--token-file", token_file(srv, "alice")]
    listing = ttenv("env", "list", *remote, state=client_state)
    assert listing.returncode == 0 and re.search(r"SHARED\s+[0-9a-f]{12}\s+running\s+1\s+alice", listing.stdout)
    show = ttenv("env", "show", "SHARED", *remote, state=client_state)
    assert show.returncode == 0 and "owner alice" in show.stdout and "127.0.0.1:" in show.stdout
    run = ttenv("env", "run", "SHARED", "--cmd", "hostname; cat /etc/debian_version", *remote, state=client_state)
    assert run.returncode == 0 and f"== {IMAGE}: exit 0" in run.stdout and f"\n{IMAGE}\n12." in run.stdout
    console = ttenv("env", "console", "SHARED", IMAGE, "--lines", "5", *remote, state=client_state)
    assert console.returncode == 0
    status = ttenv("status", "--server", *remote)
    assert status.returncode == 0 and re.search(r"CPU\s+4\s+1\s+3", status.stdout)
    assert "1 ENV(s) of 1 owner(s), 1 VM(s), 1 running" in status.stdout
    bob = ttenv("env", "list", "--backend", srv.url, token=srv.tokens["bob"])
    assert bob.stdout.strip() == "no ENVs"
    nope = ttenv("env", "show", "nope", *remote)
    assert nope.returncode == 2 and nope.stderr.strip() == "ttenv: error: no ENV named 'nope' (see: ttenv env list)"


@pytest.mark.vm
def test_expired_lease_is_reaped_within_seconds(srv: Server) -> None:
    alice = srv.backend("alice")
    started = time.monotonic()
    env = alice.create_env(EnvSpec("SHORT", (VmSpec("vm1", IMAGE, Resources(1, 256)),), PUB, ttl=3, accel="tcg"))
    assert env.expires is not None and env.expires - time.time() <= 3
    rundir = srv.state / "envs" / env.id
    assert qemu_of(rundir)
    while time.monotonic() - started < 15:
        try:
            alice.show_env(env.id)
        except NotFound:
            break
        time.sleep(0.2)
    gone = time.monotonic() - started
    assert 3 <= gone < 10, f"reaped after {gone:.1f} s"
    assert not rundir.exists() and qemu_of(rundir) == [] and port_free(env.vms[0].port)


@pytest.mark.vm
def test_public_addr_is_what_clients_are_told(tmp_path: Path, image: ImageInfo) -> None:
    options = ["--public-addr", "tt.example", "--default-lease", "120", "--max-lease", "600"]
    server = start_server(tmp_path, image_dir_with(tmp_path / "images", [image]), options=options)
    try:
        alice = server.backend("alice")
        assert alice.status()["public_addr"] == "tt.example"
        env = alice.create_env(EnvSpec("PUB", (VmSpec("vm1", IMAGE, Resources(1, 256)),), PUB, accel="tcg"))
        assert env.vms[0].address == "tt.example" and env.vms[0].port > 0  # forwarded on 127.0.0.1, announced so
        assert env.expires is not None and 100 < env.expires - time.time() <= 120  # --default-lease
        renewed = alice.renew("PUB", 10_000).expires
        assert renewed is not None and renewed - time.time() <= 600  # --max-lease
        assert env.vms[0].console == "" and env.vms[0].pid == 0 and env.rundir == ""  # server-side details
        alice.delete_env("PUB")
    finally:
        server.cleanup()


# -- many clients ----------------------------------------------------------------------------------------
@pytest.mark.vm
def test_twenty_concurrent_clients_never_breach_the_quota_and_leak_nothing(tmp_path: Path, image: ImageInfo) -> None:
    owners = [f"c{i}" for i in range(4)]
    server = start_server(
        tmp_path,
        image_dir_with(tmp_path / "images", [image]),
        owners=owners,
        options=["--cpu-total", "4", "--mem-total", "1024", "--disk-total", "100000", "--log-level", "warning"],
    )
    totals = {"cpu": 4, "mem_mib": 1024, "disk_mib": 100000}
    admin = {"Authorization": f"Bearer {TokenStore(server.state).add('ops', admin=True)}"}  # sees every owner
    try:
        stop = threading.Event()
        seen: list[dict[str, int]] = []

        def watch() -> None:
            session = requests.Session()
            while not stop.is_set():
                res = session.get(f"{server.url}/v1/status", headers=admin, timeout=30)
                seen.append(res.json()["used"])
                time.sleep(0.005)

        start = threading.Barrier(20)
        created, refused, errors = [0], [0], []
        lock = threading.Lock()

        def client(i: int) -> None:
            backend = server.backend(owners[i % 4])
            start.wait()
            for j in range(3):
                spec = EnvSpec(f"t{i}-{j}", (VmSpec("vm1", IMAGE, Resources(1, 256)),), PUB, ttl=300, accel="tcg")
                try:
                    env = backend.create_env(spec)
                except QuotaError:
                    with lock:
                        refused[0] += 1
                    time.sleep(random.uniform(0.05, 0.3))
                    continue
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(f"create {spec.name}: {exc!r}")
                    continue
                with lock:
                    created[0] += 1
                try:
                    backend.delete_env(env.id)
                except Exception as exc:  # noqa: BLE001 - collected and reported below
                    errors.append(f"delete {spec.name}: {exc!r}")

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        stop.set()
        watcher.join()
        assert not errors, errors
        assert created[0] >= 4 and created[0] + refused[0] == 60
        assert any(u["cpu"] > 0 for u in seen), seen  # the watcher saw the contention, however briefly
        breaches = [u for u in seen if any(u[k] > totals[k] for k in totals)]
        assert not breaches, breaches
        final = requests.get(f"{server.url}/v1/status", headers=admin, timeout=30).json()
        assert final["scope"] == "server" and final["envs"] == final["vms"] == 0
        assert final["used"] == {"cpu": 0, "mem_mib": 0, "disk_mib": 0}
        assert qemu_of(server.state) == []
        assert not (server.state / "envs").exists() or list((server.state / "envs").iterdir()) == []
        assert [x for x in leftovers(server.state) if not x.startswith("qemu pid ")] == []
        print(f"20 clients: {created[0]} created and deleted, {refused[0]} refused (409), {len(seen)} status polls")
    finally:
        server.cleanup()


# -- restarts (last: they stop and start the module's server) ------------------------------------------
@pytest.mark.vm
def test_stop_and_kill9_then_restart_keeps_envs_usable(srv: Server, shared: str, client_state: Path) -> None:
    remote = ["--backend", srv.url, "--token-file", token_file(srv, "alice")]
    env = srv.backend("alice").show_env(shared)
    (qemu_pid,) = qemu_of(srv.state / "envs" / env.id)

    assert srv.stop() == 0  # SIGTERM: graceful; the VMs stay up
    assert "stopped; 1 ENV(s) left running, re-adopted at the next start" in srv.output()
    assert qemu_of(srv.state / "envs" / env.id) == [qemu_pid]
    srv.start()
    assert f"re-adopted 1 ENV(s) from the state dir:\n  ENV SHARED ({env.id}) of alice: 1/1 VM(s) up" in srv.output()

    bob = srv.backend("bob")
    doomed = bob.create_env(EnvSpec("DOOMED", (VmSpec("vm1", IMAGE, Resources(1, 256)),), PUB, ttl=600, accel="tcg"))
    srv.kill()  # SIGKILL: no shutdown code at all; the VMs were started without PDEATHSIG
    assert qemu_of(srv.state / "envs" / env.id) == [qemu_pid]
    os.kill(doomed.vms[0].pid or qemu_of(srv.state / "envs" / doomed.id)[0], signal.SIGKILL)
    srv.start()
    out = srv.output()
    assert f"ENV SHARED ({env.id}) of alice: 1/1 VM(s) up" in out
    assert f"ENV DOOMED ({doomed.id}) of bob: 0/1 VM(s) up, lease" in out and "vm1 stopped: qemu is not running" in out

    after = srv.backend("alice").show_env(shared)
    assert after.id == env.id and after.vms[0].state == "running" and after.vms[0].port == env.vms[0].port
    run = ttenv("env", "run", "SHARED", "--cmd", "hostname", *remote, state=client_state)
    assert run.returncode == 0 and f"\n{IMAGE}\n" in run.stdout
    stopped = bob.show_env("DOOMED").vms[0]
    assert stopped.state == "stopped" and stopped.error == "qemu is not running"
    bob.delete_env("DOOMED")

    delete = ttenv("env", "del", "SHARED", *remote, state=client_state)
    assert delete.returncode == 0, delete.stderr
    assert srv.backend("alice").list_envs() == [] and qemu_of(srv.state) == []
    assert [x for x in leftovers(srv.state) if not x.startswith("qemu pid ")] == []
    assert not (client_state / "keys" / env.id).exists()
    with sqlite3.connect(srv.state / "state.sqlite") as db:
        assert db.execute("SELECT count(*) FROM envs").fetchone() == (0,)
