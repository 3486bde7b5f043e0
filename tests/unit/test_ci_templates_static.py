"""The CI templates (ci-templates/) without VMs: validated against the official schemas vendored by
check-jsonschema; their apt lists are setup.sh's; their structure (conditions, artifacts, cache);
the GitHub plan job, both report jobs on a JUnit file a test job would have left, and the test jobs
of the server variant, run for real with the variables a runner sets (tests/helpers/ci.py).

The test jobs on real VMs and the reports of their runs: tests/vm/test_ci_templates.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
    load_yaml,
    make_project,
)


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
    gh = Actions(
        tmp_path / "gh",
        {"os": "debian12", "backend": url, "pytest-args": "examples -p no:cacheprovider"},
        {"TTENV_STATE_DIR": str(tmp_path / "state")},
        secrets={"ttenv-token": token},
    )
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
