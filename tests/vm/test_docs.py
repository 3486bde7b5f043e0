"""The docs cannot rot: every command they show is run, as written, by these tests.

Each ```sh block of README.md and docs/*.md is a script: its commands run in order, one page per
test, in a sandbox (its own state dir, an image store holding the suite's Debian 11, 12 and 13
images, a work dir whose ``tests/`` is a copy of ``examples/``). A ```python block whose first line
is ``# file: PATH`` is written to PATH in the work dir where it appears. Commands run through bash
after a few substitutions that put the example host names, ports and paths on the sandbox;
a trailing ``# exits N`` comment says the command must exit N (otherwise 0); ``[--opt x]`` optional
parts are left out. ``ttenv serve`` starts in the background until the page is done. The few
commands that cannot run here (they need the internet, a remote libvirt host, apt, or minutes of
image building) are listed in NOT_RUN with the reason and the tests that run them instead; they are
still parsed by the real ``ttenv`` and pytest parsers. A command in the docs that is neither run
nor listed fails the suite, and so does a NOT_RUN entry that no page uses any more.
``bash scripts/demo.sh`` (the README's main job) runs for real: it installs what is missing (apt,
pip: seconds where CI's setup already ran), boots 3 VMs and prints the matrix. (SUBST: the
``Sandbox.substitute`` table.)

The reference page is checked against the code: settings (names and defaults), fixtures, markers,
hooks and the public attributes of ``Vm``, ``Env`` and ``RunResult``.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
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

from pytest_ttenv import hookspecs
from pytest_ttenv.backend.local import LocalBackend
from pytest_ttenv.cli import build_parser
from pytest_ttenv.config import SETTINGS
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.fixtures import Env, Vm
from pytest_ttenv.ssh import RunResult

from helpers.leftovers import qemu_pids_under

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_NAME = "pytest-1a2b3c"  # the kept ENV's name in docs/quickstart.md and docs/troubleshooting.md
EXAMPLE_LOGIN = re.compile(r"ssh -i /root/\S+/4f0c2a9e1b7d .* root@127\.0\.0\.1")  # ... and its login line

# command pattern -> (why it is not run here, what runs it instead: test ids or files)
NOT_RUN: dict[str, tuple[str, tuple[str, ...]]] = {
    r"^pip install": ("installs from PyPI; CI installs this clone through scripts/setup.sh",
                      ("scripts/setup.sh", ".ci/run")),
    r"^bash scripts/test\.sh": ("it is the CI job that runs this file", (".ci/run",)),
    r"^ttenv image build": ("builds an image for minutes (aarch64: ~6 min); the suite's images are built by the same "
                            "ImageBuilder, and the CLI's argument handling is tested",
                            ("tests/conftest.py::images", "tests/unit/test_cli_errors.py::test_bad_input_is_one_line",
                             "tests/vm/test_cloud_init.py::test_cloud_image_boots_from_its_own_boot_loader_with_our_seed",
                             "tests/vm/test_matrix_arches.py::test_debian_matrix_with_aarch64")),
    r"^ttenv image pull": ("downloads from vendors (no internet here); run against a local HTTP catalog",
                           ("tests/unit/test_pull.py::test_cli_pull_list_and_errors",
                            "tests/unit/test_pull.py::test_cli_cut_then_rerun_resumes")),
    r"^ttenv image import": ("needs the user's own disk; run on disks the test makes",
                             ("tests/unit/test_import.py::test_cli_import",)),
    r"libvirt": ("needs libvirtd and a second libvirt host; the libvirt tests start their own",
                 ("tests/vm/test_libvirt.py::test_one_vm_through_libvirt_end_to_end",
                  "tests/vm/test_libvirt.py::test_env_spread_over_two_hosts_survives_losing_one",
                  "tests/vm/test_libvirt.py::test_server_runs_the_libvirt_engine",
                  "tests/vm/test_libvirt.py::test_plugin_engine_options_reach_the_backend")),
    r"^bash scripts/lock\.sh": ("re-resolves the locks from PyPI and rewrites requirements/",
                                 ("tests/unit/test_install.py::test_runtime_lock_agrees_with_the_test_lock",)),
    r"^python3? bench/": ("benchmarks are run by hand (minutes, printing figures)", ("bench/",)),
    r"--tls-cert|ca-cert": ("needs a certificate for the host; the TLS tests make one for 127.0.0.1 and run these",
                            ("tests/unit/test_server_tls.py::test_https_with_the_ca_and_the_token_from_the_environment",
                             "tests/unit/test_server_tls.py::test_plugin_over_https_with_the_ini_token_says_one_warning")),
}  # fmt: skip


# -- reading the pages -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str  # continuation lines joined, comment and optional parts removed
    written: str  # as written, for parsing both with and without the optional parts
    exits: int

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: {self.written}"


def blocks(page: Path) -> list[Block]:
    out, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            out.append(Block(page, i + 2, m.group(1), "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return out


def _strip_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` -> (cmd, comment), honouring quotes."""
    quote = ""
    for k, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip(), line[k + 1 :].strip()
    return line.rstrip(), ""


