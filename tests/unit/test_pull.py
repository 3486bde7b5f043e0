"""``ttenv image pull`` against a real HTTP server on 127.0.0.1 serving real images (qemu-img).

The server supports byte ranges and can be told to cut a connection after N bytes, answer
404, or stall past the client's timeout; it logs every request so resume can be checked
from the server's side (Range asked for, bytes actually sent).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pytest_ttenv.backend.images.catalog import load_catalog
from pytest_ttenv.backend.images.checksums import find_checksum
from pytest_ttenv.backend.images.pull import ensure_available, pull, pullable_names
from pytest_ttenv.backend.images.store import ImageStore
from pytest_ttenv.errors import NotFound, TTError

from helpers.leftovers import leftovers as vm_leftovers

pytestmark = pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img not installed")

MIB = 1 << 20


# -- the server ---------------------------------------------------------------------------------
@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)  # path -> close after this many body bytes (once)
    stall: dict[str, float] = field(default_factory=dict)  # path -> seconds to wait before answering
    trickle: dict[str, int] = field(default_factory=dict)  # path -> go silent after this many body bytes (once)
    log: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def requests_for(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["path"] == path]


pytest_plugins = ["pytester"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        st = self.server.state
        path = self.path
        entry: dict[str, Any] = {"path": path, "range": self.headers.get("Range"), "status": 0, "sent": 0}
        st.log.append(entry)
        if path in st.stall:
            st.stop.wait(st.stall[path])
            return
        data = st.files.get(path)
        if data is None:
            entry["status"] = 404
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        m = re.match(r"^bytes=(\d+)-$", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        if m and (if_range is None or if_range == etag):
            start = int(m.group(1))
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            entry["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            entry["status"] = 200
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        limit = st.cut.pop(path, None)
        if limit is not None:
            self.wfile.write(body[:limit])
            self.wfile.flush()
            entry["sent"] = limit
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        limit = st.trickle.pop(path, None)
        if limit is not None:
            self.wfile.write(body[:limit])
            self.wfile.flush()
            entry["sent"] = limit
            st.stop.wait(30)
            return
        self.wfile.write(body)
        entry["sent"] = len(body)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: Served) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(Served())
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.state.stop.set()
        srv.shutdown()
        srv.server_close()


# -- real images --------------------------------------------------------------------------------
def make_raw(path: Path, mib: int = 16, data_mib: int = 3) -> bytes:
    """A sparse raw disk with ``data_mib`` of random data spread over it."""
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
        for i in range(data_mib):
            f.seek(i * 5 * MIB)
            f.write(os.urandom(MIB))
    return path.read_bytes()


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("disks")
    raw = make_raw(d / "disk.raw")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(d / "disk.raw"), str(d / "disk.qcow2")], check=True
    )
    return {"raw": raw, "qcow2": (d / "disk.qcow2").read_bytes(), "raw.xz": lzma.compress(raw, preset=0)}


def catalog_yaml(entries: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"schema": 1, "version": "test-1", "entries": entries})  # JSON is YAML


def entry(
    os_name: str,
    version: str,
    file: str,
    *,
    fmt: str = "qcow2",
    checksum: str = "SHA256SUMS",
    ck_format: str = "sums",
    alg: str = "sha256",
    base: str = "",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "os": os_name,
        "version": version,
        "user": "tester",
        "mirror": base,
        "arches": {"x86_64": {}, "aarch64": {}},
        "url": "{mirror}/" + file,
        "checksum": {"url": "{mirror}/" + checksum, "format": ck_format, "hash": alg},
        "format": fmt,
        **extra,
    }


def serve_image(
    srv: Server,
    tmp_path: Path,
    data: bytes,
    file: str = "img.qcow2",
    fmt: str = "qcow2",
    digest: str | None = None,
    alg: str = "sha256",
) -> Path:
    """Serve ``data`` as /<file> with a SHA256SUMS-style list; write a catalog for it; return its path."""
    srv.state.files[f"/{file}"] = data
    digest = digest or hashlib.new(alg, data).hexdigest()
    srv.state.files["/SHA256SUMS"] = f"{'0' * len(digest)} *other.img\n{digest} *{file}\n".encode()
    path = tmp_path / "catalog.yaml"
    ent = entry("testos", "1.0", file, fmt=fmt, alg=alg, base=srv.base)
    path.write_text(catalog_yaml({"testos-1.0": ent}))
    return path


def visible(store: ImageStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if not p.name.startswith("."))


def leftovers(store: ImageStore) -> list[str]:
    """Anything a failed pull could leave: work dirs, partial downloads (lock files are fine)."""
    found = [p.name for p in store.root.iterdir() if p.name.startswith(".pull-")]
    partial = store.root / ".partial"
    if partial.is_dir():
        found += [p.name for p in partial.iterdir() if not p.name.endswith(".lock")]
    return sorted(found)


# -- library: success, resume, mismatch, errors -------------------------------------------------
def test_pull_installs_verified_image(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"]))
    store = ImageStore(tmp_path / "images")
    lines: list[str] = []
    info = pull(store, "testos-1.0-x86_64", lines.append, catalog=cat, timeout=5)
    assert store.names() == ["testos-1.0-x86_64"] and visible(store) == ["testos-1.0-x86_64"]
    assert info.file("disk.qcow2").read_bytes() == disks["qcow2"]  # a qcow2 is moved in, unchanged
    assert (info.os, info.version, info.arch, info.user, info.boot) == ("testos", "1.0", "x86_64", "tester", "bios")
    assert (info.access, info.source, info.kernel, info.initrd, info.disk_mib) == ("cloud-init", "pull", None, None, 16)
    assert info.details["url"] == f"{server.base}/img.qcow2"
    assert info.details["sha256"] == hashlib.sha256(disks["qcow2"]).hexdigest()
    assert info.details["catalog"] == cat.version
    assert leftovers(store) == []
    assert any("verifying the sha256 checksum" in line for line in lines)
    # the checksum list was fetched before the image, and the image once, whole
    assert [r["path"] for r in server.state.log] == ["/SHA256SUMS", "/img.qcow2"]
    assert server.state.log[1]["range"] is None and server.state.log[1]["sent"] == len(disks["qcow2"])
    aarch64 = pull(store, "testos-1.0", lambda line: None, catalog=cat, arch="aarch64", timeout=5)
    assert aarch64.boot == "uefi" and store.names() == ["testos-1.0-aarch64", "testos-1.0-x86_64"]


def test_pull_new_arches_by_their_vendor_names(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    """ppc64le and s390x images laid out as Debian and Ubuntu publish them (the vendor's arch name
    ppc64el in the file name, a variant per arch, one SHA512SUMS for all): asked for by an alias,
    fetched by the vendor's file name, installed under the canonical name, booting with the
    machine's own firmware (SLOF, the s390-ccw loader)."""
    data = disks["qcow2"]
    digest = hashlib.sha512(data).hexdigest()
    files = [
        "testos-1.0-genericcloud-amd64.qcow2",
        "testos-1.0-generic-ppc64el.qcow2",
        "testos-1.0-generic-s390x.qcow2",
    ]
    for file in files:
        server.state.files[f"/latest/{file}"] = data
    server.state.files["/latest/SHA512SUMS"] = "".join(f"{digest}  {file}\n" for file in files).encode()
    ent = {
        "os": "testos",
        "version": "1.0",
        "user": "tester",
        "mirror": server.base,
        "vars": {"variant": "genericcloud"},
        "arches": {
            "x86_64": {"vendor_arch": "amd64"},
            "ppc64le": {"vendor_arch": "ppc64el", "vars": {"variant": "generic"}},
            "s390x": {"vars": {"variant": "generic"}},
        },
        "url": "{mirror}/latest/{os}-{version}-{variant}-{vendor_arch}.qcow2",
        "checksum": {"url": "{mirror}/latest/SHA512SUMS", "format": "sums", "hash": "sha512"},
        "format": "qcow2",
    }
    path = tmp_path / "catalog.yaml"
    path.write_text(catalog_yaml({"testos-1.0": ent}))
    cat = load_catalog(path)
    assert pullable_names(["ppc64el", "s390x"], cat) == ["testos-1.0-ppc64le", "testos-1.0-s390x"]
    store = ImageStore(tmp_path / "images")
    power = pull(store, "testos-1.0", lambda line: None, catalog=cat, arch="ppc64el", timeout=5)
    assert (power.name, power.arch, power.boot, power.source) == ("testos-1.0-ppc64le", "ppc64le", "bios", "pull")
    assert power.details["url"] == f"{server.base}/latest/testos-1.0-generic-ppc64el.qcow2"
    assert power.details["sha512"] == digest and power.file("disk.qcow2").read_bytes() == data
    assert [r["path"] for r in server.state.log] == ["/latest/SHA512SUMS", "/latest/testos-1.0-generic-ppc64el.qcow2"]

    res = ttenv(tmp_path, path, "image", "pull", "testos-1.0-s390x")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "pulled testos-1.0-s390x" in res.stdout
    z = ImageStore(tmp_path / "images").get("testos-1.0-s390x")
    assert (z.arch, z.boot, z.details["url"]) == (
        "s390x",
        "bios",
        f"{server.base}/latest/testos-1.0-generic-s390x.qcow2",
    )
    res = ttenv(tmp_path, path, "image", "list", "--available")
    assert re.search(r"testos-1.0-ppc64le\s+pulled\s+tester\s+bios\s+qcow2", res.stdout), res.stdout
    assert re.search(r"testos-1.0-x86_64\s+-\s+tester\s+bios\s+qcow2", res.stdout), res.stdout
    assert store.names() == ["testos-1.0-ppc64le", "testos-1.0-s390x"] and leftovers(store) == []


