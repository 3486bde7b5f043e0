"""The docs as data: the ```sh blocks of README.md and docs/*.md split into commands, and NOT_RUN,
the commands no test runs as written (with the reason and what runs them instead).

Shared by tests/unit/test_docs_static.py (every command parses; NOT_RUN stays true) and
tests/vm/test_docs.py (every other command runs, page by page)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# command pattern -> (why it is not run here, what runs it instead: test ids or files)
NOT_RUN: dict[str, tuple[str, tuple[str, ...]]] = {
    r"^pip install": (
        "installs from PyPI; CI installs this clone through scripts/setup.sh",
        ("scripts/setup.sh", ".ci/run"),
    ),
    r"^bash scripts/test\.sh": ("it is the CI job that runs this file", (".ci/run",)),
    r"^ttenv image build": (
        "builds an image for minutes (aarch64: ~6 min); the suite's images are built by the same "
        "ImageBuilder, and the CLI's argument handling is tested",
        (
            "tests/conftest.py::images",
            "tests/unit/test_cli_errors.py::test_bad_input_is_one_line",
            "tests/vm/test_cloud_init.py::test_cloud_image_boots_from_its_own_boot_loader_with_our_seed",
            "tests/vm/test_matrix_arches.py::test_debian_matrix_with_aarch64",
        ),
    ),
    r"^ttenv image pull": (
        "downloads from vendors (no internet here); run against a local HTTP catalog",
        (
            "tests/unit/test_pull.py::test_cli_pull_list_and_errors",
            "tests/unit/test_pull.py::test_cli_cut_then_rerun_resumes",
        ),
    ),
    r"^ttenv image import": (
        "needs the user's own disk; run on disks the test makes",
        ("tests/unit/test_import.py::test_cli_import",),
    ),
    r"libvirt": (
        "needs libvirtd and a second libvirt host; the libvirt tests start their own",
        (
            "tests/vm/test_libvirt.py::test_one_vm_through_libvirt_end_to_end",
            "tests/vm/test_libvirt.py::test_env_spread_over_two_hosts_survives_losing_one",
            "tests/vm/test_libvirt.py::test_server_runs_the_libvirt_engine",
            "tests/unit/test_libvirt_without_hosts.py::test_plugin_engine_options_reach_the_backend",
        ),
    ),
    r"^bash scripts/lock\.sh": (
        "re-resolves the locks from PyPI and rewrites requirements/",
        ("tests/unit/test_install.py::test_runtime_lock_agrees_with_the_test_lock",),
    ),
    r"^python3? bench/": ("benchmarks are run by hand (minutes, printing figures)", ("bench/",)),
    r"^gh run download|^curl .*/artifacts\"$|^unzip artifacts\.zip": (
        "downloads a CI job's artifact from GitHub or GitLab (a token, the internet); the template "
        "tests run the failing test jobs and check what their capture artifacts hold",
        ("tests/unit/test_ci_templates_static.py::test_capture_artifacts_of_failed_jobs_only",),
    ),
    r"\bci-failure\b": (
        "replays a capture that a failed CI job uploaded; troubleshooting.md captures a failing "
        "test's VM and replays it, and that page runs",
        ("docs/troubleshooting.md", "tests/vm/test_docs.py::test_page_runs_as_written"),
    ),
    r"--tls-cert|ca-cert": (
        "needs a certificate for the host; the TLS tests make one for 127.0.0.1 and run these",
        (
            "tests/unit/test_server_tls.py::test_https_with_the_ca_and_the_token_from_the_environment",
            "tests/unit/test_server_tls.py::test_plugin_over_https_with_the_ini_token_says_one_warning",
        ),
    ),
}


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