def commands(block: Block) -> list[Command]:
    out: list[Command] = []
    pending, start = "", 0
    for n, raw in enumerate(block.text.split("\n")):
        code, comment = _strip_comment(raw)
        if not pending:
            start = block.line + n
        if not code.strip():
            continue
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        written = (pending + code.strip()).strip()
        pending = ""
        m = re.search(r"\bexits (\d+)", comment)
        text = re.sub(r"\s\[-[^\]]*\]", "", written)
        out.append(Command(block.page, start, text, written, int(m.group(1)) if m else 0))
    return out


def all_commands() -> list[Command]:
    return [c for page in PAGES for b in blocks(page) if b.lang == "sh" for c in commands(b)]


def not_run_reason(cmd: Command) -> str | None:
    for pattern, (why, _) in NOT_RUN.items():
        if re.search(pattern, cmd.text):
            return why
    return None


# -- checks that need no VM ----------------------------------------------------------------------------
def test_commands_sit_in_sh_blocks() -> None:
    """An indented or unlabelled command block would escape these tests."""
    loose = []
    for page in PAGES:
        fenced = False
        for n, line in enumerate(page.read_text().split("\n"), 1):
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and re.match(r"^ {4}(ttenv|pytest|pip|bash|python3?) ", line):
                loose.append(f"{page.relative_to(ROOT)}:{n}: {line.strip()}")
        loose += [f"{b.page.relative_to(ROOT)}:{b.line}: ``` without a language" for b in blocks(page)
                  if not b.lang and re.search(r"^(ttenv|pytest|pip|bash) ", b.text, re.M)]  # fmt: skip
    assert not loose, "put commands in ```sh blocks:\n" + "\n".join(loose)


def test_every_not_run_entry_is_used_and_points_at_what_runs_it() -> None:
    cmds = all_commands()
    for pattern, (_, instead) in NOT_RUN.items():
        assert any(re.search(pattern, c.text) for c in cmds), f"NOT_RUN {pattern!r} matches no command of the docs"
        for ref in instead:
            path, _, func = ref.partition("::")
            assert (ROOT / path).exists(), f"NOT_RUN {pattern!r}: {path} does not exist"
            if func:
                names = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text()))
                         if isinstance(n, ast.FunctionDef)}  # fmt: skip
                assert func in names, f"NOT_RUN {pattern!r}: {ref} does not exist"


def _variants(cmd: Command) -> list[str]:
    """The command without its optional parts, and with all of them."""
    return [cmd.text, re.sub(r"\s\[(-[^\]]*)\]", r" \1", cmd.written)]


def test_every_ttenv_command_parses(capsys: pytest.CaptureFixture[str]) -> None:
    bad = []
    for cmd in all_commands():
        if not cmd.text.startswith("ttenv "):
            continue
        for variant in _variants(cmd):
            argv = shlex.split(variant)[1:]
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                bad.append(f"{cmd}: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not bad, "\n".join(bad)


def test_every_pytest_command_parses(pytester: pytest.Pytester) -> None:
    pytester.mkdir("tests")
    for cmd in all_commands():
        if cmd.text.startswith("pytest "):
            args = [a for a in shlex.split(cmd.text)[1:] if a != "..."]
            config = pytester.parseconfig(*args)
            assert config.option is not None, cmd


# -- the reference page ---------------------------------------------------------------------------------
REFERENCE = ROOT / "docs" / "reference.md"


def _table_rows(heading: str) -> list[list[str]]:
    text = REFERENCE.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in text.split("\n")
            if line.startswith("| ") and not line.startswith("| ---")]  # fmt: skip
    return rows[1:]  # without the header


def test_reference_lists_every_setting_with_its_names_and_default() -> None:
    rows = {r[0]: r for r in _table_rows("Settings")}
    expected = {f"`{s.flag}`": [f"`{s.flag}`", f"`{s.dest}`", f"`{s.env}`", f"`{s.default}`" if s.default else "—"]
                for s in SETTINGS}  # fmt: skip
    assert sorted(rows) == sorted(expected), "settings in docs/reference.md differ from pytest_ttenv/config.py"
    for flag, names in expected.items():
        assert rows[flag][:4] == names, f"{flag}: docs say {rows[flag][:4]}, the code {names}"
        setting = next(s for s in SETTINGS if f"`{s.flag}`" == flag)
        for choice in setting.choices:
            assert f"`{choice}`" in rows[flag][4], f"{flag}: choice {choice} not in the docs"


