"""How ``ttenv`` writes: one line to stdout, flushed (progress interleaves with subprocesses and
stderr in order); timestamps as local time to the minute."""

from __future__ import annotations

import time


def out(line: str) -> None:
    print(line, flush=True)


def when(ts: float) -> str:
    """A timestamp as the CLI shows it: local time to the minute."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
