"""``--tt-capture`` on the pytest side (``fixtures.capture``), without a VM: the settings, file
names, the size budget, and a run of a small suite whose only stand-in is the backend."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pytest_ttenv.config import SETTINGS, TTConfig, raw_values, resolve
from pytest_ttenv.core.capture_manifest import CaptureSkipped
from pytest_ttenv.core.naming import SIZE_FORMS
from pytest_ttenv.errors import TTError, UsageError
from pytest_ttenv.fixtures import capture as cap
from pytest_ttenv.ssh import RunResult

pytest_plugins = ["pytester"]


def settings(
    cli: dict[str, str] | None = None, env: dict[str, str] | None = None, ini: dict[str, str] | None = None
) -> TTConfig:
    cli, ini = cli or {}, ini or {}
    return resolve(raw_values(lambda d: cli.get(d), lambda d: ini.get(d), env or {}))


# -- settings ----------------------------------------------------------------------------------
def test_capture_settings_defaults_and_sources() -> None:
    names = {s.name: s for s in SETTINGS}
    assert (names["capture"].flag, names["capture"].dest, names["capture"].env) == (
        "--tt-capture",
        "tt_capture",
        "TTENV_CAPTURE",
    )
    cfg = settings()
    assert (cfg.capture, cfg.capture_dir, cfg.capture_max_bytes, cfg.capture_image) == ("none", None, 2 << 30, "auto")
    cfg = settings(env={"TTENV_CAPTURE": "failed", "TTENV_CAPTURE_MAX": "500M"}, ini={"tt_capture": "all"})
    assert (cfg.capture, cfg.capture_max_bytes) == ("failed", 500 << 20)
    cfg = settings(cli={"tt_capture": "all", "tt_capture_image": "always", "tt_capture_dir": "~/caps"})
    assert (cfg.capture, cfg.capture_image, cfg.capture_dir) == ("all", "always", os.path.expanduser("~/caps"))
    assert settings(ini={"tt_capture_max": "3G"}).capture_max_bytes == 3 << 30
    assert settings(cli={"tt_capture_max": "100"}).capture_max_bytes == 100 << 20  # a bare number: MiB


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tt_capture": "sometimes"}, "--tt-capture='sometimes' is not valid (use one of failed, all, none)"),
        ({"tt_capture_image": "maybe"}, "--tt-capture-image='maybe' is not valid (use one of auto, always, never)"),
        ({"tt_capture_max": "lots"}, "bad --tt-capture-max size 'lots'"),
        ({"tt_capture_max": "0"}, "--tt-capture-max size must be positive"),
    ],
)
def test_bad_capture_settings_are_one_usage_line(raw: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as err:
        settings(cli=raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_capture_max_from_the_environment_names_it() -> None:
    with pytest.raises(UsageError, match=r"bad TTENV_CAPTURE_MAX size '2X'"):
        settings(env={"TTENV_CAPTURE_MAX": "2X"})


def test_bad_option_stops_pytest_with_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--tt-capture-max=huge")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [ln for ln in result.stderr.lines if ln.strip()] == [
        f"ERROR: ttenv: bad --tt-capture-max size 'huge' (use {SIZE_FORMS})"
    ]


# -- names, sizes, the budget ------------------------------------------------------------------
def test_capture_name_is_safe_and_keeps_the_vm_last() -> None:
    assert cap.capture_name("tests/test_web.py::test_login[debian-12-x86_64]", "debian-12-x86_64") == (
        "tests_test_web.py_test_login_debian-12-x86_64--debian-12-x86_64.ttcap"
    )
    # separators, spaces, quotes, ../ and a leading dot never reach the name; "--" stays the separator
    name = cap.capture_name("../.hidden/t.py::TestA::test b['x/y' -- z]", "vm--1")
    assert name == "hidden_t.py_TestA_test_b_x_y_-_z--vm-1.ttcap"
    assert cap.capture_name("", "vm") == "_--vm.ttcap"


def test_long_test_ids_are_cut_to_a_bounded_distinct_name() -> None:
    a = cap.capture_name("t.py::test_p[" + "a" * 400 + "1]", "debian-12-x86_64")
    b = cap.capture_name("t.py::test_p[" + "a" * 400 + "2]", "debian-12-x86_64")
    assert a != b
    for name in (a, b):
        test_part = name.removesuffix("--debian-12-x86_64.ttcap")
        assert len(test_part) == cap.MAX_TEST_PART and len(name.encode()) < 255
    assert len(cap.capture_name("x", "v" * 300)) == len("x--.ttcap") + cap.MAX_VM_PART


def test_capture_dir_defaults_to_the_rootdir(tmp_path: Path) -> None:
    root, here = tmp_path / "root", tmp_path / "here"
    assert cap.capture_dir(None, root, here) == root / "ttenv-captures"
    assert cap.capture_dir("out/caps", root, here) == here / "out" / "caps"
    assert cap.capture_dir("/abs/caps", root, here) == Path("/abs/caps")


def test_recorded_path_is_relative_to_the_rootdir_when_under_it(tmp_path: Path) -> None:
    assert cap.recorded_path(tmp_path / "ttenv-captures" / "a--vm.ttcap", tmp_path) == "ttenv-captures/a--vm.ttcap"
    assert cap.recorded_path("/elsewhere/a--vm.ttcap", tmp_path) == "/elsewhere/a--vm.ttcap"


def test_human_size() -> None:
    assert [cap.human_size(n) for n in (0, 1023, 1536, 5 << 20, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]


def test_budget_counts_the_captures_in_the_dir(tmp_path: Path) -> None:
    (tmp_path / "a--vm.ttcap").write_bytes(b"x" * 300)
    (tmp_path / "b--vm.ttcap").write_bytes(b"x" * 200)
    (tmp_path / "notes.txt").write_bytes(b"x" * 5000)  # not a capture
    assert cap.used_bytes(tmp_path) == 500
    assert cap.used_bytes(tmp_path, besides=tmp_path / "a--vm.ttcap") == 200
    assert cap.budget(1000, 500) == 500 and cap.budget(500, 500) == 0 and cap.budget(100, 500) == 0
    with cap.dir_lock(tmp_path):  # a lock on the dir itself: nothing is added to it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a--vm.ttcap", "b--vm.ttcap", "notes.txt"]


@pytest.mark.parametrize(
    ("mode", "when", "failed", "expected"),
    [
        ("failed", "call", True, True),
        ("failed", "setup", True, True),
        ("failed", "teardown", True, False),  # the VM may be reverted already
        ("failed", "call", False, False),
        ("all", "call", False, True),
        ("all", "setup", False, False),  # the call's report follows
        ("all", "setup", True, True),
        ("none", "call", True, False),
    ],
)
def test_which_reports_are_captured(mode: str, when: str, failed: bool, expected: bool) -> None:
    assert cap.wanted(mode, when, failed) is expected


def test_errors_become_one_line() -> None:
    assert cap.one_line(TTError("the backend\n  says no", "try later")) == "the backend says no (try later)"
    assert cap.one_line(KeyError("x")) == "unexpected KeyError: 'x'"


# -- the identity agent of a cold-booted VM ----------------------------------------------------
class FakeConnection:
    def __init__(self, result: RunResult | TTError) -> None:
        self.result = result
        self.commands: list[str] = []

    def run(self, cmd: str, **options: Any) -> RunResult:
        self.commands.append(cmd)
        if isinstance(self.result, TTError):
            raise self.result
        return self.result


def fake_session(conn: FakeConnection) -> Any:
    return SimpleNamespace(connection=lambda name: conn)


def test_the_identity_agent_is_started_as_the_login_user() -> None:
    from pytest_ttenv.backend.engines.identity import agent_start_command

    conn = FakeConnection(RunResult("x", 0, b"", b"", 0.1, "vm"))
    cap.start_identity_agent(fake_session(conn), "vm", "debian")
    assert conn.commands == [agent_start_command("debian", embedded=True)]


@pytest.mark.parametrize(
    ("result", "line"),
    [
        (
            RunResult("x", 1, b"", b"warning\nno \x1b[31mpython3\x07 in the guest\n", 0.1, "vm"),
            "the identity agent did not start in the guest: no python3 in the guest",
        ),
        (RunResult("x", 3, b"", b"", 0.1, "vm"), "the identity agent did not start in the guest: exit status 3"),
        (TTError("vm: connection lost"), "the identity agent could not be started in the guest: vm: connection lost"),
    ],
)
def test_an_agent_that_does_not_start_skips_the_capture(result: RunResult | TTError, line: str) -> None:
    with pytest.raises(CaptureSkipped) as err:
        cap.start_identity_agent(fake_session(FakeConnection(result)), "vm", "root")
    assert str(err.value) == line


# -- a run with a stand-in backend -------------------------------------------------------------
# The backend serves two images; its capture writes a small file for debian-12 and refuses
# debian-11 with a TTError. Every capture call is recorded in OUT/calls.jsonl.
FAKE_BACKEND = """
import json, os, time
from pathlib import Path
from pytest_ttenv.core.capture_manifest import CaptureInfo
from pytest_ttenv.core.model import EnvInfo, ImageInfo, VmInfo
from pytest_ttenv.errors import TTError

