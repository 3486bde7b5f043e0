"""The CI templates (ci-templates/) without VMs: validated against the official schemas vendored by
check-jsonschema; their apt lists are setup.sh's; their structure (conditions, artifacts, cache);
the GitHub plan job, both report jobs on a JUnit file a test job would have left, and the test jobs
of the server variant, run for real with the variables a runner sets (tests/helpers/ci.py); the
capture artifacts: uploaded by a failed test job only (a host-only suite on a real ``ttenv serve``
whose conftest leaves a capture file and property as the plugin does) and linked by the reports.

The test jobs on real VMs and the reports of their runs: tests/vm/test_ci_templates.py.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ttenv.backend.engines.qemu_arch import QEMU_PACKAGE
from pytest_ttenv.core.naming import ARCHES, canonical_arch

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
from helpers.server import Server, start_server


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


# The package that holds each qemu binary on the hosted runners (Ubuntu) where it is not the one
# Debian's qemu_arch.QEMU_PACKAGE names: Ubuntu splits s390x out of qemu-system-misc.
UBUNTU_QEMU_PACKAGE = {"s390x": "qemu-system-s390x"}


def test_apt_lists_hold_qemu_for_every_arch() -> None:
    """FOREIGN_PKGS (and so the templates) give every guest arch its qemu on Debian and on Ubuntu
    runners; setup.sh's main job installs the host arch's for every host arch a guest has."""
    setup = (REPO / "scripts" / "setup.sh").read_text()
    foreign = apt_list(setup, "FOREIGN_PKGS")
    for arch in ARCHES:
        assert QEMU_PACKAGE[arch] in foreign and UBUNTU_QEMU_PACKAGE.get(arch, QEMU_PACKAGE[arch]) in foreign, arch
    case = re.search(r'^case "\$\(uname -m\)" in\n.*?^esac$', setup, re.MULTILINE | re.DOTALL)
    assert case, "no host arch case in setup.sh"
    for machine in ("x86_64", "i686", "aarch64", "armv7l", "riscv64", "ppc64le", "s390x"):
        script = case.group(0).replace("$(uname -m)", machine) + '\necho "$QEMU_HOST"'
        host = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.strip()
        arch = canonical_arch(machine)
        assert host in (QEMU_PACKAGE[arch], UBUNTU_QEMU_PACKAGE.get(arch)), (machine, host)


@pytest.mark.parametrize("where", ["github", "gitlab"])
def test_install_loop_counts_a_provided_name_by_its_binary(tmp_path: Path, where: str) -> None:
    """The templates' loop: a package dpkg knows as installed, or a name whose binary is on PATH
    (qemu-system-s390x, which qemu-system-misc provides on Debian), is not installed again."""
    if where == "github":
        steps = load_yaml(WORKFLOW)["jobs"]["test"]["steps"]
        text = next(s["run"] for s in steps if s.get("name") == "Install qemu and the image tools")
    else:
        text = "\n".join(load_yaml(TEMPLATE)["ttenv-test"]["script"])
    loop = re.search(r'^( *)missing=""\n.*?^\1done$', text, re.MULTILINE | re.DOTALL)
    assert loop, "no install loop"
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "qemu-system-fake390"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    script = 'PKGS="bash qemu-system-fake390 ttenv-no-such-package"\n' + loop.group(0) + '\necho "[$missing]"'
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == "[ ttenv-no-such-package]"


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


CAPTURE_FLAGS = '--tt-capture="$TTENV_CAPTURE" --tt-capture-max="$TTENV_CAPTURE_MAX" --tt-capture-dir=ttenv-captures'


def test_captures_are_uploaded_when_a_job_fails() -> None:
    """pytest runs with --tt-capture=failed and an explicit size cap; GitHub uploads ttenv-captures/
    only if the job failed (kept 7 days, no error when it is empty); GitLab, which allows one
    artifacts: per job (when: always, for the JUnit file), keeps it with the JUnit file."""
    wf = load_yaml(WORKFLOW)
    inputs = (wf.get("on") or wf[True])["workflow_call"]["inputs"]
    assert inputs["capture"]["default"] == "failed" and inputs["capture-max"]["default"] == "2G"
    test = wf["jobs"]["test"]
    assert test["env"]["TTENV_CAPTURE"] == "${{ inputs.capture }}"
    assert test["env"]["TTENV_CAPTURE_MAX"] == "${{ inputs.capture-max }}"
    run = next(s["run"] for s in test["steps"] if s.get("name") == "Tests on ${{ matrix.os }}")
    assert CAPTURE_FLAGS in run.replace("\\\n", "").replace("  ", " ")
    upload = next(s for s in test["steps"] if s.get("name") == "Upload the VM captures")
    assert upload["if"] == "${{ failure() }}" and upload["uses"] == "actions/upload-artifact@v4"
    assert upload["with"] == {
        "name": "ttenv-captures-${{ matrix.os }}",
        "path": "ttenv-captures/",
        "if-no-files-found": "ignore",
        "retention-days": "${{ inputs.capture-retention-days }}",
        "compression-level": 0,
    }
    assert inputs["capture-retention-days"] == {
        "description": inputs["capture-retention-days"]["description"],
        "type": "number",
        "default": 7,
    }
    gitlab = load_yaml(TEMPLATE)
    assert gitlab["variables"]["TTENV_CAPTURE"] == "failed" and gitlab["variables"]["TTENV_CAPTURE_MAX"] == "2G"
    assert CAPTURE_FLAGS in "\n".join(gitlab["ttenv-test"]["script"])
    arts = gitlab["ttenv-test"]["artifacts"]
    assert arts["paths"] == ["ttenv-junit/", "ttenv-captures/"] and arts["when"] == "always" and arts["expire_in"]


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


# a project whose failing test leaves a capture the way the plugin does, without a VM: the file in
# the dir --tt-capture-dir names and the JUnit property tt_capture (relative to the rootdir)
CAPTURING_CONFTEST = """
from pathlib import Path
import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    item.user_properties[:] = [("tt_vm", "debian-12-x86_64")]
    opts = [item.config.getoption(o) for o in ("tt_capture", "tt_capture_max", "tt_capture_dir")]
    if report.failed and opts[0] == "failed":
        path = Path(item.config.invocation_params.dir, opts[2], item.name + "--debian-12-x86_64.ttcap")
        path.parent.mkdir(exist_ok=True)
        path.write_text(repr(opts))
        item.user_properties.append(("tt_capture", str(path.relative_to(item.config.rootpath))))
