"""VM captures in ``ttenv report``: the ``tt_capture`` JUnit properties of a real pytest run (a suite
recording them as the plugin does, hostile values included) linked from the matrix's cells in
Markdown and HTML, listed in JSON, counted in the text; the values are never followed on disk.

The reports without captures: tests/unit/test_report.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest

from pytest_ttenv.cli import main
from pytest_ttenv.report import captures
from pytest_ttenv.report.junit import read_junit
from pytest_ttenv.report.render_html import html_page
from pytest_ttenv.report.render_json import json_document, schema
from pytest_ttenv.report.render_md import markdown

D11, D12 = "debian-11-x86_64", "debian-12-x86_64"
HOSTILE = [
    'evil"><img src=x onerror=alert(1)>.ttcap',  # markup in the name
    "javascript:alert(1)//x.ttcap",  # a scheme
    "a|b](http://evil.example) `x`.ttcap",  # table and link breakers
    "../../../../etc/outside.ttcap",  # leaves the project: no link
    "bad\nline.ttcap",  # control character: dropped
    "ttenv-captures/" + "x" * 2000 + ".ttcap",  # too long: dropped
    "/etc/passwd",  # not a capture: dropped
]
SUITE = f"""
import pytest

VMS = {[D11, D12]!r}
HOSTILE = {HOSTILE!r}

@pytest.fixture(params=VMS, ids=VMS)
def vm(request, record_property):  # what the plugin records for a VM test
    record_property("tt_vm", request.param)
    record_property("tt_os", request.param.rsplit("-", 1)[0])
    record_property("tt_arch", request.param.rsplit("-", 1)[1])
    return request.param

def test_ok(vm): pass

def test_fails_on_12(vm, record_property):
    if vm.endswith("12-x86_64"):
        record_property("tt_capture", f"ttenv-captures/test_fails_on_12--{{vm}}.ttcap")
        assert 0, "broke"

def test_hostile(vm, record_property):
    if vm.startswith("debian-11"):
        for value in HOSTILE:
            record_property("tt_capture", value)
        assert 0, "hostile"

def test_env(record_property):  # a tt_env test: one tt_vm and one capture per VM
    for name in VMS:
        record_property("tt_vm", name)
    for name in reversed(VMS):
        record_property("tt_capture", f"/abs/caps/test_env--{{name}}.ttcap")
    assert 0, "env"
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project dir after a real pytest run of SUITE: ``junit/junit.xml``; no capture file exists."""
    where = tmp_path_factory.mktemp("project")
    (where / "test_caps.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TTENV_"))}
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:ttenv",
        "--junitxml=junit/junit.xml",
    ]
    proc = subprocess.run(argv, cwd=where, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the suite has failures
    return where


@pytest.fixture
def project(run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(run)  # relative capture paths are relative to rootdir = where the report runs
    return run


class Links(HTMLParser):
    """Every ``<a href>`` and whether any ``<script>`` or ``<img>`` element is in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag in ("script", "img")
        self.hrefs += [v or "" for k, v in attrs if tag == "a" and k == "href"]


def test_captures_land_on_their_cells(project: Path) -> None:
    matrix = read_junit(["junit/junit.xml"])
    assert matrix.cells[("test_caps::test_fails_on_12", D12)].captures == [
        f"ttenv-captures/test_fails_on_12--{D12}.ttcap"
    ]
    assert matrix.cells[("test_caps::test_fails_on_12", D11)].captures == []
    # two VMs, two captures: each on the VM its file name ends with, whatever their order
    assert matrix.cells[("test_caps::test_env", D11)].captures == [f"/abs/caps/test_env--{D11}.ttcap"]
    assert matrix.cells[("test_caps::test_env", D12)].captures == [f"/abs/caps/test_env--{D12}.ttcap"]
    # hostile values: only those that may name a capture are kept (no control character, length
    # bound, .ttcap); they name no VM, so they go to every cell of the case (one here)
    assert matrix.cells[("test_caps::test_hostile", D11)].captures == HOSTILE[:4]
    assert [t for t, _, _ in matrix.captures()] == ["test_caps::test_env"] * 2 + ["test_caps::test_fails_on_12"] + [
        "test_caps::test_hostile"
    ] * 4


def test_markdown_links_from_where_it_is_written(project: Path) -> None:
    assert main(["report", "junit", "--details", "--md", "out/m.md"]) == 0
    md = (project / "out" / "m.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `test_caps::test_fails_on_12` |"))
    link = f"../ttenv-captures/test_fails_on_12--{D12}.ttcap"
    assert row == f"| `test_caps::test_fails_on_12` | ✅ | ❌ [📦]({link}) |"
    assert f'<a href="{link}"><code>test_fails_on_12--{D12}.ttcap</code></a>' in md  # in the failure's details
    assert "`ttenv replay FILE`" in md  # the legend says what 📦 is
    # hostile values: percent-encoded destinations, escaped names; nothing breaks out of the row
    hostile = next(line for line in md.splitlines() if line.startswith("| `test_caps::test_hostile` |"))
    assert hostile.count("|") == 4 and "evil.example)" not in hostile and "<img" not in md
    assert "(../evil%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.ttcap)" in hostile
    assert "(../javascript%3Aalert%281%29/x.ttcap)" in hostile
    assert hostile.endswith(
        "[📦](../a%7Cb%5D%28http%3A/evil.example%29%20%60x%60.ttcap) 📦 | ✅ |"  # the 4th: outside, no link
    )