OUT = {out!r}
IMAGES = [ImageInfo(f"debian-{{v}}-x86_64", "debian", v, "x86_64") for v in ("11", "12")]


class Fake:
    # its ENV is a file in OUT: xdist workers (each with a Fake of its own) see it

    name = "fake"

    def images(self):
        return IMAGES

    def list_envs(self):
        return [EnvInfo.from_dict(json.loads(p.read_text())) for p in Path(OUT).glob("env-*.json")]

    def create_env(self, spec):
        vms = [VmInfo(vm.name, vm.image, "debian", vm.name.split("-")[1], "x86_64", state="running",
                      port=1, boot="warm") for vm in spec.vms]
        env = EnvInfo("env1", spec.name, "me", time.time(), None, "running", vms)
        Path(OUT, "env-env1.json").write_text(json.dumps(env.to_dict()))
        return env

    def show_env(self, ref):
        return EnvInfo.from_dict(json.loads(Path(OUT, f"env-{{ref}}.json").read_text()))

    def wait_vm(self, env_ref, vm_name, timeout=None):
        return self.show_env(env_ref).vm(vm_name)

    def console(self, env_ref, vm_name, lines=50):
        return "console"

    def delete_env(self, ref):
        env = self.show_env(ref)
        Path(OUT, f"env-{{ref}}.json").unlink()
        return env

    def capture(self, env_ref, vm_name, dest, test, *, image="auto", max_bytes=None, report=""):
        assert report.strip() or test.outcome == "passed", "a failed test's report is passed on"
        with open(os.path.join(OUT, "calls.jsonl"), "a") as f:
            f.write(json.dumps([env_ref, vm_name, str(dest), test.nodeid, test.when, test.outcome, image,
                                max_bytes]) + "\\n")
        if vm_name.startswith("debian-11"):
            raise TTError("fake: debian-11 cannot be captured\\n(second line)")
        Path(dest).write_bytes(b"c" * 1000)
        return CaptureInfo(str(dest), vm_name, 1000, 0.5, 0.2, False)


