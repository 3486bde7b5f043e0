"""``ttenv report``: merge JUnit files into the matrix and write it as Markdown, HTML, JSON."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pytest_ttenv.report.junit import read_junit
from pytest_ttenv.report.output import out_dir, render, write
from pytest_ttenv.report.render_text import text_lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("junit", nargs="+", metavar="JUNIT", help="JUnit XML files, directories or globs ('junit/**/*.xml')")
    p.add_argument("--md", metavar="PATH", help="Markdown (fits $GITHUB_STEP_SUMMARY); - for stdout")
    p.add_argument("--html", metavar="PATH", help="one self-contained HTML page")
    p.add_argument("--json", metavar="PATH", help="JSON (schema: pytest_ttenv/report/matrix.schema.json)")
    p.add_argument("--title", help="report title (default: ttenv compatibility matrix)")
    p.add_argument("--details", action="store_true", help="Markdown: add failure messages and tracebacks")


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> int:
    """Read, merge, write. Bad input raises ReportError (one line, exit 2); 0 otherwise, whatever
    the tests' outcomes (the test jobs report those)."""
    matrix = read_junit(args.junit, args.title)
    targets = [(fmt, path) for fmt, path in (("md", args.md), ("html", args.html), ("json", args.json)) if path]
    for fmt, path in targets:
        write(path, render(fmt, matrix, details=args.details, out_dir=out_dir(path)))
    if any(path == "-" for _, path in targets):
        return 0
    for line in text_lines(matrix):
        say(line)
    other = sum(matrix.other.values())
    captured = len(matrix.captures())
    written = ", ".join(path for _, path in targets) or "nothing (give --md, --html or --json)"
    say(
        f"{len(matrix.sources)} JUnit file(s), {len(matrix.tests())} tests x {len(matrix.vms)} VMs"
        + (f", {other} test case(s) on no VM left out" if other else "")
        + (f", {captured} VM capture(s)" if captured else "")
        + f"; wrote {written}"
    )
    return 0
