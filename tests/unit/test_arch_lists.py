"""Every list of guest arches outside ``core.naming`` names the same seven as ``ARCHES``: the
capture format, the matrix format, the help of every ``--arch`` option and the reference page."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

from pytest_ttenv.cli import env, image
from pytest_ttenv.config import SETTINGS
from pytest_ttenv.core.capture_manifest import schema as capture_schema
from pytest_ttenv.core.naming import ARCHES
from pytest_ttenv.report.render_json import SCHEMA_PATH as MATRIX_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
ARCH_LIST = ", ".join(ARCHES)


def test_capture_format_knows_every_arch() -> None:
    vm = capture_schema()["properties"]["vm"]["properties"]
    assert vm["arch"]["enum"] == list(ARCHES)
    pattern = vm["image"]["properties"]["name"]["pattern"]
    assert pattern.endswith(f"-({'|'.join(ARCHES)})$")
    assert all(re.match(pattern, f"debian-12-{arch}") for arch in ARCHES)
    assert not re.match(pattern, "debian-12-ppc64el")  # a capture holds canonical names only


def test_matrix_format_names_every_arch() -> None:
    vm = json.loads(MATRIX_SCHEMA.read_text())["properties"]["vms"]["items"]["properties"]
    assert ARCH_LIST in vm["arch"]["description"]


def _arch_help(add_arguments: Callable[[argparse.ArgumentParser], None], *command: str) -> str:
    """The help of ``--arch`` of the CLI noun ``add_arguments`` sets up, under its ``command``."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sub = parser
    for name in command:
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = action.choices[name]
    return next(a.help for a in sub._actions if "--arch" in a.option_strings) or ""


def test_every_arch_option_lists_the_seven() -> None:
    helps = {
        "ttenv image pull": _arch_help(image.add_arguments, "pull"),
        "ttenv image build": _arch_help(image.add_arguments, "build"),
        "ttenv env add": _arch_help(env.add_arguments, "add"),
        "--tt-arch": next(s.help for s in SETTINGS if s.name == "arch"),
    }
    for where, text in helps.items():
        assert ARCH_LIST in text, where
    reference = (ROOT / "docs" / "reference.md").read_text()
    row = next(line for line in reference.splitlines() if line.startswith("| `--tt-arch` |"))
    assert row.split(" | ")[-1] == helps["--tt-arch"] + ". |"
    assert ", ".join(f"`{a}`" for a in ARCHES) in reference
