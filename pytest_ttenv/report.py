"""The compatibility matrix: test outcomes per VM, rendered for the terminal, JSON and Markdown.

Outcomes are ``passed``, ``failed``, ``error`` (setup/teardown failed) and ``skipped``; a test
that ran on a VM several times (reruns) keeps its worst outcome.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

OUTCOMES = ("passed", "failed", "error", "skipped")
Outcomes = Mapping[tuple[str, str], str]


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


def counts(outcomes: Outcomes, vms: Sequence[str]) -> dict[str, dict[str, int]]:
    table = {vm: dict.fromkeys(OUTCOMES, 0) for vm in vms}
    for (_, vm), outcome in outcomes.items():
        table.setdefault(vm, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
    return table


def summary_lines(outcomes: Outcomes, vms: Sequence[str]) -> list[str]:
    """Per-VM counts, then the tests that did not pass everywhere."""
    table = counts(outcomes, vms)
    width = max([len(v) for v in table] + [2])
    lines = [f"{'VM':<{width}}  " + "  ".join(f"{o:>7}" for o in OUTCOMES)]
    lines += [f"{vm:<{width}}  " + "  ".join(f"{c[o]:>7}" for o in OUTCOMES) for vm, c in table.items()]
    bad = sorted({t for (t, _), o in outcomes.items() if o in ("failed", "error")})
    for test in bad:
        where = ", ".join(f"{vm} {o}" for (t, vm), o in sorted(outcomes.items()) if t == test and o != "passed")
        lines.append(f"  {test}: {where}")
    return lines


def to_json(outcomes: Outcomes, vms: Sequence[str]) -> dict[str, object]:
    tests = sorted({t for t, _ in outcomes})
    return {
        "vms": list(vms),
        "tests": {t: {vm: outcomes.get((t, vm), "") for vm in vms} for t in tests},
        "counts": counts(outcomes, vms),
    }


def to_markdown(outcomes: Outcomes, vms: Sequence[str]) -> str:
    mark = {"passed": "✅ pass", "failed": "❌ fail", "error": "💥 error", "skipped": "⏭ skip", "": "—"}
    tests = sorted({t for t, _ in outcomes})
    lines = ["| test | " + " | ".join(vms) + " |", "| --- |" + " --- |" * len(vms)]
    lines += [f"| `{t}` | " + " | ".join(mark[outcomes.get((t, vm), "")] for vm in vms) + " |" for t in tests]
    return "\n".join(lines) + "\n"


def write_matrix(path: str, outcomes: Outcomes, vms: Sequence[str]) -> None:
    """Write the matrix to ``path``: JSON for ``.json``, Markdown for ``.md``, else the summary text."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix == ".json":
        dest.write_text(json.dumps(to_json(outcomes, vms), indent=2) + "\n")
    elif dest.suffix == ".md":
        dest.write_text(to_markdown(outcomes, vms))
    else:
        dest.write_text("\n".join(summary_lines(outcomes, vms)) + "\n")
