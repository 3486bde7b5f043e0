"""Owner records: which process an ENV belongs to, robust against pid reuse.

A process is identified by (pid, start time in clock ticks since boot, from
``/proc/<pid>/stat`` field 22); a new process that reuses the pid has another start time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3


def is_alive(pid: int | None, started: int | None) -> bool:
    """True if the process (pid, start time) still exists and is not a zombie."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def current() -> dict[str, int | None]:
    """This process as an owner record (``{"pid": ..., "start": ...}``, for ``is_alive``)."""
    return {"pid": os.getpid(), "start": start_time(os.getpid())}


def record_alive(path: Path) -> bool | None:
    """Whether the process recorded in the owner file ``path`` still runs; None if the file is
    missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        pid, started = data["pid"], data["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(pid, int) or not (started is None or isinstance(started, int)):
        return None
    return is_alive(pid, started)