"""


def capturing_project(where: Path) -> Path:
    (where / "suite").mkdir(parents=True)
    (where / "pytest.ini").write_text("[pytest]\n")
    (where / "suite" / "conftest.py").write_text(CAPTURING_CONFTEST)
    (where / "suite" / "test_red.py").write_text("def test_red():\n    assert 0\n")
    (where / "suite" / "test_green.py").write_text("def test_green():\n    pass\n")
    return where


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A real ``ttenv serve`` whose image store lists debian-12 for this host's arch (metadata
    only: the suites below use no VM), with a token for ``ci``."""
    images = tmp_path / "server-images"
    name = f"debian-12-{platform.machine()}"
    (images / name).mkdir(parents=True)
    meta = {"name": name, "os": "debian", "version": "12", "arch": platform.machine(), "disk_mib": 64}
    (images / name / "image.json").write_text(json.dumps(meta))
    srv = start_server(tmp_path, images, owners=("ci",))
    try:
        yield srv
    finally:
        srv.cleanup()


def test_capture_artifacts_of_failed_jobs_only(tmp_path: Path, server: Server) -> None:
    """The test jobs run for real (on a server backend; host tests only) on a red and a green
    suite: the red job's capture is an artifact, the green job uploads none, and the report jobs
    link the capture from the matrix."""
    project = capturing_project(tmp_path / "project")
    name = "test_red--debian-12-x86_64.ttcap"
    env = {"TTENV_STATE_DIR": str(tmp_path / "state")}
    token = server.tokens["ci"]
    for suite, failed in (("red", True), ("green", False)):
        inputs = {"os": "debian12", "backend": server.url, "pytest-args": f"suite/test_{suite}.py", "capture-max": "3G"}
        gh = Actions(tmp_path / f"gh-{suite}", inputs, env, secrets={"ttenv-token": token})
        job = gh.run("test", {"os": "debian12"}, project)
        assert job.step("Tests on debian12").status == ("failure" if failed else "success"), job.steps
        assert job.step("Upload the VM captures").status == ("success" if failed else "skipped")
        assert job.step("Upload the JUnit file").status == "success"
        captured = gh.artifacts / "ttenv-captures-debian12"
        assert (sorted(p.name for p in captured.iterdir()) == [name]) if failed else not captured.exists()
        gl = GitLab(tmp_path / f"gl-{suite}", {"TTENV_BACKEND": server.url, "TTENV_TOKEN": token}, env)
        test = gl.run("ttenv-test", {"TTENV_OS": "debian12", "TTENV_PYTEST_ARGS": f"suite/test_{suite}.py"}, project)
        assert (test.rc != 0) == failed, test.output
        assert (test.artifacts / "ttenv-captures" / name).exists() == failed
        assert (test.artifacts / "ttenv-junit").is_dir()
        if not failed:
            continue
        assert (captured / name).read_text() == "['failed', '3G', 'ttenv-captures']"  # the inputs reach pytest
        assert (test.artifacts / "ttenv-captures" / name).read_text() == "['failed', '2G', 'ttenv-captures']"
        report = gh.run("report")
        assert all(s.status == "success" for s in report.steps), report.steps
        assert "| `suite.test_red::test_red` | ❌ 📦 |" in report.summary  # no link out of the workspace
        page = (gh.artifacts / "ttenv-report" / "matrix.html").read_text()
        assert f'<a class="capture" href="../ttenv-captures/{name}"' in page
        gl_report = gl.run("ttenv-report", {}, needs=[test])
        assert gl_report.rc == 0, gl_report.output
        md = (gl_report.artifacts / "ttenv-report" / "matrix.md").read_text()
        assert f"| `suite.test_red::test_red` | ❌ [📦](../ttenv-captures/{name}) |" in md
