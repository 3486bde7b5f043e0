"""The host server, explicitly: auth, owners, names and paths, body limits, quotas, leases, many
clients at once, restarts. Everything talks to a real ``ttenv serve`` subprocess on 127.0.0.1
(raw ``http.client`` where the exact bytes on the wire matter) and boots real VMs where a VM is
needed: one shared ENV, created through the CLI, serves every test that needs a running VM.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pytest_ttenv.backend.engines.qemu import QemuConfig, build_argv
from pytest_ttenv.backend.http import HttpBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import EnvSpec, ImageInfo, Resources, VmSpec
from pytest_ttenv.errors import NotFound, QuotaError, UsageError
from pytest_ttenv.server.auth import TokenStore
from pytest_ttenv.server.errors import Conflict
from pytest_ttenv.server.quota import Amounts, Quota
from pytest_ttenv.server.serve import forward_addr, parse_listen

from conftest import HOST_ARCH
from helpers.leftovers import leftovers, port_free
from helpers.server import Server, env_vars, free_port, image_dir_with, qemu_of, start_server

IMAGE = f"debian-12-{HOST_ARCH}"
PUB = KeyPair.generate("test-client").public


# -- pure parts -------------------------------------------------------------------------------------
def test_vm_ports_are_forwarded_on_the_bind_address() -> None:
    d = Path("/r")
    cfg = QemuConfig(name="E/vm", arch="x86_64", accel="tcg", resources=Resources(1, 256), disk=d / "o.qcow2",
                     seed=None, kernel=None, initrd=None, cmdline="", port=20022, console=d / "c", qmp=d / "q",
                     pidfile=d / "p")  # fmt: skip
    assert "user,id=net0,hostfwd=tcp:127.0.0.1:20022-:22" in build_argv(cfg)  # the local default
    wide = QemuConfig(**{**cfg.__dict__, "bind_addr": "0.0.0.0"})
    assert "user,id=net0,hostfwd=tcp:0.0.0.0:20022-:22" in build_argv(wide)


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:8730") == ("127.0.0.1", 8730)
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_listen("[::]:9000") == ("::", 9000)
    assert parse_listen("tt.example") == ("tt.example", 8730)
    for bad in ("host:0", "host:x", "host:70000"):
        with pytest.raises(UsageError, match="bad port"):
            parse_listen(bad)
    assert forward_addr("0.0.0.0") == forward_addr("::") == "0.0.0.0"
    assert forward_addr("localhost") == "127.0.0.1"
    with pytest.raises(UsageError, match="IPv4"):
        forward_addr("::1")


def test_quota_reservations_never_exceed_under_contention() -> None:
    live: dict[str, Amounts] = {}
    lock = threading.Lock()
    quota = Quota(Amounts(4, 1024, 10000), lambda: dict(live))
    peak: list[Amounts] = []
    refused = 0

    def worker(i: int) -> None:
        nonlocal refused
        for j in range(20):
            key = f"o:{i}-{j}"
            try:
                with quota.reserve(key, Amounts(1, 256, 100), key):
                    time.sleep(random.random() / 1000)
                    with lock:
                        live[key] = Amounts(1, 256, 100)
                    peak.append(quota.used())
            except QuotaError as exc:
                assert exc.free["cpu"] == 0 or exc.free["mem_mib"] < 256
                refused += 1
                continue
            time.sleep(random.random() / 1000)
            with lock:
                del live[key]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak and all(p.fits(quota.totals) for p in peak)
    assert refused > 0 and quota.used() == Amounts()
    with quota.reserve("o:x", Amounts(1, 1, 1), "x"), pytest.raises(Conflict, match="exists already"):
        with quota.reserve("o:x", Amounts(1, 1, 1), "x"):
            pass


# -- one server for the module ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(images: Callable[..., list[ImageInfo]]) -> ImageInfo:
    (img,) = images("debian-12")
    return img


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, image: ImageInfo) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    server = start_server(tmp, image_dir_with(tmp / "images", [image]),
                          options=["--cpu-total", "4", "--mem-total", "2048", "--disk-total", "100000"])  # fmt: skip
    try:
        yield server
    finally:
        server.cleanup()


def ttenv(*args: str, state: Path | None = None, timeout: float = 900, token: str | None = None,
          ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    extra = ({"TTENV_STATE_DIR": str(state)} if state else {}) | ({"TTENV_TOKEN": token} if token else {})
    res = subprocess.run([sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True,
                         env=env_vars(**extra), timeout=timeout)  # fmt: skip
    print(f"$ ttenv {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


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
    res = ttenv("env", "add", "SHARED", "--os-prefix", "debian12", "--arch", HOST_ARCH, "--cpu", "1", "--mem", "256",
                "--ttl", "3600", "--boot-timeout", "900", "--backend", srv.url, state=client_state,
                token=srv.tokens["alice"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"{IMAGE}: ready - ssh up after" in res.stdout
    return "SHARED"


def raw(srv: Server, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
        owner: str | None = "alice") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request with exactly this path and body (no client-side normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        hdrs = {**(srv.headers(owner) if owner else {}), **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs, encode_chunked="Transfer-Encoding" in hdrs)
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


def error_of(status: int, data: bytes) -> dict[str, Any]:
    body = json.loads(data)
    assert set(body) >= {"error", "message", "hint", "console"}, body
    assert "\n" not in body["message"] and "Traceback" not in body["message"]
    return dict(body)


def create_body(**fields: Any) -> bytes:
    """A valid create request with ``fields`` replaced or added."""
    body = {"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB} | fields
    return json.dumps(body).encode()


# -- auth ---------------------------------------------------------------------------------------------
ENDPOINTS = [
    ("GET", "/v1/status"), ("GET", "/v1/images"), ("GET", "/v1/envs"), ("POST", "/v1/envs"),
    ("GET", "/v1/envs/x"), ("DELETE", "/v1/envs/x"), ("POST", "/v1/envs/x/renew"), ("POST", "/v1/envs/x/keep"),
    ("POST", "/v1/envs/x/vms/y/wait"), ("POST", "/v1/envs/x/vms/y/snapshots"),
    ("POST", "/v1/envs/x/vms/y/snapshots/s/revert"), ("GET", "/v1/envs/x/vms/y/console"), ("GET", "/v1/nothing"),
]  # fmt: skip


def test_only_the_openapi_document_is_public(srv: Server) -> None:
    status, _, data = raw(srv, "GET", "/v1/openapi.json", owner=None)
    doc = json.loads(data)
    assert status == 200 and doc["openapi"].startswith("3.") and "/v1/envs/{env}/vms/{vm}/wait" in doc["paths"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for method, path in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 43}, {"Authorization": "Basic YWxpY2U6cHc="},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {srv.tokens['alice']}x"}):  # fmt: skip
            status, hdrs, data = raw(srv, method, path, body=b'{"ttl": 5}', owner=None,
                                     headers={**headers, "Content-Type": "application/json"})  # fmt: skip
            assert status == 401, (method, path, headers, data)
            assert error_of(status, data)["error"] == "auth" and hdrs["www-authenticate"] == "Bearer"


def test_token_cli_add_list_rm(srv: Server) -> None:
    add = ttenv("token", "add", "carol", "--state-dir", str(srv.state))
    assert add.returncode == 0 and "shown once" in add.stderr
    token = add.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert requests.get(f"{srv.url}/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=30).ok
    listing = ttenv("token", "list", "--state-dir", str(srv.state))
    assert "carol" in listing.stdout and "alice" in listing.stdout and token not in listing.stdout
    assert token.encode() not in (srv.state / "tokens.sqlite").read_bytes()  # only its hash is kept
    assert (srv.state / "tokens.sqlite").stat().st_mode & 0o777 == 0o600
    again = ttenv("token", "add", "carol", "--state-dir", str(srv.state))
    assert again.returncode == 2 and "exists already" in again.stderr
    assert ttenv("token", "rm", "carol", "--state-dir", str(srv.state)).returncode == 0
    revoked = requests.get(f"{srv.url}/v1/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert revoked.status_code == 401
    gone = ttenv("token", "rm", "carol", "--state-dir", str(srv.state))
    assert gone.returncode == 2 and "no token named 'carol'" in gone.stderr


def test_wrong_token_through_the_client_is_one_clear_line(srv: Server) -> None:
    with pytest.raises(UsageError, match=r"token rejected by the ttenv server at http://127\.0\.0\.1:"):
        HttpBackend(srv.url, "x" * 43).list_envs()
    res = ttenv("env", "list", "--backend", srv.url, token="y" * 43)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_unreachable_server_is_one_line_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    res = ttenv("env", "list", "--backend", url, token="t" * 43)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"ttenv: error: cannot reach the ttenv server at {url}: connection refused "
                                  "(check the URL and that `ttenv serve` runs there)")  # fmt: skip
    status = ttenv("status", "--server", "--backend", url)
    assert status.returncode == 1 and url in status.stderr and len(status.stderr.splitlines()) == 1


# -- bodies ---------------------------------------------------------------------------------------------
def test_oversize_bodies_are_413(srv: Server) -> None:
    big = json.dumps({"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": "x" * 100_000}).encode()
    hdrs = {"Content-Type": "application/json"}
    status, _, data = raw(srv, "POST", "/v1/envs", big, hdrs)
    assert status == 413 and error_of(status, data)["error"] == "too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds for a streamed body too
        for _ in range(100):
            yield b" " * 1024

    status, _, data = raw(srv, "POST", "/v1/envs", chunks(), {**hdrs, "Transfer-Encoding": "chunked"})
    assert status == 413 and error_of(status, data)["error"] == "too_large"
    status, _, data = raw(srv, "POST", "/v1/envs/x/renew", b"{" + b" " * 70_000 + b"}", hdrs)
    assert status == 413
    fits = json.dumps({"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB,
                       "pad": " " * 60_000}).encode()  # fmt: skip
    status, _, data = raw(srv, "POST", "/v1/envs", fits, hdrs)
    assert status == 422 and "pad" in error_of(status, data)["message"]  # read and judged, not cut off
    assert requests.get(f"{srv.url}/v1/status", headers=srv.headers(), timeout=30).ok


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/envs", b"{bad"),
        ("POST", "/v1/envs", b""),
        ("POST", "/v1/envs", b"[]"),
        ("POST", "/v1/envs", b'{"name": 5, "vms": [], "client_pubkey": "k"}'),
        ("POST", "/v1/envs", create_body(owner="bob")),
        ("POST", "/v1/envs", create_body(client_pubkey=PUB + "\nssh-ed25519 AAAA other")),
        ("POST", "/v1/envs", create_body(vms=[{"name": "v", "image": IMAGE, "resources": {"cpu": 0}}])),
        ("POST", "/v1/envs", create_body(vms=[{"name": "v", "image": IMAGE, "resources": {"mem_mib": 64}}])),
        ("POST", "/v1/envs", create_body(vms=[])),
        ("POST", "/v1/envs", create_body(ttl=0)),
        ("POST", "/v1/envs/x/renew", b'{"ttl": -1}'),
        ("POST", "/v1/envs/x/renew", b'{"ttl": "soon"}'),
        ("POST", "/v1/envs/x/renew", b'{"ttl": 1e308}'),
        ("POST", "/v1/envs/x/keep", b"null"),
        ("POST", "/v1/envs/x/vms/y/snapshots", b'{"name": "../../../tmp/evil"}'),
        ("GET", "/v1/envs/x/vms/y/console?tail=0", None),
        ("GET", "/v1/envs/x/vms/y/console?tail=abc", None),
        ("GET", "/v1/envs/x/vms/y/console?tail=5000", None),
        ("POST", "/v1/envs/x/vms/y/wait?timeout=-1", None),
    ],
    ids=lambda v: None if not isinstance(v, bytes) else f"body{len(v)}",  # stable ids: bodies hold a random key
)
def test_malformed_requests_are_422(srv: Server, method: str, path: str, body: bytes | None) -> None:
    status, _, data = raw(srv, method, path, body, {"Content-Type": "application/json"})
    assert status == 422, data
    err = error_of(status, data)
    assert err["error"] == "usage" and err["message"].startswith("bad request: ")


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
    for body in ({"name": "../../x", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB},
                 {"name": "E", "vms": [{"name": "../../../etc", "image": IMAGE}], "client_pubkey": PUB},
                 {"name": "E", "vms": [{"name": "v", "image": "../../../../etc"}], "client_pubkey": PUB},
                 {"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB, "ttl": 5,
                  "accel": "kvm; rm -rf /"}):  # fmt: skip
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
    for call in (lambda: bob.show_env(shared), lambda: bob.show_env(env.id), lambda: bob.delete_env(env.id),
                 lambda: bob.renew(shared, 60), lambda: bob.keep(env.id, 60), lambda: bob.wait_vm(env.id, vm, 5),
                 lambda: bob.console(env.id, vm), lambda: bob.snapshot(env.id, vm, "s"),
                 lambda: bob.revert(env.id, vm, "s")):  # fmt: skip
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
    status, _, data = raw(srv, "POST", "/v1/envs", json.dumps(
        {"name": "BIG", "vms": [{"name": f"v{i}", "image": IMAGE} for i in range(4)], "client_pubkey": PUB}),
        {"Content-Type": "application/json"})  # fmt: skip
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
    server = start_server(tmp_path, image_dir_with(tmp_path / "images", [image]), owners=owners,
                          options=["--cpu-total", "4", "--mem-total", "1024", "--disk-total", "100000",
                                   "--log-level", "warning"])  # fmt: skip
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
