"""Console text: what ttenv shows of a VM's serial console (or qemu's own log), and how logs
are kept bounded.

Every console tail goes through ``clean_text``: the guest writes its console, and the code under
test is hostile. Tails read only the end of a log (``TAIL_BYTES``); ``cap_log`` rotates a log
that grew past ``LOG_MAX`` while its writer goes on.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from pytest_ttenv.core.paths import write_private

TAIL_BYTES = 64 * 1024  # a console tail reads at most this much of the end of a log
LOG_MAX = 4 * 2**20  # a console log (or qemu's own log) longer than this is rotated ...
LOG_KEEP = 1 * 2**20  # ... keeping its last MiB in <log>.1, then truncated (see cap_log)
# Terminal escape sequences: CSI (ESC [ or 8-bit CSI ... final byte); the string sequences OSC
# (ESC ], e.g. OSC 52 clipboard writes, OSC 8 links), DCS (ESC P), SOS (ESC X), PM (ESC ^), APC
# (ESC _) up to their terminator (BEL or ST) or the end of the line; any other ESC sequence.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1


def clean_text(text: str) -> str:
    """``text`` safe to print on a terminal: escape sequences removed whole, then every control
    character but newline and tab (CR, BEL, backspace, DEL, C1). Every console tail ttenv shows
    goes through this: the guest writes its console, and the code under test is hostile."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def tail_text(data: bytes, lines: int) -> str:
    """The last ``lines`` lines of console output, made safe to print (``clean_text``)."""
    text = clean_text(data.decode(errors="replace"))
    return "\n".join(text.splitlines()[-lines:])


def _read_end(path: Path, max_bytes: int) -> bytes:
    """At most the last ``max_bytes`` of ``path`` (b'' if unreadable): seeks, never reads it all."""
    if max_bytes <= 0:
        return b""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - max_bytes))
            return f.read(max_bytes)
    except OSError:
        return b""


def rotated(path: Path) -> Path:
    """Where ``cap_log`` keeps the end of ``path`` before truncating it."""
    return path.with_name(path.name + ".1")


def tail_file(path: Path, lines: int, max_bytes: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of a log file (with the end of its rotated part, ``<log>.1``, in
    front when the log itself is short), made safe to print; '' if absent. Reads at most
    ``max_bytes`` in all."""
    data = _read_end(path, max_bytes)
    if data.count(b"\n") < lines and len(data) < max_bytes:
        data = _read_end(rotated(path), max_bytes - len(data)) + data
    return tail_text(data, lines)


def cap_log(path: Path, limit: int = LOG_MAX, keep: int = LOG_KEEP) -> bool:
    """If the log ``path`` is longer than ``limit``: its last ``keep`` bytes into ``<log>.1``
    (replaced), then ``path`` truncated to nothing; returns whether it did. The writer (qemu, a
    file chardev with ``append=on``; qemu's stderr, opened O_APPEND) goes on at the new end. What is
    written between the copy and the truncation is lost: a few lines at worst."""
    try:
        if os.stat(path).st_size <= limit:
            return False
    except OSError:
        return False
    old = rotated(path)
    tmp = old.with_name(f"{old.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    write_private(tmp, _read_end(path, keep))
    os.replace(tmp, old)
    os.truncate(path, 0)
    return True
