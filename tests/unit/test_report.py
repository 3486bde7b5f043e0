"""``ttenv report`` and the matrix model, without VMs: JUnit files written by real pytest runs of
a suite that records the plugin's properties itself (with and without xdist), a synthetic
200-test x 12-VM matrix for the size limits, and every kind of bad input.

The same reports on JUnit files of real VM runs: tests/vm/test_ci_templates.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import jsonschema
import pytest

from pytest_ttenv.cli import main
from pytest_ttenv.report import Matrix, model, summary_lines, to_json, write_matrix
from pytest_ttenv.report.junit import ReportError, read_junit
from pytest_ttenv.report.model import Cell, VmColumn, vm_in_id
from pytest_ttenv.report.render_html import html_page
from pytest_ttenv.report.render_json import json_document, schema
from pytest_ttenv.report.render_md import markdown

VMS = ("debian-11-x86_64", "debian-12-x86_64")
FAKE_SUITE = """
import pytest

VMS = {vms!r}

@pytest.fixture(params=VMS, ids=VMS)
def vm(request, record_property):  # what the plugin records for a VM test
    record_property("tt_vm", request.param)
    record_property("tt_os", request.param.rsplit("-", 1)[0])
    record_property("tt_arch", request.param.rsplit("-", 1)[1])
    return request.param

@pytest.fixture
def broken(vm):
    raise RuntimeError("setup broke on " + vm)

def test_pass(vm): pass
def test_fail(vm): assert vm.startswith("debian-11"), "only 11 | works `here`"
def test_error(broken): pass
@pytest.mark.skip(reason="skipped by marker")  # no properties: the VM comes from the id
def test_skip(vm): pass
@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail(vm): assert 0
@pytest.mark.parametrize("n", [1, 2])
def test_param(vm, n): pass
def test_host(): pass
"""


def start_pytest(where: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """Start real pytest on the fake suite in ``where``; the process and the JUnit file it writes."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "test_fake.py").write_text(FAKE_SUITE.format(vms=VMS))
    junit = where / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TTENV_"))}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    return subprocess.Popen(argv, cwd=where, env=env, stdout=subprocess.DEVNULL, text=True), junit


@pytest.fixture(scope="module")
def junits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fake suite's JUnit files, without and with xdist (both runs at once)."""
    runs = {
        "plain": start_pytest(tmp_path_factory.mktemp("plain")),
        "xdist": start_pytest(tmp_path_factory.mktemp("xdist"), "-n", "2"),
    }
    for proc, junit in runs.values():
        assert proc.wait(timeout=300) == 1 and junit.exists()  # 1: the suite has failures
    return {name: junit for name, (_, junit) in runs.items()}


@pytest.fixture
def junit(junits: dict[str, Path]) -> Path:
    return junits["plain"]


@pytest.fixture
def junit_xdist(junits: dict[str, Path]) -> Path:
    return junits["xdist"]


def validate(document: object) -> None:
    jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker()).validate(document)


def test_outcomes_of_a_real_junit_file(junit: Path) -> None:
    matrix = read_junit([str(junit)])
    assert matrix.vm_names == list(VMS)
    assert [(vm.os, vm.arch) for vm in matrix.vms] == [("debian-11", "x86_64"), ("debian-12", "x86_64")]
    rows = {t: matrix.row(t) for t in matrix.tests()}
    assert rows == {
        "test_fake::test_error": ["error", "error"],
        "test_fake::test_fail": ["passed", "failed"],
        "test_fake::test_param[1]": ["passed", "passed"],
        "test_fake::test_param[2]": ["passed", "passed"],
        "test_fake::test_pass": ["passed", "passed"],
        "test_fake::test_skip": ["skipped", "skipped"],
        "test_fake::test_xfail": ["skipped", "skipped"],
    }
    assert matrix.other == {"passed": 1, "failed": 0, "error": 0, "skipped": 0}  # test_host ran on no VM
    fail = matrix.cells[("test_fake::test_fail", "debian-12-x86_64")]
    assert fail.message == "AssertionError: only 11 | works `here`" and "def test_fail" in fail.text
    assert fail.source == str(junit) and fail.duration is not None
    error = matrix.cells[("test_fake::test_error", "debian-11-x86_64")]
    assert "setup broke on debian-11-x86_64" in error.message + error.text
    assert matrix.cells[("test_fake::test_skip", "debian-12-x86_64")].message == "skipped by marker"
    assert matrix.counts()["debian-12-x86_64"] == {"passed": 3, "failed": 1, "error": 1, "skipped": 2, "not-run": 0}


