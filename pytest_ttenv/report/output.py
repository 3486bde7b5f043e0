"""Writing a matrix to files, by format or by suffix."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pytest_ttenv.errors import from_os_error
from pytest_ttenv.report import render_html, render_json, render_md, render_text
from pytest_ttenv.report.model import Matrix


def render(fmt: str, matrix: Matrix, details: bool = False, out_dir: str | None = None) -> str:
    """``fmt`` is ``md``, ``html``, ``json`` or ``text``; ``out_dir`` is where the result goes
    (None: the current directory), for the relative links to captures."""
    if fmt == "md":
        return render_md.markdown(matrix, details=details, out_dir=out_dir)
    if fmt == "html":
        return render_html.html_page(matrix, out_dir=out_dir)
    if fmt == "json":
        return render_json.render(matrix)
    return "\n".join(render_text.text_lines(matrix)) + "\n"


def format_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return {".json": "json", ".md": "md", ".html": "html", ".htm": "html"}.get(suffix, "text")


def out_dir(path: str) -> str | None:
    """The directory the output ``path`` lands in; None for stdout (``-``)."""
    return None if path == "-" else os.path.dirname(path) or os.curdir


def write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (``-``: stdout), creating parent directories. An OS error
    becomes one TTError line."""
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise from_os_error(exc, f"write the report to {path}") from None


def write_report(path: str, matrix: Matrix, fmt: str | None = None, details: bool = False) -> None:
    """Render ``matrix`` in ``fmt`` (default: by ``path``'s suffix) and write it to ``path``."""
    write(path, render(fmt or format_for(path), matrix, details, out_dir(path)))
