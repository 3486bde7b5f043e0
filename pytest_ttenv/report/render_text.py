"""The matrix as terminal lines: per-VM counts, then where each failing test failed."""

from __future__ import annotations

from pytest_ttenv.report.model import BAD, OUTCOMES, Matrix


def text_lines(matrix: Matrix) -> list[str]:
    """A header and one line of counts per VM, then ``  test: vm failed, vm error`` per test that
    failed or errored somewhere (its other non-passing cells named too)."""
    table = matrix.counts()
    width = max([len(v) for v in table] + [2])
    lines = [f"{'VM':<{width}}  " + "  ".join(f"{o:>7}" for o in OUTCOMES)]
    lines += [f"{vm:<{width}}  " + "  ".join(f"{c[o]:>7}" for o in OUTCOMES) for vm, c in table.items()]
    for test in matrix.bad_tests():
        where = [f"{vm} {o}" for vm, o in zip(matrix.vm_names, matrix.row(test), strict=True) if o in (*BAD, "skipped")]
        lines.append(f"  {test}: {', '.join(where)}")
    return lines