def pytest_ttenv_register_backends(register):
    register("fake", lambda spec, **kw: Fake())
"""

SUITE = """
import pytest

def test_pass(tt_vm):
    pass

def test_fail(tt_vm):
    assert False, "broken"

@pytest.fixture
def broken(tt_vm):
    raise RuntimeError("setup broke")

@pytest.mark.tt_os("debian12")
def test_setup_error(broken):
    pass

def test_env(tt_env):
    assert False
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A project using the stand-in backend; returns where its capture calls are recorded."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("TTENV_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TTENV_IMAGE_DIR", str(tmp_path / "images"))
    for var in ("TTENV_OS", "TTENV_ARCH", "TTENV_BACKEND", "TTENV_CAPTURE", "TTENV_CAPTURE_DIR"):
        monkeypatch.delenv(var, raising=False)
    pytester.makeconftest(FAKE_BACKEND.format(out=str(out)))
    pytester.makepyfile(test_suite=SUITE)
    return out


def calls(out: Path) -> list[list[Any]]:
    path = out / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def junit_properties(path: Path) -> dict[str, list[tuple[str, str]]]:
    cases = ET.parse(path).getroot().iter("testcase")
    return {
        f"{c.get('classname')}::{c.get('name')}": [
            (str(p.get("name")), str(p.get("value"))) for p in c.iter("property") if p.get("name") == "tt_capture"
        ]
        for c in cases
    }


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["single", "xdist"])
def test_failed_tests_capture_their_vms(pytester: pytest.Pytester, project: Path, xdist: list[str]) -> None:
    captures = pytester.path / "ttenv-captures"
    captures.mkdir()
    (captures / "old--debian-12-x86_64.ttcap").write_bytes(b"o" * 4096)  # an earlier run's: counts
    args = ["-p", "no:cacheprovider", "--tt-os=debian", "--tt-backend=fake://x", "--tt-capture=failed"]
    result = pytester.runpytest_subprocess(*args, "--tt-capture-max=1M", "--junitxml=j.xml", *xdist, timeout=120)
    result.assert_outcomes(passed=2, failed=3, errors=1)
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output and "INTERNALERROR" not in output

    ids = {
        "fail11": "test_suite.py::test_fail[debian-11-x86_64]",
        "fail12": "test_suite.py::test_fail[debian-12-x86_64]",
        "setup12": "test_suite.py::test_setup_error[debian-12-x86_64]",
        "env": "test_suite.py::test_env",
    }

    def dest(test: str, vm: str) -> str:
        return str(captures / cap.capture_name(ids[test], f"debian-{vm}-x86_64"))

    made = sorted(calls(project), key=lambda c: (c[3], c[1]))
    expected = [  # by test id, then VM
        ["env1", "debian-11-x86_64", dest("env", "11"), ids["env"], "call", "failed", "auto"],
        ["env1", "debian-12-x86_64", dest("env", "12"), ids["env"], "call", "failed", "auto"],
        ["env1", "debian-11-x86_64", dest("fail11", "11"), ids["fail11"], "call", "failed", "auto"],
        ["env1", "debian-12-x86_64", dest("fail12", "12"), ids["fail12"], "call", "failed", "auto"],
        ["env1", "debian-12-x86_64", dest("setup12", "12"), ids["setup12"], "setup", "failed", "auto"],
    ]
    assert [c[:7] for c in made] == expected
    assert not any("test_pass" in c[3] for c in made)  # passing tests: no capture
    # the budget: 1 MiB less the earlier run's file and the captures this run made before
    # (serialized: each of the three made sees the ones made before it)
    left = (1 << 20) - 4096
    assert sorted(left - c[7] for c in made if c[1] == "debian-12-x86_64") == [0, 1000, 2000]
    assert all(left - c[7] in (0, 1000, 2000) for c in made)

    def recorded(test: str, vm: str) -> tuple[str, str]:
        return ("tt_capture", f"ttenv-captures/{cap.capture_name(ids[test], f'debian-{vm}-x86_64')}")

    props = junit_properties(pytester.path / "j.xml")
    assert props["test_suite::test_fail[debian-12-x86_64]"] == [recorded("fail12", "12")]
    assert props["test_suite::test_setup_error[debian-12-x86_64]"] == [recorded("setup12", "12")]
    assert props["test_suite::test_env"] == [recorded("env", "12")]
    assert props["test_suite::test_fail[debian-11-x86_64]"] == []  # refused: no property
    assert props["test_suite::test_pass[debian-12-x86_64]"] == []

    lines = result.stdout.lines
    assert sum(1 for ln in lines if " tt capture " in ln and ln.startswith("-")) == 4  # the failures' sections
    refused = [ln for ln in lines if ln.startswith("debian-11-x86_64: not captured: ")]
    assert refused == ["debian-11-x86_64: not captured: fake: debian-11 cannot be captured (second line)"] * 2
    assert f"debian-12-x86_64: {recorded('fail12', '12')[1]} (1000 B, 0.5 s)" in lines
    summary = [ln for ln in lines if ln.startswith("ttenv: ") and "capture(s)" in ln]
    assert summary == [
        f"ttenv: 3 capture(s), 2.9 KiB, in {captures}; 2 not made (see the tests' 'tt capture' sections)"
    ]


