"""JUnit XML files -> the matrix (junitparser).

Each test case lands on the VMs its ``tt_vm`` properties name (several for a ``tt_env`` test),
else on the VM named in its id's parameter part (``test_x[debian-12-x86_64]``: a test skipped
before its fixtures ran carries no properties); test cases naming no VM are counted in
``Matrix.other`` and left out. A case's outcome: ``failed`` if it has a ``<failure>``, else ``error``
for an ``<error>``, ``skipped`` for a ``<skipped>`` (pytest writes xfail so), else ``passed``.
Its ``tt_capture`` properties (paths of VM captures, untrusted: filtered and assigned to its
cells by ``captures.accept`` and ``captures.assign``) go on its cells, never looked up on disk.
Rows are ``classname::name`` with the VM part of the name removed; columns are sorted by VM name
(numbers as numbers). Files are read in the order
given (glob matches and directory contents sorted); a file named twice is read once; where
results collide the last one read wins (see ``Matrix.add``).

Every problem with an input (missing, unreadable, not XML, not JUnit, no test cases) raises
``ReportError`` whose text is one line naming the file.
"""

from __future__ import annotations

import glob
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, JUnitXmlError, Properties, Skipped, TestCase

from pytest_ttenv.errors import UsageError
from pytest_ttenv.report import captures
from pytest_ttenv.report.model import Cell, Matrix, VmColumn, first_line, test_key, vm_in_id


class ReportError(UsageError):
    """An input file that cannot be used; the text names it (exit code 2)."""


def expand(args: Sequence[str]) -> list[Path]:
    """Files for ``args``: a file, a directory (every ``*.xml`` below it) or a glob (``**``
    allowed); in order, each file once. Raises ReportError for an argument that yields no file."""
    if not args:
        raise ReportError("no JUnit files given", "e.g. ttenv report 'junit/*.xml'")
    found: dict[Path, Path] = {}
    for arg in args:
        if glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise ReportError(f"{arg}: no file matches this pattern")
            paths = [p for m in matches for p in _files_in(Path(m))]
        elif os.path.isdir(arg):
            paths = _files_in(Path(arg))
            if not paths:
                raise ReportError(f"{arg}: no *.xml file in this directory")
        elif not os.path.lexists(arg):
            raise ReportError(f"{arg}: no such file")
        else:
            paths = [Path(arg)]
        for path in paths:
            found.setdefault(path.resolve(), path)
    return list(found.values())


def _files_in(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.xml") if p.is_file()) if path.is_dir() else [path]


def read_junit(args: Sequence[str], title: str | None = None) -> Matrix:
    """The matrix of every JUnit file ``args`` name (see ``expand``)."""
    matrix = Matrix() if title is None else Matrix(title=title)
    for path in expand(args):
        add_file(matrix, path)
    matrix.vms.sort(key=lambda vm: natural_key(vm.name))
    return matrix


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key with numbers compared as numbers: debian-9 < debian-11 < ubuntu-22.04."""
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name) if part]


def _load(path: Path) -> JUnitXml:
    try:
        if path.stat().st_size == 0:
            raise ReportError(f"{path}: empty file, not JUnit XML")
        return JUnitXml.fromfile(str(path))
    except ET.ParseError as exc:
        raise ReportError(f"{path}: not well-formed XML ({exc})") from None
    except JUnitXmlError:
        root = ET.parse(path).getroot().tag
        raise ReportError(f"{path}: not JUnit XML (root <{root}>, expected <testsuites> or <testsuite>)") from None
    except (OSError, UnicodeError) as exc:
        raise ReportError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def add_file(matrix: Matrix, path: Path) -> None:
    """Add every test case of one JUnit file to ``matrix``."""
    cases = [case for suite in _load(path) for case in suite]
    if not cases:
        raise ReportError(f"{path}: no test cases in this JUnit file")
    matrix.sources.append(str(path))
    for case in cases:
        _add_case(matrix, case, str(path))


def _properties(case: TestCase) -> list[tuple[str, str]]:
    found = case.iterchildren(Properties)  # type: ignore[no-untyped-call]  # junitparser leaves it unannotated
    return [(str(p.name), str(p.value)) for props in found for p in props]


def _outcome(case: TestCase) -> tuple[str, str, str]:
    """(outcome, one-line message, full text) of a test case."""
    results = case.result
    for kind, outcome in ((Failure, "failed"), (Error, "error"), (Skipped, "skipped")):
        hits = [r for r in results if isinstance(r, kind)]
        if hits:
            texts = [str(r.text or "").strip() for r in hits]
            message = first_line(str(hits[0].message or "")) or first_line(texts[0])
            return outcome, message, "\n\n".join(t for t in texts if t)
    return "passed", "", ""


def _add_case(matrix: Matrix, case: TestCase, source: str) -> None:
    name, classname = str(case.name or ""), str(case.classname or "")
    props = _properties(case)
    vms = _unique(v for k, v in props if k == "tt_vm")
    fallback = vm_in_id(name)
    if not vms and fallback:
        vms = [fallback]
    outcome, message, text = _outcome(case)
    if not vms:
        matrix.other[outcome] += 1
        return
    prop = dict(props)
    captured = captures.assign(captures.accept(v for k, v in props if k == captures.PROPERTY), vms)
    for vm in vms:
        column = VmColumn.from_name(vm)
        if len(vms) == 1 and prop.get("tt_os") and prop.get("tt_arch"):
            column = VmColumn(vm, prop["tt_os"], prop["tt_arch"])
        row = test_key(name, vm)
        test = f"{classname}::{row}" if classname else row
        duration = float(case.time) if case.time is not None else None
        matrix.add(test, column, Cell(outcome, message, text, duration, source, captures=captured[vm]))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