def _attrs(cls: type) -> set[str]:
    names = {n for n, _ in inspect.getmembers(cls) if not n.startswith("_")}
    init = getattr(cls, "__init__", None)
    if init is not None and hasattr(init, "__code__"):  # attributes set in __init__
        names |= {n.attr for n in ast.walk(ast.parse(inspect.getsource(cls)))
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
                  and isinstance(n.ctx, ast.Store) and not n.attr.startswith("_")}  # fmt: skip
    return names | {f.name for f in getattr(cls, "__dataclass_fields__", {}).values()}


@pytest.mark.parametrize(("heading", "cls"), [("`Vm` (`pytest_ttenv.fixtures.Vm`)", Vm),
                                              ("`Env` (`pytest_ttenv.fixtures.Env`)", Env),
                                              ("`RunResult` (`pytest_ttenv.ssh.RunResult`)", RunResult)])  # fmt: skip
def test_reference_lists_every_public_attribute(heading: str, cls: type) -> None:
    documented = " ".join(r[0] for r in _table_rows(heading))
    missing = [a for a in sorted(_attrs(cls)) if not re.search(rf"`{a}\b", documented)]
    assert not missing, f"{cls.__name__}: not in docs/reference.md: {missing}"


def test_reference_lists_every_fixture_marker_and_hook(pytester: pytest.Pytester) -> None:
    fixtures = {r[0].strip("`") for r in _table_rows("Fixtures")}
    assert fixtures == {"tt_vm", "tt_vm_fresh", "tt_env"}
    from pytest_ttenv import fixtures as fixture_module

    assert set(fixture_module.__all__) - {"Env", "Vm"} == fixtures
    markers = pytester.runpytest("--markers").stdout.str()
    ours = set(re.findall(r"@pytest\.mark\.(tt_\w+)", markers))
    assert ours and {re.search(r"mark\.(tt_\w+)", r[0]).group(1) for r in _table_rows("Markers")} == ours  # type: ignore[union-attr]
    hooks = {n for n in dir(hookspecs) if n.startswith("pytest_ttenv_")}
    assert {re.match(r"`(\w+)\(", r[0]).group(1) for r in _table_rows("Hooks")} == hooks  # type: ignore[union-attr]


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
        for old, new in (("/srv/ttenv/images", self.env["TTENV_IMAGE_DIR"]), ("/srv/ttenv", str(self.root / "srv")),
                         ("bash scripts/", f"bash {ROOT}/scripts/"),
                         ("tt.example:8730", url), ("0.0.0.0:8730", url), ("--public-addr tt.example",
                         "--public-addr 127.0.0.1"), (EXAMPLE_NAME, self.kept or EXAMPLE_NAME)):  # fmt: skip
            text = text.replace(old, new)
        return EXAMPLE_LOGIN.sub(lambda _: self.login, text) if self.login else text

    def run(self, cmd: Command) -> None:
        line = self.substitute(cmd.text)
        print(f"\n$ {line}    # {cmd.page.relative_to(ROOT)}:{cmd.line}", flush=True)
        if line.startswith("ttenv serve"):
            self._serve(line)
            return
        res = subprocess.run(["bash", "-c", line], cwd=self.work, env=self.env, capture_output=True, text=True,
                             timeout=1200)  # fmt: skip
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
            proc = subprocess.Popen(["bash", "-c", "exec " + line], cwd=self.work, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)  # fmt: skip
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
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:ttenv",
                          "--junitxml", str(work / "junit" / "run.xml"), str(work / "jt")],
                         capture_output=True, text=True, cwd=work)  # fmt: skip
    assert res.returncode == 0, res.stdout
    shutil.rmtree(work / "jt")


@pytest.fixture
def sandbox(tmp_path: Path, images: Callable[..., list[ImageInfo]]) -> Iterator[Sandbox]:
    store = tmp_path / "images"
    store.mkdir()
    for image in images("debian-12", "debian-11", "debian-13"):  # the three of scripts/demo.sh
        (store / image.name).symlink_to(image.path)  # warm templates live in the image dir: shared
    box = Sandbox(tmp_path)
    shutil.copytree(ROOT / "examples", box.work / "tests")
    _junit(box.work)
    (box.root / "srv").mkdir()
    box.env = dict(os.environ, TTENV_STATE_DIR=str(tmp_path / "state"), TTENV_IMAGE_DIR=str(store),
                   GITHUB_STEP_SUMMARY=str(tmp_path / "step-summary.md"),
                   PYTEST_ADDOPTS="-p no:cacheprovider")  # fmt: skip
    for var in ("TTENV_TOKEN", "TTENV_OS", "TTENV_BACKEND"):
        box.env.pop(var, None)
    try:
        yield box
    finally:
        box.close()
        assert qemu_pids_under(tmp_path) == [], "a page left VMs running"


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(not_run_reason(c) is None for b in blocks(p) if b.lang == "sh"
                                    for c in commands(b))]  # fmt: skip


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