def test_xdist_junit_gives_the_same_matrix(junit: Path, junit_xdist: Path) -> None:
    plain, xdist = read_junit([str(junit)]), read_junit([str(junit_xdist)])
    assert {t: plain.row(t) for t in plain.tests()} == {t: xdist.row(t) for t in xdist.tests()}
    assert plain.other == xdist.other


def test_merge_last_result_wins_and_remembers(tmp_path: Path, junit: Path) -> None:
    # a rerun job's file with test_fail passing on debian 12 and a third VM
    rerun = tmp_path / "rerun.xml"
    rerun.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="test_fake" name="test_fail[debian-12-x86_64]" time="0.1"/>'
        '<testcase classname="test_fake" name="test_pass[debian-13-x86_64]" time="0.1"/>'
        "</testsuite></testsuites>"
    )
    matrix = read_junit([str(junit), str(rerun), str(junit.parent / "." / junit.name)])  # the same file twice
    assert matrix.sources == [str(junit), str(rerun)]  # read once
    cell = matrix.cells[("test_fake::test_fail", "debian-12-x86_64")]
    assert cell.outcome == "passed" and cell.previous == ["failed"]
    assert matrix.vm_names == [*VMS, "debian-13-x86_64"]
    assert matrix.row("test_fake::test_pass") == ["passed", "passed", "passed"]
    assert matrix.row("test_fake::test_fail") == ["passed", "passed", "not-run"]
    md = markdown(matrix)
    assert "| `test_fake::test_fail` | ✅ | ✅↻ | ➖ |" in md
    doc = json_document(matrix)
    validate(doc)
    assert {"test": "test_fake::test_fail", "vm": "debian-12-x86_64", "outcome": "passed"}.items() <= next(
        d for d in doc["details"] if d["test"] == "test_fake::test_fail"
    ).items()


def test_globs_and_directories(tmp_path: Path, junit: Path, junit_xdist: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "j1.xml").write_bytes(junit.read_bytes())
    (tmp_path / "a" / "j2.xml").write_bytes(junit_xdist.read_bytes())
    (tmp_path / "a" / "notes.txt").write_text("not a report")
    by_dir = read_junit([str(tmp_path / "a")])
    assert [Path(s).name for s in by_dir.sources] == ["j1.xml", "j2.xml"]
    by_glob = read_junit([str(tmp_path / "a" / "**" / "*.xml")])
    assert sorted(Path(s).name for s in by_glob.sources) == ["j1.xml", "j2.xml"]
    assert all(c.previous == [c.outcome] for c in by_dir.cells.values())  # same results twice: flagged as reruns


def test_cli_writes_all_formats(tmp_path: Path, junit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "report",
            str(junit),
            "--title",
            "My <matrix>",
            "--details",
            "--md",
            str(out / "m.md"),
            "--html",
            str(out / "m.html"),
            "--json",
            str(out / "m.json"),
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert "debian-12-x86_64" in stdout and "test_fake::test_fail: debian-12-x86_64 failed" in stdout
    assert "1 JUnit file(s), 7 tests x 2 VMs, 1 test case(s) on no VM left out" in stdout
    md = (out / "m.md").read_text()
    assert md.startswith("## My &lt;matrix&gt;\n")
    assert "| `test_fake::test_fail` | ✅ | ❌ |" in md and "| `test_fake::test_error` | 💥 | 💥 |" in md
    assert "<summary>❌ <code>test_fake::test_fail</code> on <code>debian-12-x86_64</code>" in md
    assert "E   AssertionError: only 11 | works `here`" in md  # --details: the report text
    doc = json.loads((out / "m.json").read_text())
    validate(doc)
    assert doc["title"] == "My <matrix>" and doc["tests"]["test_fake::test_skip"]["debian-11-x86_64"] == "skipped"
    page = (out / "m.html").read_text()
    assert "<script" not in page and "http" not in page.split("</style>")[0]  # self-contained, no scripts
    assert '<td class="cell failed" data-vm="debian-12-x86_64" data-outcome="failed"' in page
    assert "<title>My &lt;matrix&gt;</title>" in page

    assert main(["report", str(junit), "--md", "-"]) == 0
    assert capsys.readouterr().out.startswith("## ttenv compatibility matrix")  # stdout: the Markdown only


def test_markdown_without_details_has_no_messages(junit: Path) -> None:
    md = markdown(read_junit([str(junit)]))
    assert "### Failures" not in md and "only 11" not in md
    assert "**7 tests × 2 VMs** — ✅ 7 passed · ❌ 1 failed · 💥 2 error · ⏭ 4 skipped" in md


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file, not JUnit XML"),
        ("<testsuites><testsuite>", "not well-formed XML (no element found: line 1, column 23)"),
        ("<html><body/></html>", "not JUnit XML (root <html>, expected <testsuites> or <testsuite>)"),
        ('<testsuites><testsuite name="pytest" tests="0"/></testsuites>', "no test cases in this JUnit file"),
        (b"\xff\xfe<t", "not well-formed XML"),
    ],
)
def test_bad_junit_is_one_line_exit_2(
    tmp_path: Path, content: str | bytes, message: str, junit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["report", str(junit), str(bad), "--md", str(tmp_path / "m.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ttenv: error: {bad}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "m.md").exists()  # nothing written from half the input


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("missing.xml", "missing.xml: no such file"),
        ("nothing/*.xml", "nothing/*.xml: no file matches this pattern"),
        ("emptydir", "emptydir: no *.xml file in this directory"),
    ],
)
def test_missing_inputs_are_one_line(tmp_path: Path, arg: str, message: str) -> None:
    (tmp_path / "emptydir").mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "pytest_ttenv.cli", "report", arg],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr == f"ttenv: error: {message}\n" and "Traceback" not in res.stderr


