"""VM captures in the matrix: the ``.ttcap`` files a test's JUnit ``tt_capture`` properties name.

Property values are untrusted text from a file. ``accept`` keeps only values that look like a
capture's path (1 to ``MAX_CHARS`` characters, no control characters, ending in ``.ttcap``), each
once, at most ``MAX_PER_CASE`` per test case. Nothing here touches the file system: paths are
joined and compared as text, never opened, resolved or checked for existence.

A relative value is relative to pytest's rootdir, which ``ttenv report`` takes to be its current
directory (the CI templates run pytest and the report from the checkout). ``href`` is a relative,
percent-encoded link from the report's directory, or None when the capture or the report lies
outside the current directory (such a link, e.g. from ``$GITHUB_STEP_SUMMARY``, points nowhere).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from urllib.parse import quote

PROPERTY = "tt_capture"
SUFFIX = ".ttcap"
MAX_CHARS = 1024
MAX_PER_CASE = 16
LABEL_CHARS = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def accept(values: Iterable[str]) -> list[str]:
    """The values that may name a capture, in order, each once, at most ``MAX_PER_CASE``."""
    out: list[str] = []
    for value in values:
        if len(out) == MAX_PER_CASE:
            break
        if 0 < len(value) <= MAX_CHARS and value.endswith(SUFFIX) and not _CONTROL.search(value) and value not in out:
            out.append(value)
    return out


def assign(captures: Sequence[str], vms: Sequence[str]) -> dict[str, list[str]]:
    """VM -> its captures, for one test case on ``vms``: a capture whose file name ends in
    ``--<vm>.ttcap`` for one of them goes to that VM, any other to every VM of the case."""
    out: dict[str, list[str]] = {vm: [] for vm in vms}
    for capture in captures:
        name = label(capture, limit=MAX_CHARS)
        owners = [vm for vm in vms if name.endswith(f"--{vm}{SUFFIX}")] or list(vms)
        for vm in owners:
            out[vm].append(capture)
    return out


def label(capture: str, limit: int = LABEL_CHARS) -> str:
    """The capture's file name (what its CI artifact holds), cut to ``limit`` characters."""
    name = capture.replace("\\", "/").rsplit("/", 1)[-1] or capture
    return name if len(name) <= limit else name[: limit - 1] + "…"


def href(capture: str, out_dir: str | None = None, root: str | None = None) -> str | None:
    """A relative link to ``capture`` from the directory ``out_dir`` (None: ``root``, as for
    stdout), both taken relative to ``root`` (default: the current directory); None when either
    lies outside ``root``. Percent-encoded: no scheme, quote, bracket or space survives."""
    top = os.path.abspath(root if root is not None else os.curdir)
    target = os.path.normpath(os.path.join(top, capture))
    base = os.path.normpath(os.path.join(top, out_dir)) if out_dir else top
    if not (_inside(target, top) and _inside(base, top)):
        return None
    return quote(os.path.relpath(target, base).replace(os.sep, "/"), safe="/")


def _inside(path: str, top: str) -> bool:
    return os.path.commonpath([path, top]) == top
