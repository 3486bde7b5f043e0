"""A real ``ttenv serve`` in a subprocess on 127.0.0.1 with a free port, its own state and image
dirs, and tokens for named owners; stopped (and every ENV of its state dir deleted) at the end.
Also how tests talk to it: ``raw`` requests (the exact bytes on the wire), ``error_of`` its error
bodies, and ``ttenv`` the CLI in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from pytest_ttenv.backend.http import HttpBackend
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.server.auth import TokenStore

from helpers.leftovers import interactive_signals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_dir_with(root: Path, images: Sequence[ImageInfo]) -> Path:
    """An image dir holding exactly ``images`` (symlinks to the built ones)."""
    root.mkdir(parents=True, exist_ok=True)
    for image in images:
        link = root / image.name
        if not link.exists():
            assert image.path is not None
            link.symlink_to(image.path)
    return root


@dataclass
class Server:
    """One ``ttenv serve`` process; ``start()`` again after ``kill()``/``stop()`` reuses the state dir."""

    state: Path
    images: Path
    port: int
    options: list[str] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    starts: int = 0
    ca: Path | None = None  # with --tls-cert in options: the CA that signed it (https)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.state.parent / f"{self.state.name}-serve-{self.starts}.log"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pytest_ttenv.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(self.state),
            "--image-dir",
            str(self.images),
            *self.options,
        ]

    def preexec(self) -> None:
        """Run in the server's child process before it execs."""
        interactive_signals()

    def answers(self) -> bool:
        """Whether the server answers its OpenAPI document (one try, 2 s)."""
        try:
            verify = str(self.ca) if self.ca else True
            return requests.get(f"{self.url}/v1/openapi.json", timeout=2, verify=verify).status_code == 200
        except requests.RequestException:
            return False

    def start(self, timeout: float = 30.0) -> Server:
        self.starts += 1
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=self.preexec
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ttenv serve exited {self.proc.returncode}:\n{self.output()}")
            if self.answers():
                return self
            time.sleep(0.1)
        raise AssertionError(f"ttenv serve did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def add_token(self, owner: str) -> str:
        self.tokens[owner] = TokenStore(self.state).add(owner)
        return self.tokens[owner]

    def backend(self, owner: str = "alice") -> HttpBackend:
        return HttpBackend(self.url, self.tokens[owner], ca_cert=str(self.ca) if self.ca else None)

    def headers(self, owner: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[owner]}"}

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs at all."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"ttenv serve ignored SIGTERM for {timeout} s:\n{self.output()}") from None

    def cleanup(self) -> None:
        """Stop the server and delete every ENV its state dir holds (a failed test leaves none)."""
        try:
            self.stop()
        finally:
            local = LocalBackend(self.images, self.state)
            for env in local.list_envs():
                local.delete_env(env.id)


def start_server(
    tmp: Path,
    images: Path,
    owners: Sequence[str] = ("alice", "bob"),
    options: Sequence[str] = (),
) -> Server:
    """A running server with state under ``tmp`` and a token per owner."""
    state = tmp / "server-state"
    state.mkdir(parents=True, exist_ok=True)
    server = Server(state=state, images=images, port=free_port(), options=list(options))
    for owner in owners:
        server.add_token(owner)
    return server.start()


def qemu_of(state: Path) -> list[int]:
    """Live qemu processes whose run dir is under ``state``."""
    from helpers.leftovers import qemu_pids_under

    found = []
    for pid in qemu_pids_under(state):
        try:
            if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def env_vars(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTENV_")}
    return env | extra


def ttenv(
    *args: str,
    state: Path | None = None,
    timeout: float = 900,
    token: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``ttenv ARGS`` in a subprocess with none of this process's TTENV_* settings (``state``:
    TTENV_STATE_DIR, ``token``: TTENV_TOKEN); the command and its output are printed."""
    extra = ({"TTENV_STATE_DIR": str(state)} if state else {}) | ({"TTENV_TOKEN": token} if token else {})
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", *args],
        capture_output=True,
        text=True,
        env=env_vars(**extra),
        timeout=timeout,
    )
    print(f"$ ttenv {' '.join(args)} -> {res.returncode}\n{res.stdout}{res.stderr}")
    return res


def raw(
    srv: Server,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    owner: str | None = "alice",
) -> tuple[int, dict[str, str], bytes]:
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
    """The server's error body, checked to be one safe line: its fields as a dict."""
    body = json.loads(data)
    assert set(body) >= {"error", "message", "hint", "console"}, body
    assert "\n" not in body["message"] and "Traceback" not in body["message"]
    return dict(body)
