"""The docs against the code, without running them: every command sits in a ```sh block and
parses with the real ``ttenv`` and pytest parsers, every NOT_RUN entry is used and points at
tests that exist, and the reference page lists every setting (names and default), fixture,
marker, hook and public attribute of ``Vm``, ``Env`` and ``RunResult``.

Running the pages' commands: tests/vm/test_docs.py."""

from __future__ import annotations

import ast
import inspect
import re
import shlex

import pytest

from pytest_ttenv import hookspecs
from pytest_ttenv.cli import build_parser
from pytest_ttenv.config import SETTINGS
from pytest_ttenv.fixtures import Env, Vm
from pytest_ttenv.ssh import RunResult

from helpers.docs import NOT_RUN, PAGES, ROOT, Command, all_commands, blocks

pytest_plugins = ["pytester"]


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
        loose += [
            f"{b.page.relative_to(ROOT)}:{b.line}: ``` without a language"
            for b in blocks(page)
            if not b.lang and re.search(r"^(ttenv|pytest|pip|bash) ", b.text, re.M)
        ]
    assert not loose, "put commands in ```sh blocks:\n" + "\n".join(loose)


def test_every_not_run_entry_is_used_and_points_at_what_runs_it() -> None:
    cmds = all_commands()
    for pattern, (_, instead) in NOT_RUN.items():
        assert any(re.search(pattern, c.text) for c in cmds), f"NOT_RUN {pattern!r} matches no command of the docs"
        for ref in instead:
            path, _, func = ref.partition("::")
            assert (ROOT / path).exists(), f"NOT_RUN {pattern!r}: {path} does not exist"
            if func:
                names = {
                    n.name for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.FunctionDef)
                }
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
    rows = [
        [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in text.split("\n")
        if line.startswith("| ") and not line.startswith("| ---")
    ]
    return rows[1:]  # without the header


def test_reference_lists_every_setting_with_its_names_and_default() -> None:
    rows = {r[0]: r for r in _table_rows("Settings")}
    expected = {
        f"`{s.flag}`": [f"`{s.flag}`", f"`{s.dest}`", f"`{s.env}`", f"`{s.default}`" if s.default else "—"]
        for s in SETTINGS
    }
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
        names |= {
            n.attr
            for n in ast.walk(ast.parse(inspect.getsource(cls)))
            if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id == "self"
            and isinstance(n.ctx, ast.Store)
            and not n.attr.startswith("_")
        }
    return names | {f.name for f in getattr(cls, "__dataclass_fields__", {}).values()}


@pytest.mark.parametrize(
    ("heading", "cls"),
    [
        ("`Vm` (`pytest_ttenv.fixtures.Vm`)", Vm),
        ("`Env` (`pytest_ttenv.fixtures.Env`)", Env),
        ("`RunResult` (`pytest_ttenv.ssh.RunResult`)", RunResult),
    ],
)
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
