"""Tokens and TLS (issue 16): ``ttenv serve --tls-cert/--tls-key`` serves https, clients verify it
against ``--ca-cert`` / ``--tt-ca-cert`` / ``TTENV_CA_CERT`` (never not at all), and tokens come
from ``TTENV_TOKEN`` or a token file; ``--token``, ``--tt-token`` and ini ``tt_token`` still work
with one deprecation line.

A real ``ttenv serve`` on 127.0.0.1 with a certificate made here for 127.0.0.1; no VM.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pytest_ttenv.config import raw_values, resolve
from pytest_ttenv.errors import UsageError

from helpers.server import Server, env_vars, free_port

pytest_plugins = ["pytester"]

DEPRECATED = "ttenv: warning: --token puts the token in the process list; use TTENV_TOKEN or --token-file"


def make_certs(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ttenv test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = root / "ca.pem", root / "cert.pem", root / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A ttenv serve on https with a request-head (and handshake) deadline of 2 s; token of alice."""
    root = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certs(root)
    (root / "images").mkdir()
    (root / "state").mkdir()
    srv = Server(
        state=root / "state",
        images=root / "images",
        port=free_port(),
        ca=ca,
        options=["--tls-cert", str(cert), "--tls-key", str(key), "--header-timeout", "2"],
    )
    srv.add_token("alice")
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


def ttenv(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args],
        capture_output=True,
        text=True,
        env=env_vars(**env),
        timeout=120,
    )
    print(f"$ ttenv {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def token_file(path: Path, token: str, mode: int) -> Path:
    path.write_text(f"{token}\n# the first line is the token\n")
    path.chmod(mode)
    return path


# -- the server -----------------------------------------------------------------------------------
def test_https_with_the_ca_and_the_token_from_the_environment(tls: Server) -> None:
    assert f"API on https://127.0.0.1:{tls.port}/v1 (OpenAPI: https://127.0.0.1:{tls.port}/v1/openapi.json)" in (
        tls.output()
    )
    res = ttenv("env", "list", "--backend", tls.url, "--ca-cert", str(tls.ca), TTENV_TOKEN=tls.tokens["alice"])
    assert (res.returncode, res.stdout.strip(), res.stderr) == (0, "no ENVs", "")
    via_env = ttenv(
        "status", "--server", "--backend", tls.url, TTENV_TOKEN=tls.tokens["alice"], TTENV_CA_CERT=str(tls.ca)
    )
    assert via_env.returncode == 0 and f"ttenv server {tls.url}: version" in via_env.stdout and not via_env.stderr
    with contextlib.closing(tls.backend("alice")) as backend:
        assert backend.list_envs() == []


def test_without_the_ca_the_certificate_is_refused_in_one_line(tls: Server) -> None:
    res = ttenv("env", "list", "--backend", tls.url, TTENV_TOKEN=tls.tokens["alice"])
    assert res.returncode == 1 and "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith(
        f"ttenv: error: TLS with the ttenv server at {tls.url} failed: certificate verify "
        "failed: unable to get local issuer certificate (a self-signed or private CA's "
        "certificate: give it with --ca-cert"
    )


def test_plain_http_to_the_tls_port_fails_cleanly(tls: Server) -> None:
    url = f"http://127.0.0.1:{tls.port}"
    res = ttenv("env", "list", "--backend", url, TTENV_TOKEN=tls.tokens["alice"])
    assert res.returncode == 1 and "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith(
        f"ttenv: error: cannot reach the ttenv server at {url}: it closed the connection "
        "without an answer (an https server? then use https://)"
    ), res.stderr


def test_https_to_a_plain_server_fails_cleanly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as plain:  # answers TLS with an HTTP error, like uvicorn does
        plain.settimeout(30)
        url = f"https://127.0.0.1:{plain.getsockname()[1]}"
        with subprocess.Popen(
            [sys.executable, "-m", "pytest_ttenv.cli", "env", "list", "--backend", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_vars(TTENV_TOKEN="t" * 43),
        ) as proc:
            try:
                conn, _ = plain.accept()
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                _, err = proc.communicate(timeout=60)
            finally:
                proc.kill()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"ttenv: error: TLS with the ttenv server at {url} failed: ") and "use http://" in err


