"""The compatibility matrix: one outcome per (test, VM) cell, whatever produced it.

Two producers share this model: the plugin's in-session recorder (``Matrix.from_outcomes``) and
merged JUnit XML files (``pytest_ttenv.report.junit``). Renderers (text, Markdown, HTML, JSON) take
a ``Matrix`` and nothing else.

Cell outcomes are ``passed``, ``failed``, ``error`` (setup/teardown failed), ``skipped`` (xfail
included) and ``not-run`` (no result for that VM: a marker excluded it, or its job produced none).
When one cell gets several results (the same test on the same VM in two files, or twice in one
file), the last one added wins; the cell keeps the earlier outcomes in ``previous`` so a rerun's
pass is shown as such rather than hiding that it failed first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from pytest_ttenv.core.naming import ARCHES

OUTCOMES = ("passed", "failed", "error", "skipped")
NOT_RUN = "not-run"
CELL_OUTCOMES = (*OUTCOMES, NOT_RUN)
BAD = ("failed", "error")
Outcomes = Mapping[tuple[str, str], str]

_VM_IN_ID = re.compile(rf"(?:^|-)([a-z][a-z0-9]*-[0-9][a-z0-9.]*-(?:{'|'.join(ARCHES)}))(?=-|$)")


def outcome_of(report: pytest.TestReport) -> str | None:
    """The matrix outcome a report decides, or None if it decides nothing (a passing setup)."""
    if report.skipped:
        return "skipped"
    if report.failed:
        return "failed" if report.when == "call" else "error"
    return "passed" if report.when == "call" else None


def test_key(nodeid: str, vm: str) -> str:
    """The test's id with the VM's part of the parameter id removed: ``t.py::test_x[debian-12-x86_64]``
    -> ``t.py::test_x``; other parameters stay (``test_y[debian-12-x86_64-3]`` -> ``test_y[3]``)."""
    m = re.match(r"^(.*?)\[(.*)\]$", nodeid)
    if not m:
        return nodeid
    parts = [p for p in re.split(rf"(?:^|-){re.escape(vm)}(?=-|$)", m.group(2)) if p.strip("-")]
    rest = "-".join(p.strip("-") for p in parts)
    return f"{m.group(1)}[{rest}]" if rest else m.group(1)


def vm_properties(vm: str) -> list[tuple[str, str]]:
    """The JUnit properties a test instance on ``vm`` carries: ``tt_vm``, ``tt_os``, ``tt_arch``."""
    column = VmColumn.from_name(vm)
    return [("tt_vm", vm), ("tt_os", column.os), ("tt_arch", column.arch)]


def vm_in_id(name: str) -> str | None:
    """The VM named in a test id's parameter part (``test_x[debian-12-x86_64]``), or None."""
    m = re.match(r"^.*?\[(.*)\]$", name)
    hit = _VM_IN_ID.search(m.group(1)) if m else None
    return hit.group(1) if hit else None


@dataclass(frozen=True)
class VmColumn:
    """A column of the matrix: the VM's canonical name, its OS (``debian-12``) and arch."""

    name: str
    os: str
    arch: str

    @classmethod
    def from_name(cls, name: str) -> VmColumn:
        os_name, _, arch = name.rpartition("-")
        return cls(name, os_name or name, arch if os_name else "")


@dataclass
class Cell:
    """One test on one VM. ``message`` is one line (the failure or skip reason), ``text`` the full
    report (traceback), ``previous`` the outcomes this cell's result replaced (earlier runs),
    ``captures`` the paths of this result's VM captures as recorded (``report.captures``)."""

    outcome: str
    message: str = ""
    text: str = ""
    duration: float | None = None
    source: str = ""
    previous: list[str] = field(default_factory=list)
    captures: list[str] = field(default_factory=list)


@dataclass
class Matrix:
    """Tests x VMs. ``other`` counts test cases that ran on no VM (left out of the matrix)."""

    title: str = "ttenv compatibility matrix"
    vms: list[VmColumn] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @classmethod
    def from_outcomes(cls, outcomes: Outcomes, vms: Sequence[str], title: str | None = None) -> Matrix:
        """The matrix of the plugin's in-session outcomes (``(test, vm) -> outcome``); columns in
        the order of ``vms``, then any VM only the outcomes name."""
        matrix = cls() if title is None else cls(title=title)
        for vm in vms:
            matrix.add_vm(VmColumn.from_name(vm))
        for (test, vm), outcome in outcomes.items():
            matrix.add(test, VmColumn.from_name(vm), Cell(outcome))
        return matrix

    def add_vm(self, vm: VmColumn) -> None:
        if all(v.name != vm.name for v in self.vms):
            self.vms.append(vm)

    def add(self, test: str, vm: VmColumn, cell: Cell) -> None:
        """Set a cell; a result already there is replaced and remembered in ``cell.previous``."""
        self.add_vm(vm)
        old = self.cells.get((test, vm.name))
        if old is not None:
            cell.previous = [*old.previous, old.outcome]
        self.cells[(test, vm.name)] = cell

    @property
    def vm_names(self) -> list[str]:
        return [vm.name for vm in self.vms]

    def tests(self) -> list[str]:
        """Row names, sorted."""
        return sorted({t for t, _ in self.cells})

    def outcome(self, test: str, vm: str) -> str:
        cell = self.cells.get((test, vm))
        return cell.outcome if cell else NOT_RUN

    def row(self, test: str) -> list[str]:
        return [self.outcome(test, vm) for vm in self.vm_names]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per VM: how many cells of each outcome, ``not-run`` included."""
        table = {vm: dict.fromkeys(CELL_OUTCOMES, 0) for vm in self.vm_names}
        for test in self.tests():
            for vm in self.vm_names:
                table[vm][self.outcome(test, vm)] += 1
        return table

    def totals(self) -> dict[str, int]:
        """All cells: how many of each outcome."""
        total = dict.fromkeys(CELL_OUTCOMES, 0)
        for per_vm in self.counts().values():
            for outcome, n in per_vm.items():
                total[outcome] += n
        return total

    def bad_tests(self) -> list[str]:
        """Tests failed or errored on at least one VM, sorted."""
        return sorted({t for (t, _), c in self.cells.items() if c.outcome in BAD})

    def captures(self) -> list[tuple[str, str, str]]:
        """(test, vm, path) of every cell's captures, by test, then VM in column order."""
        order = {vm: i for i, vm in enumerate(self.vm_names)}
        cells = sorted(
            ((t, vm, c) for (t, vm), c in self.cells.items() if c.captures), key=lambda x: (x[0], order[x[1]])
        )
        return [(t, vm, path) for t, vm, c in cells for path in c.captures]

    def noteworthy(self) -> list[tuple[str, str, Cell]]:
        """(test, vm, cell) for every cell that did not simply pass: failed, error, skipped, or
        ran more than once; failures first, then by test and VM."""
        rank = {"failed": 0, "error": 1, "passed": 2, "skipped": 3}
        order = {vm: i for i, vm in enumerate(self.vm_names)}
        picked = [(t, vm, c) for (t, vm), c in self.cells.items() if c.outcome != "passed" or c.previous]
        return sorted(picked, key=lambda x: (rank.get(x[2].outcome, 4), x[0], order.get(x[1], 0)))


def first_line(text: str | None, limit: int = 300) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    for line in (text or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""
