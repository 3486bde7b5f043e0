"""The rule that puts a test in its folder: tests/unit holds the tests that need no VM (marked
neither ``vm`` nor ``slow``), tests/vm only tests marked ``vm`` or ``slow``. tests/conftest.py
applies it to every collected test; a test in the wrong folder fails the collection."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

VM_MARKERS = ("vm", "slow")


def misplaced(items: Iterable[pytest.Item], tests_dir: Path) -> list[str]:
    """One line per test of ``items`` in the wrong folder of ``tests_dir`` (tests elsewhere are not judged)."""
    wrong = []
    for item in items:
        try:
            folder = item.path.relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        marked = [m for m in VM_MARKERS if item.get_closest_marker(m)]
        if folder == "unit" and marked:
            wrong.append(f"{item.nodeid}: marked {'/'.join(marked)} in tests/unit (no VMs there): move it to tests/vm")
        elif folder == "vm" and not marked:
            wrong.append(f"{item.nodeid}: not marked vm or slow in tests/vm: mark it, or move it to tests/unit")
    return wrong
