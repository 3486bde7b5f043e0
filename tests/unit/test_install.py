"""The package as a user gets it: the wheel built from this tree, installed (not editable) into a
fresh virtualenv with the locked runtime dependencies only (no pytest plugins, no extras, no dev
tools), and the commands a user runs first, with their exact output on stderr. Also: nothing but
our own lines reaches the terminal from ``ttenv`` and from a pytest run of the installed plugin.

These tests reach PyPI through pip (for the build backend and the locked dependencies); pip's
cache makes a second run quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers.ci import SMALL_JUNIT, Actions

pytest_plugins = ["pytester"]
REPO = Path(__file__).resolve().parents[2]


def run(
    cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def user_env(venv: Path, tmp: Path) -> dict[str, str]:
    """A user's shell: the venv first on PATH, no warning switches of ours, state of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TTENV_", "VIRTUAL_ENV", "PYTEST_"))}
    return env | {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "TTENV_STATE_DIR": str(tmp / "state"),
        "TTENV_IMAGE_DIR": str(tmp / "images"),
    }


def make_venv(path: Path) -> Path:
    res = run([sys.executable, "-m", "venv", str(path)])
    assert res.returncode == 0, res.stderr
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)], timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    (built,) = out.glob("pytest_ttenv-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel and the runtime lock, nothing else."""
    venv = make_venv(tmp_path_factory.mktemp("venv") / "v")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    res = run([*pip, "--require-hashes", "-r", str(REPO / "requirements" / "runtime.lock")], timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run([*pip, "--no-deps", str(wheel)])
    assert res.returncode == 0, res.stdout + res.stderr
    return venv


def test_wheel_carries_the_data_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for guest in ("initramfs-init", "ssh.service", "sshd-ttenv.conf", "ttenv-seed"):
        assert f"pytest_ttenv/backend/images/guest/{guest}" in names
    assert "pytest_ttenv/backend/engines/guest/ttenv-identity" in names
    assert "pytest_ttenv/backend/images/catalog.yaml" in names
    assert "pytest_ttenv/report/matrix.schema.json" in names
    assert "pytest_ttenv/core/capture.schema.json" in names
    assert "pytest_ttenv/py.typed" in names
    assert "pytest_ttenv/ssh/ttagent.py" in names  # the agent, read as a resource and sent to the guest
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in meta and "Classifier: Framework :: Pytest" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: pytest>=") for r in requires)  # a pytest plugin needs pytest
    for tool in ("mypy", "ruff", "schemathesis", "pytest-xdist", "pytest-timeout"):  # dev tools are not extras
        assert not any(r.startswith(f"Requires-Dist: {tool}") for r in requires), requires


def test_installed_wheel_first_commands(installed: Path, tmp_path: Path) -> None:
    env = user_env(installed, tmp_path)
    ttenv = str(installed / "bin" / "ttenv")
    doctor = run([ttenv, "doctor"], env=env, timeout=300)
    assert doctor.returncode in (0, 1) and doctor.stderr == "", doctor.stderr
    assert "[warn] libvirt" in doctor.stdout  # no extra installed: said once, with the pip line
    images = run([ttenv, "image", "list"], env=env)
    assert images.returncode == 0 and images.stderr == "", images.stderr
    assert "ttenv image build debian-12" in images.stdout
    show = run([ttenv, "env", "show", "nope"], env=env)
    assert (show.returncode, show.stderr) == (2, "ttenv: error: no ENV named 'nope' (see: ttenv env list)\n")
    serve = run([ttenv, "serve", "--listen", "127.0.0.1:0"], env=env)
    assert (serve.returncode, serve.stderr) == (
        1,
        "ttenv: error: ttenv serve needs the server extra (pip install 'pytest-ttenv[server]')\n",
    )
    libvirt = run([ttenv, "env", "add", "T", "--os-prefix", "deb", "--engine", "libvirt"], env=env)
    assert libvirt.returncode == 1 and len(libvirt.stderr.splitlines()) == 1, libvirt.stderr
    needs = "ttenv: error: the libvirt engine needs libvirt-python (pip install 'pytest-ttenv[libvirt]'"
    assert libvirt.stderr.startswith(needs), libvirt.stderr
    python = str(installed / "bin" / "python")
    imports = "import pytest_ttenv.cli, pytest_ttenv.plugin, pytest_ttenv.ssh"
    strict = run([python, "-W", "error", "-c", imports], env=env)
    assert strict.returncode == 0, strict.stderr


def test_installed_plugin_in_pytest(installed: Path, tmp_path: Path) -> None:
    env = user_env(installed, tmp_path)
    pytest_bin = str(installed / "bin" / "pytest")
    helped = run([pytest_bin, "--help"], env=env, cwd=tmp_path)
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr
    assert "pytest-ttenv: run tests on VMs across an OS x arch matrix" in helped.stdout and "--tt-os" in helped.stdout
    markers = run([pytest_bin, "--markers"], env=env, cwd=tmp_path)
    assert markers.returncode == 0 and "@pytest.mark.tt_os(*prefixes)" in markers.stdout, markers.stdout


def test_report_job_with_only_the_package_installed(wheel: Path, tmp_path: Path) -> None:
    """The GitHub template's report job in a venv that has nothing but what the job installs:
    ``pip install "$TTENV_PACKAGE"`` (the wheel, its dependencies as PyPI resolves them today)."""
    venv = make_venv(tmp_path / "runner")
    gh = Actions(
        tmp_path / "gh",
        {"title": "Fresh", "ttenv-package": str(wheel)},
        {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
    )
    (gh.artifacts / "ttenv-junit-debian12").mkdir()
    (gh.artifacts / "ttenv-junit-debian12" / "junit-debian12-x86_64.xml").write_text(SMALL_JUNIT)
    job = gh.run("report")
    assert all(s.status == "success" for s in job.steps), [(s.name, s.status, s.output) for s in job.steps]
    assert "| `tests.test_a::test_bad` | ❌ |" in job.summary
    matrix = job.step("Compatibility matrix")
    assert matrix.output.startswith("VM ") and "Warning" not in matrix.output, matrix.output  # ours alone


COMMANDS = [
    (["env", "list"], 0, ""),
    (["image", "list"], 0, ""),
    (["env", "show", "nope"], 2, "ttenv: error: no ENV named 'nope' (see: ttenv env list)\n"),
    (["env", "add", "T", "--os-prefix=fedora"], 2, None),
    (["report", "nothing-here"], 2, "ttenv: error: nothing-here: no such file\n"),
]


@pytest.mark.parametrize(("args", "code", "stderr"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_ttenv_stderr_is_ours_alone(tmp_path: Path, args: list[str], code: int, stderr: str | None) -> None:
    """The console script, in the test environment (today's dependency versions): exactly our lines."""
    env = user_env(Path(sys.executable).parent.parent, tmp_path)
    res = run([str(Path(sys.executable).parent / "ttenv"), *args], env=env, timeout=120)
    assert res.returncode == code, res.stderr
    if stderr is None:
        assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("ttenv: error: "), res.stderr
    else:
        assert res.stderr == stderr


def test_pytest_run_with_the_plugin_prints_nothing_of_others(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A project with ``filterwarnings = error`` and ``tt_os`` set runs a test that needs no VM."""
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("TTENV_STATE_DIR", str(tmp_path / "state"))
    pytester.makeini("[pytest]\nfilterwarnings = error\ntt_os = debian12\n")
    pytester.makepyfile("def test_plain():\n    assert True\n")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert res.ret == 0, res.stdout.str() + res.stderr.str()
    assert res.stderr.str() == ""
    res.assert_outcomes(passed=1)


def locked(path: Path) -> dict[str, set[str]]:
    """name -> versions of a lock (a universal lock may pin a name once per Python version)."""
    pins: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, rest = line.split("==", 1)
            pins.setdefault(name.lower(), set()).add(rest.split()[0])
    return pins


def test_runtime_lock_agrees_with_the_test_lock() -> None:
    """The main job (runtime lock) never changes a venv the test command set up (test lock)."""
    runtime, test = locked(REPO / "requirements" / "runtime.lock"), locked(REPO / "requirements" / "test.lock")
    assert runtime and all(versions <= test.get(name, set()) for name, versions in runtime.items()), (runtime, test)
    assert "pytest" in runtime and "asyncssh" in runtime and "mypy" not in runtime