def test_cut_connection_then_rerun_resumes_with_range(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    data = disks["qcow2"]
    cat = load_catalog(serve_image(server, tmp_path, data))
    store = ImageStore(tmp_path / "images")
    server.state.cut["/img.qcow2"] = MIB
    with pytest.raises(TTError) as err:
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg and f"download of {server.base}/img.qcow2 cut after 1.0 of" in msg and "rerun" in msg
    assert store.names() == [] and visible(store) == []
    assert (store.root / ".partial" / "testos-1.0-x86_64.part").stat().st_size == MIB
    pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    gets = server.state.requests_for("/img.qcow2")
    assert [(g["range"], g["status"], g["sent"]) for g in gets] == [
        (None, 200, MIB),
        (f"bytes={MIB}-", 206, len(data) - MIB),
    ]
    assert store.get("testos-1.0-x86_64").file("disk.qcow2").read_bytes() == data
    assert leftovers(store) == []


def test_changed_file_on_server_is_fetched_whole(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    """If-Range: a partial download of an older file is not glued to the new one."""
    cat = load_catalog(serve_image(server, tmp_path, disks["raw"], file="img.qcow2"))
    store = ImageStore(tmp_path / "images")
    server.state.cut["/img.qcow2"] = MIB
    with pytest.raises(TTError):
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    serve_image(server, tmp_path, disks["qcow2"])  # the vendor published a new build meanwhile
    pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    second = server.state.requests_for("/img.qcow2")[1]
    assert second["range"] == f"bytes={MIB}-" and second["status"] == 200
    assert store.get("testos-1.0-x86_64").file("disk.qcow2").read_bytes() == disks["qcow2"]


def test_checksum_mismatch_is_refused_and_nothing_left(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"], digest="ab" * 32))
    store = ImageStore(tmp_path / "images")
    with pytest.raises(TTError) as err:
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    actual = hashlib.sha256(disks["qcow2"]).hexdigest()
    assert str(err.value).startswith(
        f"checksum mismatch for {server.base}/img.qcow2: expected sha256 {'ab' * 32}, "
        f"got {actual} (the download was deleted"
    )
    assert store.names() == [] and visible(store) == [] and leftovers(store) == []


def test_mismatch_after_resume_restarts_once(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    """A server without validators: the resumed file is a mix, the checksum catches it, one clean retry."""
    cat = load_catalog(serve_image(server, tmp_path, disks["raw"]))
    store = ImageStore(tmp_path / "images")
    server.state.cut["/img.qcow2"] = MIB
    with pytest.raises(TTError):
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    meta = store.root / ".partial" / "testos-1.0-x86_64.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "etag": None}))  # as if the server sent none
    serve_image(server, tmp_path, disks["qcow2"])
    lines: list[str] = []
    pull(store, "testos-1.0-x86_64", lines.append, catalog=cat, timeout=5)
    assert [g["range"] for g in server.state.requests_for("/img.qcow2")] == [None, f"bytes={MIB}-", None]
    assert any("downloading it again" in line for line in lines)
    assert store.get("testos-1.0-x86_64").file("disk.qcow2").read_bytes() == disks["qcow2"]


def test_xz_raw_is_converted_to_qcow2(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["raw.xz"], file="img.raw.xz", fmt="raw.xz", alg="sha512"))
    store = ImageStore(tmp_path / "images")
    info = pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    disk = info.file("disk.qcow2")
    assert (
        json.loads(
            subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, check=True).stdout
        )["format"]
        == "qcow2"
    )
    raw = tmp_path / "expected.raw"
    raw.write_bytes(disks["raw"])
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(disk)]).returncode == 0
    assert info.disk_mib == 16 and info.details["sha512"] == hashlib.sha512(disks["raw.xz"]).hexdigest()
    assert [p.name for p in info.path.iterdir()] == ["disk.qcow2", "image.json"] if info.path else False
    assert leftovers(store) == []