def test_capture_all_and_the_cap(pytester: pytest.Pytester, project: Path) -> None:
    """``all`` captures passing tests too; a full dir skips captures in one line, the backend not asked."""
    out_dir = pytester.path / "caps"
    out_dir.mkdir()
    name = cap.capture_name("test_suite.py::test_pass[debian-12-x86_64]", "debian-12-x86_64")
    (out_dir / name).write_bytes(b"s" * 5000)  # this test's from an earlier run: replaced, not counted
    args = ["-p", "no:cacheprovider", "--tt-os=debian12", "--tt-backend=fake://x", "--tt-capture=all"]
    result = pytester.runpytest_subprocess(*args, "--tt-capture-dir=caps", "-k", "test_pass", "-rA", timeout=120)
    result.assert_outcomes(passed=1)
    assert [c[3:] for c in calls(project)] == [
        ["test_suite.py::test_pass[debian-12-x86_64]", "call", "passed", "auto", 2 << 30]
    ]
    assert [p.name for p in out_dir.iterdir()] == [name] and (out_dir / name).read_bytes() == b"c" * 1000
    (out_dir / "big--vm.ttcap").write_bytes(b"b" * (2 << 20))
    result = pytester.runpytest_subprocess(
        *args, "--tt-capture-dir=caps", "--tt-capture-max=2M", "-k", "test_fail", timeout=120
    )
    result.assert_outcomes(failed=1)
    assert len(calls(project)) == 1  # not asked again
    result.stdout.fnmatch_lines(
        ["debian-12-x86_64: not captured: --tt-capture-max=2.0 MiB reached: 2.0 MiB of captures in * already*"]
    )


