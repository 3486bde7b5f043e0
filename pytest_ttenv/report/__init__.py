"""The compatibility matrix (tests x VMs): one model (``model``), read from the plugin's
in-session outcomes or merged JUnit files (``junit``), rendered as text, Markdown, HTML and JSON
(``render_*``). The functions below are the plugin's in-session API."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_ttenv.report.model import OUTCOMES, Matrix, Outcomes, outcome_of, test_key, vm_properties
from pytest_ttenv.report.output import write_report
from pytest_ttenv.report.render_json import json_document
from pytest_ttenv.report.render_md import markdown
from pytest_ttenv.report.render_text import text_lines

__all__ = [
    "OUTCOMES",
    "Matrix",
    "outcome_of",
    "summary_lines",
    "test_key",
    "to_json",
    "to_markdown",
    "vm_properties",
    "write_matrix",
]


def summary_lines(outcomes: Outcomes, vms: Sequence[str]) -> list[str]:
    """Per-VM counts, then the tests that did not pass everywhere."""
    return text_lines(Matrix.from_outcomes(outcomes, vms))


def to_json(outcomes: Outcomes, vms: Sequence[str]) -> dict[str, object]:
    """The in-session matrix as a JSON document (schema ``matrix.schema.json``)."""
    return json_document(Matrix.from_outcomes(outcomes, vms))


def to_markdown(outcomes: Outcomes, vms: Sequence[str]) -> str:
    return markdown(Matrix.from_outcomes(outcomes, vms))


def write_matrix(path: str, outcomes: Outcomes, vms: Sequence[str]) -> None:
    """Write the in-session matrix to ``path``: JSON for ``.json``, Markdown for ``.md``, HTML for
    ``.html``, else the summary text."""
    write_report(path, Matrix.from_outcomes(outcomes, vms))