def test_404_is_one_line(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"]))
    del server.state.files["/img.qcow2"]
    store = ImageStore(tmp_path / "images")
    with pytest.raises(TTError) as err:
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    assert str(err.value).startswith(f"cannot download {server.base}/img.qcow2: HTTP 404 Not Found (the vendor moved")
    del server.state.files["/SHA256SUMS"]
    with pytest.raises(TTError, match=r"^cannot fetch the checksum file .*/SHA256SUMS: HTTP 404"):
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    assert leftovers(store) == [] and visible(store) == []


def test_stall_times_out_as_one_line(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"]))
    server.state.stall["/img.qcow2"] = 30
    started = time.monotonic()
    with pytest.raises(TTError) as err:
        pull(ImageStore(tmp_path / "images"), "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=0.5)
    assert time.monotonic() - started < 10
    host = server.base.removeprefix("http://")
    assert str(err.value) == (
        f"cannot download {server.base}/img.qcow2: no answer from {host} within 0.5 s (the "
        "server or the network stalled; rerun to resume, or raise --timeout)"
    )


def test_stall_mid_download_then_resume(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"]))
    store = ImageStore(tmp_path / "images")
    server.state.trickle["/img.qcow2"] = MIB
    with pytest.raises(TTError) as err:
        pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=0.5)
    total = len(disks["qcow2"]) / MIB
    assert str(err.value) == (
        f"download of {server.base}/img.qcow2 stalled after 1.0 of {total:.1f} MiB: nothing "
        "received for 0.5 s (rerun to resume from 1.0 MiB, or raise --timeout)"
    )
    pull(store, "testos-1.0-x86_64", lambda line: None, catalog=cat, timeout=5)
    assert [g["range"] for g in server.state.requests_for("/img.qcow2")] == [None, f"bytes={MIB}-"]


def test_unwritable_store_is_one_line(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"]))
    (tmp_path / "images").write_text("a file where the store should be")
    with pytest.raises(TTError) as err:
        pull(ImageStore(tmp_path / "images"), "testos-1.0-x86_64", lambda line: None, catalog=cat)
    assert str(err.value).startswith(f"cannot pull image testos-1.0-x86_64 into {tmp_path / 'images'}: ")
    assert server.state.log == []


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    base = f"http://127.0.0.1:{port}"
    path = tmp_path / "catalog.yaml"
    path.write_text(catalog_yaml({"testos-1.0": entry("testos", "1.0", "img.qcow2", base=base)}))
    with pytest.raises(TTError) as err:
        pull(ImageStore(tmp_path / "images"), "testos-1.0-x86_64", lambda line: None, catalog=load_catalog(path))
    assert str(err.value).startswith(
        f"cannot fetch the checksum file {base}/SHA256SUMS: connection refused by 127.0.0.1:{port} (is the server up?"
    )


def test_ensure_available_pulls_only_what_is_missing(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = load_catalog(serve_image(server, tmp_path, disks["qcow2"]))
    store = ImageStore(tmp_path / "images")
    assert pullable_names(["x86_64"], catalog=cat) == ["testos-1.0-x86_64"]
    got = ensure_available(store, ["testos-1.0-x86_64"], lambda line: None, catalog=cat, timeout=5)
    assert [i.name for i in got] == ["testos-1.0-x86_64"]
    ensure_available(store, ["testos-1.0-x86_64"], lambda line: None, catalog=cat, timeout=5)
    assert len(server.state.requests_for("/img.qcow2")) == 1
    with pytest.raises(NotFound, match=r"image\(s\) nope-1-x86_64 not in .* and not in the catalog"):
        ensure_available(store, ["nope-1-x86_64"], lambda line: None, catalog=cat)


# -- checksum file formats (vendor-shaped samples) ----------------------------------------------
H256, H512 = "a" * 64, "b" * 128


def test_checksum_formats() -> None:
    ubuntu = f"{'c' * 64} *ubuntu-24.04-server-cloudimg-arm64.img\n{H256} *ubuntu-24.04-server-cloudimg-amd64.img\n"
    assert find_checksum(ubuntu, "sums", "sha256", "ubuntu-24.04-server-cloudimg-amd64.img") == H256
    debian = f"{'d' * 128}  debian-12-genericcloud-arm64.qcow2\n{H512}  debian-12-genericcloud-amd64.qcow2\n"
    assert find_checksum(debian, "sums", "sha512", "debian-12-genericcloud-amd64.qcow2") == H512
    fedora = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# Fedora-Cloud-Base-Generic-42-1.1.x86_64.qcow2: "
        f"123 bytes\nSHA256 (Fedora-Cloud-Base-Generic-42-1.1.x86_64.qcow2) = {H256.upper()}\n"
        "-----BEGIN PGP SIGNATURE-----\n\nxxxx\n-----END PGP SIGNATURE-----\n"
    )
    assert find_checksum(fedora, "bsd", "sha256", "Fedora-Cloud-Base-Generic-42-1.1.x86_64.qcow2") == H256
    # a sidecar names the dated file behind the "latest" link; a bare digest is fine too
    rocky = f"SHA256 (Rocky-9-GenericCloud-Base-9.6-20250531.0.x86_64.qcow2) = {H256}\n"
    assert find_checksum(rocky, "sidecar", "sha256", "Rocky-9-GenericCloud-Base.latest.x86_64.qcow2") == H256
    assert find_checksum(f"{H512}\n", "sidecar", "sha512", "x.qcow2") == H512
    doc = json.dumps({"images": {"x.qcow2": {"sha256": f"sha256:{H256}"}}})
    assert find_checksum(doc, "json", "sha256", "x.qcow2", "/images/x.qcow2/sha256") == H256
    for text, fmt, key, message in [
        (ubuntu, "sums", None, "has no sha256 entry for x.img"),
        (f"{H256}  a.img\n{'c' * 64}  b.img\n", "sidecar", None, "has no sha256 entry for x.img"),
        (doc, "json", "/images/y/sha256", "has nothing at /images/y/sha256"),
        ("<html>", "json", "/a", "is not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            find_checksum(text, fmt, "sha256", "x.img", key)


def test_json_checksum_end_to_end(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    data = disks["qcow2"]
    server.state.files["/img.qcow2"] = data
    server.state.files["/img.json"] = json.dumps({"sha256": hashlib.sha256(data).hexdigest()}).encode()
    path = tmp_path / "catalog.yaml"
    ent = entry("testos", "1.0", "img.qcow2", checksum="img.json", ck_format="json", base=server.base)
    ent["checksum"]["key"] = "/sha256"
    path.write_text(catalog_yaml({"testos-1.0": ent}))
    info = pull(ImageStore(tmp_path / "images"), "testos-1.0-x86_64", lambda line: None, catalog=load_catalog(path))
    assert info.details["sha256"] == hashlib.sha256(data).hexdigest()


# -- CLI ----------------------------------------------------------------------------------------
def ttenv(tmp_path: Path, catalog: Path | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TTENV_STATE_DIR=str(tmp_path / "state"), TTENV_IMAGE_DIR=str(tmp_path / "images"))
    env.pop("TTENV_CATALOG", None)
    if catalog:
        env["TTENV_CATALOG"] = str(catalog)
    return subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def one_error_line(res: subprocess.CompletedProcess[str], code: int, starts: str) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttenv: error: " + starts), res.stderr
    return lines[0]


def test_cli_pull_list_and_errors(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = serve_image(server, tmp_path, disks["qcow2"])
    res = ttenv(tmp_path, cat, "image", "pull", "testos-1.0", "--arch", "x86_64")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "pulled testos-1.0-x86_64" in res.stdout
    assert "\r" not in res.stdout  # no progress bar when stdout is not a terminal
    res = ttenv(tmp_path, cat, "image", "list")
    assert re.search(r"^testos-1.0-x86_64 .* tester +bios +pull ", res.stdout, re.MULTILINE), res.stdout
    res = ttenv(tmp_path, cat, "image", "list", "--available")
    assert res.returncode == 0, res.stderr
    assert re.search(r"testos-1.0-x86_64\s+pulled\s+tester\s+bios\s+qcow2", res.stdout), res.stdout
    assert re.search(r"testos-1.0-aarch64\s+-\s+tester\s+uefi\s+qcow2", res.stdout), res.stdout

    server.state.files.pop("/img.qcow2")
    one_error_line(
        ttenv(tmp_path, cat, "image", "pull", "testos-1.0-aarch64"),
        1,
        f"cannot download {server.base}/img.qcow2: HTTP 404 Not Found",
    )
    server.state.files["/img.qcow2"] = disks["qcow2"]
    server.state.stall["/img.qcow2"] = 30
    one_error_line(
        ttenv(tmp_path, cat, "image", "pull", "testos-1.0-aarch64", "--timeout", "0.5"),
        1,
        f"cannot download {server.base}/img.qcow2: no answer from",
    )
    one_error_line(ttenv(tmp_path, cat, "image", "pull", "debian-12"), 2, "'debian-12' is not in the catalog")
    one_error_line(
        ttenv(tmp_path, tmp_path / "missing.yaml", "image", "pull", "x"),
        2,
        f"cannot read catalog {tmp_path / 'missing.yaml'} (from TTENV_CATALOG)",
    )
    assert visible(ImageStore(tmp_path / "images")) == ["testos-1.0-x86_64"]


def test_cli_cut_then_rerun_resumes(server: Server, tmp_path: Path, disks: dict[str, bytes]) -> None:
    cat = serve_image(server, tmp_path, disks["qcow2"])
    server.state.cut["/img.qcow2"] = 2 * MIB
    one_error_line(
        ttenv(tmp_path, cat, "image", "pull", "testos-1.0-x86_64"),
        1,
        f"download of {server.base}/img.qcow2 cut after 2.0 of",
    )
    res = ttenv(tmp_path, cat, "image", "pull", "testos-1.0-x86_64")
    assert res.returncode == 0, res.stderr
    assert "resuming at 2.0 MiB" in res.stdout
    assert [g["range"] for g in server.state.requests_for("/img.qcow2")] == [None, f"bytes={2 * MIB}-"]


def test_builtin_catalog_in_cli(tmp_path: Path) -> None:
    res = ttenv(tmp_path, None, "image", "list", "--available")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"catalog {load_catalog(None).version} (built-in catalog)")
    for name in ("ubuntu-24.04", "debian-13", "fedora-44", "alpine-3.24", "freebsd-14.4"):
        assert re.search(rf"^  {re.escape(name)}-(x86_64|aarch64) ", res.stdout, re.MULTILINE), name


def test_plugin_pulls_a_missing_catalog_image_on_first_use(
    server: Server, tmp_path: Path, disks: dict[str, bytes], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tt-os=testos`` with the image only in the catalog: the plugin pulls it (progress shown)
    before the session's ENV is created. The served disk has no boot loader, so its VM cannot
    answer SSH: the test instance errors after the (short) boot timeout, and nothing is left."""
    catalog = serve_image(server, tmp_path, disks["qcow2"])
    images, state = tmp_path / "images", tmp_path / "state"
    monkeypatch.setenv("TTENV_CATALOG", str(catalog))
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(images))
    monkeypatch.setenv("TTENV_STATE_DIR", str(state))
    pytester.makepyfile("def test_on_vm(tt_vm):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--tt-os=testos",
        "--tt-arch=x86_64",
        "--tt-boot-timeout=3",
        "--tt-accel=tcg",
        "--tt-boot=cold",  # a cloud-init image would start warm: its template VM would fail to boot first
        timeout=300,
    )
    out = result.stdout.str()
    assert "ttenv: " in out and "testos-1.0-x86_64" in out
    assert ImageStore(images).names() == ["testos-1.0-x86_64"]
    assert ImageStore(images).get("testos-1.0-x86_64").source == "pull"
    result.assert_outcomes(errors=1)
    assert "VM testos-1.0-x86_64 did not answer SSH within 3 s" in out
    assert vm_leftovers(state) == []
