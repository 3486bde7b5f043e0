"""Stream a saved VM state to stdout, verified: ``python3 -S statecat.py STATE SHA256``.

qemu runs this as its ``-incoming exec:`` source. The file is hashed as it streams, and its
last HOLD bytes (the device state and end-of-stream marker live there, after the RAM) are
written only once the whole file has the expected sha256; otherwise nothing more is written,
the reason goes to stderr (qemu's log) and the exit status is 1, so qemu fails to load a
corrupt or truncated state instead of running it. Costs nothing on the critical path: hashing
overlaps qemu's loading. Standalone on purpose (no package imports: it starts in milliseconds).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque

CHUNK = 1 << 20
HOLD = 8 << 20


def stream(path: str, expected: str, out: int) -> str:
    """Copy ``path`` to file descriptor ``out`` if its sha256 is ``expected``: '' then, else why not."""
    h = hashlib.sha256()
    held: deque[bytes] = deque()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            held.append(chunk)
            size += len(chunk)
            while size - len(held[0]) >= HOLD:
                size -= len(held[0])
                _write_all(out, held.popleft())
    if h.hexdigest() != expected:
        return f"{path}: sha256 {h.hexdigest()} is not the {expected} it was saved with"
    for chunk in held:
        _write_all(out, chunk)
    return ""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: statecat.py STATE SHA256", file=sys.stderr)
        return 2
    try:
        why = stream(argv[1], argv[2], sys.stdout.fileno())
    except OSError as exc:
        why = f"{argv[1]}: {exc}"
    if why:
        print(f"ttenv: refusing the saved VM state: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
