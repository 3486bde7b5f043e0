"""The CI templates (ci-templates/) run for real, with VMs.

Their shell steps run here with the CI variables a runner sets: the GitHub workflow's plan, test
and report jobs (the `run:` steps in bash as GitHub runs them; the few actions they use emulated:
checkout copies the project, cache records its key, artifacts are directories) and the GitLab
template's test and report jobs (before_script + script in one shell). The test jobs run a tiny
matrix on the local backend: GitHub's runs the example suite plus a suite with every outcome (pass,
fail, error, skip, xfail, tt_env, host-only) under xdist on Debian 12; GitLab's two example tests on
Debian 11. Those real JUnit files then feed the report tests, and the HTML report is opened in
headless chromium.

Without VMs (schemas, apt lists, structure, the plan and report jobs, the server variant):
tests/unit/test_ci_templates_static.py.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from pytest_ttenv.backend.images.catalog import catalog_version
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.fixtures.capture import capture_name
from pytest_ttenv.report.junit import read_junit
from pytest_ttenv.report.render_json import schema

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.ci import Actions, GitLab, GitLabJob, Job, base_env, make_project


# -- the real runs ---------------------------------------------------------------------------------------------
@dataclass
class GitHubRun:
    actions: Actions
    test: Job
    report: Job

    @property
    def junit(self) -> Path:
        return self.actions.artifacts / "ttenv-junit-debian12" / f"junit-debian12-{HOST_ARCH}.xml"


@pytest.fixture(scope="module")
def github_run(images: Callable[..., list[ImageInfo]], tmp_path_factory: pytest.TempPathFactory) -> GitHubRun:
    """The workflow's jobs with os=debian12 on this host's arch: plan, one test job (the example
    suite and the outcomes suite, xdist -n 2, one VM), the report job."""
    images("debian-12")
    root = tmp_path_factory.mktemp("github")
    project = make_project(root / "project")
    inputs = {
        "os": "debian12",
        "arch": HOST_ARCH,
        "pytest-args": "examples suite -n 2 -p no:cacheprovider",
        "title": "ttenv matrix (test)",
    }
    env = {"TTENV_IMAGE_DIR": str(IMAGE_ROOT), "TTENV_STATE_DIR": str(root / "state")}
    actions = Actions(root / "run", inputs, env)
    plan = actions.run("plan")
    oses = json.loads(plan.outputs["os"])
    assert oses == ["debian12"]
    test = actions.run("test", {"os": oses[0]}, project)
    report = actions.run("report")
    return GitHubRun(actions, test, report)


@pytest.mark.vm
def test_github_test_job(github_run: GitHubRun) -> None:
    job = github_run.test
    status = {s.name: s.status for s in job.steps}
    tests = job.step("Tests on debian12")
    assert status == {
        "actions/checkout@v4": "success",
        "actions/setup-python@v5": "success",
        "Enable KVM": "success",
        "Install qemu and the image tools": "success",
        "Install pytest-ttenv and the project": "success",
        "Image store, cache key, JUnit file name": "success",
        "Cache the image store": "success",
        "Tests on debian12": "failure",  # the outcomes suite fails on purpose
        "Upload the JUnit file": "success",  # if: !cancelled() - uploaded all the same
        "Upload the VM captures": "success",  # if: failure()
    }, tests.output[-3000:]
    assert "2 workers" in tests.output and "1 failed" in tests.output and "1 error" in tests.output, tests.output[
        -3000:
    ]
    expected_key = f"ttenv-images-Linux-X64-{catalog_version()}-debian12-{HOST_ARCH}"
    assert job.cache_keys == [expected_key]
    assert github_run.junit.exists()
    # --tt-capture=failed: the failed test's VM, saved running, in the job's captures artifact
    captures = sorted(p.name for p in (github_run.actions.artifacts / "ttenv-captures-debian12").iterdir())
    vm = f"debian-12-{HOST_ARCH}"
    assert capture_name(f"suite/test_outcomes.py::test_fails[{vm}]", vm) in captures, (captures, tests.output[-3000:])


@pytest.mark.vm
def test_github_report_job(github_run: GitHubRun) -> None:
    job = github_run.report
    assert all(s.status == "success" for s in job.steps), [(s.name, s.status, s.output[-500:]) for s in job.steps]
    summary = job.summary
    vm = f"debian-12-{HOST_ARCH}"
    assert summary.startswith("## ttenv matrix (test)\n")
    assert f"| `{vm}` | debian-12 | {HOST_ARCH} | 10 | 1 | 1 | 3 | 0 |" in summary
    for row in (
        "| `suite.test_outcomes::test_fails` | ❌ 📦 |",  # its capture; no link from the step summary
        "| `suite.test_outcomes::test_errors` | 💥",
        "| `suite.test_outcomes::test_skipped_by_marker` | ⏭ |",
        "| `suite.test_outcomes::test_param[2]` | ✅ |",
        "| `examples.test_hello_tool::test_changes_are_undone` | ✅ |",
    ):
        assert row in summary, summary
    assert f"expected failure on {vm}" in summary  # --details
    report = github_run.actions.artifacts / "ttenv-report"
    doc = json.loads((report / "matrix.json").read_text())
    jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker()).validate(doc)
    assert doc["title"] == "ttenv matrix (test)" and [v["name"] for v in doc["vms"]] == [vm]
    fails = next(c for c in doc["captures"] if c["test"] == "suite.test_outcomes::test_fails")
    assert fails["vm"] == vm and fails["path"].startswith("ttenv-captures/suite_test_outcomes.py_test_fails_")
    assert f'<a class="capture" href="../{fails["path"]}"' in (report / "matrix.html").read_text()


@pytest.mark.vm
def test_report_of_a_real_run(github_run: GitHubRun) -> None:
    """Every outcome, as the plugin wrote it to JUnit under xdist, lands in the right cell."""
    matrix = read_junit([str(github_run.junit)])
    vm = f"debian-12-{HOST_ARCH}"
    assert matrix.vm_names == [vm]
    rows = {t.removeprefix("suite.test_outcomes::"): matrix.outcome(t, vm) for t in matrix.tests()}
    assert {k: v for k, v in rows.items() if not k.startswith("examples.")} == {
        "test_passes": "passed",
        "test_fails": "failed",
        "test_errors": "error",
        "test_skipped_by_marker": "skipped",  # properties set at collection, not by the fixture
        "test_skips_itself": "skipped",
        "test_xfails": "skipped",
        "test_param[1]": "passed",
        "test_param[2]": "passed",
        "test_all_vms": "passed",  # tt_env: on every VM it used
    }
    assert all(rows[t] == "passed" for t in rows if t.startswith("examples."))
    assert len([t for t in rows if t.startswith("examples.")]) == 6
    assert matrix.other == {"passed": 1, "failed": 0, "error": 0, "skipped": 1}  # host-only; only_on_11 (no VM)
    fails = matrix.cells[("suite.test_outcomes::test_fails", vm)]
    assert f"AssertionError: expected failure on {vm}" == fails.message and "def test_fails" in fails.text
    assert "RuntimeError: fixture broke on" in matrix.cells[("suite.test_outcomes::test_errors", vm)].message
    assert matrix.cells[("suite.test_outcomes::test_skipped_by_marker", vm)].message == "skipped by marker"
    assert matrix.vms[0].os == "debian-12" and matrix.vms[0].arch == HOST_ARCH


# -- the HTML page in a real browser ---------------------------------------------------------------------------
class MatrixDom(HTMLParser):
    """Collects (test, vm, outcome) from table#matrix of a DOM dump, and its VM header cells."""

    def __init__(self) -> None:
        super().__init__()
        self.in_matrix = False
        self.test: str | None = None
        self.header_vms: list[str] = []
        self.cells: dict[tuple[str, str], str] = {}
        self.failure_blocks = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.in_matrix = a.get("id") == "matrix"
        elif self.in_matrix and tag == "th" and a.get("data-vm"):
            self.header_vms.append(str(a["data-vm"]))
        elif self.in_matrix and tag == "tr":
            self.test = a.get("data-test")
        elif self.in_matrix and tag == "td" and self.test and a.get("data-outcome"):
            self.cells[(self.test, str(a["data-vm"]))] = str(a["data-outcome"])
        elif tag == "details" and (a.get("id") or "").startswith("d-"):
            self.failure_blocks += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_matrix = False


