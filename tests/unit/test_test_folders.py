"""The folder rule of tests/conftest.py (tests/helpers/layout.py), run on a suite of its own: a test
marked ``vm``/``slow`` in unit/ or an unmarked one in vm/ fails the collection with one line each,
whatever ``-m`` selects; correctly placed tests are collected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
TESTS = Path(__file__).resolve().parents[1]


def _suite(pytester: pytest.Pytester, unit: str, vm: str) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    vm: boots VMs\n    slow: slow VMs\n")
    shutil.copy(TESTS / "conftest.py", pytester.path / "conftest.py")
    (pytester.path / "helpers").mkdir()
    for name in ("__init__.py", "layout.py", "prebuild.py"):
        shutil.copy(TESTS / "helpers" / name, pytester.path / "helpers" / name)
    pytester.makepyfile(**{"unit/test_u": "import pytest\n\n" + unit, "vm/test_v": "import pytest\n\n" + vm})


def test_a_test_in_the_wrong_folder_fails_the_collection_with_one_line(pytester: pytest.Pytester) -> None:
    _suite(
        pytester,
        unit="@pytest.mark.vm\ndef test_boots():\n    pass\n\ndef test_fast():\n    pass\n",
        vm="def test_fast():\n    pass\n\n@pytest.mark.slow\ndef test_slow():\n    pass\n",
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not vm and not slow")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert [line for line in result.stderr.lines if line.strip()] == [
        "ERROR: unit/test_u.py::test_boots: marked vm in tests/unit (no VMs there): move it to tests/vm",
        "ERROR: vm/test_v.py::test_fast: not marked vm or slow in tests/vm: mark it, or move it to tests/unit",
    ]


def test_tests_in_their_folders_are_collected(pytester: pytest.Pytester) -> None:
    _suite(
        pytester,
        unit="def test_fast():\n    pass\n",
        vm="pytestmark = pytest.mark.vm  # the module's mark counts\n\ndef test_boots():\n    pass\n\n"
        "@pytest.mark.slow\ndef test_slow():\n    pass\n",
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK, result.stderr.str()
    result.stdout.fnmatch_lines(["unit/test_u.py::test_fast", "vm/test_v.py::test_boots", "vm/test_v.py::test_slow"])