def test_unwritable_output_is_one_line(tmp_path: Path, junit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["report", str(junit), "--html", str(tmp_path / "file" / "m.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ttenv: error: cannot write the report to ") and err.count("\n") == 1


def test_ids_and_keys() -> None:
    assert vm_in_id("test_x[debian-12-x86_64]") == "debian-12-x86_64"
    assert vm_in_id("test_x[3-ubuntu-24.04-aarch64-fast]") == "ubuntu-24.04-aarch64"
    assert vm_in_id("test_x[no-vm]") is None and vm_in_id("test_x") is None
    assert model.test_key("t.py::test_y[debian-12-x86_64-3]", "debian-12-x86_64") == "t.py::test_y[3]"
    assert model.test_key("test_y[1-debian-12-x86_64]", "debian-12-x86_64") == "test_y[1]"


def test_tt_env_case_lands_on_every_vm_it_names(tmp_path: Path) -> None:
    f = tmp_path / "env.xml"
    f.write_text(
        '<testsuite name="pytest"><testcase classname="t" name="test_env" time="1.5"><properties>'
        '<property name="tt_vm" value="debian-11-x86_64"/><property name="tt_os" value="debian-11"/>'
        '<property name="tt_arch" value="x86_64"/><property name="tt_vm" value="debian-12-aarch64"/>'
        '<property name="tt_os" value="debian-12"/><property name="tt_arch" value="aarch64"/>'
        '</properties><failure message="boom">trace</failure></testcase></testsuite>'
    )
    matrix = read_junit([str(f)])
    assert matrix.row("t::test_env") == ["failed", "failed"]
    assert matrix.vms == [
        VmColumn("debian-11-x86_64", "debian-11", "x86_64"),
        VmColumn("debian-12-aarch64", "debian-12", "aarch64"),
    ]


def test_markdown_escapes_table_breakers() -> None:
    matrix = Matrix()
    matrix.add("t::test_a[x|y]", VmColumn.from_name("debian-12-x86_64"), Cell("failed", "bad `thing` <b>"))
    matrix.add("t::test_`b`", VmColumn.from_name("debian-12-x86_64"), Cell("passed"))
    md = markdown(matrix, details=True)
    assert "| `t::test_a[x\\|y]` | ❌ |" in md and "| `` t::test_`b` `` | ✅ |" in md
    assert ": bad `thing` &lt;b&gt;</summary>" in md


# -- the in-session report (the plugin's API) -------------------------------------------------------
def test_in_session_api(tmp_path: Path) -> None:
    outcomes = {
        ("t.py::test_a", "debian-12-x86_64"): "passed",
        ("t.py::test_a", "debian-11-x86_64"): "failed",
        ("t.py::test_b", "debian-12-x86_64"): "skipped",
    }
    vms = ["debian-12-x86_64", "debian-11-x86_64"]
    assert summary_lines(outcomes, vms) == [
        "VM                 passed   failed    error  skipped",
        "debian-12-x86_64        1        0        0        1",
        "debian-11-x86_64        0        1        0        0",
        "  t.py::test_a: debian-11-x86_64 failed",
    ]
    doc = to_json(outcomes, vms)
    validate(doc)
    assert doc["tests"] == {
        "t.py::test_a": {"debian-12-x86_64": "passed", "debian-11-x86_64": "failed"},
        "t.py::test_b": {"debian-12-x86_64": "skipped", "debian-11-x86_64": "not-run"},
    }
    for name in ("m.json", "m.md", "m.html", "m.txt"):
        write_matrix(str(tmp_path / name), outcomes, vms)
    assert json.loads((tmp_path / "m.json").read_text())["counts"]["debian-11-x86_64"]["failed"] == 1
    assert "| `t.py::test_a` | ✅ | ❌ |" in (tmp_path / "m.md").read_text()
    assert 'data-test="t.py::test_a"' in (tmp_path / "m.html").read_text()
    assert (tmp_path / "m.txt").read_text().splitlines()[0].startswith("VM ")


# -- size limits --------------------------------------------------------------------------------------
def synthetic_junit(
    path: Path, tests: int, vms: list[str], fail_every: int, text_size: int = 2000, pad: int = 0
) -> Path:
    """One JUnit file per VM, as CI jobs write them: ``tests`` tests (names ``pad`` characters
    longer), every ``fail_every``-th failing on the VMs it picks, ``text_size`` characters of
    traceback each."""
    path.mkdir(parents=True, exist_ok=True)
    for v, vm in enumerate(vms):
        cases = []
        for t in range(tests):
            name = quoteattr(f"test_feature_{t:04d}_does_something_reasonably_long{'_' * pad}[{vm}]")
            props = (
                f'<properties><property name="tt_vm" value="{vm}"/>'
                f'<property name="tt_os" value="{vm.rsplit("-", 1)[0]}"/>'
                f'<property name="tt_arch" value="{vm.rsplit("-", 1)[1]}"/></properties>'
            )
            body = ""
            if t % fail_every == 0 and (t + v) % 3 == 0:
                body = f'<failure message="AssertionError: {t} on {vm}">{"x" * text_size}</failure>'
            elif t % 17 == 0:
                body = '<skipped type="pytest.skip" message="not here">skip</skipped>'
            cases.append(f'<testcase classname="tests.test_big" name={name} time="0.5">{props}{body}</testcase>')
        (path / f"junit-{vm}.xml").write_text(
            f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'
        )
    return path


TWELVE = [
    f"{os}-{arch}"
    for os in ("debian-11", "debian-12", "debian-13", "ubuntu-22.04", "ubuntu-24.04", "fedora-42")
    for arch in ("x86_64", "aarch64")
]


def test_200_tests_on_12_vms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = synthetic_junit(tmp_path / "junit", 200, TWELVE, fail_every=10)
    out = tmp_path / "out"
    start = time.monotonic()
    code = main(
        [
            "report",
            str(src),
            "--details",
            "--md",
            str(out / "m.md"),
            "--html",
            str(out / "m.html"),
            "--json",
            str(out / "m.json"),
        ]
    )
    elapsed = time.monotonic() - start
    assert code == 0
    md = (out / "m.md").read_bytes()
    with capsys.disabled():
        print(
            f"\n200x12 report: {elapsed:.2f} s; md {len(md)} B, html {(out / 'm.html').stat().st_size} B, "
            f"json {(out / 'm.json').stat().st_size} B"
        )
    assert elapsed < 20
    assert len(md) < 1_000_000
    text = md.decode()
    assert "**200 tests × 12 VMs**" in text
    assert "180 of 200 tests passed, were skipped or did not run on every VM: their rows are collapsed" in text
    assert text.count("| `tests.test_big::test_feature_") == 20  # only the rows with failures
    assert text.count("<details>") == 80  # 20 tests x 4 of 12 VMs failing, all fit
    doc = json.loads((out / "m.json").read_text())
    validate(doc)
    assert len(doc["tests"]) == 200 and doc["totals"]["failed"] == 80 and len(doc["vms"]) == 12
    assert (out / "m.html").read_text().count('<tr class="') == 200


def test_huge_matrix_stays_under_the_step_summary_limit(tmp_path: Path) -> None:
    junit = synthetic_junit(tmp_path / "junit", 2500, TWELVE, fail_every=1, text_size=500, pad=300)
    matrix = read_junit([str(junit)])
    md = markdown(matrix, details=True)
    size = len(md.encode())
    assert 900_000 < size < 1_000_000
    assert "more rows left out to stay under the step-summary size limit" in md
    assert md.rstrip().endswith("<sub>12 JUnit file(s) merged by <code>ttenv report</code></sub>")
    small = markdown(matrix, details=True, limit=50_000)
    assert len(small.encode()) < 50_000


def test_html_escapes_everything(tmp_path: Path) -> None:
    matrix = Matrix(title="<b>")
    matrix.add('t::test_"x"<y>', VmColumn.from_name("debian-12-x86_64"), Cell("error", "<script>", "</pre><i>"))
    page = html_page(matrix)
    assert "<script>" not in page and "</pre><i>" not in page and "&lt;script&gt;" in page


def test_report_error_is_a_usage_error() -> None:
    assert ReportError("x").exit_code == 2