def test_markdown_to_stdout_or_outside_the_project(project: Path, tmp_path: Path) -> None:
    matrix = read_junit(["junit/junit.xml"])
    stdout = markdown(matrix)  # out_dir None: the current directory
    assert f"[📦](ttenv-captures/test_fails_on_12--{D12}.ttcap)" in stdout
    summary = markdown(matrix, out_dir=str(tmp_path / "step-summary"))  # e.g. $GITHUB_STEP_SUMMARY
    assert "](" not in summary and "| ✅ | ❌ 📦 |" in summary


def test_html_links_and_escapes(project: Path) -> None:
    assert main(["report", "junit", "--html", "report/deep/m.html"]) == 0
    page = (project / "report" / "deep" / "m.html").read_text()
    links = Links()
    links.feed(page)
    assert links.scripts == 0
    captures_linked = [h for h in links.hrefs if h.endswith(".ttcap")]
    assert f"../../ttenv-captures/test_fails_on_12--{D12}.ttcap" in captures_linked
    assert all(h.startswith("../../") and ":" not in h and '"' not in h and " " not in h for h in captures_linked)
    assert not any("outside" in h or "abs/caps" in h for h in links.hrefs)  # outside the project: no link
    assert 'title="VM capture: outside.ttcap">capture</span>' in page
    assert 'title="VM capture: evil&quot;&gt;&lt;img src=x onerror=alert(1)&gt;.ttcap"' in page
    assert f"<code>test_fails_on_12--{D12}.ttcap</code></a></p>" in page  # named in the failure's details


def test_json_lists_captures_per_test_case(project: Path) -> None:
    assert main(["report", "junit", "--json", "m.json"]) == 0
    doc = json.loads((project / "m.json").read_text())
    jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker()).validate(doc)
    assert doc["captures"][:3] == [
        {"test": "test_caps::test_env", "vm": D11, "path": f"/abs/caps/test_env--{D11}.ttcap"},
        {"test": "test_caps::test_env", "vm": D12, "path": f"/abs/caps/test_env--{D12}.ttcap"},
        {"test": "test_caps::test_fails_on_12", "vm": D12, "path": f"ttenv-captures/test_fails_on_12--{D12}.ttcap"},
    ]
    old = dict(doc)
    del old["captures"]  # a document written before captures existed still validates
    jsonschema.Draft202012Validator(schema()).validate(old)


def test_text_counts_and_nothing_is_read_from_disk(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "ttenv-captures").mkdir(exist_ok=True)
    (project / "ttenv-captures" / f"test_fails_on_12--{D12}.ttcap").symlink_to("/nonexistent")
    try:
        assert main(["report", "junit"]) == 0
    finally:
        (project / "ttenv-captures" / f"test_fails_on_12--{D12}.ttcap").unlink()
    out = capsys.readouterr().out
    assert out.strip().endswith(
        "1 JUnit file(s), 4 tests x 2 VMs, 7 VM capture(s); wrote nothing (give --md, --html or --json)"
    )


def test_href_and_accept_contracts(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert captures.href("c/x.ttcap", "r", root) == "../c/x.ttcap"
    assert captures.href(f"{root}/c/x.ttcap", None, root) == "c/x.ttcap"
    assert captures.href("../x.ttcap", None, root) is None and captures.href("x.ttcap", "/elsewhere", root) is None
    assert captures.href("c/a b#?.ttcap", ".", root) == "c/a%20b%23%3F.ttcap"
    assert captures.accept(["a.ttcap", "a.ttcap", "b.txt", "", "\x1b[31m.ttcap"]) == ["a.ttcap"]
    assert len(captures.accept(f"{i}.ttcap" for i in range(100))) == captures.MAX_PER_CASE
    assert captures.assign(["x--vm1.ttcap", "y.ttcap"], ["vm1", "vm2"]) == {
        "vm1": ["x--vm1.ttcap", "y.ttcap"],
        "vm2": ["y.ttcap"],
    }
    assert len(captures.label("d/" + "n" * 500 + ".ttcap")) == captures.LABEL_CHARS


def test_reports_without_captures_are_unchanged(project: Path) -> None:
    matrix = read_junit(["junit/junit.xml"])
    for cell in matrix.cells.values():
        cell.captures = []
    assert "📦" not in markdown(matrix, details=True) and 'class="capture"' not in html_page(matrix)
    assert json_document(matrix)["captures"] == []