def png_pixels(data: bytes) -> tuple[int, int, set[tuple[int, int, int]]]:
    """Width, height and the set of RGB colours of an 8-bit RGB/RGBA PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            channels = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, prev = zlib.decompress(idat), width * channels, bytearray(width * channels)
    colours: set[tuple[int, int, int]] = set()
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, ul = prev[x], prev[x - channels] if x >= channels else 0
            if ftype == 1:
                line[x] = (line[x] + left) & 255
            elif ftype == 2:
                line[x] = (line[x] + up) & 255
            elif ftype == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif ftype == 4:
                p = left + up - ul
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else ul)) & 255
        colours.update(tuple(line[i : i + 3]) for i in range(0, stride, channels))  # type: ignore[misc]
        prev = line
    return width, height, colours


@pytest.mark.vm
def test_html_report_in_chromium(github_run: GitHubRun, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it)")
    page = github_run.actions.artifacts / "ttenv-report" / "matrix.html"
    common = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    parsed = MatrixDom()
    parsed.feed(dom.stdout)
    vm = f"debian-12-{HOST_ARCH}"
    assert parsed.header_vms == [vm]
    assert parsed.cells[("suite.test_outcomes::test_fails", vm)] == "failed"
    assert parsed.cells[("suite.test_outcomes::test_errors", vm)] == "error"
    assert parsed.cells[("suite.test_outcomes::test_xfails", vm)] == "skipped"
    assert parsed.cells[("suite.test_outcomes::test_passes", vm)] == "passed"
    assert len(parsed.cells) == 15 and parsed.failure_blocks == 2

    shot = tmp_path / "matrix.png"
    res = subprocess.run(
        [*common, "--window-size=1280,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    width, height, colours = png_pixels(shot.read_bytes())
    assert (width, height) == (1280, 1400)
    # the cells' backgrounds were painted: passed, failed, error, skipped
    assert {(0xDA, 0xFB, 0xE1), (0xFF, 0xEB, 0xE9), (0xFF, 0xD8, 0xB5), (0xFF, 0xF8, 0xC5)} <= colours


# -- GitLab: a second OS, and the merge of both CI systems' files -------------------------------------------------
@pytest.fixture(scope="module")
def gitlab_run(
    images: Callable[..., list[ImageInfo]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, GitLabJob]:
    images("debian-11")
    root = tmp_path_factory.mktemp("gitlab")
    project = make_project(root / "src")
    hello = "examples/test_hello_tool.py"
    settings = {"TTENV_IMAGE_DIR": str(IMAGE_ROOT), "TTENV_STATE_DIR": str(root / "state")}  # CI/CD variables
    gitlab = GitLab(root / "run", settings, {})
    test = gitlab.run(
        "ttenv-test",
        {
            "TTENV_OS": "debian11",
            "TTENV_ARCH": HOST_ARCH,
            "TTENV_PYTEST_ARGS": f"{hello}::test_version {hello}::test_greets_with_os_name -p no:cacheprovider",
        },
        project,
    )
    report = gitlab.run("ttenv-report", {"TTENV_TITLE": "GitLab matrix"}, needs=[test])
    return {"test": test, "report": report}


@pytest.mark.vm
def test_gitlab_jobs(gitlab_run: dict[str, GitLabJob]) -> None:
    test, report = gitlab_run["test"], gitlab_run["report"]
    assert test.rc == 0, test.output[-3000:]
    assert "2 passed" in test.output
    assert [p.name for p in test.junit] == [f"junit-debian11-{HOST_ARCH}.xml"]  # reports: junit matches
    assert test.cache_key == f"ttenv-images-debian11-{HOST_ARCH}-1"
    assert report.rc == 0, report.output
    md = (report.artifacts / "ttenv-report" / "matrix.md").read_text()
    assert md.startswith("## GitLab matrix\n")
    assert "| `examples.test_hello_tool::test_version` | ✅ |" in md
    assert sorted(p.name for p in (report.artifacts / "ttenv-report").iterdir()) == [
        "matrix.html",
        "matrix.json",
        "matrix.md",
    ]


@pytest.mark.vm
def test_merge_of_both_ci_systems(github_run: GitHubRun, gitlab_run: dict[str, GitLabJob], tmp_path: Path) -> None:
    files = [str(github_run.junit), *map(str, gitlab_run["test"].junit)]
    res = subprocess.run(
        ["ttenv", "report", *files, "--md", str(tmp_path / "m.md")],
        capture_output=True,
        text=True,
        env=base_env({}),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    v11, v12 = f"debian-11-{HOST_ARCH}", f"debian-12-{HOST_ARCH}"
    md = (tmp_path / "m.md").read_text()
    assert f"| test | `{v11}` | `{v12}` |" in md
    assert "| `examples.test_hello_tool::test_version` | ✅ | ✅ |" in md
    assert "| `examples.test_hello_tool::test_python_available` | ➖ | ✅ |" in md  # not run on 11
    assert "| `suite.test_outcomes::test_fails` | ➖ | ❌ 📦 |" in md  # the capture is not under tmp_path
    assert "2 JUnit file(s), 15 tests x 2 VMs" in res.stdout