def test_token_file_and_the_deprecated_token_option(tls: Server, tmp_path: Path) -> None:
    remote = ["--backend", tls.url, "--ca-cert", str(tls.ca)]
    private = token_file(tmp_path / "token", tls.tokens["alice"], 0o600)
    res = ttenv("env", "list", *remote, "--token-file", str(private))
    assert (res.returncode, res.stdout.strip(), res.stderr) == (0, "no ENVs", "")
    via_env = ttenv("env", "list", *remote, TTENV_TOKEN_FILE=str(private))
    assert (via_env.returncode, via_env.stderr) == (0, "")

    shared = token_file(tmp_path / "shared-token", tls.tokens["alice"], 0o644)
    res = ttenv("env", "list", *remote, "--token-file", str(shared))
    assert res.returncode == 0 and res.stdout.strip() == "no ENVs"
    assert res.stderr == f"ttenv: warning: --token-file {shared} can be read by others (mode 0644); chmod 600 it\n"

    old = ttenv("env", "list", *remote, "--token", tls.tokens["alice"])
    assert (old.returncode, old.stdout.strip(), old.stderr) == (0, "no ENVs", DEPRECATED + "\n")

    for bad, message in (
        (tmp_path / "missing", "cannot read it: No such file or directory"),
        (token_file(tmp_path / "empty", "", 0o600), "its first line is empty"),
    ):
        res = ttenv("env", "list", *remote, "--token-file", str(bad))
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"ttenv: error: --token-file '{bad}': {message}")
    wrong = ttenv("env", "list", *remote, TTENV_TOKEN="w" * 43)
    assert wrong.returncode == 2 and "check TTENV_TOKEN / --tt-token-file (ttenv: --token-file)" in wrong.stderr


def test_a_bad_ca_file_is_one_line(tls: Server, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for path, message in (
        (tmp_path / "junk.pem", "no PEM certificate in it"),
        (tmp_path / "nope.pem", "No such file or directory"),
    ):
        res = ttenv("env", "list", "--backend", tls.url, "--ca-cert", str(path), TTENV_TOKEN=tls.tokens["alice"])
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"ttenv: error: CA certificate file '{path}': {message}")


def test_tls_options_are_both_or_neither_and_readable(tmp_path: Path) -> None:
    _, cert, key = make_certs(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_cert, _ = make_certs(tmp_path / "other")
    encrypted = tmp_path / "encrypted.pem"
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    serve = ["serve", "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state")]
    for extra, message in (
        (["--tls-cert", str(cert)], "--tls-cert and --tls-key go together"),
        (["--tls-key", str(key)], "--tls-cert and --tls-key go together"),
        (
            ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key)],
            f"--tls-cert '{tmp_path / 'nope.pem'}': cannot read it: No such file or directory",
        ),
        (["--tls-cert", str(other_cert), "--tls-key", str(key)], "are not a PEM certificate and its unencrypted key"),
        (["--tls-cert", str(cert), "--tls-key", str(encrypted)], "are not a PEM certificate and its unencrypted key"),
    ):
        res = ttenv(*serve, *extra)
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
        assert res.stderr.startswith("ttenv: error: ") and message in res.stderr


