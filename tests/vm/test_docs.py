"""The docs cannot rot: every command they show is run, as written, by these tests.

Each ```sh block of README.md and docs/*.md is a script: its commands run in order, one page per
test, in a sandbox (its own state dir, an image store holding the suite's Debian 11, 12 and 13
images, a work dir whose ``tests/`` is a copy of ``examples/``). A ```python block whose first line
is ``# file: PATH`` is written to PATH in the work dir where it appears. Commands run through bash
after a few substitutions that put the example host names, ports and paths on the sandbox; a
trailing ``# exits N`` comment says the command must exit N (otherwise 0); ``[--opt x]`` optional
parts are left out. ``ttenv serve`` starts in the background until the page is done. The few
commands that cannot run here (they need the internet, a remote libvirt host, apt, or minutes of
image building) are listed in NOT_RUN (tests/helpers/docs.py) with the reason and the tests that run
them instead. A command in the docs that is neither run nor listed fails the suite. ``bash
scripts/demo.sh`` (the README's main job) runs for real: it installs what is missing (apt, pip:
seconds where CI's setup already ran), boots 3 VMs and prints the matrix. (SUBST: the
``Sandbox.substitute`` table.)

Without VMs, tests/unit/test_docs_static.py checks that every command (NOT_RUN ones too) parses with
the real ``ttenv`` and pytest parsers, that every NOT_RUN entry is used and names tests that exist,
and the reference page against the code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.core.model import ImageInfo

from helpers.docs import PAGES, ROOT, Block, Command, blocks, commands, not_run_reason
from helpers.leftovers import qemu_pids_under

EXAMPLE_NAME = "pytest-1a2b3c"  # the kept ENV's name in docs/quickstart.md and docs/troubleshooting.md
EXAMPLE_LOGIN = re.compile(r"ssh -i /root/\S+/4f0c2a9e1b7d .* root@127\.0\.0\.1")  # ... and its login line


# -- running the pages ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sandbox:
    root: Path
    port: int = field(default_factory=_free_port)
    env: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    kept: str = ""  # the ENV a --tt-keep session kept, for the example name in later commands
    login: str = ""  # the login line printed for it

    @property
    def work(self) -> Path:
        return self.root / "work"

    def substitute(self, text: str) -> str:
        url = f"127.0.0.1:{self.port}"
        for old, new in (
            ("/srv/ttenv/images", self.env["TTENV_IMAGE_DIR"]),
            ("/srv/ttenv", str(self.root / "srv")),
            ("bash scripts/", f"bash {ROOT}/scripts/"),
            ("tt.example:8730", url),
            ("0.0.0.0:8730", url),
            ("--public-addr tt.example", "--public-addr 127.0.0.1"),
            (EXAMPLE_NAME, self.kept or EXAMPLE_NAME),
        ):
            text = text.replace(old, new)
        return EXAMPLE_LOGIN.sub(lambda _: self.login, text) if self.login else text

    def run(self, cmd: Command) -> None:
        line = self.substitute(cmd.text)
        print(f"\n$ {line}    # {cmd.page.relative_to(ROOT)}:{cmd.line}", flush=True)
        if line.startswith("ttenv serve"):
            self._serve(line)
            return
        res = subprocess.run(
            ["bash", "-c", line], cwd=self.work, env=self.env, capture_output=True, text=True, timeout=1200
        )
        print(res.stdout + res.stderr, flush=True)
        assert res.returncode == cmd.exits, f"{cmd}: exit {res.returncode}, the docs say {cmd.exits}"
        if "scripts/demo.sh" in line:  # the main job prints the tests x VMs matrix of 3 VMs
            assert "ttenv compatibility matrix" in res.stdout and "`debian-13-" in res.stdout, res.stdout[-2000:]
        if line.startswith("ttenv token add"):
            self.env["TTENV_TOKEN"] = res.stdout.strip()
        kept = re.search(r"kept ENV (\S+)", res.stdout + res.stderr)
        if kept:
            self.kept = kept.group(1)
            self.login = re.findall(r": (ssh -i .*)$", res.stdout + res.stderr, re.M)[0]

    def _serve(self, line: str) -> None:
        with (self.root / f"serve-{len(self.servers)}.log").open("wb") as log:  # the child keeps its own fd
            proc = subprocess.Popen(
                ["bash", "-c", "exec " + line], cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.servers.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{line}: exited {proc.returncode}: {Path(log.name).read_text()}"
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/v1/openapi.json", timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise AssertionError(f"{line}: not answering after 60 s: {Path(log.name).read_text()}")

    def write(self, block: Block) -> None:
        first = block.text.partition("\n")[0]
        path = self.work / first.removeprefix("# file:").strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text + "\n")
        print(f"\n# wrote {path.relative_to(self.work)} from {block.page.relative_to(ROOT)}:{block.line}")

    def close(self) -> None:
        for proc in self.servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        for state in (self.root / "state", self.root / "srv"):
            if state.exists():
                backend = LocalBackend(self.env["TTENV_IMAGE_DIR"], state)
                for env in backend.list_envs():
                    backend.delete_env(env.id)


def _junit(work: Path) -> None:
    """A real JUnit file from a real pytest run, for the pages' ``ttenv report`` commands."""
    (work / "junit").mkdir()
    (work / "jt").mkdir()
    (work / "jt" / "test_j.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('vm', ['debian-12-x86_64', 'debian-11-x86_64'])\n"
        "def test_case(record_property, vm):\n    record_property('tt_vm', vm)\n"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:ttenv",
            "--junitxml",
            str(work / "junit" / "run.xml"),
            str(work / "jt"),
        ],
        capture_output=True,
        text=True,
        cwd=work,
    )
    assert res.returncode == 0, res.stdout
    shutil.rmtree(work / "jt")


@pytest.fixture
def sandbox(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> Iterator[Sandbox]:
    store = tmp_path / "images"
    store.mkdir()
    for image in images("debian-12", "debian-11", "debian-13"):  # the three of scripts/demo.sh
        assert image.path is not None  # built: it has a directory
        (store / image.name).symlink_to(image.path)  # warm templates live in the image dir: shared
    box = Sandbox(tmp_path)
    shutil.copytree(ROOT / "examples", box.work / "tests")
    _junit(box.work)
    (box.root / "srv").mkdir()
    box.env = dict(
        os.environ,
        TTENV_STATE_DIR=str(tmp_path / "state"),
        TTENV_IMAGE_DIR=str(store),
        GITHUB_STEP_SUMMARY=str(tmp_path / "step-summary.md"),
        PYTEST_ADDOPTS="-p no:cacheprovider",
    )
    for var in ("TTENV_TOKEN", "TTENV_OS", "TTENV_BACKEND"):
        box.env.pop(var, None)
    try:
        yield box
    finally:
        box.close()
        assert qemu_pids_under(tmp_path) == [], "a page left VMs running"


def _runnable_pages() -> list[Path]:
    return [
        p for p in PAGES if any(not_run_reason(c) is None for b in blocks(p) if b.lang == "sh" for c in commands(b))
    ]


@pytest.mark.vm
@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_as_written(page: Path, sandbox: Sandbox) -> None:
    for block in blocks(page):
        if block.lang == "python" and block.text.startswith("# file:"):
            sandbox.write(block)
        elif block.lang == "sh":
            for cmd in commands(block):
                if not_run_reason(cmd) is None:
                    sandbox.run(cmd)
