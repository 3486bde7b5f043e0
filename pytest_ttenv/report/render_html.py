"""The matrix as one self-contained HTML page: inline CSS, no scripts, no external resources.

Structure (tests rely on it): ``table#totals`` (one row per VM), ``table#matrix`` with a header
cell per VM (``th[data-vm]``), one ``tr[data-test]`` per test whose cells are
``td.cell.<outcome>[data-vm][data-outcome]``, a ``tfoot`` of per-VM totals, and
``section#failures`` with one ``details#d-N`` per failed/errored cell (linked from the cell).
A cell with VM captures holds an ``a.capture`` per capture (``span.capture`` where no relative
link from ``out_dir`` is possible, see ``captures.href``), and its failure details a
``p.capture`` naming the files. A CSS-only checkbox hides the rows without failures.
"""

from __future__ import annotations

import html
import time

from pytest_ttenv.report import captures
from pytest_ttenv.report.model import BAD, CELL_OUTCOMES, Matrix
from pytest_ttenv.report.render_md import LABEL, capture_html, summary_line

# plain symbols every common font has (no emoji font needed); the words and colours say it too
SYMBOL = {"passed": "✓", "failed": "✗", "error": "⚠", "skipped": "↷", "not-run": "–"}
CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1f2328;background:#fff}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.5em 0 .5em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #d0d7de;padding:.25em .6em}
thead th{position:sticky;top:0;background:#f6f8fa}th[scope=row]{text-align:left;font-weight:normal}
td.cell{text-align:center;white-space:nowrap}td.num{text-align:right}
.passed{background:#dafbe1}.failed{background:#ffebe9}.error{background:#ffd8b5}
.skipped{background:#fff8c5}.not-run{background:#f6f8fa;color:#8c959f}
td.cell a{color:inherit;text-decoration:none;display:block}
td.cell .capture{font-size:.8em;display:block}td.cell a.capture{text-decoration:underline}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
details{border:1px solid #d0d7de;border-radius:6px;margin:.4em 0;padding:.3em .6em}
details:target{outline:2px solid #cf222e}summary{cursor:pointer}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:.6em;overflow:auto}
.meta{color:#59636e;font-size:.9em}
body:has(#only-bad:checked) #matrix tbody tr.ok{display:none}
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _cell(matrix: Matrix, test: str, vm: str, anchors: dict[tuple[str, str], str], out_dir: str | None) -> str:
    cell = matrix.cells.get((test, vm))
    outcome = cell.outcome if cell else "not-run"
    label = f"{SYMBOL[outcome]} {LABEL[outcome]}" + (" ↻" if cell and cell.previous else "")
    tip = []
    if cell and cell.message:
        tip.append(cell.message)
    if cell and cell.previous:
        tip.append("earlier: " + ", ".join(cell.previous))
    if cell and cell.duration is not None:
        tip.append(f"{cell.duration:.2f} s")
    title = f' title="{_e(" | ".join(tip))}"' if tip else ""
    inner = f'<a href="#{anchors[(test, vm)]}">{_e(label)}</a>' if (test, vm) in anchors else _e(label)
    for path in cell.captures if cell else []:
        link, name = captures.href(path, out_dir), _e(f"VM capture: {captures.label(path)}")
        inner += (
            f'<a class="capture" href="{_e(link)}" title="{name}">capture</a>'
            if link
            else f'<span class="capture" title="{name}">capture</span>'
        )
    return f'<td class="cell {outcome}" data-vm="{_e(vm)}" data-outcome="{outcome}"{title}>{inner}</td>'


def html_page(matrix: Matrix, out_dir: str | None = None) -> str:
    """The whole page as a string (UTF-8 when written); ``out_dir``: where it goes (None: the
    current directory), for links to captures."""
    names = matrix.vm_names
    failing = [(t, vm, c) for t, vm, c in matrix.noteworthy() if c.outcome in BAD]
    anchors = {(t, vm): f"d-{i}" for i, (t, vm, _) in enumerate(failing, 1)}
    per_vm = matrix.counts()
    bad_tests = set(matrix.bad_tests())
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(matrix.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(matrix.title)}</h1>",
        f'<p id="summary">{_e(summary_line(matrix, SYMBOL).replace("**", ""))}</p>',
        '<table id="totals"><thead><tr><th>VM</th><th>OS</th><th>arch</th>'
        + "".join(f'<th class="{o}">{_e(SYMBOL[o] + " " + LABEL[o])}</th>' for o in CELL_OUTCOMES)
        + "</tr></thead><tbody>",
    ]
    for col in matrix.vms:
        nums = "".join(f'<td class="num" data-outcome="{o}">{per_vm[col.name][o]}</td>' for o in CELL_OUTCOMES)
        out.append(
            f'<tr data-vm="{_e(col.name)}"><th scope="row"><code>{_e(col.name)}</code></th>'
            f"<td>{_e(col.os)}</td><td>{_e(col.arch)}</td>{nums}</tr>"
        )
    out.append("</tbody></table>")
    out.append(
        '<h2>Matrix</h2><p><label><input type="checkbox" id="only-bad"> only tests that failed somewhere '
        f"({len(bad_tests)})</label></p>"
    )
    heads = "".join(f'<th data-vm="{_e(name)}"><code>{_e(name)}</code></th>' for name in names)
    out.append(f'<table id="matrix"><thead><tr><th>test</th>{heads}</tr></thead><tbody>')
    for test in matrix.tests():
        cls = "bad" if test in bad_tests else "ok"
        cells = "".join(_cell(matrix, test, name, anchors, out_dir) for name in names)
        out.append(f'<tr class="{cls}" data-test="{_e(test)}"><th scope="row"><code>{_e(test)}</code></th>{cells}</tr>')
    out.append("</tbody><tfoot><tr><th>totals</th>")
    for name in names:
        c = per_vm[name]
        sums = " ".join(f"{SYMBOL[o]}&nbsp;{c[o]}" for o in CELL_OUTCOMES if c[o])
        out.append(f'<td class="cell" data-vm="{_e(name)}">{sums}</td>')
    out.append("</tr></tfoot></table>")
    out.append(f'<section id="failures"><h2>Failures ({len(failing)})</h2>')
    for test, vm, cell in failing:
        summary = f"{SYMBOL[cell.outcome]} <code>{_e(test)}</code> on <code>{_e(vm)}</code>"
        if cell.message:
            summary += f": {_e(cell.message)}"
        where = f'<p class="meta">from {_e(cell.source)}</p>' if cell.source else ""
        out.append(
            f'<details id="{anchors[(test, vm)]}" class="{cell.outcome}" data-test="{_e(test)}" '
            f'data-vm="{_e(vm)}"><summary>{summary}</summary>{where}{capture_html(cell, out_dir, "")}'
            f"<pre>{_e(cell.text or cell.message or '(no message)')}</pre></details>"
        )
    if not failing:
        out.append("<p>None.</p>")
    out.append("</section>")
    sources = "".join(f"<li><code>{_e(s)}</code></li>" for s in matrix.sources)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out.append(
        f'<footer class="meta"><p>Generated {when} by <code>ttenv report</code>.</p>'
        + (f"<ul>{sources}</ul>" if sources else "")
        + "</footer>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