def test_a_tls_handshake_must_end_within_the_header_timeout(tls: Server) -> None:
    """A client that opens TCP and never starts TLS, or starts it and stalls, is closed within
    --header-timeout (2 s here), as a slow request head is."""
    with (
        socket.create_connection(("127.0.0.1", tls.port), timeout=10) as idle,
        socket.create_connection(("127.0.0.1", tls.port), timeout=10) as stalled,
    ):
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01")  # the first bytes of a ClientHello, then nothing
        start = time.monotonic()
        assert idle.recv(100) == b""
        assert stalled.recv(100) == b""
        assert time.monotonic() - start < 4.5
    # after the handshake, the request-head deadline holds as on http
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    with (
        socket.create_connection(("127.0.0.1", tls.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(b"GET /v1/status HTTP/1.1\r\n")
        start = time.monotonic()
        assert conn.recv(100) == b""
        assert time.monotonic() - start < 4.5


# -- the plugin's settings --------------------------------------------------------------------------
def values(
    cli: dict[str, str] | None = None, env: dict[str, str] | None = None, ini: dict[str, str] | None = None
) -> dict[str, str]:
    cli, ini = cli or {}, ini or {}
    return raw_values(lambda d: cli.get(d), lambda d: ini.get(d), env or {})


def test_plugin_token_file_and_ca_cert_resolution(tmp_path: Path) -> None:
    server = {"TTENV_BACKEND": "https://tt.example:8730"}
    private = token_file(tmp_path / "private", "from-file", 0o600)
    shared = token_file(tmp_path / "shared", "shared-file", 0o640)

    cfg = resolve(values(env=server | {"TTENV_TOKEN_FILE": str(private), "TTENV_CA_CERT": "~/ca.pem"}))
    assert (cfg.token, cfg.notes, cfg.ca_cert) == ("from-file", (), os.path.expanduser("~/ca.pem"))
    cfg = resolve(values(ini={"tt_token_file": str(shared)}, env=server))
    assert cfg.token == "shared-file"
    assert cfg.notes == (f"warning: ini tt_token_file {shared} can be read by others (mode 0640); chmod 600 it",)
    cfg = resolve(values(cli={"tt_token_file": str(private)}, env=server | {"TTENV_TOKEN": "from-env"}))
    assert cfg.token == "from-file"  # the command line beats the environment
    cfg = resolve(values(ini={"tt_token_file": str(private)}, env=server | {"TTENV_TOKEN": "from-env"}))
    assert (cfg.token, cfg.notes) == ("from-env", ())
    cfg = resolve(values(env=server | {"TTENV_TOKEN": "from-env", "TTENV_TOKEN_FILE": str(private)}))
    assert cfg.token == "from-env"  # the same level: the token itself
    local = resolve(values(ini={"tt_token_file": str(tmp_path / "missing")}))
    assert local.token == "" and local.ca_cert is None  # the local backend reads no token file
    with pytest.raises(UsageError, match=r"^TTENV_TOKEN_FILE '.*missing': cannot read it: No such file"):
        resolve(values(env=server | {"TTENV_TOKEN_FILE": str(tmp_path / "missing")}))


def test_plugin_token_in_argv_or_ini_is_deprecated() -> None:
    assert resolve(values(env={"TTENV_TOKEN": "t"})).notes == ()
    assert resolve(values(cli={"tt_token": "t"})).notes == (
        "warning: --tt-token puts the token in the process list; use TTENV_TOKEN or --tt-token-file",
    )
    cfg = resolve(values(ini={"tt_token": "t"}))
    assert cfg.token == "t" and cfg.notes == (
        "warning: ini tt_token puts the token in a file that gets committed; use TTENV_TOKEN or tt_token_file",
    )


def test_plugin_over_https_with_the_ini_token_says_one_warning(
    pytester: pytest.Pytester, tls: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("TTENV_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TTENV_STATE_DIR", str(pytester.path / "state"))
    pytester.makeini(f"[pytest]\ntt_backend = {tls.url}\ntt_token = {tls.tokens['alice']}\ntt_ca_cert = {tls.ca}\n")
    pytester.makepyfile("def test_on_vm(tt_vm):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-os=debian12")
    out = result.stdout.str() + result.stderr.str()
    warning = "ttenv: warning: ini tt_token puts the token in a file that gets committed; use TTENV_TOKEN or "
    assert out.count(warning) == 1, out
    # the server answered over TLS (its image list is empty): no TLS or token error
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "debian12" in out and "TLS" not in out, out
