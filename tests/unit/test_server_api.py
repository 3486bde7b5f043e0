"""The host server's API without VMs: listen and forward addresses, quota reservations under
contention, auth (only the OpenAPI document is public), the token CLI, a wrong token or an
unreachable server as one clear line, body limits and malformed requests. The server is a real
``ttenv serve`` subprocess on 127.0.0.1 (raw ``http.client`` where the exact bytes on the wire
matter) with an empty image dir: every request here is refused or answered before an image or a VM
would be needed.

With VMs (names and paths, owners, quotas, leases, many clients, restarts): tests/vm/test_server.py.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pytest_ttenv.backend.engines.qemu import QemuConfig, build_argv
from pytest_ttenv.backend.http import HttpBackend
from pytest_ttenv.core.keys import KeyPair
from pytest_ttenv.core.model import Resources
from pytest_ttenv.errors import QuotaError, UsageError
from pytest_ttenv.server.errors import Conflict
from pytest_ttenv.server.quota import Amounts, Quota
from pytest_ttenv.server.serve import forward_addr, parse_listen

from conftest import HOST_ARCH
from helpers.server import Server, error_of, free_port, raw, start_server, ttenv

IMAGE = f"debian-12-{HOST_ARCH}"  # named in request bodies; the server has no image
PUB = KeyPair.generate("test-client").public


# -- pure parts -------------------------------------------------------------------------------------
def test_vm_ports_are_forwarded_on_the_bind_address() -> None:
    d = Path("/r")
    cfg = QemuConfig(
        name="E/vm",
        arch="x86_64",
        accel="tcg",
        resources=Resources(1, 256),
        disk=d / "o.qcow2",
        seed=None,
        kernel=None,
        initrd=None,
        cmdline="",
        port=20022,
        console=d / "c",
        qmp=d / "q",
        pidfile=d / "p",
    )
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


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    images = tmp / "images"
    images.mkdir()
    server = start_server(tmp, images, options=["--cpu-total", "4", "--mem-total", "2048", "--disk-total", "100000"])
    try:
        yield server
    finally:
        server.cleanup()


def create_body(**fields: Any) -> bytes:
    """A valid create request with ``fields`` replaced or added."""
    body = {"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB} | fields
    return json.dumps(body).encode()


# -- auth ---------------------------------------------------------------------------------------------
ENDPOINTS = [
    ("GET", "/v1/status"),
    ("GET", "/v1/images"),
    ("GET", "/v1/envs"),
    ("POST", "/v1/envs"),
    ("GET", "/v1/envs/x"),
    ("DELETE", "/v1/envs/x"),
    ("POST", "/v1/envs/x/renew"),
    ("POST", "/v1/envs/x/keep"),
    ("POST", "/v1/envs/x/vms/y/wait"),
    ("POST", "/v1/envs/x/vms/y/snapshots"),
    ("POST", "/v1/envs/x/vms/y/snapshots/s/revert"),
    ("GET", "/v1/envs/x/vms/y/console"),
    ("GET", "/v1/nothing"),
]


def test_only_the_openapi_document_is_public(srv: Server) -> None:
    status, _, data = raw(srv, "GET", "/v1/openapi.json", owner=None)
    doc = json.loads(data)
    assert status == 200 and doc["openapi"].startswith("3.") and "/v1/envs/{env}/vms/{vm}/wait" in doc["paths"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for method, path in ENDPOINTS:
        for headers in (
            {},
            {"Authorization": "Bearer " + "x" * 43},
            {"Authorization": "Basic YWxpY2U6cHc="},
            {"Authorization": "Bearer"},
            {"Authorization": f"Bearer {srv.tokens['alice']}x"},
        ):
            status, hdrs, data = raw(
                srv,
                method,
                path,
                body=b'{"ttl": 5}',
                owner=None,
                headers={**headers, "Content-Type": "application/json"},
            )
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
    assert res.stderr.strip() == (
        f"ttenv: error: cannot reach the ttenv server at {url}: connection refused "
        "(check the URL and that `ttenv serve` runs there)"
    )
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
    fits = json.dumps(
        {"name": "E", "vms": [{"name": "v", "image": IMAGE}], "client_pubkey": PUB, "pad": " " * 60_000}
    ).encode()
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