def test_nothing_is_captured_by_default(pytester: pytest.Pytester, project: Path) -> None:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--tt-os=debian12", "--tt-backend=fake://x")
    result.assert_outcomes(passed=1, failed=2, errors=1)
    assert calls(project) == [] and not (pytester.path / "ttenv-captures").exists()
    assert "capture(s)" not in result.stdout.str()


def test_a_backend_without_capture_is_one_line(tmp_path: Path) -> None:
    hook = cap.CaptureHook(
        cast(Any, SimpleNamespace(rootpath=tmp_path, invocation_params=SimpleNamespace(dir=tmp_path))),
        cast(Any, SimpleNamespace(cfg=SimpleNamespace(capture_dir=None))),
    )
    vm = SimpleNamespace(error="", info=SimpleNamespace(boot="warm", user="root"))
    session = SimpleNamespace(vms={"vm": vm}, backend=SimpleNamespace(name="old"))
    report = cast(Any, SimpleNamespace(when="call", outcome="failed"))
    assert hook.capture(cast(Any, session), "vm", "t.py::test", report) == (
        "vm: not captured: the backend 'old' cannot capture VMs",
        None,
    )
    vm.error = "VM vm died (qemu is not running)"
    assert hook.capture(cast(Any, session), "vm", "t.py::test", report)[0] == (
        "vm: not captured: VM vm died (qemu is not running)"
    )
    assert not (tmp_path / "ttenv-captures").exists()
