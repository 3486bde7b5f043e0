"""The CI templates (ci-templates/) are not dead text.

- Validated against the official schemas vendored by check-jsonschema.
- Their shell steps run here for real, with the CI variables a runner sets: the GitHub workflow's
  plan, test and report jobs (the `run:` steps in bash as GitHub runs them; the few actions they
  use emulated: checkout copies the project, cache records its key, artifacts are directories)
  and the GitLab template's test and report jobs (before_script + script in one shell).
- The test jobs run a tiny matrix on the local backend: GitHub's runs the example suite plus a
  suite with every outcome (pass, fail, error, skip, xfail, tt_env, host-only) under xdist on
  Debian 12; GitLab's two example tests on Debian 11. Those real JUnit files then feed the report
  tests, and the HTML report is opened in headless chromium.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from pytest_ttenv.backend.images.catalog import catalog_version
from pytest_ttenv.core.model import ImageInfo
from pytest_ttenv.report.junit import read_junit
from pytest_ttenv.report.render_json import schema

from conftest import HOST_ARCH, IMAGE_ROOT
from helpers.ci import (
    GITHUB,
    GITLAB,
    REPO,
    SMALL_JUNIT,
    TEMPLATE,
    WORKFLOW,
    Actions,
    GitLab,
    GitLabJob,
    Job,
    base_env,
    load_yaml,
)

OUTCOMES_SUITE = """
import pytest

@pytest.fixture
def broken(tt_vm):
    raise RuntimeError(f"fixture broke on {tt_vm.name}")

def test_passes(tt_vm):
    assert tt_vm.run("true").ok

def test_fails(tt_vm):
    assert tt_vm.run("echo hi").stdout == "bye", f"expected failure on {tt_vm.name}"

def test_errors(broken):
    pass

@pytest.mark.skip(reason="skipped by marker")
def test_skipped_by_marker(tt_vm):
    pass

def test_skips_itself(tt_vm):
    pytest.skip(f"skipped on {tt_vm.name}")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfails(tt_vm):
    assert tt_vm.run("false").ok

@pytest.mark.parametrize("n", [1, 2])
def test_param(tt_vm, n):
    assert n in (1, 2)

@pytest.mark.tt_os("debian11")
def test_only_on_11(tt_vm):
    pass

def test_all_vms(tt_env):
    assert all(r.ok for r in tt_env.run("true").values())

def test_on_the_host():
    pass
"""


# -- static checks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schema_name", "files"),
    [
        ("vendor.github-workflows", sorted(GITHUB.glob("*.yml"))),
        ("vendor.gitlab-ci", sorted(GITLAB.glob("*.yml"))),
    ],
)
def test_templates_valid_against_the_official_schemas(schema_name: str, files: list[Path]) -> None:
    assert len(files) == 3
    res = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema_name, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def apt_list(text: str, name: str = "PKGS") -> list[str]:
    m = re.search(name + r'=[("]([^)"]*)[)"]', text)
    assert m, f"no {name} list"
    return m.group(1).split()


def test_apt_lists_are_setup_sh_s() -> None:
    """The templates install what setup.sh calls the runtime, for every guest arch (no test-only packages)."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    wanted = sorted(apt_list(setup, "RUNTIME_PKGS") + apt_list(setup, "FOREIGN_PKGS"))
    steps = load_yaml(WORKFLOW)["jobs"]["test"]["steps"]
    install = next(s["run"] for s in steps if s.get("name") == "Install qemu and the image tools")
    assert sorted(apt_list(install)) == wanted
    assert sorted(apt_list("\n".join(load_yaml(TEMPLATE)["ttenv-test"]["script"]))) == wanted


