"""The matrix as GitHub-flavoured Markdown, sized for ``$GITHUB_STEP_SUMMARY``.

Contract: the result is at most ``limit`` bytes of UTF-8 (default 1,000,000; GitHub refuses step
summaries over 1 MiB). Above ``collapse_over`` rows, rows without a failure or error collapse
into one line; if the table still does not fit, the rows that do not fit are left out, saying how
many. ``details=True`` adds each failed/errored cell's message and report in ``<details>``
blocks, as many as fit (each text cut to ``detail_chars``). A cell with VM captures shows 📦 for
each, linked when ``captures.href`` can make a relative link from ``out_dir``; the failure
details name the files.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

from pytest_ttenv.report import captures
from pytest_ttenv.report.model import BAD, CELL_OUTCOMES, Cell, Matrix

LIMIT = 1_000_000
COLLAPSE_OVER = 50
DETAIL_CHARS = 4000
SYMBOL = {"passed": "✅", "failed": "❌", "error": "💥", "skipped": "⏭", "not-run": "➖"}
LABEL = {"passed": "passed", "failed": "failed", "error": "error", "skipped": "skipped", "not-run": "not run"}
LEGEND = " · ".join(f"{SYMBOL[o]} {LABEL[o]}" for o in CELL_OUTCOMES) + " · ↻ ran more than once (last result shown)"
CAPTURE = "📦"
CAPTURE_LEGEND = f"{CAPTURE} the VM captured when the test ended: `ttenv replay FILE` brings it back (docs/ci.md)"


def _code(text: str) -> str:
    """An inline code span safe inside a table cell."""
    text = " ".join(text.split()).replace("|", "\\|")
    ticks = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (ticks + 1)
    return f"{fence} {text} {fence}" if ticks else f"`{text}`"


def _fenced(text: str) -> str:
    fence = "`" * max(3, max((len(m) for m in re.findall(r"`{3,}", text)), default=0) + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _size(parts: list[str]) -> int:
    return sum(len(p.encode()) + 1 for p in parts)


def summary_line(matrix: Matrix, symbols: Mapping[str, str] = SYMBOL) -> str:
    """The bold totals line: tests, VMs, and each outcome that occurs with its count."""
    totals = matrix.totals()
    counts = " · ".join(f"{symbols[o]} {totals[o]} {LABEL[o]}" for o in CELL_OUTCOMES if totals[o])
    line = f"**{len(matrix.tests())} tests × {len(matrix.vms)} VMs** — {counts or 'no results'}"
    other = sum(matrix.other.values())
    if other:
        line += f" · {other} test case(s) ran on no VM ({matrix.other['failed'] + matrix.other['error']} failed)"
    return line


def _mark(cell: Cell | None, out_dir: str | None) -> str:
    """A table cell: the outcome's symbol, ↻ for a rerun, 📦 per capture (a link if possible)."""
    if cell is None:
        return SYMBOL["not-run"]
    mark = SYMBOL[cell.outcome] + ("↻" if cell.previous else "")
    for path in cell.captures:
        link = captures.href(path, out_dir)
        mark += f" [{CAPTURE}]({link})" if link else f" {CAPTURE}"
    return mark


def markdown(
    matrix: Matrix,
    details: bool = False,
    limit: int = LIMIT,
    collapse_over: int = COLLAPSE_OVER,
    detail_chars: int = DETAIL_CHARS,
    out_dir: str | None = None,
) -> str:
    """The report: title, totals, per-VM totals, the matrix, a legend, optionally the failures.
    ``out_dir``: where the Markdown goes (None: the current directory), for links to captures."""
    head = [f"## {html.escape(matrix.title, quote=False)}", "", summary_line(matrix), ""]
    head.append("| VM | OS | arch | " + " | ".join(SYMBOL[o] for o in CELL_OUTCOMES) + " |")
    head.append("| --- | --- | --- |" + " ---: |" * len(CELL_OUTCOMES))
    per_vm = matrix.counts()
    for vm in matrix.vms:
        c = per_vm[vm.name]
        head.append(
            f"| {_code(vm.name)} | {vm.os} | {vm.arch} | " + " | ".join(str(c[o]) for o in CELL_OUTCOMES) + " |"
        )
    head.append("")

    tests = matrix.tests()
    bad = set(matrix.bad_tests())
    shown = tests if len(tests) <= collapse_over else [t for t in tests if t in bad]
    collapsed = len(tests) - len(shown)
    tail = ["", LEGEND + (f"<br>{CAPTURE_LEGEND}" if matrix.captures() else ""), ""]
    if matrix.sources:
        tail.append(f"<sub>{len(matrix.sources)} JUnit file(s) merged by <code>ttenv report</code></sub>")
    reserve = _size(tail) + 400  # the notes below

    body = [
        "| test | " + " | ".join(_code(v) for v in matrix.vm_names) + " |",
        "| --- |" + " :---: |" * len(matrix.vms),
    ]
    left_out = 0
    used = _size(head) + _size(body)
    for i, test in enumerate(shown):
        row = f"| {_code(test)} | " + " | ".join(_mark(matrix.cells.get((test, vm)), out_dir) for vm in matrix.vm_names)
        row += " |"
        if used + len(row.encode()) + 1 > limit - reserve:
            left_out = len(shown) - i
            break
        body.append(row)
        used += len(row.encode()) + 1
    if not tests:
        body = ["_No VM test results._"]
    if collapsed:
        body.append("")
        body.append(
            f"_{collapsed} of {len(tests)} tests passed, were skipped or did not run on every VM: their rows "
            "are collapsed (the HTML and JSON reports have every row)._"
        )
    if left_out:
        body.append("")
        body.append(
            f"_{left_out} more rows left out to stay under the step-summary size limit; see the HTML or JSON report._"
        )
    out = head + body
    if details:
        out += _details(matrix, limit - _size(out) - _size(tail) - 200, detail_chars, out_dir)
    return "\n".join(out + tail) + "\n"


def capture_html(cell: Cell, out_dir: str | None, symbol: str = CAPTURE) -> str:
    """The ``<p>`` naming a cell's captures (links where possible), or ``""``; escaped HTML."""
    items = []
    for path in cell.captures:
        name = f"<code>{html.escape(captures.label(path))}</code>"
        link = captures.href(path, out_dir)
        items.append(f'<a href="{html.escape(link)}">{name}</a>' if link else name)
    return f'<p class="capture">{symbol + " " if symbol else ""}VM capture: {", ".join(items)}</p>' if items else ""


def _details(matrix: Matrix, budget: int, detail_chars: int, out_dir: str | None) -> list[str]:
    failing = [(t, vm, c) for t, vm, c in matrix.noteworthy() if c.outcome in BAD]
    if not failing:
        return []
    lines = ["", "### Failures", ""]
    used = _size(lines)
    for i, (test, vm, cell) in enumerate(failing):
        text = cell.text or cell.message or "(no message)"
        if len(text) > detail_chars:
            text = text[:detail_chars] + f"\n… ({len(cell.text) - detail_chars} more characters in the HTML report)"
        summary = f"{SYMBOL[cell.outcome]} <code>{html.escape(test)}</code> on <code>{html.escape(vm)}</code>"
        if cell.message:
            summary += f": {html.escape(cell.message)}"
        block = ["<details>", f"<summary>{summary}</summary>", "", _fenced(text), "", "</details>", ""]
        if cell.captures:
            block[2:2] = ["", capture_html(cell, out_dir)]
        if used + _size(block) > budget:
            lines.append(f"_{len(failing) - i} more failure details left out to stay under the size limit._")
            break
        lines += block
        used += _size(block)
    return lines
