"""The matrix as a JSON document; its schema is ``matrix.schema.json`` next to this module (draft
2020-12, documented in docs/reports.md). ``version`` changes only when a key changes meaning."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pytest_ttenv.report.model import Matrix

FORMAT = "pytest-ttenv-matrix"
VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("matrix.schema.json")


def json_document(matrix: Matrix) -> dict[str, Any]:
    """Every cell's outcome (``not-run`` explicit), per-VM and overall counts, the details
    (message, text, duration, earlier outcomes) of every cell that did not simply pass, and every
    cell's VM captures (paths as the JUnit files recorded them)."""
    names = matrix.vm_names
    return {
        "format": FORMAT,
        "version": VERSION,
        "title": matrix.title,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": list(matrix.sources),
        "vms": [{"name": vm.name, "os": vm.os, "arch": vm.arch} for vm in matrix.vms],
        "tests": {t: dict(zip(names, matrix.row(t), strict=True)) for t in matrix.tests()},
        "counts": matrix.counts(),
        "totals": matrix.totals(),
        "details": [
            {
                "test": test,
                "vm": vm,
                "outcome": cell.outcome,
                "message": cell.message,
                "text": cell.text,
                "duration": cell.duration,
                "source": cell.source,
                "previous": list(cell.previous),
            }
            for test, vm, cell in matrix.noteworthy()
        ],
        "other": dict(matrix.other),
        "captures": [{"test": test, "vm": vm, "path": path} for test, vm, path in matrix.captures()],
    }


def schema() -> dict[str, Any]:
    """The JSON Schema the documents of ``json_document`` follow."""
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return loaded


def render(matrix: Matrix) -> str:
    return json.dumps(json_document(matrix), indent=2, ensure_ascii=False) + "\n"