def test_template_structure() -> None:
    jobs = load_yaml(WORKFLOW)["jobs"]
    assert jobs["report"]["if"] == "${{ !cancelled() }}" and jobs["report"]["needs"] == "test"
    assert jobs["test"]["strategy"]["fail-fast"] is False
    uploads = [s for s in jobs["test"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads[0]["if"] == "${{ !cancelled() }}" and "${{ matrix.os }}" in uploads[0]["with"]["name"]
    gitlab = load_yaml(TEMPLATE)
    test, report = gitlab["ttenv-test"], gitlab["ttenv-report"]
    assert test["artifacts"]["when"] == "always" and test["artifacts"]["reports"]["junit"] == "ttenv-junit/*.xml"
    assert "TTENV_OS" in test["parallel"]["matrix"][0]
    assert report["stage"] == "report" and gitlab["stages"].index("report") > gitlab["stages"].index("test")
    assert report["when"] == "always" and report["needs"] == [{"job": "ttenv-test", "artifacts": True}]
    # the image store is cached: it must be the cached path inside the project dir
    assert test["variables"]["TTENV_IMAGE_DIR"] == "$CI_PROJECT_DIR/.ttenv-images"
    assert test["cache"]["paths"] == [".ttenv-images/"]


@pytest.mark.parametrize(
    ("os_input", "expected"),
    [("debian11, debian12,debian11", '["debian11", "debian12"]'), ('["ubuntu2404", "deb"]', '["ubuntu2404", "deb"]')],
)
def test_github_plan_job(tmp_path: Path, os_input: str, expected: str) -> None:
    job = Actions(tmp_path, {"os": os_input}, {}).run("plan")
    assert [s.status for s in job.steps] == ["success"], job.steps
    assert job.outputs == {"os": expected}


def test_github_plan_job_refuses_an_empty_list(tmp_path: Path) -> None:
    job = Actions(tmp_path, {"os": " , "}, {}).run("plan")
    assert job.steps[0].status == "failure" and "the os input names no OS prefix" in job.steps[0].output



def test_report_jobs_without_vms(tmp_path: Path) -> None:
    """Both report jobs on a JUnit file a test job would have left (the VM runs are below)."""
    gh = Actions(tmp_path / "gh", {"title": "Nightly"}, {})
    (gh.artifacts / "ttenv-junit-debian12").mkdir()
    (gh.artifacts / "ttenv-junit-debian12" / "junit-debian12-x86_64.xml").write_text(SMALL_JUNIT)
    job = gh.run("report")
    assert all(s.status == "success" for s in job.steps), job.steps
    assert job.summary.startswith("## Nightly\n") and "| `tests.test_a::test_bad` | ❌ |" in job.summary
    assert "<summary>❌ <code>tests.test_a::test_bad</code>" in job.summary  # --details
    assert sorted(p.name for p in (gh.artifacts / "ttenv-report").iterdir()) == ["matrix.html", "matrix.json"]

    gl = GitLab(tmp_path / "gl", {}, {})
    fake = tmp_path / "fake-test-job"
    (fake / "ttenv-junit").mkdir(parents=True)
    (fake / "ttenv-junit" / "junit-debian12-x86_64.xml").write_text(SMALL_JUNIT)
    dep = GitLabJob(fake, 1, "", fake, [], "")
    report = gl.run("ttenv-report", {}, needs=[dep])
    assert report.rc == 0, report.output
    assert "| `tests.test_a::test_ok` | ✅ |" in (report.artifacts / "ttenv-report" / "matrix.md").read_text()


def test_report_job_without_any_junit_is_one_line(tmp_path: Path) -> None:
    job = Actions(tmp_path, {}, {}).run("report")  # every test job died before writing JUnit
    matrix = job.step("Compatibility matrix")
    assert matrix.status == "failure" and matrix.output.strip().endswith("ttenv: error: ttenv-junit: no such file")
    assert job.step("Upload the report").status == "success"  # if: !cancelled(), nothing to upload


def test_server_variant_installs_nothing_and_reaches_for_the_server(tmp_path: Path) -> None:
    """backend = a server URL: no KVM, apt or cache work; pytest talks to the server (none listens
    here, so the job fails with the plugin's one line) and the token never shows in a log."""
    url, token = "http://127.0.0.1:9", "s3cret-token"
    project = make_project(tmp_path / "project")
    gh = Actions(tmp_path / "gh", {"os": "debian12", "backend": url, "pytest-args": "examples -p no:cacheprovider"},
                 {"TTENV_STATE_DIR": str(tmp_path / "state")}, secrets={"ttenv-token": token})  # fmt: skip
    job = gh.run("test", {"os": "debian12"}, project)
    assert "or a remote backend" in job.step("Enable KVM").output
    assert "nothing to install" in job.step("Install qemu and the image tools").output
    assert job.step("Cache the image store").status == "skipped" and job.cache_keys == []
    tests = job.step("Tests on debian12")
    assert tests.status == "failure" and f"cannot reach the ttenv server at {url}" in tests.output, tests.output
    assert job.step("Upload the JUnit file").status == "success"
    assert all(token not in s.output for s in job.steps)

    gl = GitLab(
        tmp_path / "gl", {"TTENV_BACKEND": url, "TTENV_TOKEN": token, "TTENV_STATE_DIR": str(tmp_path / "s2")}, {}
    )
    test = gl.run("ttenv-test", {"TTENV_OS": "debian12", "TTENV_PYTEST_ARGS": "examples -p no:cacheprovider"}, project)
    assert test.rc != 0 and f"backend {url}: the VMs run there" in test.output
    assert f"cannot reach the ttenv server at {url}" in test.output and token not in test.output


# -- the real runs ---------------------------------------------------------------------------------------------
def make_project(where: Path) -> Path:
    shutil.copytree(REPO / "examples", where / "examples")
    (where / "suite").mkdir()
    (where / "suite" / "test_outcomes.py").write_text(OUTCOMES_SUITE)
    return where


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
    }, tests.output[-3000:]
    assert "2 workers" in tests.output and "1 failed" in tests.output and "1 error" in tests.output, tests.output[
        -3000:
    ]
    expected_key = f"ttenv-images-Linux-X64-{catalog_version()}-debian12-{HOST_ARCH}"
    assert job.cache_keys == [expected_key]
    assert github_run.junit.exists()


@pytest.mark.vm
def test_github_report_job(github_run: GitHubRun) -> None:
    job = github_run.report
    assert all(s.status == "success" for s in job.steps), [(s.name, s.status, s.output[-500:]) for s in job.steps]
    summary = job.summary
    vm = f"debian-12-{HOST_ARCH}"
    assert summary.startswith("## ttenv matrix (test)\n")
    assert f"| `{vm}` | debian-12 | {HOST_ARCH} | 10 | 1 | 1 | 3 | 0 |" in summary
    for row in (
        "| `suite.test_outcomes::test_fails` | ❌ |",
        "| `suite.test_outcomes::test_errors` | 💥 |",
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
    assert "| `suite.test_outcomes::test_fails` | ➖ | ❌ |" in md
    assert "2 JUnit file(s), 15 tests x 2 VMs" in res.stdout
